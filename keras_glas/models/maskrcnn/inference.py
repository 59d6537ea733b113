"""Graph post-processing: RPN proposals, detection NMS, mask pasting into the instance map."""
import tensorflow as tf

from keras_glas.models.maskrcnn import boxes as box_ops

# Proposals and detections narrower than this (pixels) are dropped, as in torchvision.
MIN_BOX_SIDE = 1e-2


def _large_enough(boxes):
    return ((boxes[..., 2] - boxes[..., 0]) >= MIN_BOX_SIDE) & (
        (boxes[..., 3] - boxes[..., 1]) >= MIN_BOX_SIDE
    )


def propose(objectness, deltas, anchors, height, width, pre_nms_top_n, post_nms_top_n,
            iou_threshold):
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
        tf.gather(deltas, indices, batch_dims=1), tf.gather(anchors, indices),
        box_ops.RPN_BOX_WEIGHTS
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


def _paste_window(box, size, height, width):
    """Pixel window a mask pasted into `box` can touch, and its sampling box.

    Pixel (y, x) of the canvas reads the (size x size) mask bilinearly at mask coordinates
    `((y + 0.5 - y1) * size / h - 0.5, ...)`; with a zero border around the mask (as
    torchvision's `paste_masks_in_image`) the mask fades to 0 at the box edge, so only pixels
    within half a mask cell (plus half a pixel) of the box can be non-zero.

    Args:
        box: float32 (4,) pixel yxyx.
        size: int, mask side S.
        height, width: scalar int32 canvas size.

    Returns:
        `(top, left, rows, columns)` int32 scalars of the window (at least 1 x 1, inside the
        canvas), and float32 (4,) the window's first and last pixel centres in normalised
        coordinates of the zero-bordered (S + 2) mask, for `tf.image.crop_and_resize`.
    """
    box_h = tf.maximum(box[2] - box[0], 1e-3)
    box_w = tf.maximum(box[3] - box[1], 1e-3)
    margin_y = 0.5 + 0.5 * box_h / size
    margin_x = 0.5 + 0.5 * box_w / size
    top = tf.clip_by_value(tf.cast(tf.floor(box[0] - margin_y), tf.int32), 0, height - 1)
    left = tf.clip_by_value(tf.cast(tf.floor(box[1] - margin_x), tf.int32), 0, width - 1)
    bottom = tf.clip_by_value(tf.cast(tf.math.ceil(box[2] + margin_y), tf.int32), top + 1, height)
    right = tf.clip_by_value(tf.cast(tf.math.ceil(box[3] + margin_x), tf.int32), left + 1, width)

    def normalised(pixel, start, side):
        # Mask coordinate of the pixel centre, +1 for the zero border, over the bordered
        # mask's index span (S + 1) as crop_and_resize measures it.
        return ((tf.cast(pixel, tf.float32) + 0.5 - start) * size / side + 0.5) / (size + 1)

    crop_box = tf.stack([normalised(top, box[0], box_h), normalised(left, box[1], box_w),
                         normalised(bottom - 1, box[0], box_h),
                         normalised(right - 1, box[1], box_w)])
    return top, left, bottom - top, right - left, crop_box


def paste_instances(masks, boxes, valid, height, width, threshold):
    """Paste score-sorted mask probabilities into their boxes and merge them into label maps.

    Each mask is resampled only over the window of the canvas its box can touch
    (`_paste_window`), so the cost grows with the boxes' area, not with detections x H x W:
    detections are painted from the lowest score up, each overwriting the pixels where its
    probability exceeds `threshold`, so overlaps end with the highest-scoring detection.

    Args:
        masks: float32 (B, D, S, S) probabilities, detections sorted by decreasing score.
        boxes: float32 (B, D, 4) pixel yxyx.
        valid: bool (B, D); invalid detections are skipped.
        height, width: scalar int32 canvas size.
        threshold: float, a pixel belongs to a detection where its probability exceeds this.

    Returns:
        `(instances int32 (B, H, W), probabilities float32 (B, H, W))`: id k + 1 is detection
        k (0 = background); probabilities are the per-pixel maximum over valid detections.
    """
    size = masks.shape[-1]
    shape = tf.shape(masks)
    detections = shape[1]
    total = shape[0] * detections
    padded = tf.reshape(tf.pad(masks, [[0, 0], [0, 0], [1, 1], [1, 1]]),
                        (-1, size + 2, size + 2, 1))
    flat_boxes = tf.reshape(boxes, (-1, 4))
    flat_valid = tf.reshape(valid, (-1,))
    canvas_shape = tf.stack([shape[0], height, width])

    def paint(index, instances, probabilities):
        image, rank = index // detections, index % detections
        top, left, rows, columns, crop_box = _paste_window(flat_boxes[index], size, height, width)
        window = tf.image.crop_and_resize(
            padded[index][None], crop_box[None], [0], tf.stack([rows, columns]),
            extrapolation_value=0.0)[0, :, :, 0]
        begin = tf.stack([image, top, left])
        window_shape = tf.stack([1, rows, columns])
        end = begin + window_shape
        old_ids = tf.slice(instances, begin, window_shape)
        old_probabilities = tf.slice(probabilities, begin, window_shape)
        new_ids = tf.where(window[None] > threshold, rank + 1, old_ids)
        new_probabilities = tf.maximum(old_probabilities, window[None])
        strides = tf.ones(3, tf.int32)
        instances = tf.raw_ops.TensorStridedSliceUpdate(
            input=instances, begin=begin, end=end, strides=strides, value=new_ids)
        probabilities = tf.raw_ops.TensorStridedSliceUpdate(
            input=probabilities, begin=begin, end=end, strides=strides, value=new_probabilities)
        return instances, probabilities

    def body(index, instances, probabilities):
        instances, probabilities = tf.cond(
            flat_valid[index], lambda: paint(index, instances, probabilities),
            lambda: (instances, probabilities))
        return index - 1, instances, probabilities

    _, instances, probabilities = tf.while_loop(
        lambda index, *_: index >= 0, body,
        (total - 1, tf.zeros(canvas_shape, tf.int32), tf.zeros(canvas_shape, tf.float32)))
    return instances, probabilities
