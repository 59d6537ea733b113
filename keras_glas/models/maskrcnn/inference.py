"""Graph post-processing: RPN proposals, detection NMS, mask pasting and the instance map."""
import tensorflow as tf

from keras_glas.models.maskrcnn import boxes as box_ops

# Proposals and detections narrower than this (pixels) are dropped, as in torchvision.
MIN_BOX_SIDE = 1e-2


def _large_enough(boxes):
    return ((boxes[..., 2] - boxes[..., 0]) >= MIN_BOX_SIDE) & (
        (boxes[..., 3] - boxes[..., 1]) >= MIN_BOX_SIDE
    )


def propose(objectness, deltas, anchors, height, width, pre_nms_top_n, post_nms_top_n, iou_threshold):
    """RPN proposals: top-k anchors by objectness, decoded, clipped, then NMS per image.

    Args:
        objectness: float32 (B, A) logits; deltas: float32 (B, A, 4); anchors: float32 (A, 4).
        height, width: scalar int32, image size the boxes are clipped to.
        pre_nms_top_n, post_nms_top_n: int; iou_threshold: float.

    Returns:
        `(proposals float32 (B, post_nms_top_n, 4), valid bool (B, post_nms_top_n))`, sorted by
        objectness; invalid rows are zeros.
    """
    top_n = tf.minimum(pre_nms_top_n, tf.shape(anchors)[0])
    scores, indices = tf.math.top_k(objectness, top_n)
    proposals = box_ops.decode_boxes(
        tf.gather(deltas, indices, batch_dims=1), tf.gather(anchors, indices), box_ops.RPN_BOX_WEIGHTS
    )
    proposals = box_ops.clip_boxes(proposals, height, width)
    scores = tf.where(_large_enough(proposals), tf.sigmoid(scores), 0.0)
    proposals, _, _, count = tf.image.combined_non_max_suppression(
        proposals[:, :, None, :], scores[:, :, None], post_nms_top_n, post_nms_top_n,
        iou_threshold=iou_threshold, score_threshold=1e-6, pad_per_class=False, clip_boxes=False,
    )
    valid = tf.range(post_nms_top_n)[None, :] < count[:, None]
    return proposals, valid


def detect(class_logits, deltas, proposals, proposal_valid, height, width, score_threshold,
           iou_threshold, max_detections):
    """Final detections from the box head: per-class decoding, score threshold and NMS.

    Args:
        class_logits: float32 (B, R, C + 1); deltas: float32 (B, R, 4 C);
        proposals: float32 (B, R, 4); proposal_valid: bool (B, R).
        height, width: scalar int32, the (unpadded) image size.

    Returns:
        `(boxes float32 (B, D, 4), scores float32 (B, D), classes int32 (B, D), count int32 (B,))`
        sorted by score, D = max(1, largest count in the batch); rows past `count` are zeros.
    """
    num_classes = class_logits.shape[-1] - 1
    scores = tf.nn.softmax(class_logits, axis=-1)[..., 1:]
    shape = tf.shape(deltas)
    deltas = tf.reshape(deltas, (shape[0], shape[1], num_classes, 4))
    boxes = box_ops.decode_boxes(deltas, proposals[:, :, None, :], box_ops.RCNN_BOX_WEIGHTS)
    boxes = box_ops.clip_boxes(boxes, height, width)
    scores = tf.where(proposal_valid[:, :, None] & _large_enough(boxes), scores, 0.0)
    boxes, scores, classes, count = tf.image.combined_non_max_suppression(
        boxes, scores, max_detections, max_detections, iou_threshold=iou_threshold,
        score_threshold=score_threshold, pad_per_class=False, clip_boxes=False,
    )
    kept = tf.maximum(tf.reduce_max(count), 1)
    return boxes[:, :kept], scores[:, :kept], tf.cast(classes[:, :kept], tf.int32), count


def paste_masks(masks, boxes, height, width):
    """Resample fixed-size mask probabilities into their boxes on the full image canvas.

    One `crop_and_resize` per call: each mask is the "image", and its "crop box" maps the whole
    canvas into mask coordinates, so pixel (y, x) reads the mask bilinearly at
    `((y + 0.5 - y1) * S / h - 0.5, ...)`. Masks get a zero border first (as torchvision's
    `paste_masks_in_image`) so they fade to 0 at the box edge instead of being cut.

    Args:
        masks: float32 (M, S, S) probabilities.
        boxes: float32 (M, 4) pixel yxyx.
        height, width: scalar int32 canvas size.

    Returns:
        float32 (M, height, width).
    """
    size = masks.shape[-1]
    padded = tf.pad(masks, [[0, 0], [1, 1], [1, 1]])[..., None]
    box_h = tf.maximum(boxes[:, 2] - boxes[:, 0], 1e-3)
    box_w = tf.maximum(boxes[:, 3] - boxes[:, 1], 1e-3)
    last_y = tf.cast(height, tf.float32) - 0.5
    last_x = tf.cast(width, tf.float32) - 0.5
    # +1 for the zero border; divide by size + 1 = padded side - 1 for crop_and_resize's scale.
    y_start = ((0.5 - boxes[:, 0]) * size / box_h + 0.5) / (size + 1)
    x_start = ((0.5 - boxes[:, 1]) * size / box_w + 0.5) / (size + 1)
    y_end = ((last_y - boxes[:, 0]) * size / box_h + 0.5) / (size + 1)
    x_end = ((last_x - boxes[:, 1]) * size / box_w + 0.5) / (size + 1)
    canvas = tf.image.crop_and_resize(
        padded, tf.stack([y_start, x_start, y_end, x_end], axis=1), tf.range(tf.shape(masks)[0]),
        tf.stack([height, width]), extrapolation_value=0.0,
    )
    return canvas[..., 0]


def instance_map(masks, valid, threshold):
    """Merge score-sorted full-size masks into one label map per image.

    Args:
        masks: float32 (B, D, H, W) probabilities, detections sorted by decreasing score.
        valid: bool (B, D).
        threshold: float, a pixel belongs to a detection where its probability exceeds this.

    Returns:
        `(instances int32 (B, H, W), probabilities float32 (B, H, W))`: where masks overlap the
        pixel goes to the highest-scoring detection; id k + 1 is detection k (0 = background);
        probabilities are the per-pixel maximum over valid detections.
    """
    masks = tf.where(valid[:, :, None, None], masks, 0.0)
    inside = masks > threshold
    num = tf.shape(masks)[1]
    # Rank D..1 so argmax picks the first (best-scoring) detection covering the pixel.
    rank = tf.reshape(num - tf.range(num), (1, -1, 1, 1))
    winner = tf.argmax(tf.where(inside, rank, 0), axis=1, output_type=tf.int32)
    instances = tf.where(tf.reduce_any(inside, axis=1), winner + 1, 0)
    return instances, tf.reduce_max(masks, axis=1)
