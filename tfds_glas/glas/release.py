"""Reading the GlaS@MICCAI'2015 (Warwick-QU) release: locating, verifying and decoding its files.

The release is `Warwick_QU_Dataset_(Released_2016_07_08).zip`, holding the folder
`Warwick QU Dataset (Released 2016_07_08)/` with, for every example `<name>` (`train_1` ...
`train_85`, `testA_1` ... `testA_60`, `testB_1` ... `testB_20`), an RGB image `<name>.bmp` and
an 8-bit palette annotation `<name>_anno.bmp` whose palette *indices* are gland ids, plus
`Grade.csv`. Everything here raises `GlasDataError` on bad input, with the file and the fix.
"""
import csv
import dataclasses
import hashlib
import io
import os
import pathlib
import re
import struct
import warnings
import zipfile

import numpy as np
from PIL import Image

RELEASE_ZIP = "Warwick_QU_Dataset_(Released_2016_07_08).zip"
RELEASE_FOLDER = "Warwick QU Dataset (Released 2016_07_08)"
GRADE_FILE = "Grade.csv"
BINARY_MASK_FOLDER = "binary_masks"
MANIFEST_PATH = pathlib.Path(__file__).with_name("RELEASE_MANIFEST.tsv")

# TFDS split -> name prefix in the release.
SPLIT_PREFIXES = {"train": "train", "test_a": "testA", "test_b": "testB"}
GRADES = ("benign", "malignant")
DETAILED_GRADES = (
    "healthy",
    "adenomatous",
    "moderately differentiated",
    "moderately-to-poorly differentiated",
    "poorly differentiated",
)
# Spellings found in Grade.csv -> canonical `DETAILED_GRADES` entry.
_DETAILED_GRADE_ALIASES = {
    "moderately-to-poorly differentated": "moderately-to-poorly differentiated"
}
_IMAGE_NAME = re.compile(r"^(train|testA|testB)_(\d+)\.bmp$")

EXPECTED_LAYOUT = (
    f"the release zip `{RELEASE_ZIP}`, its extracted folder `{RELEASE_FOLDER}/`, or the flat "
    f"files themselves (`train_1.bmp`, `train_1_anno.bmp`, ..., `testB_20_anno.bmp`, "
    f"`{GRADE_FILE}`)"
)


class GlasDataError(ValueError):
    """A GlaS input file is missing, unreadable or inconsistent; the message says which and how
    to fix it."""


class GlasIntegrityWarning(UserWarning):
    """A release file differs from the published release (size or sha256)."""


@dataclasses.dataclass(frozen=True)
class GradeRecord:
    """One row of `Grade.csv`."""

    patient_id: int
    grade: str
    grade_detailed: str


def example_sort_key(name):
    """Release order: train, testA, testB, each by number (`train_2` before `train_10`)."""
    prefix, _, number = name.rpartition("_")
    prefixes = list(SPLIT_PREFIXES.values())
    rank = prefixes.index(prefix) if prefix in prefixes else len(prefixes)
    return rank, prefix, int(number) if number.isdigit() else -1, name


class ReleaseFiles:
    """Read access to the release files, whether in a folder or in the release zip.

    Files are addressed by their path relative to the release folder (`train_1.bmp`,
    `binary_masks/train_1.png`).
    """

    def __init__(self, root, zip_path=None, zip_members=None):
        self.root = pathlib.Path(root)
        self._zip_path = zip_path
        self._zip_members = zip_members

    @classmethod
    def find(cls, manual_dir):
        """Locates the release in `manual_dir` (flat files, extracted folder or zip).

        Raises:
            GlasDataError: `manual_dir` holds none of the three layouts.
        """
        manual_dir = pathlib.Path(os.fspath(manual_dir))
        if not manual_dir.is_dir():
            raise GlasDataError(
                f"manual_dir {manual_dir} does not exist. Create it and put in it "
                f"{EXPECTED_LAYOUT}."
            )
        for folder in (manual_dir, manual_dir / RELEASE_FOLDER):
            if (folder / GRADE_FILE).is_file() or any(folder.glob("*.bmp")):
                return cls(folder)
        for path in manual_dir.iterdir():
            if path.name.lower() == RELEASE_ZIP.lower() and path.is_file():
                return cls._from_zip(path)
        found = sorted(path.name for path in manual_dir.iterdir())
        found = ", ".join(found[:10]) + (", ..." if len(found) > 10 else "") if found else "nothing"
        raise GlasDataError(
            f"No GlaS release found in manual_dir {manual_dir} (it holds: {found}). "
            f"Expected {EXPECTED_LAYOUT}."
        )

    @classmethod
    def _from_zip(cls, zip_path):
        try:
            with zipfile.ZipFile(zip_path) as archive:
                members = {
                    pathlib.PurePosixPath(member).name: member
                    for member in archive.namelist()
                    if not member.endswith("/")
                    and not member.startswith("__MACOSX/")
                    and not pathlib.PurePosixPath(member).name.startswith("._")
                }
        except zipfile.BadZipFile as error:
            raise GlasDataError(
                f"{zip_path} is not a readable zip ({error}); download the release again."
            ) from error
        return cls(zip_path, zip_path=zip_path, zip_members=members)

    def names(self):
        """Relative paths of the files at the top of the release."""
        if self._zip_members is not None:
            return sorted(self._zip_members)
        return sorted(path.name for path in self.root.iterdir() if path.is_file())

    def exists(self, name):
        if self._zip_members is not None:
            return name in self._zip_members
        return (self.root / name).is_file()

    def location(self, name):
        """Human-readable place of `name`, for messages."""
        if self._zip_members is not None:
            return f"{self._zip_path}:{self._zip_members.get(name, name)}"
        return str(self.root / name)

    def read(self, name):
        """Bytes of the file `name`; raises `GlasDataError` if absent."""
        if not self.exists(name):
            raise GlasDataError(f"{self.location(name)} is missing; copy it from the GlaS release.")
        if self._zip_members is not None:
            with zipfile.ZipFile(self._zip_path) as archive:
                return archive.read(self._zip_members[name])
        return (self.root / name).read_bytes()

    def image_names(self):
        """Example names (`train_1`, `testA_12`, ...) of the images present, in release order."""
        names = [match.group(0)[:-4] for match in map(_IMAGE_NAME.match, self.names()) if match]
        return sorted(names, key=example_sort_key)


