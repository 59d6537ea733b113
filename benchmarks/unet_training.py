"""Seconds a U-Net training step takes on this CPU, with and without XLA and oneDNN, and what
its training targets cost the input pipeline.

    python -m benchmarks.unet_training [--config configs/unet_glas_cpu.yaml] [--steps 5]
        [--out F.json]

Step: the config's U-Net, loss and optimizer (`keras_glas.train.compile_model`) at the config's
image size, batch size and precision (`auto` resolved for this machine), on one constant batch
of random images, masks and border weights, so that the input pipeline is not measured. Two
warm-up steps (tracing and XLA compilation) are not timed, then `--steps` steps run in one
`fit` call. The four variants (`train.jit_compile` false / true × `TF_ENABLE_ONEDNN_OPTS` 0 /
1) each run in a fresh process, because TensorFlow reads `TF_ENABLE_ONEDNN_OPTS` once, when it
is imported.

Targets: the milliseconds `keras_glas.data.border_weight_map` and `contour_map` take (in a
`tf.function`, median of 20 interleaved calls after one warm-up each) for one instance map at
the training size holding a grid of 24 rectangular glands with 4 px gaps, about as crowded as
a GlaS image.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.machine import interleaved_median_seconds, machine_info, save_results

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "unet_glas_cpu.yaml"
WARMUP_STEPS = 2
TARGET_RUNS = 20


def time_steps(config_path: str, jit_compile: bool, steps: int) -> dict:
    """Seconds per training step of the config's U-Net (this process's oneDNN setting)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_glas.config import load_config
    from keras_glas.models import build_model
    from keras_glas.train import compile_model, make_optimizer, resolve_precision, training_stages

    config = load_config(config_path, [f"train.jit_compile={str(jit_compile).lower()}"])
    precision = resolve_precision(config.train.precision)
    keras.config.set_dtype_policy(precision)
    keras.utils.set_random_seed(0)
    model = build_model(config.model)
    compile_model(model, config, make_optimizer(training_stages(config)[0]))

    batch, size = config.data.batch_size, config.data.image_size
    rng = np.random.default_rng(0)
    images = rng.random((batch, size, size, 3), dtype=np.float32)
    masks = (rng.random((batch, size, size, 1)) > 0.5).astype(np.float32)
    targets, weights = {"mask": masks}, {"mask": np.ones((batch, size, size), np.float32)}
    if config.model.contour_head:
        targets["contour"], weights["contour"] = masks, weights["mask"]
    dataset = tf.data.Dataset.from_tensors((images, targets, weights)).repeat()

    model.fit(dataset, steps_per_epoch=WARMUP_STEPS, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    return {"s_per_step": (time.perf_counter() - start) / steps, "precision": precision,
            "batch_size": batch, "image_size": size}


def crowded_instances(size: int):
    """int32 (size, size) map: a 6 × 4 grid of rectangular glands with 4 px gaps between."""
    import numpy as np

    labels = np.zeros((size, size), np.int32)
    rows, cols = np.array_split(np.arange(size), 6), np.array_split(np.arange(size), 4)
    for index, (row, col) in enumerate((row, col) for row in rows for col in cols):
        labels[row[2]:row[-2], col[2]:col[-2]] = index + 1
    return labels


def time_targets(size: int) -> dict:
    """Median milliseconds of `border_weight_map` and `contour_map` on `crowded_instances`."""
    import tensorflow as tf

    from keras_glas.data import border_weight_map, contour_map

    labels = tf.constant(crowded_instances(size))
    functions = [tf.function(border_weight_map), tf.function(contour_map)]
    seconds = interleaved_median_seconds([lambda f=f: f(labels).numpy() for f in functions],
                                         TARGET_RUNS)
    return {"border_weights_ms": 1000 * seconds[0], "contour_ms": 1000 * seconds[1]}


def run_worker(config: str, jit_compile: bool, onednn: str, steps: int) -> dict:
    """`time_steps` in a fresh interpreter with TF_ENABLE_ONEDNN_OPTS=`onednn`."""
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                      os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "benchmarks.unet_training", "--config", config,
            "--steps", str(steps), "--worker", "jit" if jit_compile else "nojit"]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"benchmark worker failed ({' '.join(argv)}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.unet_training",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--worker", choices=("jit", "nojit"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(time_steps(args.config, args.worker == "jit", args.steps)))
        return None

    from keras_glas.config import load_config

    load_config(args.config)  # a bad config fails here, with the file named, not in a worker
    load_before = os.getloadavg()[0]
    variants = []
    for onednn in ("0", "1"):
        for jit_compile in (False, True):
            row = {"jit_compile": jit_compile, "tf_enable_onednn_opts": onednn,
                   **run_worker(args.config, jit_compile, onednn, args.steps)}
            variants.append(row)
            print(f"  jit_compile={str(jit_compile).lower():<5} TF_ENABLE_ONEDNN_OPTS={onednn}: "
                  f"{row['s_per_step']:.2f} s a step of {row['batch_size']} at "
                  f"{row['image_size']}² ({row['precision']})", flush=True)
    baseline = variants[0]["s_per_step"]
    for row in variants:
        row["speedup"] = baseline / row["s_per_step"]
    targets = time_targets(variants[0]["image_size"])
    print(f"  targets at {variants[0]['image_size']}²: border weights "
          f"{targets['border_weights_ms']:.1f} ms, contour {targets['contour_ms']:.1f} ms a map")
    results = {
        "config": str(Path(args.config).resolve().relative_to(REPO_ROOT))
        if Path(args.config).resolve().is_relative_to(REPO_ROOT) else args.config,
        "steps": args.steps,
        "variants": variants,
        "targets": targets,
        **machine_info(),
        "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
    }
    print(f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    save_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
