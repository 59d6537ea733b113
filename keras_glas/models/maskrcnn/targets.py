"""Training targets for the RPN and the R-CNN heads, vectorised over batch, anchors and RoIs.

Ground truth arrives as the pipeline's padded tensors: `gt_boxes` float32 (B, N, 4) pixel yxyx
and `gt_classes` float32 (B, N) with -1 marking padding; `instances` int32 (B, H, W) where
id k + 1 is the object of `gt_boxes[:, k]`.
"""
import tensorflow as tf

from keras_glas.models.maskrcnn import boxes as box_ops

POSITIVE = 1
NEGATIVE = 0
IGNORE = -1


def trim_padding(gt_boxes, gt_classes):
    """Drop the padding columns that are padding in every image of the batch.

    Returns `(gt_boxes (B, N', 4), gt_classes (B, N'), gt_valid bool (B, N'))` with N' >= 1 the
    last valid column + 1, so IoU matrices are (anchors x real objects), not x max_instances.
    """
    valid = gt_classes >= 0
    columns = tf.range(1, tf.shape(gt_classes)[1] + 1)
    count = tf.maximum(tf.reduce_max(tf.where(valid, columns[None, :], 0)), 1)
    return gt_boxes[:, :count], gt_classes[:, :count], valid[:, :count]


def match(iou, gt_valid, positive_iou, negative_iou, allow_low_quality):
    """Label each candidate box by its best ground-truth IoU.

    Args:
        iou: float32 (B, M, N) candidates x ground truth.
        gt_valid: bool (B, N).
        positive_iou: candidates with IoU >= this are positive.
        negative_iou: candidates with IoU < this are negative; in between are ignored.
        allow_low_quality: also make positive every candidate that is the best match of some
            ground-truth box (so each object gets at least one anchor, as in Faster R-CNN).

    Returns:
        `(labels int32 (B, M) in {1, 0, -1}, matched int32 (B, M) index into N)`.
    """
    iou = tf.where(gt_valid[:, None, :], iou, -1.0)
    best_iou = tf.reduce_max(iou, axis=2)
    matched = tf.argmax(iou, axis=2, output_type=tf.int32)
    labels = tf.where(
        best_iou >= positive_iou, POSITIVE, tf.where(best_iou < negative_iou, NEGATIVE, IGNORE)
    )
    if allow_low_quality:
        best_per_gt = tf.reduce_max(iou, axis=1, keepdims=True)
        is_best = (iou >= best_per_gt) & gt_valid[:, None, :] & (best_per_gt > 0.0)
        labels = tf.where(tf.reduce_any(is_best, axis=2), POSITIVE, labels)
    return labels, matched


def sample(labels, num_samples, positive_fraction):
    """Draw a random balanced subset of labelled candidates per image, positives first.

    At most `num_samples * positive_fraction` positives are drawn, negatives fill the rest;
    slots left over when there are too few candidates are marked invalid.

    Args:
        labels: int32 (B, M) in {1, 0, -1}.
        num_samples: int, samples per image.
        positive_fraction: float.

    Returns:
        `(indices int32 (B, num_samples) into M, valid bool (B, num_samples),
        positive bool (B, num_samples))`; invalid slots point at candidate 0.
    """
    num_candidates = tf.shape(labels)[1]
    shortfall = tf.maximum(num_samples - num_candidates, 0)
    labels = tf.pad(labels, [[0, 0], [0, shortfall]], constant_values=IGNORE)
    # Random keys in [0, 1); -1 marks candidates of the other kind so top_k puts them last.
    keys = tf.random.uniform(tf.shape(labels))
    max_positives = int(num_samples * positive_fraction)
    positive_keys, positive_indices = tf.math.top_k(
        tf.where(labels == POSITIVE, keys, -1.0), max_positives
    )
    negative_keys, negative_indices = tf.math.top_k(
        tf.where(labels == NEGATIVE, keys, -1.0), num_samples
    )
    positive_valid = positive_keys >= 0.0
    num_positive = tf.reduce_sum(tf.cast(positive_valid, tf.int32), axis=1, keepdims=True)
    negative_valid = (negative_keys >= 0.0) & (
        tf.range(num_samples)[None, :] < num_samples - num_positive
    )
    indices = tf.concat([positive_indices, negative_indices], axis=1)
    valid = tf.concat([positive_valid, negative_valid], axis=1)
    positive = tf.concat([positive_valid, tf.zeros_like(negative_valid)], axis=1)
    # Compact: valid slots first, in their order (positives, then negatives).
    slot = tf.range(max_positives + num_samples, dtype=tf.float32)[None, :]
    _, order = tf.math.top_k(tf.where(valid, -slot, -slot - 1e6), num_samples)
    indices = tf.gather(indices, order, batch_dims=1)
    valid = tf.gather(valid, order, batch_dims=1)
    positive = tf.gather(positive, order, batch_dims=1)
    indices = tf.where(valid, tf.minimum(indices, num_candidates - 1), 0)
    return indices, valid, positive


def rpn_targets(anchors, gt_boxes, gt_valid, num_samples=256, positive_fraction=0.5,
                positive_iou=0.7, negative_iou=0.3):
    """Sampled anchors with their objectness and box-delta targets.

    Args:
        anchors: float32 (A, 4).
        gt_boxes: float32 (B, N, 4); gt_valid: bool (B, N).

    Returns:
        dict of `indices` int32 (B, S) into A, `valid` and `positive` bool (B, S),
        `box_targets` float32 (B, S, 4) (meaningful where positive), S = num_samples.
    """
    iou = box_ops.box_iou(anchors[None], gt_boxes)
    labels, matched = match(iou, gt_valid, positive_iou, negative_iou, allow_low_quality=True)
    indices, valid, positive = sample(labels, num_samples, positive_fraction)
    matched_boxes = tf.gather(gt_boxes, tf.gather(matched, indices, batch_dims=1), batch_dims=1)
    box_targets = box_ops.encode_boxes(
        matched_boxes, tf.gather(anchors, indices), box_ops.RPN_BOX_WEIGHTS
    )
    return {"indices": indices, "valid": valid, "positive": positive, "box_targets": box_targets}


