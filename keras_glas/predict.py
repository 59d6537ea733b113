"""Predict gland instance maps for image files with an exported model.

`python -m keras_glas.predict MODEL IMAGE... --out DIR` writes, for each image `NAME.ext`,
`DIR/NAME_instances.png` (16-bit PNG label map: 0 background, 1..K one id per gland) and
`DIR/NAME_overlay.png` (the image with each gland tinted in its own colour and outlined).
MODEL is a SavedModel written by `keras_glas.export`, a training run directory or a `.keras`
file (both exported to a temporary SavedModel first, so predictions come from the artefact
users deploy). An unreadable image is reported by name on stderr and skipped; the others are
still written and the exit status is 1 at the end.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries
from tqdm import tqdm

from keras_glas.atomic import atomic_path

OVERLAY_ALPHA = 0.45


def read_image(path):
    """An image file (any format Pillow reads: BMP, PNG, JPEG, TIFF...) as uint8 (H, W, 3) RGB.

    Raises:
        OSError: the file is missing, not an image, or truncated (the message names the file).
    """
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise OSError(f"cannot read image {path}: {error}") from None


def instance_palette(num_colours, seed=0):
    """uint8 (num_colours, 3) bright colours, row 0 black; the same ids get the same colours."""
    colours = np.random.default_rng(seed).integers(64, 256, size=(max(num_colours, 1), 3))
    colours[0] = 0
    return colours.astype(np.uint8)


def colour_overlay(image, instances, alpha=OVERLAY_ALPHA):
    """Tint each instance of `instances` int (H, W) over `image` uint8 (H, W, 3) and outline it.

    Returns:
        uint8 (H, W, 3).
    """
    colours = instance_palette(int(instances.max()) + 1)[instances]
    inside = (instances > 0)[..., None]
    blended = np.where(inside, (1 - alpha) * image + alpha * colours, image)
    outline = find_boundaries(instances, mode="inner") & (instances > 0)
    blended[outline] = colours[outline]
    return blended.round().astype(np.uint8)


def write_png(path, array):
    """Write uint8 (H, W, 3) or uint16 (H, W) `array` as PNG at `path` via a temp file + rename."""
    with atomic_path(path) as temp:
        Image.fromarray(array).save(temp, format="PNG")


def instance_map_png(instances):
    """int (H, W) instance ids → uint16 (H, W) for a 16-bit PNG (ids must fit in 16 bits)."""
    if instances.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError(f"{instances.max()} instances do not fit a 16-bit PNG")
    return instances.astype(np.uint16)


class SavedModelPredictor:
    """Runs the `serving_default` signature of a keras-glas SavedModel on single images."""

    def __init__(self, saved_model_dir):
        import tensorflow as tf

        self._tf = tf
        self._serve = tf.saved_model.load(str(saved_model_dir)).signatures["serving_default"]

    def __call__(self, image):
        """uint8 (H, W, 3) → dict of NumPy outputs without the batch axis (`instances` int32
        (H, W), `probabilities` float32 (H, W), ...)."""
        outputs = self._serve(images=self._tf.constant(image[None]))
        return {key: value.numpy()[0] for key, value in outputs.items()}


def predict_files(predictor, image_paths, out_dir, progress=True):
    """Write instance maps and overlays for `image_paths`; unreadable files are skipped.

    Returns:
        list of `(path, error message)` for the files that could not be read or predicted.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    for path in tqdm(image_paths, desc="predict", unit="image", disable=not progress):
        try:
            image = read_image(path)
        except OSError as error:
            failures.append((path, str(error)))
            tqdm.write(f"error: {error}", file=sys.stderr)
            continue
        instances = predictor(image)["instances"]
        stem = Path(path).stem
        write_png(out_dir / f"{stem}_instances.png", instance_map_png(instances))
        write_png(out_dir / f"{stem}_overlay.png", colour_overlay(image, instances))
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m keras_glas.predict",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("model", metavar="MODEL",
                        help="SavedModel dir, training run dir or .keras file")
    parser.add_argument("images", metavar="IMAGE", nargs="+",
                        help="image files (BMP, PNG, JPEG...)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    args = parser.parse_args(argv)
    stems = [Path(path).stem for path in args.images]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        parser.error(f"several images share the name {', '.join(duplicates)}: their outputs "
                     "would overwrite each other; predict them into separate --out directories")

    from keras_glas.export import ensure_saved_model

    with tempfile.TemporaryDirectory() as work_dir:
        try:
            saved_model = ensure_saved_model(args.model, work_dir)
        except (FileNotFoundError, ValueError) as error:
            parser.exit(2, f"error: {error}\n")
        failures = predict_files(SavedModelPredictor(saved_model), args.images, args.out)
    written = len(args.images) - len(failures)
    print(f"{written} of {len(args.images)} images predicted into {args.out}")
    if failures:
        print(f"{len(failures)} unreadable: {', '.join(str(path) for path, _ in failures)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
