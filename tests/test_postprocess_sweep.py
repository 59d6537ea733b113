"""benchmarks.postprocess_sweep: a grid of post-processing settings scored from one prediction."""
import json

import numpy as np
import pytest

from keras_glas import evaluate
from keras_glas.export import export_run
from keras_glas.train import train

from benchmarks import postprocess_sweep
from benchmarks.real_glas import METRIC_DIRECTIONS

GRID = {"threshold": ["0.3", "0.7"], "min_size": ["0", "20"]}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_unet_config):
    run_dir = tmp_path_factory.mktemp("sweep") / "run"
    train(tiny_unet_config("data.validation_fraction=0.25", "train.epochs=2"), run_dir,
          verbose=0)
    return export_run(run_dir, run_dir.parent / "saved_model")


def test_parse_grid_keeps_the_order_and_names_every_combination():
    grid = postprocess_sweep.parse_grid(["threshold=0.4, 0.6", "min_size=0,50,100"])
    assert grid == {"threshold": ["0.4", "0.6"], "min_size": ["0", "50", "100"]}
    combinations = postprocess_sweep.grid_overrides(grid)
    assert list(combinations)[:4] == ["threshold=0.4,min_size=0", "threshold=0.4,min_size=50",
                                      "threshold=0.4,min_size=100", "threshold=0.6,min_size=0"]
    assert len(combinations) == 6
    assert combinations["threshold=0.6,min_size=100"] == ["threshold=0.6", "min_size=100"]


@pytest.mark.parametrize("entries, message", [
    (["threshold"], "expected key=value"),
    (["min_size="], "expected key=value"),
    (["min_size=1", "min_size=2"], "given twice"),
])
def test_parse_grid_rejects_bad_entries(entries, message):
    with pytest.raises(ValueError, match=message):
        postprocess_sweep.parse_grid(entries)


def test_sweep_scores_as_evaluate_does_and_selects_on_validation(saved_model,
                                                                 synthetic_data_dir):
    record = postprocess_sweep.sweep(saved_model, "glas/synthetic", synthetic_data_dir, GRID,
                                     progress=False)
    assert list(record["variants"]) == ["threshold=0.3,min_size=0", "threshold=0.3,min_size=20",
                                        "threshold=0.7,min_size=0", "threshold=0.7,min_size=20"]
    assert record["validation_split"] == "train[:25%]"
    # Each combination scores what evaluate scores with the same --postprocess options.
    for name in ("threshold=0.3,min_size=20", "threshold=0.7,min_size=0"):
        expected = evaluate.evaluate(saved_model, ("test_a", "validation"), "glas/synthetic",
                                     synthetic_data_dir, name.split(","))
        variant = record["variants"][name]
        assert variant["postprocess"] == expected["postprocess"]
        for split in ("test_a", "validation"):
            assert variant[split] == expected[split]
        assert variant["test_b"]["n_images"] > 0
    # The grid changes the instances it scores.
    scores = [variant["validation"]["object_dice"] for variant in record["variants"].values()]
    assert len(set(scores)) > 1
    selected = record["selected_on_validation"]
    assert selected["rank_sum"] == min(selected["rank_sums"].values())
    assert sum(selected["rank_sums"].values()) >= len(METRIC_DIRECTIONS) * len(GRID) * 2


def test_cli_writes_the_table_and_json(saved_model, synthetic_data_dir, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    status = postprocess_sweep.main([str(saved_model), "--dataset", "glas/synthetic",
                                     "--data-dir", synthetic_data_dir, "--splits", "validation",
                                     "--grid", "min_size=0,30", "--out", str(out)])
    assert status == 0
    record = json.loads(out.read_text())
    assert list(record["variants"]) == ["min_size=0", "min_size=30"]
    assert set(record["variants"]["min_size=30"]) == {"postprocess", "validation"}
    assert record["command"].startswith("python -m benchmarks.postprocess_sweep ")
    printed = capsys.readouterr().out
    assert "| min_size=0 |" in printed or "| **min_size=0** |" in printed
    assert f"selected on validation: {record['selected_on_validation']['variant']}" in printed


def test_unknown_option_is_refused_before_predicting(saved_model, synthetic_data_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        postprocess_sweep.main([str(saved_model), "--dataset", "glas/synthetic", "--data-dir",
                                synthetic_data_dir, "--grid", "thresh=0.5"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "thresh=0.5" in error and "min_size" in error


def test_an_ensemble_of_one_model_twice_scores_as_the_model(saved_model, synthetic_data_dir):
    grid = {"min_size": ["20"]}
    single = postprocess_sweep.sweep(saved_model, "glas/synthetic", synthetic_data_dir, grid,
                                     ("validation", "test_a"), progress=False)
    twice = postprocess_sweep.sweep([saved_model, saved_model], "glas/synthetic",
                                    synthetic_data_dir, grid, ("validation", "test_a"),
                                    progress=False)
    assert twice["variants"] == single["variants"]
    assert twice["validation_split"] == single["validation_split"] == "train[:25%]"


def constant_predictor(probability, contour=None):
    """A stand-in for `SavedModelPredictor`: the same maps for every image."""
    def predict(image):
        maps = {"probabilities": np.full(image.shape[:2], probability, np.float32)}
        if contour is not None:
            maps["contour"] = np.full(image.shape[:2], contour, np.float32)
        return maps
    return predict


def test_averaged_maps_are_the_mean_of_the_members(synthetic_data_dir):
    members = [constant_predictor(0.2, 0.9), constant_predictor(0.6, 0.1),
               constant_predictor(0.7, 0.2)]
    examples = postprocess_sweep.averaged_maps(members, "glas/synthetic", "test_b",
                                               synthetic_data_dir, progress=False)
    alone = postprocess_sweep.averaged_maps(members[:1], "glas/synthetic", "test_b",
                                            synthetic_data_dir, progress=False)
    assert [name for name, _, _ in examples] == [name for name, _, _ in alone]
    for (_, ground_truth, maps), (_, truth_alone, _) in zip(examples, alone, strict=True):
        np.testing.assert_array_equal(ground_truth, truth_alone)
        assert maps["probabilities"].shape == ground_truth.shape
        np.testing.assert_allclose(maps["probabilities"], 0.5, rtol=1e-6)
        np.testing.assert_allclose(maps["contour"], 0.4, rtol=1e-6)


def test_members_with_different_maps_are_refused(synthetic_data_dir):
    with pytest.raises(ValueError, match="contour head"):
        postprocess_sweep.averaged_maps([constant_predictor(0.2, 0.9), constant_predictor(0.6)],
                                        "glas/synthetic", "test_b", synthetic_data_dir,
                                        progress=False)


def test_members_that_held_out_different_images_are_refused(monkeypatch):
    held_out = {"run_a": "train[:10%]", "run_b": "train[:20%]"}
    monkeypatch.setattr(postprocess_sweep, "validation_split", held_out.get)
    assert postprocess_sweep.ensemble_validation_split(["run_a", "run_a"]) == "train[:10%]"
    with pytest.raises(ValueError, match="different validation images"):
        postprocess_sweep.ensemble_validation_split(["run_a", "run_b"])
