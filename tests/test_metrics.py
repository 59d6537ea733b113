"""GlaS metrics on hand-made label maps whose answers are worked out in the comments."""

import math
import time

import numpy as np
import pytest

from keras_glas import metrics


def row_map(width, segments, height=1, row=0, dtype=np.int32):
    """Label map (height, width) with `{id: (first_col, last_col)}` painted on one row."""
    labels = np.zeros((height, width), dtype=dtype)
    for label, (first, last) in segments.items():
        labels[row, first : last + 1] = label
    return labels


def scores(pred, gt):
    return metrics.per_image_scores(pred, gt)


# --------------------------------------------------------------------------------------------
# Official protocol
# --------------------------------------------------------------------------------------------
def test_perfect_match_with_touching_instances_is_perfect():
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])  # two touching instances stay apart
    result = scores(gt * 3, gt)  # ids 3 and 6: same objects
    assert (result["tp"], result["fp"], result["fn"]) == (2, 0, 0)
    assert result["f1"] == 1.0 and result["object_dice"] == 1.0
    assert result["object_hausdorff"] == 0.0


@pytest.mark.parametrize("left_id, right_id", [(3, 7), (7, 3)])
def test_tie_takes_the_smallest_id(left_id, right_id):
    # gt: left object 4 px (cols 0-1), right object 8 px (cols 2-5), two rows.
    gt = np.zeros((2, 6), np.int32)
    gt[:, 0:2], gt[:, 2:6] = left_id, right_id
    # pred S (cols 1-2, 4 px) covers 2 px of each: a tie, partner = the smaller id (3).
    pred = np.zeros((2, 6), np.int32)
    pred[:, 1:3] = 5
    result = scores(pred, gt)
    # 2 px is exactly half of the left object and a quarter of the right: never "more than
    # half" -> TP 0, FP 1, FN 2, F1 0.
    assert (result["tp"], result["fp"], result["fn"]) == (0, 1, 2)
    assert result["f1"] == 0.0
    # Ground-truth side, both take S as partner: left Dice 2*2/(4+4) = 1/2, right
    # 2*2/(8+4) = 1/3, weighted (4*1/2 + 8*1/3)/12 = 7/18. Hausdorff: left 1 (cols 0-1 vs
    # 1-2), right 3 (col 5 to col 2): (4*1 + 8*3)/12 = 7/3.
    if left_id < right_id:  # partner of S = left object: Dice 1/2, Hausdorff 1
        expected_dice, expected_hausdorff = 0.5 * (1 / 2 + 7 / 18), 0.5 * (1 + 7 / 3)
    else:  # partner of S = right object: Dice 1/3, Hausdorff 3
        expected_dice, expected_hausdorff = 0.5 * (1 / 3 + 7 / 18), 0.5 * (3 + 7 / 3)
    assert result["object_dice"] == pytest.approx(expected_dice, abs=1e-12)
    assert result["object_hausdorff"] == pytest.approx(expected_hausdorff, abs=1e-12)


def test_split_object():
    # One gt object on cols 1-10 (10 px) split into S1 = cols 1-6 (6 px), S2 = cols 7-10 (4 px).
    gt = row_map(12, {1: (1, 10)}, height=3, row=1)
    pred = row_map(12, {1: (1, 6), 2: (7, 10)}, height=3, row=1)
    result = scores(pred, gt)
    # S1 covers 6 > 10/2 -> TP; S2 covers 4 -> FP. F1 = 2/(2 + 1 + 0) = 2/3.
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 0)
    assert result["f1"] == pytest.approx(2 / 3)
    # Dice S1 = 12/16 = 3/4, S2 = 8/14 = 4/7; pred side (6*3/4 + 4*4/7)/10 = 19/28;
    # gt partner = S1 -> 3/4. Object Dice = (19/28 + 21/28)/2 = 5/7.
    assert result["object_dice"] == pytest.approx(5 / 7, abs=1e-12)
    # Hausdorff S1-G = 4 (col 10 to col 6), S2-G = 6 (col 1 to col 7);
    # pred side (6*4 + 4*6)/10 = 4.8, gt side 4 -> (4.8 + 4)/2 = 4.4.
    assert result["object_hausdorff"] == pytest.approx(4.4, abs=1e-12)


