"""keras_glas.callbacks: GlaS metrics of the validation images during training."""
import csv
import math

import keras
import pytest

from keras_glas import metrics
from keras_glas.callbacks import GLAS_LOG_NAMES, GlasMetricsCallback
from keras_glas.config import ConfigError
from keras_glas.evaluate import predict_split
from keras_glas.export import export_run
from keras_glas.models.maskrcnn import build_maskrcnn
from keras_glas.predict import SavedModelPredictor
from keras_glas.train import train

VALIDATION = "train[:10%]"


def history(run_dir):
    with (run_dir / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_scores_every_n_epochs_first_and_last_and_select_the_checkpoint(tmp_path,
                                                                       tiny_unet_config):
    run_dir = tmp_path / "run"
    config = tiny_unet_config("train.epochs=4", "train.glas_metrics_every=3",
                              "train.monitor=val_glas_f1")
    train(config, run_dir, verbose=0)
    rows = history(run_dir)
    assert [row["epoch"] for row in rows] == ["0", "1", "2", "3"]
    # Epoch 0 is the first of the fit, epoch 2 the third, epoch 3 the last.
    scored = [row["val_glas_f1"] != "NA" for row in rows]
    assert scored == [True, False, True, True]
    for row in (rows[0], rows[2], rows[3]):
        assert 0.0 <= float(row["val_glas_f1"]) <= 1.0
        assert 0.0 <= float(row["val_glas_object_dice"]) <= 1.0
        assert float(row["val_glas_object_hausdorff"]) >= 0.0
    assert rows[1]["val_glas_object_hausdorff"] == "NA"
    assert (run_dir / "checkpoints" / "best.weights.h5").is_file()


def test_logged_scores_equal_evaluating_the_exported_checkpoint(tmp_path, synthetic_data_dir,
                                                                tiny_unet_config):
    run_dir = tmp_path / "run"
    config = tiny_unet_config("postprocess.min_size=5", "postprocess.fill_holes=true")
    train(config, run_dir, verbose=0)
    [row] = history(run_dir)
    saved_model = export_run(run_dir, tmp_path / "saved_model", checkpoint="last")
    scored = predict_split(SavedModelPredictor(saved_model), "glas/synthetic", VALIDATION,
                           synthetic_data_dir, progress=False)
    assert len(scored) >= 2
    expected = metrics.glas_scores([item.prediction for item in scored],
                                   [item.ground_truth for item in scored])
    for key, name in GLAS_LOG_NAMES.items():
        assert float(row[name]) == pytest.approx(expected[key], abs=1e-6)


def test_maskrcnn_under_mixed_bfloat16_logs_finite_scores(synthetic_data_dir):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_maskrcnn("resnet_tiny", fpn_channels=16, box_head_units=32,
                               mask_head_channels=16, rpn_pre_nms_top_n_test=100,
                               rpn_post_nms_top_n_test=32, max_detections=10)
        callback = GlasMetricsCallback("glas/synthetic", VALIDATION, synthetic_data_dir,
                                       image_size=64, every=5)
        callback.set_model(model)
        callback.set_params({"epochs": 10})
        callback.on_train_begin()
        logs = {}
        callback.on_epoch_end(3, logs)  # the first epoch of the fit: scored
        assert set(logs) == set(GLAS_LOG_NAMES.values())
        assert all(math.isfinite(value) for value in logs.values())
        later = {}
        callback.on_epoch_end(5, later)  # neither every 5th, nor the first, nor the last
        assert later == {}
    finally:
        keras.config.set_dtype_policy(previous)


def test_a_glas_monitor_needs_the_metrics_switched_on(tmp_path, tiny_unet_config):
    config = tiny_unet_config("train.glas_metrics_every=null",
                              "train.monitor=val_glas_object_hausdorff")
    with pytest.raises(ConfigError, match="glas_metrics_every"):
        train(config, tmp_path / "run", verbose=0)
    with pytest.raises(ValueError, match="every must be >= 1"):
        GlasMetricsCallback("glas/synthetic", VALIDATION, every=0)
