"""The real-GlaS benchmark driver (`benchmarks/real_glas.py`) and its CPU configs.

The end-to-end test runs the whole chain (build `glas/binary_masks`, train, export, evaluate,
post-processing study, leaderboard) with `--smoke` on the first 10 images of each split of the
real data; the others check the configs and the driver's own logic without training.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keras_glas import train
from keras_glas.config import load_config

from benchmarks import real_glas

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("model", ["unet", "maskrcnn"])
def test_cpu_config_validates_on_real_data_with_a_validation_split(model):
    config = load_config(REPO_ROOT / "configs" / f"{model}_glas_cpu.yaml")
    assert config.model.name == model
    assert config.data.dataset == "glas/binary_masks"
    assert config.data.validation_fraction > 0  # checkpoint selection on train[:k%], not test


@pytest.mark.parametrize("model", ["unet", "maskrcnn"])
def test_smoke_train_arguments_validate_against_the_cpu_config(model):
    """--smoke trains each model with its CPU config plus SMOKE_TRAIN_ARGS: the overrides must
    make a valid config (a 64-px scale with the config's taller input_height did not)."""
    args = train.parse_args([model, "--config", str(real_glas.config_path(model)),
                             *real_glas.SMOKE_TRAIN_ARGS[model]])
    config = load_config(args.config, train.overrides_from_args(args))
    assert config.model.name == model
    assert config.data.image_size == 64 and config.data.input_height <= 64
    assert config.train.epochs == 1 and config.train.steps_per_epoch == 2


def test_study_variants_switch_one_step_on_at_a_time():
    configured = {"threshold": 0.5, "min_size": 300, "fill_holes": True, "split": "contour",
                  "contour_threshold": 0.5, "watershed_h": 3.0}
    variants = real_glas.study_variants(configured, has_contour=True)
    assert set(variants) == {"none", "fill_holes", "min_size", "split_watershed",
                             "split_contour", "split_contour_min_seed", "config",
                             "config_split_none", "config_split_watershed",
                             "config_split_contour_min_seed"}
    assert variants["none"] == ["min_size=0", "fill_holes=false", "split=none"]
    assert variants["min_size"] == ["min_size=300", "fill_holes=false", "split=none"]
    assert variants["split_contour"] == ["min_size=0", "fill_holes=false", "split=contour"]
    assert variants["split_contour_min_seed"] == [*variants["split_contour"], "min_seed_size=300"]
    assert variants["config_split_contour_min_seed"] == [*variants["config"], "min_seed_size=300"]
    assert "fill_holes=true" in variants["config"] and "split=contour" in variants["config"]
    assert variants["config_split_none"] == [
        option.replace("split=contour", "split=none") for option in variants["config"]]
    without_head = real_glas.study_variants({**configured, "min_size": 0}, has_contour=False)
    assert not {"split_contour", "config_split_contour", "split_contour_min_seed",
                "config_split_contour_min_seed"} & set(without_head)
    assert without_head["min_size"][0] == f"min_size={real_glas.STUDY_MIN_SIZE}"


def test_variants_with_the_same_resolved_options_are_named_once():
    configured = {"threshold": 0.5, "min_size": 300, "fill_holes": False, "split": "none",
                  "contour_threshold": 0.5}
    variants = real_glas.study_variants(configured, has_contour=True)
    # No hole filling and no split: the config is small-object removal alone.
    assert real_glas.same_variants(configured, variants) == {"config": "min_size"}
    splitting = {**configured, "split": "contour"}
    assert real_glas.same_variants(splitting, real_glas.study_variants(splitting, True)) == {
        "config_split_none": "min_size"}
    filling = {**splitting, "fill_holes": True}
    assert real_glas.same_variants(filling, real_glas.study_variants(filling, True)) == {}


# The config's options resolve to those of the study's `min_size` variant.
MIN_SIZE_CONFIG = {"threshold": 0.5, "min_size": 300, "fill_holes": False, "split": "none",
                   "contour_threshold": 0.5}


def run_fake_study(tmp_path, monkeypatch, **study_options):
    """`postprocess_study` of a U-Net without a contour head configured as `MIN_SIZE_CONFIG`,
    with a fake evaluate stage that gives new scores at every call.

    Returns:
        `(study, evaluated)`: the study and the `(saved_model, postprocess options)` of each
        evaluate call, in order.
    """
    evaluated = []

    def fake_stage(name, argv, log_dir):
        options = argv[argv.index("--postprocess") + 1:]
        value = (len(evaluated) % 7 + 1) / 10
        evaluated.append((argv[3], tuple(options)))
        split = argv[argv.index("--split") + 1]
        splits = real_glas.SPLITS if split == "all" else (split,)
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps(
            {"postprocess": options, **dict.fromkeys(splits, _scores(value, value, 100 * value))}))
        return 1.0

    monkeypatch.setattr(real_glas, "run_stage", fake_stage)
    (tmp_path / "study").mkdir()
    study = real_glas.postprocess_study(
        tmp_path, tmp_path / "saved_model", real_glas.Paths(tmp_path, tmp_path, tmp_path),
        {"postprocess": MIN_SIZE_CONFIG, "outputs": ["mask"]}, "U-Net", **study_options)
    return study, evaluated