def test_two_objects_merged():
    # G1 = cols 1-4 (4 px), G2 = cols 6-11 (6 px); the prediction S = cols 1-11 (11 px).
    gt = row_map(13, {1: (1, 4), 2: (6, 11)}, height=3, row=1)
    pred = row_map(13, {9: (1, 11)}, height=3, row=1)
    result = scores(pred, gt)
    # Partner of S = G2 (overlap 6 > 4) and 6 > 6/2 -> TP 1, FP 0, FN 2 - 1 = 1, F1 2/3.
    assert (result["tp"], result["fp"], result["fn"]) == (1, 0, 1)
    assert result["f1"] == pytest.approx(2 / 3)
    # Dice S-G2 = 12/17, G1-S = 8/15: (12/17 + (4*8/15 + 6*12/17)/10)/2 = 856/1275.
    assert result["object_dice"] == pytest.approx(856 / 1275, abs=1e-12)
    # Hausdorff S-G2 = 5 (col 1 to col 6), S-G1 = 7 (col 11 to col 4):
    # (5 + (4*7 + 6*5)/10)/2 = (5 + 5.8)/2 = 5.4.
    assert result["object_hausdorff"] == pytest.approx(5.4, abs=1e-12)


def test_false_positive_and_missed_object_take_the_nearest_partner_by_hausdorff():
    # G1 = cols 0-3 (predicted exactly by S1), G2 = cols 10-19 (missed), FP S2 = col 7.
    gt = row_map(20, {1: (0, 3), 2: (10, 19)})
    pred = row_map(20, {1: (0, 3), 2: (7, 7)})
    result = scores(pred, gt)
    # F1: S1 TP, S2 FP, G2 FN -> 2/(2 + 1 + 1) = 1/2.
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 1)
    assert result["f1"] == 0.5
    # Dice: pred (4*1 + 1*0)/5 = 4/5, gt (4*1 + 10*0)/14 = 2/7 -> (4/5 + 2/7)/2 = 19/35.
    assert result["object_dice"] == pytest.approx(19 / 35, abs=1e-12)
    # S2 touches nothing: H(S2, G1) = max(7-3, 7-0) = 7, H(S2, G2) = max(10-7, 19-7) = 12
    # -> G1 (nearer by Hausdorff although G2 is nearer by gap), 7.
    # G2 touches nothing: H(G2, S1) = max(19-3, 10-0) = 16, H(G2, S2) = 12 -> 12.
    # pred side (4*0 + 1*7)/5 = 7/5, gt side (4*0 + 10*12)/14 = 60/7 -> (7/5 + 60/7)/2.
    assert result["object_hausdorff"] == pytest.approx((7 / 5 + 60 / 7) / 2, abs=1e-12)


def test_hausdorff_counts_interior_pixels_of_a_hole():
    # gt: a filled 7x7 square (49 px); prediction: the same with a 3x3 hole (40 px). The
    # gt's centre pixel is 2 px from the nearest predicted pixel although the two boundaries
    # coincide: Hausdorff 2, not 0.
    gt = np.zeros((9, 9), np.uint8)
    gt[1:8, 1:8] = 1
    pred = gt.copy()
    pred[3:6, 3:6] = 0
    result = scores(pred, gt)
    assert result["f1"] == 1.0  # 40 > 49/2
    assert result["object_dice"] == pytest.approx(80 / 89)  # 2*40/(40 + 49) on both sides
    assert result["object_hausdorff"] == 2.0


