"""Tests of the TFDS `glas` builder: release layouts, real images, bad inputs, binary masks."""
import shutil
import warnings
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from scipy import ndimage

from tfds_glas.glas import release, synthetic
from tfds_glas.glas.glas_dataset_builder import Builder
from tfds_glas.glas.release import GlasDataError, GlasIntegrityWarning

GRADE_HEADER = "name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"
# Fake release: name -> (height, width, grade, detailed grade as spelt in the release).
FAKE_EXAMPLES = {
    "train_1": (30, 40, "benign", "healthy"),
    "train_2": (30, 40, "malignant", "moderately-to-poorly differentated"),
    "testA_1": (26, 36, "malignant", "poorly differentiated"),
    "testB_1": (30, 40, "benign", "adenomatous"),
}
# A palette whose colours are nothing like their indices (index 1 is bright green, ...).
PALETTE = np.random.default_rng(0).integers(0, 256, (256, 3)).astype(np.uint8)


def write_palette_bmp(path, indices):
    """Writes uint8 `indices` (H, W) as an 8-bit palette BMP, like the release annotations."""
    annotation = Image.fromarray(indices.astype(np.uint8), mode="P")
    annotation.putpalette(PALETTE.tobytes())
    annotation.save(path, format="BMP")


def write_grades(path, rows):
    """Writes Grade.csv as released: leading spaces, CR-only line endings."""
    lines = [GRADE_HEADER] + [f"{name},{patient}, {grade}, {detailed}"
                              for name, patient, grade, detailed in rows]
    path.write_bytes(("\r".join(lines) + "\r").encode())


def fake_annotation(height, width, seed):
    """uint8 (H, W) with 3 glands: ids 1, 2 touch side by side, id 3 stands apart."""
    indices = np.zeros((height, width), np.uint8)
    offset = seed % 3
    indices[4 + offset:12 + offset, 4:12] = 1
    indices[4 + offset:12 + offset, 12:20] = 2
    indices[height - 10:height - 3, width - 12:width - 4] = 3
    return indices


def write_fake_release(folder, examples=FAKE_EXAMPLES, masks=True):
    """Fake release files in `folder`; returns name -> (image, annotation) as written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    rng = np.random.default_rng(1)
    for seed, (name, (height, width, _, _)) in enumerate(examples.items()):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        annotation = fake_annotation(height, width, seed)
        Image.fromarray(image).save(folder / f"{name}.bmp")
        write_palette_bmp(folder / f"{name}_anno.bmp", annotation)
        if masks:
            (folder / "binary_masks").mkdir(exist_ok=True)
            Image.fromarray(np.uint8(annotation > 0) * 255).save(
                folder / "binary_masks" / f"{name}.png")
        written[name] = image, annotation
    rows = [(name, 7 + index, grade, detailed)
            for index, (name, (_, _, grade, detailed)) in enumerate(examples.items())]
    write_grades(folder / "Grade.csv", rows)
    return written


def build(config, manual_dir, data_dir):
    """Builds `glas/<config>` from `manual_dir`; returns split -> list of numpy examples."""
    builder = Builder(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(manual_dir), compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
    )
    return {
        split: list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
        for split in builder.info.splits
    }


def build_error(config, manual_dir, data_dir):
    """Builds and returns the `GlasDataError` message; checks nothing half-built remains."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GlasIntegrityWarning)
        with pytest.raises(GlasDataError) as error:
            build(config, manual_dir, data_dir)
    assert not list(data_dir.rglob("dataset_info.json")), "a failed build left a dataset behind"
    return str(error.value)


def by_name(examples):
    return {example["name"].decode(): example for split in examples.values() for example in split}


# ---------------------------------------------------------------------------- release layouts


