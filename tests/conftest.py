"""Shared fixtures.

TensorFlow is configured here, before any test touches it: the one physical CPU is split into
two logical devices so that `tf.distribute.MirroredStrategy` tests run without a GPU.
"""
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_GLAS_DIR = Path(
    os.environ.get("KERAS_GLAS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data" / "glas")
)


@pytest.fixture(scope="session")
def two_cpu_strategy():
    """One `MirroredStrategy` over the two logical CPUs, shared by every test that needs one.

    Separate MirroredStrategy objects in one process each number their collective ops from the
    same start, so a second strategy's all-reduce can meet a first one's leftover instance and
    fail with a shape mismatch; one shared strategy keeps the numbering unique.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="session")
def shared_glas_dir():
    """`../shared/data/glas` (real GlaS images, grades, binary masks); skips where absent."""
    if not (SHARED_GLAS_DIR / "train_1.bmp").is_file():
        pytest.skip(f"real GlaS images not found at {SHARED_GLAS_DIR} (set KERAS_GLAS_SHARED_DATA)")
    return SHARED_GLAS_DIR


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
    """A TFDS data_dir with `glas/synthetic` built once per test session."""
    import tensorflow_datasets as tfds

    import tfds_glas  # noqa: F401  (registers the `glas` builder)

    data_dir = tmp_path_factory.mktemp("tfds")
    tfds.builder("glas/synthetic", data_dir=str(data_dir)).download_and_prepare()
    return str(data_dir)


@pytest.fixture
def damaged_synthetic_copy(synthetic_data_dir, tmp_path):
    """Makes a copy of the synthetic data_dir with one byte of a split's record file flipped.

    `damaged_synthetic_copy("train")` returns the copy's path. The file keeps its size, so it
    passes `make_dataset`'s size check and fails TensorFlow's CRC only when the record is read.
    """
    import shutil

    def make(split):
        copy = tmp_path / "damaged_tfds"
        shutil.copytree(synthetic_data_dir, copy)
        (record,) = copy.glob(f"glas/synthetic/*/glas-{split}.tfrecord-*")
        data = bytearray(record.read_bytes())
        data[len(data) // 2] ^= 0xFF
        record.write_bytes(bytes(data))
        return copy

    return make


@pytest.fixture(scope="session")
def tiny_unet_config(synthetic_data_dir):
    """Makes a `Config` of the seed's U-Net recipe shrunk for CPU tests, plus overrides.

    `glas/synthetic`, 64 px, batch 2, base 4, depth 2, 1 epoch of 2 steps, no fine-tune stage,
    float32; `tiny_unet_config("train.epochs=3", ...)` adds `section.key=value` overrides.
    """
    from keras_glas.config import load_config

    def make(*overrides):
        return load_config(REPO_ROOT / "configs" / "unet.yaml", [
            "data.dataset=glas/synthetic", f"data.data_dir={synthetic_data_dir}",
            "data.image_size=64", "data.batch_size=2", "model.base_filters=4", "model.depth=2",
            "train.epochs=1", "train.steps_per_epoch=2", "train.finetune=null",
            "train.precision=float32", *overrides,
        ])

    return make
