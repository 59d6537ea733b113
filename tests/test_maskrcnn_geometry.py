"""Mask R-CNN geometry and targets: anchors, box coding, matching, RoIAlign, mask targets,
pasting."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_glas.models.maskrcnn import boxes as box_ops
from keras_glas.models.maskrcnn import inference, targets
from keras_glas.models.maskrcnn.roi_align import (
    assign_levels,
    bin_means,
    multilevel_roi_align,
    roi_align,
)


def test_anchors_cover_every_level_with_the_right_sizes_and_ratios():
    anchors = box_ops.generate_anchors(64, 96, (4, 8), (32, 64), (0.5, 1.0, 2.0)).numpy()
    assert anchors.shape == ((16 * 24 + 8 * 12) * 3, 4)
    heights = anchors[:, 2] - anchors[:, 0]
    widths = anchors[:, 3] - anchors[:, 1]
    # First level: centre of cell (0, 0) at stride / 2, three ratios h / w with area 32**2.
    np.testing.assert_allclose((anchors[:3, 0] + anchors[:3, 2]) / 2, 2.0)
    np.testing.assert_allclose(heights[:3] / widths[:3], [0.5, 1.0, 2.0], rtol=1e-5)
    np.testing.assert_allclose(heights[:3] * widths[:3], 32.0**2, rtol=1e-5)
    second = anchors[16 * 24 * 3:]
    np.testing.assert_allclose((second[:, 2] - second[:, 0]) * (second[:, 3] - second[:, 1]),
                               64.0**2, rtol=1e-5)
    # Last cell of the second level sits at row 7, column 11 of stride 8.
    np.testing.assert_allclose((second[-1, 0] + second[-1, 2]) / 2, 7.5 * 8)
    np.testing.assert_allclose((second[-1, 1] + second[-1, 3]) / 2, 11.5 * 8)


@pytest.mark.parametrize("weights", [box_ops.RPN_BOX_WEIGHTS, box_ops.RCNN_BOX_WEIGHTS])
def test_encode_decode_round_trip(weights):
    rng = np.random.default_rng(0)
    anchors = rng.uniform(0, 50, (20, 2))
    anchors = np.concatenate([anchors, anchors + rng.uniform(4, 60, (20, 2))], 1).astype(np.float32)
    boxes = rng.uniform(0, 50, (20, 2))
    boxes = np.concatenate([boxes, boxes + rng.uniform(4, 60, (20, 2))], 1).astype(np.float32)
    deltas = box_ops.encode_boxes(boxes, anchors, weights)
    np.testing.assert_allclose(box_ops.decode_boxes(deltas, anchors, weights), boxes, atol=1e-3)
    # A box identical to its anchor has zero deltas.
    np.testing.assert_allclose(box_ops.encode_boxes(anchors, anchors, weights), 0.0, atol=1e-6)


def test_box_iou_by_hand():
    a = tf.constant([[0.0, 0.0, 10.0, 10.0]])
    b = tf.constant([[5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    np.testing.assert_allclose(box_ops.box_iou(a, b).numpy(), [[25.0 / 175.0, 0.0, 1.0]], rtol=1e-6)


def test_rpn_targets_on_hand_made_boxes():
    anchors = tf.constant([
        [0.0, 0.0, 10.0, 10.0],    # IoU 1 with object 0 -> positive
        [1.0, 1.0, 11.0, 11.0],    # IoU 0.68 with object 0 -> ignored
        [40.0, 40.0, 50.0, 50.0],  # no overlap -> negative
        [20.0, 20.0, 28.0, 30.0],  # IoU 0.4 with object 1, its best anchor -> positive
                                   # (low quality)
        [60.0, 60.0, 70.0, 70.0],  # negative
    ])
    gt_boxes = tf.constant([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 30.0],
                             [-1.0, -1.0, -1.0, -1.0]]])
    gt_boxes, gt_classes, gt_valid = targets.trim_padding(gt_boxes, tf.constant([[0.0, 0.0, -1.0]]))
    assert gt_boxes.shape[1] == 2 and gt_valid.numpy().all()
    labels, matched = targets.match(box_ops.box_iou(anchors[None], gt_boxes), gt_valid,
                                    0.7, 0.3, True)
    np.testing.assert_array_equal(labels.numpy(), [[1, -1, 0, 1, 0]])
    assert matched.numpy()[0, 0] == 0 and matched.numpy()[0, 3] == 1

    result = targets.rpn_targets(anchors, gt_boxes, gt_valid, num_samples=4, positive_fraction=0.5)
    indices, valid, positive = (result[k].numpy()[0] for k in ("indices", "valid", "positive"))
    # Two positives first (anchors 0 and 3 in random order), then the two negatives.
    assert sorted(indices[:2]) == [0, 3] and positive[:2].all() and not positive[2:].any()
    assert sorted(indices[2:]) == [2, 4] and valid.all()
    box_targets = result["box_targets"].numpy()[0]
    np.testing.assert_allclose(box_targets[list(indices).index(0)], 0.0, atol=1e-6)
    decoded = box_ops.decode_boxes(box_targets[list(indices).index(3)], anchors[3],
                                   box_ops.RPN_BOX_WEIGHTS)
    np.testing.assert_allclose(decoded, [20.0, 20.0, 40.0, 30.0], atol=1e-4)


def test_sample_caps_positives_and_marks_shortfall_invalid():
    labels = tf.constant([[1, 1, 1, 1, 0, -1], [-1, -1, 0, -1, -1, -1]])
    indices, valid, positive = targets.sample(labels, num_samples=8, positive_fraction=0.25)
    assert positive.numpy().sum(1).tolist() == [2, 0]
    assert valid.numpy().sum(1).tolist() == [3, 1]
    assert indices.numpy()[1, 0] == 2 and (indices.numpy() < 6).all()
    # Valid slots come first, positives before negatives.
    assert valid.numpy()[0, :3].all() and positive.numpy()[0, :2].all()


def test_roi_targets_append_gt_and_label_by_iou():
    proposals = tf.constant([[[0.0, 0.0, 10.0, 9.0], [50.0, 50.0, 60.0, 60.0],
                              [0.0, 0.0, 0.0, 0.0]]])
    proposal_valid = tf.constant([[True, True, False]])
    gt_boxes = tf.constant([[[0.0, 0.0, 10.0, 10.0]]])
    result = targets.roi_targets(proposals, proposal_valid, gt_boxes, tf.constant([[0.0]]),
                                 tf.constant([[True]]), num_samples=4, positive_fraction=0.5)
    rois = result["rois"].numpy()[0]
    positive = result["positive"].numpy()[0]
    # Positives: proposal 0 (IoU 0.9) and the appended ground truth; negative: proposal 1.
    assert positive.tolist() == [True, True, False, False]
    assert result["valid"].numpy()[0].tolist() == [True, True, True, False]
    assert result["classes"].numpy()[0].tolist()[:3] == [1, 1, 0]
    np.testing.assert_allclose(rois[2], [50.0, 50.0, 60.0, 60.0])
    recall = targets.proposal_recall(proposals, proposal_valid, gt_boxes, tf.constant([[True]]))
    assert float(recall) == 1.0


def _bilinear(image, y, x):
    """Reference bilinear sample of (H, W, C) at index coordinates, 0 outside [0, H-1]."""
    h, w = image.shape[:2]
    if y < 0 or x < 0 or y > h - 1 or x > w - 1:
        return np.zeros(image.shape[2])
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    fy, fx = y - y0, x - x0
    return ((1 - fy) * (1 - fx) * image[y0, x0] + (1 - fy) * fx * image[y0, x1]
            + fy * (1 - fx) * image[y1, x0] + fy * fx * image[y1, x1])


def test_roi_align_matches_hand_computed_bilinear_samples():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 12, 10, 3)).astype(np.float32)
    box = np.array([9.0, 6.0, 33.0, 30.0], np.float32)  # image pixels, stride 4
    stride, size, ratio = 4, 3, 2
    pooled = roi_align(features, box[None], tf.constant([1]), stride, size, ratio).numpy()[0]
    y1, x1, y2, x2 = box / stride
    bin_h, bin_w = (y2 - y1) / size, (x2 - x1) / size
    expected = np.zeros((size, size, 3))
    for i in range(size):
        for j in range(size):
            samples = [
                _bilinear(features[1], y1 + (i + (a + 0.5) / ratio) * bin_h - 0.5,
                          x1 + (j + (b + 0.5) / ratio) * bin_w - 0.5)
                for a in range(ratio) for b in range(ratio)
            ]
            expected[i, j] = np.mean(samples, axis=0)
    np.testing.assert_allclose(pooled, expected, atol=1e-5)


def test_bin_means_and_their_gradient_equal_a_reshaped_mean():
    samples = tf.constant(np.random.default_rng(4).normal(size=(3, 6, 6, 5)), tf.float32)
    upstream = tf.constant(np.random.default_rng(5).normal(size=(3, 2, 2, 5)), tf.float32)

    def value_and_gradient(function):
        with tf.GradientTape() as tape:
            tape.watch(samples)
            means = function(samples)
            loss = tf.reduce_sum(means * upstream)
        return means, tape.gradient(loss, samples)

    means, gradient = value_and_gradient(lambda x: bin_means(x, 3))
    expected, expected_gradient = value_and_gradient(
        lambda x: tf.reduce_mean(tf.reshape(x, (3, 2, 3, 2, 3, 5)), axis=(2, 4)))
    np.testing.assert_allclose(means.numpy(), expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(gradient.numpy(), expected_gradient.numpy(), atol=1e-6)


def test_multilevel_roi_align_pools_each_box_on_its_level():
    boxes = tf.constant([[0.0, 0.0, 224.0, 224.0], [0.0, 0.0, 112.0, 112.0], [0.0, 0.0, 20.0, 20.0],
                         [0.0, 0.0, 900.0, 900.0]])
    np.testing.assert_array_equal(assign_levels(boxes, 2, 5).numpy(), [4, 3, 2, 5])
    rng = np.random.default_rng(2)
    features = [rng.normal(size=(1, 256 // 2**level, 256 // 2**level, 2)).astype(np.float32)
                for level in (2, 3, 4, 5)]
    indices = tf.zeros(4, tf.int32)
    pooled = multilevel_roi_align(features, boxes, indices, 7).numpy()
    for row, level in enumerate([4, 3, 2, 5]):
        single = roi_align(features[level - 2], boxes[row:row + 1], indices[:1],
                           2**level, 7).numpy()
        np.testing.assert_allclose(pooled[row], single[0], atol=1e-6)


def _instance_map():
    yy, xx = np.mgrid[:64, :64]
    instances = np.zeros((2, 64, 64), np.int32)
    instances[0][(yy - 24) ** 2 / 144 + (xx - 34) ** 2 / 100 <= 1] = 1
    instances[0][(yy - 48) ** 2 + (xx - 16) ** 2 <= 64] = 2
    instances[1][10:30, 5:50] = 1
    return instances


def test_mask_targets_equal_a_hand_cropped_mask():
    instances = _instance_map()
    # A 28x28 box on pixel boundaries samples exactly the pixel centres: a plain crop.
    rois = tf.constant([[10.0, 20.0, 38.0, 48.0], [30.0, 2.0, 58.0, 30.0]])
    result = targets.mask_targets(instances, rois, tf.constant([0, 0]),
                                  tf.constant([1, 2]), 28).numpy()
    np.testing.assert_array_equal(result[0], instances[0, 10:38, 20:48] == 1)
    np.testing.assert_array_equal(result[1], instances[0, 30:58, 2:30] == 2)


def test_mask_targets_equal_crop_and_resize_of_the_one_hot_mask():
    instances = _instance_map()
    rois = np.array([[12.3, 22.1, 37.9, 47.2], [35.5, 3.3, 60.1, 29.0], [8.0, 1.0, 33.0, 60.0],
                     [-4.0, -6.0, 20.0, 70.0]], np.float32)
    images = np.array([0, 0, 1, 1], np.int32)
    ids = np.array([1, 2, 1, 1], np.int32)
    result = targets.mask_targets(instances, rois, images, ids, 28).numpy()
    one_hot = (instances[images] == ids[:, None, None]).astype(np.float32)[..., None]
    from keras_glas.models.maskrcnn.roi_align import aligned_crop_boxes
    crop_boxes = aligned_crop_boxes(tf.constant(rois), 1.0, 64, 64, 28)
    expected = tf.image.crop_and_resize(one_hot, crop_boxes, tf.range(4), (28, 28)).numpy()[..., 0]
    np.testing.assert_allclose(result, expected, atol=1e-5)


def _reference_paste(masks, boxes, valid, height, width, threshold):
    """Per-pixel definition of `inference.paste_instances` (NumPy, one image)."""
    size = masks.shape[-1]
    instances = np.zeros((height, width), np.int32)
    probabilities = np.zeros((height, width), np.float32)
    for k in reversed(range(len(masks))):
        if not valid[k]:
            continue
        bordered = np.pad(masks[k], 1)[..., None]
        y1, x1, y2, x2 = boxes[k]
        h, w = max(y2 - y1, 1e-3), max(x2 - x1, 1e-3)
        for y in range(height):
            for x in range(width):
                value = _bilinear(bordered, (y + 0.5 - y1) * size / h + 0.5,
                                  (x + 0.5 - x1) * size / w + 0.5)[0]
                probabilities[y, x] = max(probabilities[y, x], value)
                if value > threshold:
                    instances[y, x] = k + 1
    return instances, probabilities


def test_paste_instances_puts_each_mask_back_into_its_box():
    instances = _instance_map()
    rois = tf.constant([[11.0, 23.0, 37.0, 45.0], [39.0, 7.0, 57.0, 25.0]])
    masks = targets.mask_targets(instances, rois, tf.constant([0, 0]), tf.constant([1, 2]), 28)
    pasted, probabilities = inference.paste_instances(
        masks[None], rois[None], tf.constant([[True, True]]), 64, 70, 0.5)
    assert pasted.shape == (1, 64, 70) and pasted.dtype == tf.int32
    for k in range(2):
        mask = pasted.numpy()[0, :, :64] == k + 1
        truth = instances[0] == k + 1
        iou = (mask & truth).sum() / (mask | truth).sum()
        assert iou > 0.9, iou
    assert not (pasted.numpy()[0, :, 64:] > 0).any()
    assert not (probabilities.numpy()[0, :, 64:] > 0).any()


def test_paste_instances_equals_the_per_pixel_definition():
    rng = np.random.default_rng(3)
    masks = rng.uniform(size=(2, 4, 6, 6)).astype(np.float32)
    # Boxes overlapping each other, the canvas edges, sub-pixel and degenerate ones.
    boxes = np.array([[[2.3, 1.7, 15.2, 12.9], [0.0, 0.0, 21.0, 19.0], [10.5, 9.5, 11.0, 10.1],
                       [-3.0, 14.0, 8.0, 30.0]],
                      [[5.0, 5.0, 5.0, 9.0], [1.0, 2.0, 20.0, 18.0], [0.0, 0.0, 1.0, 1.0],
                       [12.0, 3.0, 21.0, 19.0]]], np.float32)
    valid = np.array([[True, True, True, True], [True, True, False, False]])
    instances, probabilities = inference.paste_instances(masks, boxes, valid, 21, 19, 0.5)
    for n in range(2):
        expected_ids, expected_probabilities = _reference_paste(masks[n], boxes[n], valid[n],
                                                                21, 19, 0.5)
        np.testing.assert_allclose(probabilities.numpy()[n], expected_probabilities, atol=1e-5)
        # Ties at the threshold are decided by rounding; compare where the value is clear.
        clear = np.abs(expected_probabilities - 0.5) > 1e-4
        np.testing.assert_array_equal(instances.numpy()[n][clear], expected_ids[clear])


def test_paste_instances_gives_overlaps_to_the_higher_score():
    masks = np.zeros((1, 3, 4, 4), np.float32)
    masks[0, 0] = 0.9    # best detection
    masks[0, 1] = 0.8    # its box overlaps the best one's lower half
    masks[0, 2] = 0.95   # invalid (padding) detection, ignored
    boxes = np.array([[[0.0, 0.0, 8.0, 8.0], [4.0, 0.0, 12.0, 8.0], [0.0, 0.0, 12.0, 8.0]]],
                     np.float32)
    instances, probabilities = inference.paste_instances(
        masks, boxes, tf.constant([[True, True, False]]), 12, 8, 0.5)
    ids = instances.numpy()[0]
    first = _reference_paste(masks[0, :1], boxes[0, :1], [True], 12, 8, 0.5)[0] == 1
    second = _reference_paste(masks[0, 1:2], boxes[0, 1:2], [True], 12, 8, 0.5)[0] == 1
    assert (first & second).any()
    assert (ids[first] == 1).all()
    assert (ids[second & ~first] == 2).all() and (second & ~first).any()
    assert (ids[~first & ~second] == 0).all()
    assert probabilities.numpy().max() == np.float32(0.9)


def test_upsample_2x_equals_a_2x2_stride_2_transposed_convolution():
    from keras_glas.models.maskrcnn.heads import upsample_2x

    rng = np.random.default_rng(6)
    features = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    transposed = keras.layers.Conv2DTranspose(4, 2, strides=2, activation="relu")
    expected = transposed(features).numpy()
    inputs = keras.Input((5, 5, 3))
    shuffled = keras.Model(inputs, upsample_2x(inputs, 4, 5, "zeros", name="up"))
    kernel, bias = transposed.get_weights()  # (2, 2, out, in), (out,)
    # Output pixel (2 i + a, 2 j + b), channel c reads kernel[a, b, c]:
    # 1x1 channel (2 a + b) * 4 + c.
    shuffled.get_layer("up").set_weights([
        kernel.transpose(3, 0, 1, 2).reshape(1, 1, 3, 16), np.tile(bias, 4)])
    np.testing.assert_allclose(shuffled(features).numpy(), expected, atol=1e-5)