@pytest.mark.filterwarnings("ignore::tfds_glas.glas.release.GlasIntegrityWarning")
def test_fake_release_builds_with_ids_from_palette_indices(tmp_path):
    written = write_fake_release(tmp_path / "manual")
    examples = build("original", tmp_path / "manual", tmp_path / "data")
    assert ({split: len(rows) for split, rows in examples.items()}
            == {"train": 2, "test_a": 1, "test_b": 1})
    named = by_name(examples)
    for name, (image, annotation) in written.items():
        np.testing.assert_array_equal(named[name]["image"], image)
        assert named[name]["instances"].dtype == np.uint16
        np.testing.assert_array_equal(named[name]["instances"], annotation)
    train_2 = named["train_2"]
    assert (train_2["grade"], train_2["grade_detailed"], train_2["patient_id"]) == (1, 3, 8)
    assert named["testB_1"]["grade_detailed"] == release.DETAILED_GRADES.index("adenomatous")


@pytest.mark.filterwarnings("ignore::tfds_glas.glas.release.GlasIntegrityWarning")
@pytest.mark.parametrize("layout", ["zip", "upper_case_zip", "extracted_folder"])
def test_release_zip_and_extracted_folder(tmp_path, layout):
    examples = {"train_1": FAKE_EXAMPLES["train_1"], "testA_1": FAKE_EXAMPLES["testA_1"],
                "testB_1": FAKE_EXAMPLES["testB_1"]}
    written = write_fake_release(tmp_path / "files", examples, masks=False)
    manual = tmp_path / "manual"
    if layout == "extracted_folder":
        shutil.copytree(tmp_path / "files", manual / release.RELEASE_FOLDER)
    else:
        manual.mkdir()
        zip_name = (release.RELEASE_ZIP.upper() if layout == "upper_case_zip"
                    else release.RELEASE_ZIP)
        with zipfile.ZipFile(manual / zip_name, "w") as archive:
            for path in (tmp_path / "files").iterdir():
                archive.write(path, f"{release.RELEASE_FOLDER}/{path.name}")
            archive.writestr(f"__MACOSX/{release.RELEASE_FOLDER}/._train_1.bmp", b"junk")
    named = by_name(build("original", manual, tmp_path / "data"))
    assert sorted(named) == sorted(written)
    np.testing.assert_array_equal(named["testA_1"]["instances"], written["testA_1"][1])


@pytest.mark.parametrize("line_end", ["\r", "\r\n", "\n"])
def test_grade_csv_quirks(line_end):
    text = line_end.join(
        [GRADE_HEADER, "testA_1,4, benign, adenomatous",
         "train_9,16, malignant, moderately-to-poorly differentated", ""]
    )
    grades = release.parse_grades(text, "Grade.csv")
    assert grades == {
        "testA_1": release.GradeRecord(4, "benign", "adenomatous"),
        "train_9": release.GradeRecord(16, "malignant", "moderately-to-poorly differentiated"),
    }


def test_manifest_check_warns_only_on_changed_release_files():
    manifest = release.load_manifest()
    assert len(manifest) == 330 and manifest["train_1_anno.bmp"][0] == 406150
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        release.verify_release_file("my_own_file.bmp", b"anything", manifest, "my_own_file.bmp")
    with pytest.warns(GlasIntegrityWarning,
                      match=r"/copy/of/train_1\.bmp.*re-saved or corrupted copy"):
        release.verify_release_file("train_1.bmp", b"BM not the release", manifest,
                                    "/copy/of/train_1.bmp")


# ---------------------------------------------------------------------------- real GlaS images

REAL_SUBSET = ("train_1", "train_2", "testA_1", "testA_7", "testB_1")


def real_grade_rows(shared_glas_dir, names):
    """The Grade.csv rows of `names`, split on commas by hand (independent of the builder)."""
    lines = (shared_glas_dir.joinpath("Grade.csv").read_bytes().decode()
             .replace("\r\n", "\r").split("\r"))
    cells = (line.split(",") for line in lines[1:] if line)
    return {row[0]: (int(row[1]), row[2].strip(), row[3].strip())
            for row in cells if row[0] in names}