def parse_grades(text, source):
    """Parses `Grade.csv` (leading spaces, CR-only or CRLF line endings are all fine).

    Args:
        text: the file's content, str.
        source: where it came from, for messages.

    Returns:
        dict name -> `GradeRecord`.
    """
    rows = list(csv.reader(io.StringIO(text, newline=None)))
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    expected = ["name", "patient id", "grade (glas)"]
    if header[:3] != expected or len(header) < 4:
        raise GlasDataError(
            f"{source} is not the release's Grade.csv: its header is {header}, expected "
            f"{expected + ['grade (sirinukunwattana et al. 2015)']}. "
            "Copy Grade.csv from the release."
        )
    records = {}
    for line_number, row in enumerate(rows[1:], start=2):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        try:
            name, patient_id, grade, detailed = cells[:4]
            detailed = _DETAILED_GRADE_ALIASES.get(detailed, detailed)
            if grade not in GRADES or detailed not in DETAILED_GRADES:
                raise ValueError(f"unknown grade {grade!r} / {detailed!r}")
            records[name] = GradeRecord(int(patient_id), grade, detailed)
        except ValueError as error:
            raise GlasDataError(
                f"{source} line {line_number} {row} is malformed ({error}); "
                "copy Grade.csv from the release."
            ) from error
    return records


def load_manifest(path=MANIFEST_PATH):
    """Published size and sha256 of every release BMP: dict name -> (size_bytes, sha256)."""
    manifest = {}
    for line in pathlib.Path(path).read_text().splitlines():
        if line and not line.startswith("#"):
            name, size, sha256 = line.split("\t")[:3]
            manifest[name] = (int(size), sha256)
    return manifest


def verify_release_file(name, data, manifest, location):
    """Warns (`GlasIntegrityWarning`) when `data` is not the published file `name`.

    Files the manifest does not list are not checked.
    """
    if name not in manifest:
        return
    size, sha256 = manifest[name]
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
        warnings.warn(
            f"{location} differs from the published GlaS release file {name} (size {len(data)} vs "
            f"{size} bytes, or sha256): it is a re-saved or corrupted copy. Pixels are used as "
            "they are; copy the file from the release zip to get the official data.",
            GlasIntegrityWarning,
            stacklevel=2,
        )


def _open_image(data, location):
    """Decodes `data` fully with PIL; truncated or unreadable files raise `GlasDataError`."""
    fix = "copy it again from the GlaS release zip"
    # PIL may be configured (LOAD_TRUNCATED_IMAGES) to pad short BMPs silently: check the header.
    if data[:2] == b"BM" and len(data) >= 6:
        declared = struct.unpack("<I", data[2:6])[0]
        if len(data) < declared:
            raise GlasDataError(
                f"{location} is truncated ({len(data)} bytes, its BMP header says {declared}); "
                f"{fix}."
            )
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise GlasDataError(f"{location} is not a readable image ({error}); {fix}.") from error
    return image


def decode_rgb_image(data, location):
    """Decodes a release image.

    Returns:
        uint8 (H, W, 3).
    """
    image = _open_image(data, location)
    if image.mode != "RGB":
        raise GlasDataError(
            f"{location} has PIL mode {image.mode!r} ({len(image.getbands())} channel(s)); "
            "GlaS images are 3-channel RGB BMPs. Use the original image from the release, not a "
            "converted copy."
        )
    return np.asarray(image, dtype=np.uint8)


def decode_annotation(data, location):
    """Decodes a release annotation: the palette indices (never the colours) are gland ids.

    Returns:
        uint16 (H, W): 0 background, 1..K gland ids.
    """
    image = _open_image(data, location)
    if image.mode not in ("P", "L"):
        raise GlasDataError(
            f"{location} has PIL mode {image.mode!r}; GlaS annotations are 8-bit palette (or "
            "greyscale) BMPs whose values are gland ids. Use the original annotation from the "
            "release."
        )
    # For mode "P", np.asarray gives the palette indices, not the colours.
    return np.asarray(image).astype(np.uint16)


def decode_binary_mask(data, location):
    """Decodes a binarised annotation (0/255 or 0/1, single channel).

    Returns:
        bool (H, W), True on glands.
    """
    image = _open_image(data, location)
    if image.mode not in ("L", "1"):
        raise GlasDataError(
            f"{location} has PIL mode {image.mode!r}; binary masks must be single-channel 8-bit "
            "PNGs with values 0/255 or 0/1."
        )
    mask = np.asarray(image).astype(np.uint8)
    values = set(np.unique(mask).tolist())
    if not (values <= {0, 255} or values <= {0, 1}):
        shown = sorted(values)[:8]
        raise GlasDataError(
            f"{location} is not binary (values {shown}{' ...' if len(values) > 8 else ''}); binary "
            "masks must hold only 0 and 255 (or 0 and 1). Re-export it without resampling."
        )
    return mask > 0
