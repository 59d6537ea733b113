"""Box geometry for Mask R-CNN: anchors, IoU, delta encoding and decoding.

Boxes are pixel `yxyx` (`y1, x1, y2, x2`) float32 everywhere in the package. Box deltas follow
the Faster R-CNN parameterisation `(dy, dx, dh, dw)` = weights * (centre shift / anchor size,
log size ratio), as in torchvision and the seed.
"""
import math

import tensorflow as tf

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
RCNN_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Largest log size ratio a decoded delta may have
# (torchvision's bound: boxes at most 62x an anchor).
MAX_LOG_SCALE = math.log(1000.0 / 16.0)


def generate_anchors(image_height, image_width, strides, sizes, aspect_ratios):
    """Anchors of every FPN level for an image (padded to a multiple of the largest stride).

    Args:
        image_height, image_width: int or scalar int32 tensor, padded image size in pixels.
        strides: tuple of ints, one per level (e.g. (4, 8, 16, 32, 64)).
        sizes: tuple of anchor sides in pixels, one per level (e.g. (32, 64, 128, 256, 512)).
        aspect_ratios: tuple of height / width ratios shared by every level.

    Returns:
        float32 (A, 4) pixel yxyx; level-major, then row, column, aspect ratio — the order in
        which `RPNHead` outputs are flattened. Anchor centres sit at `(i + 0.5) * stride`.
    """
    ratios = tf.constant(aspect_ratios, tf.float32)
    anchors = []
    for stride, size in zip(strides, sizes, strict=True):
        # A ratio r = h / w keeps the area size**2.
        half_h = size * tf.sqrt(ratios) / 2.0
        half_w = size / tf.sqrt(ratios) / 2.0
        rows = tf.cast(tf.math.floordiv(image_height + stride - 1, stride), tf.float32)
        cols = tf.cast(tf.math.floordiv(image_width + stride - 1, stride), tf.float32)
        cy = (tf.range(rows) + 0.5) * stride
        cx = (tf.range(cols) + 0.5) * stride
        cy, cx = tf.meshgrid(cy, cx, indexing="ij")
        cy = cy[:, :, None]
        cx = cx[:, :, None]
        level = tf.stack([cy - half_h, cx - half_w, cy + half_h, cx + half_w], axis=-1)
        anchors.append(tf.reshape(level, (-1, 4)))
    return tf.concat(anchors, axis=0)


def box_area(boxes):
    """Area of yxyx boxes (..., 4) -> (...,), zero for degenerate boxes."""
    return tf.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * tf.maximum(
        boxes[..., 3] - boxes[..., 1], 0.0
    )


def box_iou(boxes_a, boxes_b):
    """Pairwise IoU.

    Args:
        boxes_a: float32 (..., M, 4) yxyx.
        boxes_b: float32 (..., N, 4) yxyx, same leading dims as `boxes_a` (or broadcastable).

    Returns:
        float32 (..., M, N); 0 where a union is empty.
    """
    a = boxes_a[..., :, None, :]
    b = boxes_b[..., None, :, :]
    top = tf.maximum(a[..., 0], b[..., 0])
    left = tf.maximum(a[..., 1], b[..., 1])
    bottom = tf.minimum(a[..., 2], b[..., 2])
    right = tf.minimum(a[..., 3], b[..., 3])
    intersection = tf.maximum(bottom - top, 0.0) * tf.maximum(right - left, 0.0)
    union = box_area(a) + box_area(b) - intersection
    return tf.math.divide_no_nan(intersection, union)


def _centre_size(boxes):
    height = boxes[..., 2] - boxes[..., 0]
    width = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * height, boxes[..., 1] + 0.5 * width, height, width


def encode_boxes(boxes, anchors, weights):
    """Deltas that move `anchors` onto `boxes` (both (..., 4) yxyx) -> float32 (..., 4)."""
    cy, cx, h, w = _centre_size(boxes)
    acy, acx, ah, aw = _centre_size(anchors)
    # Degenerate (padding) pairs are masked out by the losses; keep them finite.
    ah = tf.maximum(ah, 1e-6)
    aw = tf.maximum(aw, 1e-6)
    h = tf.maximum(h, 1e-6)
    w = tf.maximum(w, 1e-6)
    wy, wx, wh, ww = weights
    return tf.stack(
        [wy * (cy - acy) / ah, wx * (cx - acx) / aw,
         wh * tf.math.log(h / ah), ww * tf.math.log(w / aw)],
        axis=-1,
    )


def decode_boxes(deltas, anchors, weights):
    """Inverse of `encode_boxes`: apply deltas (..., 4) to anchors (..., 4) -> yxyx (..., 4)."""
    acy, acx, ah, aw = _centre_size(anchors)
    wy, wx, wh, ww = weights
    dy = deltas[..., 0] / wy
    dx = deltas[..., 1] / wx
    dh = tf.minimum(deltas[..., 2] / wh, MAX_LOG_SCALE)
    dw = tf.minimum(deltas[..., 3] / ww, MAX_LOG_SCALE)
    cy = acy + dy * ah
    cx = acx + dx * aw
    h = ah * tf.exp(dh)
    w = aw * tf.exp(dw)
    return tf.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)


def clip_boxes(boxes, height, width):
    """Clip yxyx boxes (..., 4) to the image [0, height] x [0, width]."""
    height = tf.cast(height, boxes.dtype)
    width = tf.cast(width, boxes.dtype)
    y1 = tf.clip_by_value(boxes[..., 0], 0.0, height)
    x1 = tf.clip_by_value(boxes[..., 1], 0.0, width)
    y2 = tf.clip_by_value(boxes[..., 2], 0.0, height)
    x2 = tf.clip_by_value(boxes[..., 3], 0.0, width)
    return tf.stack([y1, x1, y2, x2], axis=-1)