def lay_real_subset(shared_glas_dir, manual, names=REAL_SUBSET):
    """Symlinks real images of `names` into `manual` with a trimmed Grade.csv."""
    manual.mkdir()
    for name in names:
        (manual / f"{name}.bmp").symlink_to(shared_glas_dir / f"{name}.bmp")
    rows = real_grade_rows(shared_glas_dir, names)
    write_grades(manual / "Grade.csv", [(name, *rows[name]) for name in names])
    return rows


def test_real_images_beside_written_annotations(shared_glas_dir, tmp_path):
    manual = tmp_path / "manual"
    rows = lay_real_subset(shared_glas_dir, manual)
    annotations = {}
    for seed, name in enumerate(REAL_SUBSET):
        width, height = Image.open(shared_glas_dir / f"{name}.bmp").size
        annotations[name] = synthetic.draw_instances(np.random.default_rng(seed), height, width,
                                                     seed % 2 == 1)
        assert 2 <= annotations[name].max() < 256
        write_palette_bmp(manual / f"{name}_anno.bmp", annotations[name])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples = build("original", manual, tmp_path / "data")
    warned = " ".join(str(warning.message) for warning in caught
                      if warning.category is GlasIntegrityWarning)
    # The real images are the release's bytes; our annotations are not the release's.
    assert "train_1_anno.bmp" in warned and "train_1.bmp " not in warned

    assert ({split: len(rows) for split, rows in examples.items()}
            == {"train": 2, "test_a": 2, "test_b": 1})
    for name, example in by_name(examples).items():
        real = np.asarray(Image.open(shared_glas_dir / f"{name}.bmp").convert("RGB"))
        np.testing.assert_array_equal(example["image"], real)
        np.testing.assert_array_equal(example["instances"], annotations[name])
        patient, grade, detailed = rows[name]
        detailed = detailed.replace("differentated", "differentiated")
        assert example["patient_id"] == patient
        assert release.GRADES[example["grade"]] == grade
        assert release.DETAILED_GRADES[example["grade_detailed"]] == detailed


def test_changed_real_image_is_reported(shared_glas_dir, tmp_path):
    manual = tmp_path / "manual"
    lay_real_subset(shared_glas_dir, manual, names=("train_1", "testA_1", "testB_1"))
    (manual / "testA_1.bmp").unlink()
    image = np.asarray(Image.open(shared_glas_dir / "testA_1.bmp")).copy()
    image[0, 0] ^= 1
    Image.fromarray(image).save(manual / "testA_1.bmp")
    for name in ("train_1", "testA_1", "testB_1"):
        width, height = Image.open(manual / f"{name}.bmp").size
        write_palette_bmp(manual / f"{name}_anno.bmp", fake_annotation(height, width, 0))
    with pytest.warns(GlasIntegrityWarning) as caught:
        build("original", manual, tmp_path / "data")
    messages = [str(warning.message) for warning in caught
                if warning.category is GlasIntegrityWarning]
    assert any("testA_1.bmp differs" in message and "re-saved or corrupted copy" in message
               for message in messages)
    assert not any("train_1.bmp differs" in message for message in messages)


def test_shared_images_without_annotations_stop_with_clear_error(shared_glas_dir, tmp_path):
    if (shared_glas_dir / "train_1_anno.bmp").exists():
        pytest.skip("the shared folder now has annotations")
    message = build_error("original", shared_glas_dir, tmp_path / "data")
    assert "annotations missing" in message and "train_1_anno.bmp" in message
    assert "glas/binary_masks" in message


def test_complete_release_builds_85_60_20(shared_glas_dir, tmp_path):
    missing = [name for name in release.load_manifest() if not (shared_glas_dir / name).is_file()]
    if missing:
        pytest.skip(f"{len(missing)} release files missing from {shared_glas_dir} "
                    f"(e.g. {missing[0]}): "
                    "the instance annotations are not available here")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GlasIntegrityWarning)
        examples = build("original", shared_glas_dir, tmp_path / "data")
    assert ({split: len(rows) for split, rows in examples.items()}
            == {"train": 85, "test_a": 60, "test_b": 20})
    for example in by_name(examples).values():
        height, width = example["instances"].shape
        assert (width, height) in synthetic.GLAS_SIZES
        assert example["image"].shape == (height, width, 3)
        assert example["instances"].max() >= 1