def brute_force_hausdorff(first, second):
    """Symmetric Hausdorff distance of two bool masks over all pixel pairs (the definition)."""
    a, b = np.argwhere(first), np.argwhere(second)
    squared = ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1)
    return math.sqrt(max(squared.min(axis=1).max(), squared.min(axis=0).max()))


@pytest.mark.parametrize("seed", range(30))
def test_hausdorff_of_one_object_each_equals_the_brute_force_definition(seed):
    # One object per side: each is the other's partner (or nearest object), so the score is
    # their Hausdorff distance. Random shapes (holes, specks, disjoint parts, one object far
    # inside the other's box) exercise every route: distance maps, k-d trees, box splits.
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(8, 40, size=2))
    masks = []
    for _ in range(2):
        mask = np.zeros(shape, bool)
        while not mask.any():
            top, left = rng.integers(0, shape[0]), rng.integers(0, shape[1])
            height, width = rng.integers(1, shape[0] + 1), rng.integers(1, shape[1] + 1)
            mask[top : top + height, left : left + width] = True
            mask &= rng.random(shape) < rng.uniform(0.3, 1.0)
        masks.append(mask)
    pred = np.where(masks[0], 3, 0).astype(np.int32)
    gt = np.where(masks[1], 5, 0).astype(np.uint8)
    expected = brute_force_hausdorff(masks[0], masks[1])
    assert metrics.object_hausdorff(pred, gt) == pytest.approx(expected, abs=1e-12)


def test_single_image_functions_agree_with_per_image_scores():
    gt = row_map(13, {1: (1, 4), 2: (6, 11)}, height=3, row=1)
    pred = row_map(13, {9: (1, 11)}, height=3, row=1)
    result = scores(pred, gt)
    assert metrics.object_f1(pred, gt) == result["f1"]
    assert metrics.object_dice(pred, gt) == result["object_dice"]
    assert metrics.object_hausdorff(pred, gt) == result["object_hausdorff"]
    assert metrics.glas_scores([pred], [gt]) == result


# Edge cases ----------------------------------------------------------------------------------
def test_no_objects_on_either_side_is_perfect():
    empty = np.zeros((3, 4), np.int32)
    result = metrics.glas_scores([empty, empty], [empty, empty])
    assert (result["f1"], result["object_dice"], result["object_hausdorff"]) == (1.0, 1.0, 0.0)
    assert (result["tp"], result["fp"], result["fn"]) == (0, 0, 0)


@pytest.mark.parametrize("empty_side", ["pred", "gt"])
def test_objects_on_one_side_only_get_dice_0_and_the_image_diagonal(empty_side):
    objects = row_map(4, {1: (0, 1), 2: (3, 3)}, height=3)
    empty = np.zeros_like(objects)
    pred, gt = (empty, objects) if empty_side == "pred" else (objects, empty)
    result = scores(pred, gt)
    assert result["f1"] == 0.0 and result["object_dice"] == 0.0
    assert result["object_hausdorff"] == 5.0  # sqrt(3**2 + 4**2)


def test_objects_on_one_side_only_within_a_split_use_their_image_diagonal():
    # Image A (3x4): one object of 2 px, predicted exactly. Image B (6x8, diagonal 10): a
    # predicted object of 3 px and no ground truth.
    gt_a = row_map(4, {1: (0, 1)}, height=3)
    pred_b = row_map(8, {4: (0, 2)}, height=6)
    result = metrics.glas_scores([gt_a, pred_b], [gt_a, np.zeros_like(pred_b)])
    # F1: TP 1, FP 1, FN 0 -> 2/3. Dice: pred (2*1 + 3*0)/5 = 2/5, gt 1 -> (2/5 + 1)/2 = 7/10.
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["object_dice"] == pytest.approx(0.7, abs=1e-12)
    # Hausdorff: pred (2*0 + 3*10)/5 = 6, gt 0 -> 3.
    assert result["object_hausdorff"] == pytest.approx(3.0, abs=1e-12)


