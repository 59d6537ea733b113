"""Evaluation CLI on an exported tiny U-Net and the synthetic GlaS."""
import json
import math

import numpy as np
import pytest

from keras_glas import evaluate, export
from keras_glas.evaluate import ScoredImage
from keras_glas.models.unet import build_unet
from keras_glas.postprocess import PostprocessOptions


def red_threshold_unet(threshold=200):
    """A base-4, depth-2 U-Net with hand-set weights: gland = 9×9 box-blurred red channel below
    `threshold` (synthetic glands are darker in red than the stroma). Deterministic, fast, and
    with real partly-right predictions, unlike a randomly initialised net."""
    model = build_unet(base_filters=4, depth=2)
    for layer in model.layers:
        layer.set_weights([np.zeros_like(weight) for weight in layer.get_weights()])
    for name, inputs in (("encoder1_conv1", 3), ("encoder1_conv2", 4), ("decoder1_conv1", 8),
                         ("decoder1_conv2", 4)):
        box = np.zeros((3, 3, inputs, 4), np.float32)
        box[:, :, 0, 0] = 1 / 9
        model.get_layer(name).set_weights([box, np.zeros(4, np.float32)])
    head = np.zeros((1, 1, 4, 1), np.float32)
    head[0, 0, 0, 0] = -40.0
    model.get_layer("mask_logits").set_weights(
        [head, np.array([40.0 * threshold / 255], np.float32)])
    return model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("evaluate") / "saved_model"
    return export.export_model(red_threshold_unet(), out_dir,
                               PostprocessOptions(min_size=100, fill_holes=True))


