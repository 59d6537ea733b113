"""Throughput and memory of the tf.data pipeline against the seed study's Python batch generator.

    python -m benchmarks.pipeline --dataset glas/synthetic [--data-dir D] [--epochs 3]
        [--images-per-epoch 120] [--image-size 512] [--batch-size 6] [--out FILE.json]

Both sides produce U-Net training batches (images and binary masks) from the train split at
512×512, batch 6, with the seed's augmentation (flips and crop, p = 0.5 each); then again with the
extra augmentations on (rotation/scale, elastic deformation, H&E stain jitter). The tf.data side
is `keras_glas.data.make_dataset(..., cache=True)` (decoded examples cached after their one-off
anti-aliased shrink to 1.25·S, one warm-up epoch untimed; each timed epoch opens a new iterator,
as `Model.fit` does).
The seed-style side keeps only file paths and, per sample, reads the image and mask with
scikit-image, flips and crops in NumPy and resizes with `skimage.transform.resize(...,
anti_aliasing=True)`; its files are exported from the split as PNG beforehand (not timed).

Each measurement runs in its own spawned process so that peak RSS (`ru_maxrss`) belongs to it
alone; RSS is also sampled after every epoch to show that it does not grow.
"""

import argparse
import math
import multiprocessing
import os
import queue as queue_module
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.machine import machine_info, save_results

SEED_CROP_PROBABILITY = 0.5
MIN_CROP_FRACTION = 0.6  # the same window sizes as keras_glas.augment.AugmentOptions' default


def _peak_rss_mb():
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb():
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _cpu_seconds():
    """User + system CPU time of this process (all its threads), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed_epochs(run_epoch, epochs):
    """Runs `run_epoch() -> images` `epochs` times; returns images/s and RSS after each epoch.

    Also CPU milliseconds per image: on a shared machine wall-clock throughput depends on the
    other processes' load, CPU time much less (2000 / cpu_ms_per_image bounds images/s on two
    idle cores).
    """
    images, seconds, cpu_seconds, rss = 0, 0.0, 0.0, []
    for _ in range(epochs):
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        images += run_epoch()
        seconds += time.perf_counter() - start
        cpu_seconds += _cpu_seconds() - cpu_start
        rss.append(round(_rss_mb(), 1))
    return {
        "images_per_s": images / seconds,
        "cpu_ms_per_image": 1000.0 * cpu_seconds / images,
        "rss_mb_per_epoch": rss,
        "peak_rss_mb": _peak_rss_mb(),
    }


def measure_tfdata(config, extra):
    """Child process: images/s of make_dataset with cached decode (after one warm-up epoch)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_glas.augment import AugmentOptions
    from keras_glas.data import make_dataset

    augment = AugmentOptions(rotate_scale=True, elastic=True, stain_jitter=True) if extra else True
    dataset = make_dataset(
        config["dataset"],
        split="train",
        model="unet",
        batch_size=config["batch_size"],
        image_size=config["image_size"],
        augment=augment,
        seed=0,
        data_dir=config["data_dir"],
        cache=True,
    )
    split_size = sum(
        int(x.shape[0]) for x, _ in dataset
    )  # warm-up: fills the cache, traces the map
    passes = max(1, math.ceil(config["images_per_epoch"] / max(split_size, 1)))
    epoch_dataset = dataset.repeat(passes)

    def run_epoch():
        return sum(int(x.shape[0]) for x, _ in epoch_dataset)

    return _timed_epochs(run_epoch, config["epochs"])


def export_split(dataset, data_dir, out_dir):
    """Writes the train split as `<name>.png` images and `<name>_instances.png` (uint16) files.

    Returns:
        A list of (image path, instance map path).
    """
    import numpy as np
    from PIL import Image

    from keras_glas.data import make_dataset

    pairs = []
    for example in make_dataset(dataset, split="train", model="eval", data_dir=data_dir):
        name = example["name"][0].numpy().decode()
        image_path, labels_path = (
            Path(out_dir) / f"{name}.png",
            Path(out_dir) / f"{name}_instances.png",
        )
        Image.fromarray(example["image"][0].numpy()).save(image_path)
        Image.fromarray(example["instances"][0].numpy().astype(np.uint16)).save(labels_path)
        pairs.append((str(image_path), str(labels_path)))
    return pairs


def seed_style_batches(pairs, batch_size, size, rng, extra=False):
    """The seed study's memory-efficient generator: one pass over `pairs`, batches of U-Net inputs.

    Per sample: read image and labels from disk, flip left-right and up-down and crop (p = 0.5
    each) in NumPy, resize to size×size with scikit-image (anti-aliased for the image, order 0 for
    the mask); with `extra`, also rotate/scale, elastic-deform (SciPy) and stain-jitter (skimage
    HED), the NumPy counterparts of keras_glas.augment's extras.

    Yields:
        `(images float (B, size, size, 3), masks float (B, size, size, 1))`.
    """
    import numpy as np
    from skimage import io, transform

    order = rng.permutation(len(pairs))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        images, masks = [], []
        for index in order[start : start + batch_size]:
            image_path, labels_path = pairs[index]
            image, mask = io.imread(image_path), io.imread(labels_path) > 0
            if rng.random() < 0.5:
                image, mask = image[:, ::-1], mask[:, ::-1]
            if rng.random() < 0.5:
                image, mask = image[::-1], mask[::-1]
            if rng.random() < SEED_CROP_PROBABILITY:
                fraction = rng.uniform(MIN_CROP_FRACTION, 1.0)
                height, width = round(image.shape[0] * fraction), round(image.shape[1] * fraction)
                top = rng.integers(0, image.shape[0] - height + 1)
                left = rng.integers(0, image.shape[1] - width + 1)
                image, mask = (
                    image[top : top + height, left : left + width],
                    mask[top : top + height, left : left + width],
                )
            image = transform.resize(image, (size, size), anti_aliasing=True)
            mask = transform.resize(mask.astype(float), (size, size), order=0, anti_aliasing=False)
            if extra:
                image, mask = _numpy_extras(image, mask, rng)
            images.append(image)
            masks.append(mask[..., None])
        yield np.stack(images), np.stack(masks)