# ---------------------------------------------------------------------------- bad inputs


def test_missing_annotation(tmp_path):
    write_fake_release(tmp_path / "manual")
    (tmp_path / "manual" / "testA_1_anno.bmp").unlink()
    message = build_error("original", tmp_path / "manual", tmp_path / "data")
    assert "1 of 4 annotations missing" in message and "testA_1_anno.bmp" in message


def test_image_and_annotation_sizes_differ(tmp_path):
    write_fake_release(tmp_path / "manual")
    write_palette_bmp(tmp_path / "manual" / "train_2_anno.bmp", np.zeros((30, 41), np.uint8))
    message = build_error("original", tmp_path / "manual", tmp_path / "data")
    assert ("train_2_anno.bmp is 41x30" in message and "train_2.bmp is 40x30" in message
            and "must match" in message)


def test_truncated_bmp(tmp_path):
    write_fake_release(tmp_path / "manual")
    path = tmp_path / "manual" / "train_1.bmp"
    path.write_bytes(path.read_bytes()[:-500])
    message = build_error("original", tmp_path / "manual", tmp_path / "data")
    assert "train_1.bmp is truncated" in message and "copy it again" in message


def test_unreadable_bmp(tmp_path):
    write_fake_release(tmp_path / "manual")
    (tmp_path / "manual" / "testB_1_anno.bmp").write_bytes(b"this is not an image")
    message = build_error("original", tmp_path / "manual", tmp_path / "data")
    assert "testB_1_anno.bmp is not a readable image" in message


def test_image_not_three_channels(tmp_path):
    write_fake_release(tmp_path / "manual")
    Image.new("L", (40, 30)).save(tmp_path / "manual" / "train_1.bmp")
    message = build_error("original", tmp_path / "manual", tmp_path / "data")
    assert "train_1.bmp has PIL mode 'L'" in message and "3-channel RGB" in message


def test_name_not_in_grade_csv(tmp_path):
    examples = dict(FAKE_EXAMPLES)
    write_fake_release(tmp_path / "manual", examples)
    write_grades(tmp_path / "manual" / "Grade.csv", [("train_1", 1, "benign", "healthy"),
                                                     ("testA_1", 2, "benign", "healthy"),
                                                     ("testB_1", 3, "benign", "healthy")])
    message = build_error("original", tmp_path / "manual", tmp_path / "data")
    assert "not in" in message and "Grade.csv" in message and "train_2.bmp" in message


def test_empty_manual_dir(tmp_path):
    (tmp_path / "manual").mkdir()
    message = build_error("original", tmp_path / "manual", tmp_path / "data")
    assert "empty" in message and release.RELEASE_ZIP in message and "train_1_anno.bmp" in message


def test_wrong_manual_dir(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "notes.txt").write_text("not GlaS")
    message = build_error("original", tmp_path / "manual", tmp_path / "data")
    assert ("No GlaS release found" in message and "notes.txt" in message
            and release.RELEASE_FOLDER in message)


# ---------------------------------------------------------------------------- binary_masks


