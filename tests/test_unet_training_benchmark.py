"""`benchmarks.unet_training`: every variant runs in its own process with its oneDNN setting and
its XLA choice, and the targets' timing runs on a crowded instance map.

The timings themselves are measured by the benchmark, not here.
"""
import json

import numpy as np
import pytest
from scipy import ndimage

from keras_glas.config import ConfigError

from benchmarks import unet_training

TINY_CONFIG = """\
data: {image_size: 32, batch_size: 2}
model: {base_filters: 4, depth: 2, batch_norm: true, contour_head: true}
train: {loss: weighted_bce, precision: float32, optimizer: adamw, learning_rate: 1.0e-3}
"""


def test_crowded_instances_are_24_separate_glands():
    labels = unet_training.crowded_instances(96)
    assert labels.dtype == np.int32 and labels.shape == (96, 96)
    np.testing.assert_array_equal(np.unique(labels), np.arange(25))
    # 4 px of background between neighbours: no two glands touch.
    assert ndimage.label(labels > 0)[1] == 24


def test_every_variant_runs_in_its_own_process_and_the_json_is_written(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    out = tmp_path / "result.json"
    unet_training.main(["--config", str(config), "--steps", "1", "--out", str(out)])
    results = json.loads(out.read_text())
    variants = results["variants"]
    assert [(row["tf_enable_onednn_opts"], row["jit_compile"]) for row in variants] == [
        ("0", False), ("0", True), ("1", False), ("1", True)]
    for row in variants:
        assert row["s_per_step"] > 0 and row["precision"] == "float32"
        assert (row["batch_size"], row["image_size"]) == (2, 32)
    assert variants[0]["speedup"] == pytest.approx(1.0)
    assert results["targets"]["border_weights_ms"] > 0 and results["targets"]["contour_ms"] > 0
    assert "jit_compile=true  TF_ENABLE_ONEDNN_OPTS=1" in capsys.readouterr().out


def test_a_bad_config_fails_before_any_worker_starts(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train: {no_such_key: 1}\n")
    with pytest.raises(ConfigError, match=rf"{config}: unknown key 'train.no_such_key'"):
        unet_training.main(["--config", str(config)])


def test_a_failing_worker_names_its_command(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train: {no_such_key: 1}\n")
    with pytest.raises(SystemExit,
                       match=r"(?s)benchmark worker failed .*--worker nojit.*no_such_key"):
        unet_training.run_worker(str(config), False, "0", 1)