def _numpy_extras(image, mask, rng):
    """Rotation/scale, elastic deformation and H&E stain jitter with SciPy / scikit-image."""
    import numpy as np
    from scipy import ndimage
    from skimage import color, transform

    size = image.shape[0]
    centre = np.array([size, size]) / 2 - 0.5
    affine = (
        transform.AffineTransform(translation=-centre)
        + transform.AffineTransform(
            rotation=np.deg2rad(rng.uniform(-15, 15)), scale=rng.uniform(0.9, 1.1)
        )
        + transform.AffineTransform(translation=centre)
    )
    image = transform.warp(image, affine.inverse, order=1)
    mask = transform.warp(mask, affine.inverse, order=0)
    displacement = [ndimage.gaussian_filter(rng.normal(size=(size, size)), 32) for _ in range(2)]
    displacement = [d * 4.0 / max(d.std(), 1e-6) for d in displacement]
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    coordinates = [rows + displacement[0], cols + displacement[1]]
    image = np.stack(
        [ndimage.map_coordinates(image[..., c], coordinates, order=1) for c in range(3)], -1
    )
    mask = ndimage.map_coordinates(mask, coordinates, order=0)
    stains = color.rgb2hed(image) * (1 + rng.uniform(-0.05, 0.05, 3)) + rng.uniform(-0.05, 0.05, 3)
    return color.hed2rgb(stains), mask


def measure_generator(config, extra):
    """Child process: images/s of the seed-style generator over the exported PNG files."""
    import numpy as np

    rng = np.random.default_rng(0)
    pairs = config["pairs"]
    passes = max(1, math.ceil(config["images_per_epoch"] / len(pairs)))

    def run_epoch():
        images = 0
        for _ in range(passes):
            for batch_images, _ in seed_style_batches(
                pairs, config["batch_size"], config["image_size"], rng, extra
            ):
                images += len(batch_images)
        return images

    return _timed_epochs(run_epoch, config["epochs"])


def _child(function, args, queue):
    queue.put(function(*args))


def run_isolated(function, *args):
    """Runs `function(*args)` in a fresh spawned process and returns its result."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(function, args, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not process.is_alive():
                raise RuntimeError(
                    f"benchmark child {function.__name__} died with exit code {process.exitcode}"
                ) from None  # the empty queue is how the death shows, not its cause
    process.join()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", default="glas/synthetic", help="TFDS name, e.g. glas/synthetic or glas"
    )
    parser.add_argument(
        "--data-dir", default=None, help="TFDS data_dir holding the prepared dataset"
    )
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per measurement")
    parser.add_argument(
        "--images-per-epoch", type=int, default=120, help="an epoch repeats the split to reach this"
    )
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--out", default="results/pipeline_benchmark.json")
    args = parser.parse_args(argv)

    config = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "epochs": args.epochs,
        "images_per_epoch": args.images_per_epoch,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
    }
    results = dict(config, load_average_at_start=os.getloadavg()[0], **machine_info())
    with tempfile.TemporaryDirectory(prefix="glas_png_") as png_dir:
        print(f"exporting {args.dataset} train split as PNG to {png_dir} (not timed)")
        config["pairs"] = run_isolated(export_split, args.dataset, args.data_dir, png_dir)
        for extra, suffix in ((False, ""), (True, "_extra")):
            label = "seed augmentation" + (
                " + rotate/scale, elastic, stain jitter" if extra else ""
            )
            for side, function in (("tfdata", measure_tfdata), ("generator", measure_generator)):
                measured = run_isolated(function, config, extra)
                results[f"{side}{suffix}_images_per_s"] = round(measured["images_per_s"], 2)
                results[f"{side}{suffix}_cpu_ms_per_image"] = round(measured["cpu_ms_per_image"], 2)
                results[f"{side}{suffix}_peak_rss_mb"] = round(measured["peak_rss_mb"], 1)
                results[f"{side}{suffix}_rss_mb_per_epoch"] = measured["rss_mb_per_epoch"]
                print(
                    f"{label:60s} {side:9s} {measured['images_per_s']:8.1f} images/s  "
                    f"{measured['cpu_ms_per_image']:6.2f} CPU ms/image  "
                    f"peak RSS {measured['peak_rss_mb']:7.1f} MB  "
                    f"RSS per epoch {measured['rss_mb_per_epoch']}"
                )
            ratio = (
                results[f"tfdata{suffix}_images_per_s"] / results[f"generator{suffix}_images_per_s"]
            )
            results["extra_ratio" if extra else "ratio"] = round(ratio, 2)
            print(f"{label:60s} ratio     {ratio:8.1f}x")
    results["load_average_at_end"] = os.getloadavg()[0]
    save_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