def test_study_scores_a_repeated_variant_once(tmp_path, monkeypatch):
    study, evaluated = run_fake_study(tmp_path, monkeypatch)
    variants = study["variants"]
    assert set(variants) == set(real_glas.study_variants(MIN_SIZE_CONFIG, has_contour=False))
    assert len(evaluated) == 2 * (len(variants) - 1)  # test splits + validation, config once
    assert variants["config"]["same_as"] == "min_size"
    assert {split: variants["config"][split] for split in ("test_a", "test_b", "validation")} \
        == {split: variants["min_size"][split] for split in ("test_a", "test_b", "validation")}
    assert "same_as" not in variants["min_size"]
    assert study["selected_on_validation"]["rank_sums"]["config"] \
        == study["selected_on_validation"]["rank_sums"]["min_size"]


def test_study_scores_the_flip_averaged_export_under_the_config_postprocessing(tmp_path,
                                                                               monkeypatch):
    # The config's options are those of `min_size`, yet the flip variant is scored, on its model.
    study, evaluated = run_fake_study(tmp_path, monkeypatch,
                                      flipped_saved_model=tmp_path / "flipped",
                                      flipped_export_command="python -m keras_glas.export X")
    flips = study["variants"][real_glas.FLIPS_VARIANT]
    assert "same_as" not in flips and flips["export_command"] == "python -m keras_glas.export X"
    config_options = tuple(real_glas.study_variants(MIN_SIZE_CONFIG, has_contour=False)["config"])
    assert [entry for entry in evaluated if entry[0] == str(tmp_path / "flipped")] == \
        [(str(tmp_path / "flipped"), config_options)] * 2  # test splits + validation
    assert flips["validation"] != study["variants"]["config"]["validation"]
    assert real_glas.FLIPS_VARIANT in study["selected_on_validation"]["rank_sums"]


def _scores(f1, dice, hausdorff):
    return {"f1": f1, "object_dice": dice, "object_hausdorff": hausdorff,
            "seed": {"f1": f1, "object_dice": dice, "object_hausdorff": hausdorff}}


def test_compare_to_baseline_signs_and_majority_rule():
    variants = {
        "none": {"test_a": _scores(0.5, 0.6, 100.0), "test_b": _scores(0.5, 0.6, 100.0)},
        # better F1 and Hausdorff on A; only Dice better on B
        "fill_holes": {"test_a": _scores(0.6, 0.6, 90.0), "test_b": _scores(0.4, 0.7, 120.0)},
    }
    result = real_glas.compare_to_baseline(variants)
    delta = result["deltas_vs_none"]["fill_holes"]["test_a"]["official"]
    assert delta["f1"] == pytest.approx(0.1) and delta["object_hausdorff"] == pytest.approx(-10.0)
    assert result["helps"] == {"fill_holes": {"test_a": True, "test_b": False}}


def test_selection_on_validation_ranks_by_the_challenge_rule_and_ignores_test_scores():
    def variant(validation, test):
        return {"validation": _scores(*validation), "test_a": _scores(*test),
                "test_b": _scores(*test)}

    variants = {
        "none": variant((0.5, 0.8, 100.0), (0.9, 0.9, 10.0)),  # best on test only
        "min_size": variant((0.7, 0.8, 90.0), (0.1, 0.1, 900.0)),  # ranks 1 + 2 + 1
        "config": variant((0.6, 0.9, 95.0), (0.1, 0.1, 900.0)),  # ranks 2 + 1 + 2
    }
    selected = real_glas.select_on_validation(variants)
    # F1 ranks min_size 1, config 2, none 3; Dice: config 1, the others tie at 2; Hausdorff
    # (lower is better): min_size 1, config 2, none 3.
    assert selected["rank_sums"] == {"none": 8, "min_size": 4, "config": 5}
    assert selected["variant"] == "min_size" and selected["rank_sum"] == 4
    tied = {"a": variant((0.5, 0.8, 100.0), (0, 0, 0)), "b": variant((0.5, 0.8, 100.0), (0, 0, 0))}
    assert real_glas.select_on_validation(tied)["variant"] == "a"


def test_learning_curve_stamps_rows_and_marks_resumed_ones(tmp_path):
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss,val_loss,val_glas_f1\n0,1.0,1.5,0.25\n")
    clock = real_glas.HistoryClock(history, poll_seconds=60)
    clock.start()
    with history.open("a") as handle:
        handle.write("1,0.5,0.9,NA\n")  # GlaS metrics not scored that epoch
    clock.stop()
    curve = real_glas.learning_curve(history, clock.stamps)
    assert [point["epoch"] for point in curve] == [1, 2]
    assert curve[0]["elapsed_s"] is None  # present before the run started (resumed run)
    assert curve[1]["elapsed_s"] >= 0 and curve[1]["val_loss"] == 0.9
    assert curve[0]["val_glas_f1"] == 0.25 and "val_glas_f1" not in curve[1]


