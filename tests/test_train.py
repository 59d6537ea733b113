"""keras_glas.train: the CLI's run dir, resume after SIGKILL, learning, precision, distribution.

Everything is tiny (64² images, 4–8 base filters, depth 2, a few steps) so the file runs in a
couple of minutes on 2 cores; the CLI tests run `python -m keras_glas.train` in a subprocess
from a directory outside the repository.
"""
import csv
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_glas.config import ConfigError, load_config
from keras_glas.data import make_dataset
from keras_glas.models import build_model
from keras_glas.train import (
    ResumableEarlyStopping,
    compile_model,
    main,
    make_optimizer,
    resolve_dataset,
    train,
    training_stages,
)

REPO = Path(__file__).resolve().parents[1]
UNET_YAML = REPO / "configs" / "unet.yaml"
TINY_UNET = ["--image-size", "64", "--batch-size", "2",
             "--set", "model.base_filters=4", "--set", "model.depth=2",
             "--set", "train.finetune=null", "--set", "train.precision=float32"]


def cli_env():
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "2"}


def run_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "keras_glas.train", *args], cwd=cwd,
                          env=cli_env(), capture_output=True, text=True, timeout=900)


def history_rows(run_dir):
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_trains_into_a_run_dir_and_refuses_a_different_config(tmp_path,
                                                                  synthetic_data_dir):
    run_dir = tmp_path / "run"
    # No --dataset: glas is not prepared in this data dir, so the CLI says so and falls back.
    args = ["unet", "--data-dir", synthetic_data_dir, "--run-dir", str(run_dir),
            "--epochs", "2", "--steps-per-epoch", "2", *TINY_UNET]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("glas is not prepared") == 1
    assert "tfds build glas --imports tfds_glas --manual_dir" in result.stdout
    assert "Epoch 1/2" in result.stdout and "Epoch 2/2" in result.stdout
    assert f"python -m keras_glas.export {run_dir}" in result.stdout
    for name in ("config.yaml", "history.csv", "checkpoints/best.weights.h5",
                 "checkpoints/last.weights.h5", "backup/main"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "logs").is_dir() == (importlib.util.find_spec("tensorboard") is not None)
    assert [row["epoch"] for row in history_rows(run_dir)] == ["0", "1"]
    assert all(math.isfinite(float(row["val_loss"])) for row in history_rows(run_dir))
    saved = load_config(run_dir / "config.yaml")
    assert saved.data.dataset == "glas/synthetic"
    assert (saved.model.base_filters, saved.train.epochs, saved.train.monitor) == (
        4, 2, "val_loss")

    rerun = run_cli(args, cwd=tmp_path)
    assert rerun.returncode == 0 and "nothing to do" in rerun.stdout
    assert len(history_rows(run_dir)) == 2

    changed = run_cli([*args, "--epochs", "3"], cwd=tmp_path)
    assert changed.returncode != 0
    assert "train.epochs: 2 -> 3" in changed.stderr and "new --run-dir" in changed.stderr