def test_split_without_any_prediction_scores_the_largest_diagonal():
    gts = [row_map(4, {1: (0, 1)}, height=3), row_map(8, {1: (0, 1), 2: (4, 5)}, height=6)]
    result = metrics.glas_scores([np.zeros_like(g) for g in gts], gts)
    assert (result["tp"], result["fp"], result["fn"]) == (0, 0, 3)
    assert (result["f1"], result["object_dice"], result["object_hausdorff"]) == (0.0, 0.0, 10.0)


def test_split_is_pooled_not_averaged():
    # Image 1: one 10-px object predicted exactly. Image 2 (3x4): a 2-px object, no prediction.
    gt_1 = row_map(10, {1: (0, 9)}, height=2)
    gt_2 = row_map(4, {1: (1, 2)}, height=3)
    preds, gts = [gt_1, np.zeros_like(gt_2)], [gt_1, gt_2]
    pooled = metrics.glas_scores(preds, gts)
    # Pooled: TP 1, FP 0, FN 1 -> F1 2/3 (mean of per-image F1s: (1 + 0)/2 = 1/2).
    assert pooled["f1"] == pytest.approx(2 / 3)
    # Dice: pred side 1, gt side (10*1 + 2*0)/12 = 5/6 -> 11/12 (per-image mean 1/2).
    assert pooled["object_dice"] == pytest.approx(11 / 12, abs=1e-12)
    # Hausdorff: pred side 0, gt side (10*0 + 2*5)/12 = 5/6 -> 5/12 (per-image mean 5/2).
    assert pooled["object_hausdorff"] == pytest.approx(5 / 12, abs=1e-12)
    per_image = [metrics.per_image_scores(p, g) for p, g in zip(preds, gts, strict=True)]
    assert np.mean([s["object_dice"] for s in per_image]) == pytest.approx(0.5)
    assert np.mean([s["object_hausdorff"] for s in per_image]) == pytest.approx(2.5)


@pytest.mark.parametrize(
    "dtype, ids",
    [
        (np.uint8, (3, 250)),
        (np.uint16, (1000, 60000)),
        (np.uint16, (3, 1000)),  # table too large for boxes from its cells: per-map boxes
        (np.int32, (17, 2_000_000_000)),  # beyond the look-up table: np.unique path
        (np.int64, (5, 9)),
        (np.uint64, (2, 3)),
        (np.uint64, (2, 1 << 40)),
    ],
)
def test_dtypes_and_non_consecutive_ids_give_the_same_scores(dtype, ids):
    gt = row_map(13, {1: (1, 4), 2: (6, 11)}, height=3, row=1)
    pred = row_map(13, {1: (1, 11)}, height=3, row=1)
    reference = scores(pred, gt)
    relabel = np.array([0, *ids], dtype=dtype)
    result = scores(relabel[pred], relabel[gt])
    assert result == reference
    assert all(type(value) in (int, float) for value in result.values())  # JSON-ready
    assert result["object_dice"] == pytest.approx(856 / 1275, abs=1e-12)


def test_bool_masks_are_single_object_maps():
    mask = row_map(6, {1: (1, 3)}).astype(bool)
    assert metrics.per_image_scores(mask, mask)["f1"] == 1.0


def test_parallel_workers_match_serial():
    gts = [row_map(20, {1: (0, 3), 2: (10, 19)}), row_map(13, {1: (1, 4), 2: (6, 11)})]
    preds = [row_map(20, {1: (0, 3), 2: (7, 7)}), row_map(13, {9: (1, 11)})]
    assert metrics.glas_scores(preds, gts, workers=2) == metrics.glas_scores(preds, gts)


