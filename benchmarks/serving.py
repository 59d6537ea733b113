"""Serving latency: the exported SavedModel (post-processing included) vs the Keras forward pass.

`python -m benchmarks.serving [--out FILE.json] [--config configs/unet.yaml] [--run-dir RUN]
[--base-filters N] [--runs 5]`

Times `serving_default` of a SavedModel written by `keras_glas.export` on one 775×522 image
(uint8 in; scaling, padding, U-Net, cropping and in-graph post-processing included) against the
Keras model's forward pass alone on the same image padded to a multiple of 2**depth (a
`tf.function` of `model(x, training=False)`). Each is warmed up once, then the median of
`--runs` calls is reported. The model is the config's U-Net (the seed's width, base 64, by
default) with random weights, or a trained run with `--run-dir` (post-processing time depends on
what the mask looks like, so a trained model is the representative case). The image is
`testA_1.bmp` of the real GlaS where `../shared/data/glas` holds it, else a synthetic one.
Goal (issue 6): `ratio = savedmodel_s / keras_forward_s <= 1.5`.
"""

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_glas import export
from keras_glas.config import load_config
from keras_glas.models import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
GLAS_IMAGE = Path(os.environ.get("KERAS_GLAS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data" / "glas")) / "testA_1.bmp"
HEIGHT, WIDTH = 522, 775
GOAL_RATIO = 1.5


def benchmark_image():
    """uint8 (522, 775, 3): real GlaS testA_1 where available, else smooth synthetic blobs."""
    if GLAS_IMAGE.is_file():
        from keras_glas.predict import read_image

        image = read_image(GLAS_IMAGE)
        if image.shape[:2] == (HEIGHT, WIDTH):
            return image, GLAS_IMAGE.name
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    field = sum(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
                for cy, cx, r in zip(rng.uniform(0, HEIGHT, 20), rng.uniform(0, WIDTH, 20), rng.uniform(15, 50, 20)))
    colour = np.stack([1 - field, 0.6 * (1 - field), 0.8 + 0 * field], -1).clip(0, 1)
    return (255 * colour).astype(np.uint8), "synthetic"


def median_seconds(function, runs):
    """Median wall time of `function()` over `runs` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "unet.yaml"))
    parser.add_argument("--run-dir", default=None, help="trained run to export (default: random weights)")
    parser.add_argument("--base-filters", type=int, default=None, help="override the config's width")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    if args.run_dir:
        model, config = export.load_run_model(args.run_dir, "best" if (
            Path(args.run_dir) / "checkpoints" / "best.weights.h5").is_file() else "last")
    else:
        overrides = [f"model.base_filters={args.base_filters}"] if args.base_filters else []
        config = load_config(args.config, overrides)
        with export.float32_policy():
            model = build_model(config.model)
    image, image_name = benchmark_image()
    multiple = export.unet_pad_multiple(model)
    padded = tf.constant(np.pad(image.astype(np.float32) / 255.0,
                                [(0, -HEIGHT % multiple), (0, -WIDTH % multiple), (0, 0)])[None])
    forward = tf.function(lambda x: model(x, training=False))
    keras_forward_s = median_seconds(lambda: forward(padded)["mask"].numpy(), args.runs)

    with tempfile.TemporaryDirectory() as work_dir:
        saved_model = export.export_model(model, Path(work_dir) / "saved_model", config.postprocess)
        serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
        batch = tf.constant(image[None])
        savedmodel_s = median_seconds(lambda: serve(images=batch)["instances"].numpy(), args.runs)
        n_instances = int(serve(images=batch)["instances"].numpy().max())

    results = {
        "savedmodel_s": savedmodel_s,
        "keras_forward_s": keras_forward_s,
        "ratio": savedmodel_s / keras_forward_s,
        "goal_ratio": GOAL_RATIO,
        "meets_goal": savedmodel_s / keras_forward_s <= GOAL_RATIO,
        "image": image_name,
        "image_hw": [HEIGHT, WIDTH],
        "base_filters": config.model.base_filters,
        "depth": config.model.depth,
        "weights": args.run_dir or "random",
        "postprocess": dataclasses.asdict(config.postprocess),
        "n_instances": n_instances,
        "runs": args.runs,
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
    }
    print(f"SavedModel (post-processing included): {savedmodel_s:.3f} s   Keras forward: "
          f"{keras_forward_s:.3f} s   ratio {results['ratio']:.2f} (goal <= {GOAL_RATIO}), "
          f"U-Net base {results['base_filters']}, {image_name} {WIDTH}x{HEIGHT}, {n_instances} instances")
    if args.out:
        from keras_glas.evaluate import write_json

        write_json(args.out, results)
        print(f"written to {args.out}")
    return results


if __name__ == "__main__":
    main()