def test_sigkill_then_same_command_resumes_at_the_killed_epoch(tmp_path, synthetic_data_dir):
    run_dir, epochs = tmp_path / "run", 6
    args = ["unet", "--dataset", "glas/synthetic", "--data-dir", synthetic_data_dir,
            "--run-dir", str(run_dir), "--epochs", str(epochs), "--steps-per-epoch", "3",
            *TINY_UNET]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "keras_glas.train", *args],
                                 cwd=tmp_path, env=cli_env(), stdout=log,
                                 stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not history_rows(run_dir) and time.monotonic() < deadline:
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                time.sleep(0.05)
            assert first.poll() is None, "training finished before it could be killed"
        finally:
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
    finished = len(history_rows(run_dir))
    assert 1 <= finished < epochs

    second = run_cli(args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Epoch 1/" not in second.stdout
    first_epoch = second.stdout.index("Epoch ")
    assert second.stdout[first_epoch:].startswith(f"Epoch {finished + 1}/{epochs}")
    assert [int(row["epoch"]) for row in history_rows(run_dir)] == list(range(epochs))


def test_one_epoch_of_the_seed_recipe_lowers_the_loss(synthetic_data_dir):
    config = load_config(UNET_YAML, ["model.base_filters=8", "model.depth=2"])
    keras.utils.set_random_seed(0)
    batches = make_dataset("glas/synthetic", split="train[:25%]", batch_size=2,
                           image_size=64, augment=False, data_dir=synthetic_data_dir).cache()
    model = build_model(config.model)
    compile_model(model, config, make_optimizer(training_stages(config)[0]))
    before = model.evaluate(batches, verbose=0, return_dict=True)["loss"]
    model.fit(batches.repeat(), steps_per_epoch=12, epochs=1, shuffle=False, verbose=0)
    after = model.evaluate(batches, verbose=0, return_dict=True)["loss"]
    assert after < before - 0.01, (before, after)


def test_mixed_bfloat16_trains_with_finite_loss_and_float32_outputs(tmp_path,
                                                                    tiny_unet_config):
    policy = keras.config.dtype_policy().name
    config = tiny_unet_config("train.precision=mixed_bfloat16")
    [history] = train(config, tmp_path / "run", verbose=0)
    assert history.model.compute_dtype == "bfloat16"
    outputs = history.model(tf.zeros((1, 64, 64, 3)))
    assert outputs["mask"].dtype == "float32"
    assert all(math.isfinite(value) for value in history.history["loss"])
    assert keras.config.dtype_policy().name == policy  # train() restores the global policy


def test_mixed_float16_wraps_the_optimizer_in_loss_scaling():
    config = load_config(UNET_YAML, ["model.base_filters=4", "model.depth=2"])
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_model(config.model)
        compile_model(model, config, make_optimizer(training_stages(config)[0]))
    finally:
        keras.config.set_dtype_policy(policy)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, keras.optimizers.SGD)


def load_weights_into_compiled(path, config):
    """A compiled model of `config` with `path` loaded into its weights and optimizer state."""
    model = build_model(config.model)
    compile_model(model, config, make_optimizer(training_stages(config)[0]))
    model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
    return model


# Mirrored: SwapEMAWeights swaps through the strategy's `extended.update`, not plain assigns.
@pytest.mark.parametrize("ema_momentum, mirrored", [(None, False), (0.5, False), (0.5, True)])
def test_ema_checkpoints_hold_the_averaged_weights_and_the_backup_the_raw_ones(
        tmp_path, tiny_unet_config, two_cpu_strategy, ema_momentum, mirrored):
    config = tiny_unet_config("train.epochs=2", f"train.ema_momentum={ema_momentum or 'null'}")
    train(config, tmp_path, strategy=two_cpu_strategy if mirrored else None, verbose=0)
    checkpoint = load_weights_into_compiled(tmp_path / "checkpoints" / "last.weights.h5", config)
    saved = [variable.numpy() for variable in checkpoint.trainable_variables]
    backup = load_weights_into_compiled(tmp_path / "backup" / "main" / "latest.weights.h5", config)
    raw = [variable.numpy() for variable in backup.trainable_variables]
    same = [np.allclose(a, b) for a, b in zip(saved, raw, strict=True)]
    if ema_momentum is None:
        assert all(same)
        return
    assert not all(same)  # 4 steps of SGD at lr 0.1 move the raw weights off their average
    # The backup's optimizer holds the average the checkpoint was saved from.
    backup.optimizer.finalize_variable_values(backup.trainable_variables)
    for variable, value in zip(backup.trainable_variables, saved, strict=True):
        np.testing.assert_allclose(variable.numpy(), value, rtol=1e-6, err_msg=variable.path)


def test_mirrored_strategy_runs_both_stages(tmp_path, tiny_unet_config, two_cpu_strategy):
    strategy = two_cpu_strategy
    config = tiny_unet_config("train.finetune.epochs=1", "train.finetune.learning_rate=1e-4")
    main_stage, finetune = train(config, tmp_path / "run", strategy=strategy, verbose=0)
    assert strategy.num_replicas_in_sync == 2
    assert isinstance(main_stage.model.optimizer, keras.optimizers.SGD)
    assert isinstance(finetune.model.optimizer, keras.optimizers.Adam)
    rows = history_rows(tmp_path / "run")
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert all(math.isfinite(float(row["loss"])) for row in rows)
    assert np.isfinite(finetune.model.get_weights()[0]).all()