def test_evaluate_cli_writes_scores_and_figures(saved_model, synthetic_data_dir, tmp_path, capsys):
    json_path = tmp_path / "scores" / "tiny.json"
    figures = tmp_path / "figures"
    status = evaluate.main([str(saved_model), "--split", "all", "--dataset", "glas/synthetic",
                            "--data-dir", synthetic_data_dir, "--json", str(json_path),
                            "--figures", str(figures), "--name", "tiny-unet"])
    assert status == 0
    results = json.loads(json_path.read_text())
    assert results["model"] == "tiny-unet"
    assert (results["dataset"], results["ground_truth"]) == ("glas/synthetic", "instances")
    assert results["postprocess"]["min_size"] == 100
    for split, n_images in (("test_a", 12), ("test_b", 8)):
        scores = results[split]
        assert scores["n_images"] == n_images
        for key in ("f1", "object_dice", "object_hausdorff", "count"):
            assert math.isfinite(scores[key]) and math.isfinite(scores["seed"][key]), (split, key)
        assert 0.2 < scores["f1"] <= 1 and 0.2 < scores["object_dice"] <= 1  # partly right
        assert min(scores["tp"], scores["fp"], scores["fn"]) >= 0
        for rank in ("best", "average", "worst"):
            assert (figures / f"{split}_{rank}.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "| tiny-unet | test_a |" in table and "| tiny-unet | test_b |" in table


def test_evaluate_postprocess_overrides_and_errors(saved_model, synthetic_data_dir, tmp_path):
    json_path = tmp_path / "scores.json"
    evaluate.main([str(saved_model), "--split", "test_b", "--dataset", "glas/synthetic",
                   "--data-dir", synthetic_data_dir, "--json", str(json_path),
                   "--postprocess", "min_size=1000000", "split=watershed"])
    results = json.loads(json_path.read_text())
    assert results["postprocess"]["split"] == "watershed"
    assert "test_a" not in results
    # No object is larger than the image: nothing survives, every gland is a false negative.
    assert (results["test_b"]["tp"] == 0 and results["test_b"]["fp"] == 0
            and results["test_b"]["fn"] > 0)

    with pytest.raises(SystemExit) as bad_key:
        evaluate.main([str(saved_model), "--split", "test_a", "--postprocess", "colour=red"])
    assert bad_key.value.code == 2
    with pytest.raises(SystemExit) as bad_model:
        evaluate.main([str(tmp_path), "--split", "test_a"])
    assert bad_model.value.code == 2


def test_a_damaged_record_is_an_error_naming_the_dataset(saved_model, damaged_synthetic_copy,
                                                         capsys):
    copy = damaged_synthetic_copy("test_b")
    with pytest.raises(SystemExit) as damaged:
        evaluate.main([str(saved_model), "--split", "test_b", "--dataset", "glas/synthetic",
                       "--data-dir", str(copy)])
    assert damaged.value.code == 2
    message = capsys.readouterr().err
    assert "records of 'glas/synthetic'" in message and "damaged" in message
    assert "tfds build glas/synthetic" in message


def test_validation_split_scores_the_runs_held_out_training_images(tiny_unet_config,
                                                                    synthetic_data_dir, tmp_path):
    from keras_glas.train import train

    run_dir = tmp_path / "run"
    train(tiny_unet_config("data.validation_fraction=0.25"), run_dir, verbose=0)
    json_path = tmp_path / "validation.json"
    status = evaluate.main([str(run_dir), "--split", "validation", "--dataset", "glas/synthetic",
                            "--data-dir", synthetic_data_dir, "--json", str(json_path)])
    assert status == 0
    results = json.loads(json_path.read_text())
    assert results["validation_split"] == "train[:25%]"
    assert results["validation"]["n_images"] == 6  # a quarter of the 24 synthetic train images
    assert "test_a" not in results and "test_b" not in results


def test_validation_split_needs_the_runs_config(saved_model, synthetic_data_dir, capsys):
    with pytest.raises(SystemExit) as missing:
        evaluate.main([str(saved_model), "--split", "validation", "--dataset", "glas/synthetic",
                       "--data-dir", synthetic_data_dir])
    assert missing.value.code == 2
    assert "needs the training run's config" in capsys.readouterr().err


def test_score_split_on_perfect_and_empty_predictions():
    gt = np.zeros((30, 40), np.int32)
    gt[2:10, 3:12] = 1
    gt[15:25, 20:35] = 2
    perfect = evaluate.score_split([ScoredImage("a", gt.copy(), gt),
                                    ScoredImage("b", gt.copy(), gt)])
    assert (perfect["f1"], perfect["object_dice"], perfect["object_hausdorff"],
            perfect["count"]) == (1, 1, 0, 1)
    assert (perfect["tp"], perfect["fp"], perfect["fn"], perfect["n_images"]) == (4, 0, 0, 2)
    assert perfect["seed"]["object_dice"] == pytest.approx(1.0)

    empty = evaluate.score_split([ScoredImage("a", np.zeros_like(gt), gt)])
    assert (empty["f1"], empty["object_dice"], empty["count"], empty["fn"]) == (0, 0, 0, 2)
    assert perfect["object_classes"]["tp"] == {"count": 4, "median_area": 111.0}  # 72, 150 px twice
    assert empty["object_classes"]["fn_missed"] == {"count": 2, "median_area": 111.0}
    assert empty["object_classes"]["tp"]["count"] == 0
    printed = evaluate.format_object_classes({"test_a": perfect, "test_b": empty})
    assert printed.splitlines() == [
        "test_a objects: tp 4 (median 111 px), fn_missed 0, fn_merged 0, fn_partial 0, "
        "fp_background 0, fp_partial 0",
        "test_b objects: tp 0, fn_missed 2 (median 111 px), fn_merged 0, fn_partial 0, "
        "fp_background 0, fp_partial 0"]


def test_pick_examples_orders_by_object_dice():
    gt = np.zeros((20, 20), np.int32)
    gt[2:12, 2:12] = 1
    half = np.zeros_like(gt)
    half[2:12, 2:7] = 1
    images = [ScoredImage("half", half, gt), ScoredImage("none", np.zeros_like(gt), gt),
              ScoredImage("all", gt.copy(), gt)]
    picks = evaluate.pick_examples(images)
    assert [(label, item.name) for label, item, _ in picks] == [
        ("best", "all"), ("average", "half"), ("worst", "none")]
    assert [dice for _, _, dice in picks] == pytest.approx([1.0, 2 / 3, 0.0])


def test_repostprocess_options_update_the_exports_and_refuse_a_maskrcnn():
    info = {"model_kind": "unet", "postprocess": {"threshold": 0.5, "min_size": 300,
                                                  "split": "contour"}}
    options = evaluate.repostprocess_options(info, ["min_size=1500", "threshold=0.4"])
    assert options == PostprocessOptions(threshold=0.4, min_size=1500, split="contour")
    with pytest.raises(ValueError, match="min_size"):
        evaluate.repostprocess_options(info, ["minsize=1"])
    with pytest.raises(ValueError, match="Mask R-CNN builds its instance map itself"):
        evaluate.repostprocess_options({"model_kind": "maskrcnn", "postprocess": None},
                                       ["min_size=1"])