@pytest.mark.filterwarnings("ignore::tfds_glas.glas.release.GlasIntegrityWarning")
def test_binary_masks_instances_are_8_connected_components(tmp_path):
    written = write_fake_release(tmp_path / "manual")
    # 0/1 masks are accepted too; a diagonal touch joins two blobs (8-connectivity).
    mask = np.zeros((30, 40), np.uint8)
    mask[2:6, 2:6] = 1
    mask[6:10, 6:10] = 1
    mask[20:25, 30:35] = 1
    Image.fromarray(mask).save(tmp_path / "manual" / "binary_masks" / "train_1.png")
    named = by_name(build("binary_masks", tmp_path / "manual", tmp_path / "data"))
    assert named["train_1"]["instances"].max() == 2
    np.testing.assert_array_equal(named["train_1"]["instances"] > 0, mask > 0)
    # Touching glands 1 and 2 of the annotation merge into one instance.
    for name in ("train_2", "testA_1", "testB_1"):
        expected = ndimage.label(written[name][1] > 0, structure=np.ones((3, 3)))[0]
        np.testing.assert_array_equal(named[name]["instances"], expected)
        assert named[name]["instances"].max() == 2
        np.testing.assert_array_equal(named[name]["image"], written[name][0])


def test_binary_masks_documented_as_reconstructed(tmp_path):
    builder = Builder(config="binary_masks", data_dir=str(tmp_path))
    assert "touching glands merge" in builder.info.description
    assert "touching glands are merged" in builder.info.features["instances"].doc.desc


def test_binary_mask_missing(tmp_path):
    write_fake_release(tmp_path / "manual")
    (tmp_path / "manual" / "binary_masks" / "testB_1.png").unlink()
    message = build_error("binary_masks", tmp_path / "manual", tmp_path / "data")
    assert "binary masks are missing" in message and "binary_masks/testB_1.png" in message


def test_binary_mask_size_mismatch(tmp_path):
    write_fake_release(tmp_path / "manual")
    Image.fromarray(np.zeros((29, 40), np.uint8)).save(
        tmp_path / "manual" / "binary_masks" / "train_1.png")
    message = build_error("binary_masks", tmp_path / "manual", tmp_path / "data")
    assert "binary_masks/train_1.png is 40x29" in message and "must match" in message


def test_binary_mask_not_binary(tmp_path):
    write_fake_release(tmp_path / "manual")
    mask = np.zeros((30, 40), np.uint8)
    mask[5:10, 5:10] = 255
    mask[5, 5:10] = 128  # a resampled edge
    Image.fromarray(mask).save(tmp_path / "manual" / "binary_masks" / "train_2.png")
    message = build_error("binary_masks", tmp_path / "manual", tmp_path / "data")
    assert "binary_masks/train_2.png is not binary (values [0, 128, 255])" in message


def test_binary_masks_on_real_images(shared_glas_dir, tmp_path):
    manual = tmp_path / "manual"
    names = ("train_1", "testA_1", "testB_1")
    lay_real_subset(shared_glas_dir, manual, names)
    (manual / "binary_masks").mkdir()
    for name in names:
        (manual / "binary_masks" / f"{name}.png").symlink_to(
            shared_glas_dir / "binary_masks" / f"{name}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GlasIntegrityWarning)
        named = by_name(build("binary_masks", manual, tmp_path / "data"))
    for name in names:
        mask = np.asarray(Image.open(shared_glas_dir / "binary_masks" / f"{name}.png")) > 0
        expected = ndimage.label(mask, structure=np.ones((3, 3)))[0]
        assert expected.max() >= 1
        np.testing.assert_array_equal(named[name]["instances"], expected)


def test_write_tiles_writes_images_with_their_instance_maps(tmp_path):
    paths = synthetic.write_tiles(tmp_path, 2)
    assert [p.name for p in paths] == ["synthetic_100000.png", "synthetic_100001.png"]
    for path in paths:
        image = np.asarray(Image.open(path))
        instances = np.asarray(Image.open(tmp_path / "instances" / path.name))
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert (image.shape[1], image.shape[0]) in synthetic.GLAS_SIZES
        assert instances.shape == image.shape[:2] and instances.max() >= 1
        # The files hold exactly the tile drawn from that seed (RGB, not OpenCV's BGR).
        seed = int(path.stem.split("_")[1])
        expected_image, expected_instances = synthetic.draw_tile(
            seed, *image.shape[:2], malignant=seed % 2 == 1)
        np.testing.assert_array_equal(image, expected_image)
        np.testing.assert_array_equal(instances, expected_instances)