@pytest.mark.parametrize(
    "pred, gt, message",
    [
        (np.zeros((3, 4), np.int32), np.zeros((4, 3), np.int32), "same shape"),
        (np.zeros((3, 4), np.float32), np.zeros((3, 4), np.int32), "integer dtype"),
        (np.zeros((1, 3, 4), np.int32), np.zeros((1, 3, 4), np.int32), "2-D"),
        (np.full((3, 4), -1, np.int32), np.zeros((3, 4), np.int32), "negative"),
        (np.zeros((0, 4), np.int32), np.zeros((0, 4), np.int32), "empty"),
    ],
)
def test_bad_label_maps_raise_value_error(pred, gt, message):
    with pytest.raises(ValueError, match=message):
        metrics.per_image_scores(pred, gt)
    with pytest.raises(ValueError, match=message):
        metrics.seed_compatible_scores([pred], [gt])


def test_bad_splits_raise_value_error():
    label_map = np.zeros((3, 4), np.int32)
    with pytest.raises(ValueError, match="2 predictions for 1 ground truths"):
        metrics.glas_scores([label_map, label_map], [label_map])
    with pytest.raises(ValueError, match="empty split"):
        metrics.glas_scores([], [])
    with pytest.raises(ValueError, match="wrap a single map"):
        metrics.glas_scores(label_map, label_map)
    with pytest.raises(ValueError, match=r"pred\[1\]"):
        metrics.glas_scores([label_map, label_map.astype(float)], [label_map, label_map])


def test_object_classes_say_why_each_error_counts():
    # One row, ground truth: A cols 0-9 (10 px), B cols 12-17 (6 px) touching C cols 18-21
    # (4 px), D cols 24-26 (3 px), E cols 30-37 (8 px).
    gt = row_map(44, {1: (0, 9), 2: (12, 17), 3: (18, 21), 4: (24, 26), 5: (30, 37)})
    # Prediction: P1 = A exactly (TP). P2 spans B and C (partner B: 6 px against 4) -> TP for
    # B; C, covered wholly by P2, is lost to the merge. Nothing on D (missed). P3 and P4 each
    # cover exactly half of E (never "more than half"): two partial FPs, E partial. P5 on
    # cols 40-42 touches nothing (background FP).
    pred = row_map(44, {1: (0, 9), 2: (12, 21), 3: (30, 33), 4: (34, 37), 5: (40, 42)})
    classes = metrics.official_object_classes(pred, gt)
    assert list(classes) == list(metrics.OBJECT_CLASSES)
    assert {name: sorted(areas.tolist()) for name, areas in classes.items()} == {
        "tp": [6, 10], "fn_missed": [3], "fn_merged": [4], "fn_partial": [8],
        "fp_background": [3], "fp_partial": [4, 4]}
    result = scores(pred, gt)
    assert (result["tp"], result["fp"], result["fn"]) == (2, 3, 3)


