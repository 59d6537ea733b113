"""glas dataset: GlaS@MICCAI'2015 gland segmentation in colon histology (Warwick-QU)."""
import dataclasses
import functools
import os

import numpy as np
import tensorflow_datasets as tfds
from scipy import ndimage

from . import release, synthetic
from .release import GlasDataError

_DESCRIPTION = """
GlaS@MICCAI'2015 Gland Segmentation Challenge (Warwick-QU dataset): 165 H&E-stained colon
histology images (20x, about 0.62 um/pixel, 16 patients with T3/T4 colorectal adenocarcinoma),
each with an instance annotation of its glands and a benign/malignant grade. Splits follow the
challenge: `train` (85), `test_a` (60, the off-site test set), `test_b` (20, the on-site test set).

Images are stored losslessly at their original size (775x522 for most, a few near 580x440).
`instances` holds one id per gland (0 is background).
"""

_INSTANCES_DOC = "uint16 (H, W) label map: 0 background, 1..K one id per gland."

_MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
For the `original` config, download `{release.RELEASE_ZIP}` from the GlaS contest page
(https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest/download/). The data are provided for
research purposes only; commercial use is not allowed, and publications must cite the GlaS
challenge paper (Sirinukunwattana et al., Medical Image Analysis 2017). Put in `manual_dir`
{release.EXPECTED_LAYOUT}.

For the `binary_masks` config, `manual_dir` holds the release images, `{release.GRADE_FILE}` and a
`{release.BINARY_MASK_FOLDER}/` folder with one `<name>.png` mask (0/255 or 0/1) per image.

The `synthetic` config needs no download.
"""


@dataclasses.dataclass
class GlasConfig(tfds.core.BuilderConfig):
    """A `glas` config; `source` is how examples are made: release, binary_masks or synthetic."""

    source: str = "release"
    synthetic_counts: tuple = ()


# Offsets that keep the synthetic splits' seeds apart.
_SYNTHETIC_SEED_OFFSETS = {"train": 0, "testA": 10_000, "testB": 20_000}


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for the GlaS@MICCAI'2015 gland segmentation dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        GlasConfig(
            name="original",
            description="The official release with its instance annotations (manual download).",
            source="release",
        ),
        GlasConfig(
            name="synthetic",
            description=(
                "Procedural H&E-like tiles at GlaS sizes with exact instance labels (no download): "
                "benign (round, regular) and malignant (irregular, crowded, touching) glands; "
                "24/12/8 examples, deterministic. Not real tissue: for tests and demos."
            ),
            source="synthetic",
            synthetic_counts=(("train", 24), ("test_a", 12), ("test_b", 8)),
        ),
        GlasConfig(
            name="binary_masks",
            description=(
                "The release images with binarised annotations (`binary_masks/<name>.png`). "
                "Instance ids are RECONSTRUCTED as the 8-connected components of each mask: "
                "touching glands merge into one instance, so instance metrics are approximate."
            ),
            source="binary_masks",
        ),
    ]
    DEFAULT_CONFIG_NAME = "original"

    def _info(self) -> tfds.core.DatasetInfo:
        instances_doc = _INSTANCES_DOC
        if self.builder_config.source == "binary_masks":
            instances_doc += (
                " Reconstructed as 8-connected components of a binary mask: touching glands are "
                "merged into one id."
            )
        return self.dataset_info_from_configs(
            description=(
                f"{_DESCRIPTION}\nConfig `{self.builder_config.name}`: "
                f"{self.builder_config.description}"
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(None, None, 3), dtype=np.uint8, encoding_format="png",
                        doc="RGB H&E image, uint8 (H, W, 3), original size, lossless.",
                    ),
                    "instances": tfds.features.Tensor(
                        shape=(None, None), dtype=np.uint16,
                        encoding=tfds.features.Encoding.ZLIB, doc=instances_doc,
                    ),
                    "grade": tfds.features.ClassLabel(
                        names=list(release.GRADES), doc="`grade (GlaS)` column of Grade.csv."
                    ),
                    "grade_detailed": tfds.features.ClassLabel(
                        names=list(release.DETAILED_GRADES),
                        doc="`grade (Sirinukunwattana et al. 2015)` column of Grade.csv.",
                    ),
                    "patient_id": tfds.features.Scalar(
                        dtype=np.int32, doc="`patient ID` of Grade.csv."
                    ),
                    "name": tfds.features.Text(doc="Release name, e.g. `testA_12`."),
                }
            ),
            supervised_keys=("image", "instances"),
            homepage="https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Returns SplitGenerators."""
        if self.builder_config.source == "synthetic":
            return {
                split: self._generate_examples(
                    [f"{release.SPLIT_PREFIXES[split]}_{index + 1}" for index in range(count)],
                    _synthetic_example,
                )
                for split, count in self.builder_config.synthetic_counts
            }
        files = release.ReleaseFiles.find(_manual_dir(dl_manager))
        grades = release.parse_grades(
            files.read(release.GRADE_FILE).decode("utf-8-sig"), files.location(release.GRADE_FILE)
        )
        names = files.image_names()
        _check_names(files, names, grades)
        source = self.builder_config.source
        _check_targets_present(files, names, source)
        read_example = functools.partial(
            _release_example, files, grades, release.load_manifest(), source
        )
        return {
            split: self._generate_examples(split_names, read_example)
            for split, split_names in _names_by_split(names).items()
        }

    def _generate_examples(self, names, read_example):
        """Yields `(name, example)` with `example = read_example(name)` for each of `names`."""
        for name in names:
            yield name, read_example(name)


