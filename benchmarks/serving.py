"""Serving latency: the exported SavedModel (post-processing included) vs the Keras forward pass.

`python -m benchmarks.serving [--out FILE.json] [--config configs/unet.yaml] [--run-dir RUN]
[--base-filters N] [--runs 5]`

Times `serving_default` of SavedModels written by `keras_glas.export` on one 775×522 image at
two inference scales: the export's default, the run's training scale `data.image_size` S (512
for `configs/unet.yaml`: the network runs at 512×345), and native resolution (`--image-size 0`,
the network runs at 775×522). The SavedModel time includes everything a client gets (uint8 in;
scaling, resizing, padding, U-Net, cropping, resizing back, in-graph post-processing at
775×522). The reference is the Keras model's forward pass alone at the same network input (the
image resized as the SavedModel does, padded to a multiple of 2**depth; a `tf.function` of
`model(x, training=False)`). Each is warmed up once, then the median of `--runs` calls is
reported; the two are called alternately so that both see the same load. The model is the
config's U-Net (the seed's width, base 64, by default) with random weights, or a trained run
with `--run-dir` (post-processing time depends on what the mask looks like, so a trained model
is the representative case). The image is `testA_1.bmp` of the real
GlaS where `../shared/data/glas` holds it, else a synthetic one. The load average before and
after is recorded: the CPU may be shared. Goal (issue 6): `ratio = savedmodel_s /
keras_forward_s <= 1.5` at each scale.
"""

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_glas import export
from keras_glas.config import load_config
from keras_glas.models import build_model

from benchmarks.machine import interleaved_median_seconds, machine_info, save_results

REPO_ROOT = Path(__file__).resolve().parents[1]
GLAS_IMAGE = Path(os.environ.get("KERAS_GLAS_SHARED_DATA",
                                 REPO_ROOT.parent / "shared" / "data" / "glas")) / "testA_1.bmp"
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
                for cy, cx, r in zip(rng.uniform(0, HEIGHT, 20), rng.uniform(0, WIDTH, 20),
                                     rng.uniform(15, 50, 20), strict=True))
    colour = np.stack([1 - field, 0.6 * (1 - field), 0.8 + 0 * field], -1).clip(0, 1)
    return (255 * colour).astype(np.uint8), "synthetic"


def keras_input(image, image_size, multiple):
    """float32 (1, h, w, 3): the network input the SavedModel builds for `image` at `image_size`
    (0 = native), zero-padded to `multiple`."""
    inputs = tf.constant(image[None], tf.float32) / 255.0
    if image_size:
        inputs = export.resize_to_training_scale(inputs, image_size)
    return export.pad_to_multiple(inputs, multiple)


def time_scale(model, config, image, image_size, runs, work_dir):
    """Latency record of one inference scale: SavedModel vs Keras forward at its input size."""
    inputs = keras_input(image, image_size, export.unet_pad_multiple(model))
    forward = tf.function(lambda x: model(x, training=False))
    saved_model = export.export_model(model, Path(work_dir) / f"saved_model_{image_size}",
                                      config.postprocess, image_size=image_size)
    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    batch = tf.constant(image[None])
    savedmodel_s, keras_forward_s = interleaved_median_seconds(
        [lambda: serve(images=batch)["instances"].numpy(),
         lambda: forward(inputs)["mask"].numpy()], runs)
    return {
        "image_size": image_size,
        "network_input_hw": [int(inputs.shape[1]), int(inputs.shape[2])],
        "savedmodel_s": savedmodel_s,
        "keras_forward_s": keras_forward_s,
        "ratio": savedmodel_s / keras_forward_s,
        "meets_goal": savedmodel_s / keras_forward_s <= GOAL_RATIO,
        "n_instances": int(serve(images=batch)["instances"].numpy().max()),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "unet.yaml"))
    parser.add_argument("--run-dir", default=None,
                        help="trained run to export (default: random weights)")
    parser.add_argument("--base-filters", type=int, default=None,
                        help="override the config's width")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    if args.run_dir:
        model, config, _ = export.load_run_model(args.run_dir)
    else:
        overrides = [f"model.base_filters={args.base_filters}"] if args.base_filters else []
        config = load_config(args.config, overrides)
        with export.float32_policy():
            model = build_model(config.model)
    image, image_name = benchmark_image()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work_dir:
        scales = {name: time_scale(model, config, image, image_size, args.runs, work_dir)
                  for name, image_size in (("training_scale", config.data.image_size),
                                           ("native", 0))}
    results = {
        "scales": scales,
        "goal_ratio": GOAL_RATIO,
        "image": image_name,
        "image_hw": [HEIGHT, WIDTH],
        "base_filters": config.model.base_filters,
        "depth": config.model.depth,
        "weights": args.run_dir or "random",
        "postprocess": dataclasses.asdict(config.postprocess),
        "runs": args.runs,
        **machine_info(),
        "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "tensorflow": tf.__version__,
    }
    print(f"U-Net base {results['base_filters']}, {image_name} {WIDTH}x{HEIGHT}, median of "
          f"{args.runs}, load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    for name, row in scales.items():
        height, width = row["network_input_hw"]
        print(f"  {name:<14} (image_size {row['image_size']}, network {width}x{height}): "
              f"SavedModel {row['savedmodel_s']:.3f} s   "
              f"Keras forward {row['keras_forward_s']:.3f} s"
              f"   ratio {row['ratio']:.2f} (goal <= {GOAL_RATIO})   "
              f"{row['n_instances']} instances")
    save_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