@pytest.mark.parametrize("seed", range(3))
def test_object_classes_add_up_to_the_official_counts(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        shape = tuple(rng.integers(4, 30, size=2))
        gt = rng.integers(0, rng.integers(1, 6), size=shape)
        pred = rng.integers(0, rng.integers(1, 6), size=shape) * (rng.random(shape) < 0.7)
        classes = metrics.official_object_classes(pred, gt)
        terms = metrics.official_image_terms(pred, gt)
        assert len(classes["tp"]) == terms.tp
        assert sum(len(classes[name]) for name in ("fn_missed", "fn_merged", "fn_partial")) \
            == terms.fn
        assert sum(len(classes[name]) for name in ("fp_background", "fp_partial")) == terms.fp


def test_pooled_object_classes_count_and_take_medians():
    gt = row_map(10, {1: (0, 1), 2: (4, 8)})
    pooled = metrics.pool_object_classes([metrics.official_object_classes(gt, gt),
                                          metrics.official_object_classes(gt[:, :3], gt[:, :3])])
    assert pooled["tp"] == {"count": 3, "median_area": 2.0}  # areas 2, 5 and 2
    assert pooled["fn_missed"] == {"count": 0, "median_area": None}


# Pathological predictions (what an untrained model gives) must be scored in bounded time -----
GLAS_SHAPE = (522, 775)


def gland_grid():
    """GlaS-sized gt with 15 rectangular glands of distinct sizes; returns (map, boxes)."""
    gt = np.zeros(GLAS_SHAPE, np.int32)
    boxes = []
    for k in range(15):
        top, left = 20 + 170 * (k // 5), 20 + 150 * (k % 5)
        box = (top, top + 40 + 3 * k, left, left + 60 + 2 * k)  # [top, bottom) x [left, right)
        gt[box[0] : box[1], box[2] : box[3]] = k + 1
        boxes.append(box)
    return gt, boxes


def farthest_image_pixel_from_box(box, shape):
    """Largest distance from a pixel of the image to the rectangle `box` (at an image corner)."""
    top, bottom, left, right = box[0], box[1] - 1, box[2], box[3] - 1
    return max(
        math.hypot(max(top - row, row - bottom, 0), max(left - col, col - right, 0))
        for row in (0, shape[0] - 1)
        for col in (0, shape[1] - 1)
    )


def test_whole_image_prediction_is_fast_and_exact():
    gt, boxes = gland_grid()
    pred = np.ones(GLAS_SHAPE, np.uint8)  # one object covering the image
    start = time.perf_counter()
    result = metrics.glas_scores([pred], [gt])
    assert time.perf_counter() - start < 5.0
    areas = np.array([(b[1] - b[0]) * (b[3] - b[2]) for b in boxes], np.float64)
    image = float(pred.size)
    # The prediction's partner is the largest gland (the last), which it covers entirely:
    # TP 1, FP 0, FN 14, F1 2/16. Every gland partners with the prediction.
    assert (result["tp"], result["fp"], result["fn"]) == (1, 0, 14)
    assert result["f1"] == pytest.approx(1 / 8)
    dice = 2 * areas / (areas + image)
    expected_dice = 0.5 * (dice[-1] + areas @ dice / areas.sum())
    assert result["object_dice"] == pytest.approx(expected_dice, abs=1e-12)
    # H(image, gland) = distance from the farthest image corner to the gland rectangle.
    distance = np.array([farthest_image_pixel_from_box(b, GLAS_SHAPE) for b in boxes])
    expected_hausdorff = 0.5 * (distance[-1] + areas @ distance / areas.sum())
    assert result["object_hausdorff"] == pytest.approx(expected_hausdorff, abs=1e-9)


def test_noise_prediction_is_fast_and_exact():
    # Salt-and-pepper noise as one object (what an untrained model can give): half of the
    # image is its boundary. Scoring must stay exact and take bounded time.
    gt, boxes = gland_grid()
    pred = (np.random.default_rng(0).random(GLAS_SHAPE) < 0.5).astype(np.int32)
    pred[[0, 0, -1, -1], [0, -1, 0, -1]] = 1  # the image corners, farthest from every gland
    start = time.perf_counter()
    result = metrics.glas_scores([pred], [gt])
    assert time.perf_counter() - start < 5.0
    # H(noise, gland) = distance from the farthest image corner to the gland rectangle: every
    # gland pixel is within a few pixels of a noise pixel, far less.
    distance = np.array([farthest_image_pixel_from_box(b, GLAS_SHAPE) for b in boxes])
    areas = np.array([(b[1] - b[0]) * (b[3] - b[2]) for b in boxes], np.float64)
    partner = np.bincount(gt[pred == 1], minlength=16)[1:].argmax()
    expected = 0.5 * (distance[partner] + areas @ distance / areas.sum())
    assert result["object_hausdorff"] == pytest.approx(expected, abs=1e-9)


def test_many_specks_against_a_few_glands_is_fast():
    gt, boxes = gland_grid()
    gt[gt > 3] = 0  # keep three glands
    pred = np.zeros(GLAS_SHAPE, np.int32)
    rows, cols = np.meshgrid(np.arange(0, 520, 11), np.arange(0, 773, 11), indexing="ij")
    for label, (row, col) in enumerate(zip(rows.ravel(), cols.ravel(), strict=True), start=1):
        pred[row : row + 2, col : col + 2] = label  # 3384 specks of 2 x 2
    start = time.perf_counter()
    result = metrics.glas_scores([pred], [gt])
    assert time.perf_counter() - start < 5.0
    # A 4-px speck never covers more than half a gland: TP 0, every speck FP, 3 FN.
    assert (result["tp"], result["fp"], result["fn"]) == (0, rows.size, 3)
    assert result["f1"] == 0.0
    # A speck covering o px of a gland G (glands are far apart: at most one) has Dice
    # 2 o / (4 + |G|), 0 off the glands; a gland's partner is a speck wholly inside it (4 px,
    # ties to the smallest id), Dice 8 / (4 + |G|).
    areas = np.bincount(gt.ravel())[1:].astype(np.float64)
    speck_dice = np.array([
        2 * np.count_nonzero(patch) / (4 + areas[patch.max() - 1]) if patch.any() else 0.0
        for patch in (gt[r : r + 2, c : c + 2]
                      for r, c in zip(rows.ravel(), cols.ravel(), strict=True))
    ])
    expected_dice = 0.5 * (speck_dice.mean() + areas @ (8 / (4 + areas)) / areas.sum())
    assert result["object_dice"] == pytest.approx(expected_dice, abs=1e-12)
    assert 0 < result["object_hausdorff"] < metrics.image_diagonal(GLAS_SHAPE)


# --------------------------------------------------------------------------------------------
# Seed-compatible protocol
# --------------------------------------------------------------------------------------------
def test_count_score_counts_binarised_components():
    touching = np.array([[1, 1, 2, 2], [0, 0, 0, 0], [3, 0, 0, 0]])  # 1 and 2 merge -> 2 parts
    assert metrics.count_score(touching, touching) == 1.0
    apart = np.array([[1, 0, 2, 0], [0, 0, 0, 0], [0, 0, 0, 3]])  # 3 components
    assert metrics.count_score(apart, touching) == pytest.approx(2 / 3)
    diagonal = np.array([[1, 0], [0, 2]])  # 8-connected: one component (4-connected: two)
    assert metrics.count_score(diagonal, np.array([[1, 0], [0, 0]])) == 1.0
    assert metrics.count_score(np.zeros((2, 2), int), diagonal) == 0.0
    assert metrics.count_score(np.zeros((2, 2), int), np.zeros((2, 2), int)) == 0.0


def test_seed_scores_of_a_merge():
    # Same maps as test_two_objects_merged: G1 = cols 1-4, G2 = cols 6-11, S = cols 1-11.
    gt = row_map(13, {1: (1, 4), 2: (6, 11)}, height=3, row=1)
    pred = row_map(13, {9: (1, 11)}, height=3, row=1)
    result = metrics.seed_compatible_image_scores(pred, gt)
    # Pixel F1: 2*10/(11 + 10) = 20/21.
    assert result["f1"] == pytest.approx(20 / 21, abs=1e-12)
    # Object Dice, Dice restricted to the object's own pixels: G1 2*4/(4+4) = 1 weighted
    # 4/10, G2 2*6/(6+6) = 1 weighted 6/10; S (partner G2) 2*6/(11+6) = 12/17 weighted 11/11
    # -> (1 + 12/17)/2 = 29/34.
    assert result["object_dice"] == pytest.approx(29 / 34, abs=1e-12)
    # Hausdorff with bounding-box crops: G1 vs S cropped to cols 1-4 -> 0; G2 vs S cropped to
    # cols 6-11 -> 0; S vs G2 (inside S's box) -> 5, weight 11/11 -> (0 + 5)/2 = 2.5.
    assert result["object_hausdorff"] == pytest.approx(2.5, abs=1e-12)
    assert result["count"] == 0.5  # 1 predicted component, 2 ground-truth ones


def test_seed_scores_merge_touching_instances():
    # Two touching gt instances predicted exactly: binarised, they are one component.
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    result = metrics.seed_compatible_image_scores(gt, gt)
    assert result == {"f1": 1.0, "object_dice": 1.0, "object_hausdorff": 0.0, "count": 1.0}
    # The same prediction with the instances apart: official counts 2 TP; the seed, whose
    # ground truth has merged into one component, partners S1 and S2 with it (Dice restricted
    # to each S: 1) and the merged G with S1 (2*4/(8+4) = 2/3, weight 4/8): (1/3 + 1)/2.
    pred = np.array([[1, 1, 0, 2], [1, 1, 0, 2]])
    result = metrics.seed_compatible_image_scores(pred, gt)
    assert result["object_dice"] == pytest.approx((1 / 3 + 1) / 2, abs=1e-12)
    assert result["count"] == 0.5


def test_seed_hausdorff_weights_by_partner_pixels_in_the_box():
    # gt: an L of 4 px in a 2x3 box; prediction: the full 2x3 box (6 px).
    gt = np.array([[1, 1, 1], [1, 0, 0]])
    pred = np.ones((2, 3), np.int32)
    result = metrics.seed_compatible_image_scores(pred, gt)
    assert result["f1"] == pytest.approx(0.8)  # 2*4/(6 + 4)
    # Object Dice: G 2*4/(4+4) = 1 weight 4/4; S 2*4/(6+4) = 0.8 weight 6/6 -> 0.9.
    assert result["object_dice"] == pytest.approx(0.9, abs=1e-12)
    # Hausdorff(G, S) = 1 (pixel (1,2) is 1 from the L). gt side weight = S pixels in G's box
    # / gt area = 6/4; pred side weight 6/6: (1.5*1 + 1*1)/2 = 1.25 (official: 1).
    assert result["object_hausdorff"] == pytest.approx(1.25, abs=1e-12)
    assert metrics.object_hausdorff(pred, gt) == 1.0


def test_seed_hausdorff_without_overlap_uses_box_area_and_diagonal():
    gt = row_map(12, {1: (0, 3)})  # 1x4 box
    pred = row_map(12, {1: (8, 9)})  # 1x2 box
    result = metrics.seed_compatible_image_scores(pred, gt)
    # gt: (4/4) * sqrt(1 + 16); pred: (2/2) * sqrt(1 + 4); halved.
    assert result["object_hausdorff"] == pytest.approx((math.sqrt(17) + math.sqrt(5)) / 2)
    assert (result["f1"], result["object_dice"], result["count"]) == (0.0, 0.0, 1.0)


def test_seed_empty_cases():
    empty = np.zeros((3, 4), np.int32)
    objects = row_map(4, {1: (0, 1)}, height=3)
    # Both empty: the seed gives F1 0 and object Dice 0 (not 1), Hausdorff the diagonal.
    expected = {"f1": 0.0, "object_dice": 0.0, "object_hausdorff": 5.0, "count": 0.0}
    assert metrics.seed_compatible_image_scores(empty, empty) == expected
    assert metrics.seed_compatible_image_scores(empty, objects) == expected
    assert metrics.seed_compatible_image_scores(objects, empty) == expected


def test_seed_split_scores_are_per_image_means():
    gt = row_map(13, {1: (1, 4), 2: (6, 11)}, height=3, row=1)
    pred = row_map(13, {9: (1, 11)}, height=3, row=1)
    empty = np.zeros((3, 4), np.int32)
    result = metrics.seed_compatible_scores([pred, empty], [gt, empty])
    assert result["f1"] == pytest.approx((20 / 21 + 0) / 2)
    assert result["object_dice"] == pytest.approx((29 / 34 + 0) / 2)
    assert result["object_hausdorff"] == pytest.approx((2.5 + 5) / 2)
    assert result["count"] == pytest.approx((0.5 + 0) / 2)
    assert result["num_images"] == 2