def _synthetic_example(name):
    """Synthetic example `name` (e.g. `testA_3`); its seed depends only on the name."""
    prefix, _, number = name.rpartition("_")
    index = int(number) - 1
    seed = _SYNTHETIC_SEED_OFFSETS[prefix] + index
    height, width = synthetic.sample_tile_size(np.random.default_rng(seed))
    # Odd tiles are malignant; the detailed grades cycle through their grade's levels.
    malignant = index % 2 == 1
    image, instances = synthetic.draw_tile(seed, height, width, malignant)
    detailed_levels = release.DETAILED_GRADES[2:] if malignant else release.DETAILED_GRADES[:2]
    return {
        "image": image,
        "instances": instances,
        "grade": release.GRADES[int(malignant)],
        "grade_detailed": detailed_levels[index // 2 % len(detailed_levels)],
        "patient_id": 1 + index // 4,
        "name": name,
    }


def _release_example(files, grades, manifest, source, name):
    """Example `name` read from the release files; labels from its annotation or binary mask."""
    image = _read_verified(files, f"{name}.bmp", manifest, release.decode_rgb_image)
    target_file = _target_file(source, name)
    if source == "binary_masks":
        mask = _read_verified(files, target_file, manifest, release.decode_binary_mask)
        instances = ndimage.label(mask, structure=np.ones((3, 3)))[0].astype(np.uint16)
    else:
        instances = _read_verified(files, target_file, manifest, release.decode_annotation)
    if instances.shape != image.shape[:2]:
        raise GlasDataError(
            f"{files.location(target_file)} is {instances.shape[1]}x{instances.shape[0]} (WxH) but "
            f"its image {files.location(name + '.bmp')} is {image.shape[1]}x{image.shape[0]}; they "
            "must match. Use the image and labels of the same release."
        )
    record = grades[name]
    return {
        "image": image,
        "instances": instances,
        "grade": record.grade,
        "grade_detailed": record.grade_detailed,
        "patient_id": record.patient_id,
        "name": name,
    }


def _manual_dir(dl_manager):
    """`dl_manager.manual_dir`, with TFDS's missing/empty-directory error made ours."""
    try:
        return dl_manager.manual_dir
    except AssertionError as error:
        raise GlasDataError(
            f"{error}\nNo GlaS release to read: pass --manual_dir DIR (or "
            f"download_config=tfds.download.DownloadConfig(manual_dir=DIR)) where DIR holds "
            f"{release.EXPECTED_LAYOUT}."
        ) from error


def _target_file(source, name):
    """The file holding the labels of example `name` for config source `source`."""
    if source == "binary_masks":
        return f"{release.BINARY_MASK_FOLDER}/{name}.png"
    return f"{name}_anno.bmp"


def _check_names(files, names, grades):
    """Every image has a Grade.csv row and every Grade.csv row has an image."""
    grade_location = files.location(release.GRADE_FILE)
    if not names:
        raise GlasDataError(
            f"No GlaS images (train_N.bmp, testA_N.bmp, testB_N.bmp) in {files.root}. Expected "
            f"{release.EXPECTED_LAYOUT}."
        )
    ungraded = [name for name in names if name not in grades]
    if ungraded:
        raise GlasDataError(
            f"{len(ungraded)} image(s) are not in {grade_location}, e.g. {ungraded[0]}.bmp. "
            "Use the Grade.csv of the same release (or remove images that are not part of GlaS)."
        )
    missing = sorted(set(grades) - set(names), key=release.example_sort_key)
    if missing:
        raise GlasDataError(
            f"{len(missing)} image(s) listed in {grade_location} are missing, e.g. "
            f"{files.location(missing[0] + '.bmp')}. Copy all images of the release."
        )


def _check_targets_present(files, names, source):
    """Fails before anything is written when label files are missing."""
    missing = [
        _target_file(source, name)
        for name in names
        if not files.exists(_target_file(source, name))
    ]
    if not missing:
        return
    example = files.location(missing[0])
    if source == "binary_masks":
        raise GlasDataError(
            f"{len(missing)} of {len(names)} binary masks are missing, e.g. {example}. Put one "
            f"`{release.BINARY_MASK_FOLDER}/<name>.png` (0/255 or 0/1) beside the images for "
            "each image."
        )
    hint = ""
    if files.exists(f"{release.BINARY_MASK_FOLDER}/{names[0]}.png"):
        hint = " This folder has binarised masks: `glas/binary_masks` builds from them."
    raise GlasDataError(
        f"{len(missing)} of {len(names)} annotations missing, e.g. {example} "
        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}). The `original` config "
        f"needs each image's instance annotation `<name>_anno.bmp` from the release zip "
        f"`{release.RELEASE_ZIP}`.{hint}"
    )


def _names_by_split(names):
    """dict split -> example names of that split (release order)."""
    by_prefix = {prefix: [] for prefix in release.SPLIT_PREFIXES.values()}
    for name in names:
        by_prefix[name.rpartition("_")[0]].append(name)
    return {split: by_prefix[prefix] for split, prefix in release.SPLIT_PREFIXES.items()}


def _read_verified(files, name, manifest, decode):
    """Reads `name`, warns if it differs from the published release file, decodes it."""
    data = files.read(name)
    location = files.location(name)
    release.verify_release_file(os.path.basename(name), data, manifest, location)
    return decode(data, location)