def test_failing_stage_names_itself_and_its_log(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    with pytest.raises(real_glas.StageError, match=r"stage train-unet failed with exit code 3"
                                                   r".*train-unet\.log") as error:
        real_glas.run_stage("train-unet", argv, tmp_path)
    assert str(tmp_path / "train-unet.log") in str(error.value)
    assert "boom" in (tmp_path / "train-unet.log").read_text()


@pytest.mark.parametrize("flags", [["--smoke"], ["--max-images", "10"]])
def test_partial_runs_refuse_the_repository_results_dir(flags):
    args = real_glas.parse_args([*flags, "--out-dir", str(REPO_ROOT / "results")])
    with pytest.raises(SystemExit, match="never write into the repository's results"):
        real_glas.resolve_paths(args)


def test_max_images_floor():
    with pytest.raises(SystemExit, match="--max-images must be >= 10"):
        real_glas.resolve_paths(real_glas.parse_args(["--smoke", "--max-images", "3"]))


def test_smoke_chain_on_real_glas(shared_glas_dir, tmp_path):
    work_dir, out_dir = tmp_path / "work", tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.real_glas", "--smoke", "--models", "unet",
         "--max-images", "10", "--glas-dir", str(shared_glas_dir), "--work-dir", str(work_dir),
         "--out-dir", str(out_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200,
        env={**real_glas.subprocess_env(), "CUDA_VISIBLE_DEVICES": ""})
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    record = json.loads((out_dir / "real_glas_unet.json").read_text())
    assert record["dataset"] == "glas/binary_masks" and record["smoke"] is True
    for split in real_glas.SPLITS:
        scores = record[split]
        assert scores["n_images"] == 10
        for key in ("f1", "object_dice", "object_hausdorff"):
            assert math.isfinite(scores[key]), (split, key, scores[key])
            assert math.isfinite(scores["seed"][key]), (split, "seed", key)
    for stage in ("train", "export", "evaluate"):
        assert record["commands"][stage].startswith(f"python -m keras_glas.{stage} ")
    assert "--figures" in record["commands"]["evaluate"]
    assert "--test-time-flips" in record["commands"]["export_test_time_flips"]
    assert "export_test_time_flips_s" in record["timings"]
    # The row is the export the config names.
    flips = record["resolved_config"]["train"]["export_test_time_flips"]
    assert ("saved_model_test_time_flips " in record["commands"]["evaluate"]) is flips
    assert "--no-test-time-flips" in record["commands"]["export"]
    assert all(seconds > 0 for seconds in record["timings"].values()), record["timings"]
    assert record["resolved_config"]["model"]["base_filters"] == 4
    assert record["resolved_config"]["data"]["input_height"] == 48  # a lower canvas trains
    assert [point["epoch"] for point in record["learning_curve"]] == [1]
    assert record["learning_curve"][0]["elapsed_s"] > 0
    assert "val_loss" in record["learning_curve"][0]
    # The CPU config scores the validation images with the GlaS metrics (first epoch included).
    assert 0.0 <= record["learning_curve"][0]["val_glas_object_dice"] <= 1.0
    gaps = record["target_gaps"]
    assert gaps["seed"]["target"] == "DTU-MASKRCNN" and gaps["official"]["target"] == "CUMedVision2"
    seed_f1 = gaps["seed"]["test_a"]["f1"]
    assert seed_f1["better_by"] == pytest.approx(record["test_a"]["seed"]["f1"] - 0.922)
    assert record["machine"]["logical_cores"] >= 1 and "tensorflow" in " ".join(record["versions"])
    # The driver turns TensorFlow's oneDNN kernels on unless the caller chose otherwise.
    assert record["environment"]["TF_ENABLE_ONEDNN_OPTS"] == os.environ.get(
        "TF_ENABLE_ONEDNN_OPTS", "1")

    figures = sorted((out_dir / "figures" / "unet").iterdir())
    assert [path.name for path in figures] == sorted(
        [f"{split}_{label}.png" for split in real_glas.SPLITS for label in real_glas.FIGURE_LABELS]
        + ["learning_curve.png"])
    assert all(path.read_bytes()[:8] == PNG_MAGIC for path in figures)
    assert sorted(record["figures"]) == [str(path.relative_to(out_dir)) for path in figures]

    study = json.loads((out_dir / "postprocess_study.json").read_text())
    assert set(study["variants"]) == set(real_glas.SMOKE_STUDY_VARIANTS)
    assert study["variants"]["none"]["postprocess"]["split"] == "none"
    assert set(study["helps"]["config"]) == set(real_glas.SPLITS)
    for scores in study["variants"].values():
        assert "--split validation" in scores["validation_command"]
        assert scores["validation"]["n_images"] >= 1
    assert study["selected_on_validation"]["variant"] in real_glas.SMOKE_STUDY_VARIANTS
    assert "--test-time-flips" in study["variants"][real_glas.FLIPS_VARIANT]["export_command"]
    assert "smoke unet" in (out_dir / "leaderboard.md").read_text()
    assert (out_dir / "leaderboard.png").read_bytes()[:8] == PNG_MAGIC