def roi_targets(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, num_samples=512,
                positive_fraction=0.25, positive_iou=0.5):
    """Sampled RoIs (proposals plus the ground-truth boxes) and their head targets.

    Args:
        proposals: float32 (B, R, 4); proposal_valid: bool (B, R).
        gt_boxes: float32 (B, N, 4); gt_classes: float32 (B, N); gt_valid: bool (B, N).

    Returns:
        dict with (B, S) entries, S = num_samples: `rois` float32 (B, S, 4), `classes` int32
        (0 background, c + 1 foreground class c), `box_targets` float32 (B, S, 4), `matched`
        int32 index of the matched ground truth, `valid` and `positive` bool.
    """
    rois = tf.concat([proposals, gt_boxes], axis=1)
    roi_valid = tf.concat([proposal_valid, gt_valid], axis=1)
    iou = box_ops.box_iou(rois, gt_boxes)
    labels, matched = match(iou, gt_valid, positive_iou, positive_iou, allow_low_quality=False)
    labels = tf.where(roi_valid, labels, IGNORE)
    indices, valid, positive = sample(labels, num_samples, positive_fraction)
    rois = tf.gather(rois, indices, batch_dims=1)
    matched = tf.gather(matched, indices, batch_dims=1)
    classes = tf.cast(tf.gather(gt_classes, matched, batch_dims=1), tf.int32) + 1
    box_targets = box_ops.encode_boxes(
        tf.gather(gt_boxes, matched, batch_dims=1), rois, box_ops.RCNN_BOX_WEIGHTS
    )
    return {
        "rois": rois,
        "classes": tf.where(positive, classes, 0),
        "box_targets": box_targets,
        "matched": matched,
        "valid": valid,
        "positive": positive,
    }


def proposal_recall(proposals, proposal_valid, gt_boxes, gt_valid, iou_threshold=0.5):
    """Fraction of ground-truth boxes that some valid proposal overlaps with IoU >= threshold.

    Returns a float32 scalar (0 when the batch has no object).
    """
    iou = tf.where(proposal_valid[:, :, None], box_ops.box_iou(proposals, gt_boxes), 0.0)
    found = (tf.reduce_max(iou, axis=1) >= iou_threshold) & gt_valid
    return tf.math.divide_no_nan(
        tf.reduce_sum(tf.cast(found, tf.float32)), tf.reduce_sum(tf.cast(gt_valid, tf.float32))
    )


def mask_targets(instances, rois, box_indices, instance_ids, size):
    """Soft mask targets: the selected object's binary mask RoIAligned into each RoI.

    Equals `tf.image.crop_and_resize` (bilinear, extrapolation 0) of the one-hot mask
    `instances[b] == id` sampled at RoIAlign's bin centres (see `roi_align.aligned_crop_boxes`),
    but gathers the 4 neighbours of each sample from the id map instead of materialising one
    full-size mask per RoI, so memory is O(RoIs x size**2) whatever the image size.

    Args:
        instances: int32 (B, H, W) instance ids.
        rois: float32 (M, 4) pixel yxyx.
        box_indices: int32 (M,) image of each RoI.
        instance_ids: int32 (M,) id whose mask is the target of each RoI.
        size: int, output side (28 for Mask R-CNN).

    Returns:
        float32 (M, size, size) in [0, 1].
    """
    shape = tf.shape(instances)
    height, width = shape[1], shape[2]
    centres = (tf.range(size, dtype=tf.float32) + 0.5) / size
    ys = rois[:, 0:1] + centres[None, :] * (rois[:, 2:3] - rois[:, 0:1]) - 0.5
    xs = rois[:, 1:2] + centres[None, :] * (rois[:, 3:4] - rois[:, 1:2]) - 0.5

    def neighbours(coords, extent):
        # crop_and_resize returns the extrapolation value for samples outside [0, extent - 1].
        inside = (coords >= 0.0) & (coords <= tf.cast(extent - 1, tf.float32))
        low = tf.floor(coords)
        frac = coords - low
        low = tf.cast(low, tf.int32)
        return (tf.clip_by_value(low, 0, extent - 1), tf.clip_by_value(low + 1, 0, extent - 1),
                frac, inside)

    y0, y1, fy, inside_y = neighbours(ys, height)
    x0, x1, fx, inside_x = neighbours(xs, width)
    batch = tf.broadcast_to(box_indices[:, None, None], (tf.shape(rois)[0], size, size))
    ids = instance_ids[:, None, None]

    def indicator(y, x):
        index = tf.stack([batch, tf.broadcast_to(y[:, :, None], tf.shape(batch)),
                          tf.broadcast_to(x[:, None, :], tf.shape(batch))], axis=-1)
        return tf.cast(tf.equal(tf.gather_nd(instances, index), ids), tf.float32)

    fy = fy[:, :, None]
    fx = fx[:, None, :]
    top = indicator(y0, x0) * (1.0 - fx) + indicator(y0, x1) * fx
    bottom = indicator(y1, x0) * (1.0 - fx) + indicator(y1, x1) * fx
    value = top * (1.0 - fy) + bottom * fy
    inside = inside_y[:, :, None] & inside_x[:, None, :]
    return tf.where(inside, value, 0.0)
