"""glas dataset tests on the fake release in `dummy_data/` and on the synthetic config."""
import pytest
import tensorflow_datasets as tfds

from . import glas_dataset_builder

# The fake files carry release names but not release bytes: the integrity warning is expected.
pytestmark = pytest.mark.filterwarnings("ignore::tfds_glas.glas.release.GlasIntegrityWarning")


class GlasReleaseTest(tfds.testing.DatasetBuilderTestCase):
    """`original` and `binary_masks` read the same fake release (6 images, palette BMP
    annotations)."""

    DATASET_CLASS = glas_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["original", "binary_masks"]
    SPLITS = {"train": 3, "test_a": 2, "test_b": 1}


class GlasSyntheticTest(tfds.testing.DatasetBuilderTestCase):
    """The procedural config: no download, 24/12/8 examples."""

    DATASET_CLASS = glas_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["synthetic"]
    SPLITS = {"train": 24, "test_a": 12, "test_b": 8}


if __name__ == "__main__":
    tfds.testing.test_main()