def test_contour_head_model_trains_with_weighted_bce_with_and_without_xla(tmp_path,
                                                                         tiny_unet_config):
    losses = {}
    for jit_compile in ("false", "true"):
        config = tiny_unet_config("model.contour_head=true", "train.loss=weighted_bce",
                                  f"train.jit_compile={jit_compile}")
        [history] = train(config, tmp_path / f"run_jit_{jit_compile}", verbose=0)
        assert history.model.jit_compile is (jit_compile == "true")
        assert {"mask_loss", "contour_loss"} <= set(history.history)
        losses[jit_compile] = history.history["loss"]
    assert all(math.isfinite(value) for value in losses["true"])
    # Same seed, same batches: XLA changes only the rounding of the same computation.
    np.testing.assert_allclose(losses["true"], losses["false"], rtol=1e-3)


def test_early_stopping_counts_the_epochs_of_an_interrupted_run(tmp_path):
    history = tmp_path / "history.csv"
    history.write_text(
        "epoch,val_glas_f1\n"
        "0,0.9\n"  # an earlier stage: not this stage's best
        "3,0.5\n4,0.6\n5,NA\n6,0.55\n7,0.58\n"  # this stage: best 0.6, then 2 worse
    )
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    stopping = ResumableEarlyStopping(history, first_epoch=3, monitor="val_glas_f1",
                                      patience=3, mode="max")
    stopping.set_model(model)
    model.stop_training = False
    stopping.on_train_begin()
    assert (stopping.best, stopping.best_epoch, stopping.wait) == (0.6, 4, 2)
    assert not model.stop_training
    stopping.on_epoch_end(8, {"val_glas_f1": 0.59})  # the third epoch without improvement
    assert model.stop_training


def test_a_damaged_record_mid_epoch_names_the_dataset_and_the_fix(tmp_path,
                                                                  damaged_synthetic_copy):
    copy = damaged_synthetic_copy("train")
    result = run_cli(["unet", "--config", str(UNET_YAML), "--dataset", "glas/synthetic",
                      "--data-dir", str(copy), "--run-dir", str(tmp_path / "run"),
                      "--epochs", "1", *TINY_UNET], cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "records of 'glas/synthetic'" in result.stderr and "damaged" in result.stderr
    assert "tfds build glas/synthetic" in result.stderr


def test_unprepared_real_dataset_and_wrong_config_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="tfds build glas/binary_masks --imports tfds_glas"):
        resolve_dataset("glas/binary_masks", str(tmp_path))
    with pytest.raises(SystemExit, match="model.name=maskrcnn, not unet"):
        main(["unet", "--config", str(REPO / "configs" / "maskrcnn.yaml"),
              "--run-dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="unknown key 'model.widht'"):
        main(["unet", "--set", "model.widht=3", "--run-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_maskrcnn_trains_through_the_same_cli(tmp_path, synthetic_data_dir):
    run_dir = tmp_path / "run"
    result = run_cli(["maskrcnn", "--dataset", "glas/synthetic", "--data-dir",
                      synthetic_data_dir, "--run-dir", str(run_dir), "--image-size", "64",
                      "--batch-size", "2", "--epochs", "1", "--steps-per-epoch", "2",
                      "--set", "model.backbone=resnet18", "--set", "train.precision=float32"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = history_rows(run_dir)
    assert math.isfinite(float(row["val_mask_loss"]))
    # The GlaS metrics of the validation images, from the model's own in-graph inference.
    assert 0.0 <= float(row["val_glas_object_dice"]) <= 1.0
    assert (run_dir / "checkpoints" / "best.weights.h5").is_file()
    assert load_config(run_dir / "config.yaml").train.monitor == "val_mask_loss"
