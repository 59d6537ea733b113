"""Mask R-CNN speed: our model vs keras-cv-nightly's MaskRCNN (and optionally torchvision's).

    python -m benchmarks.maskrcnn [--out FILE.json] [--torchvision [--torch-python PATH]]
                                  [--policy mixed_bfloat16]

Configuration of issue 7: ResNet-50, random init, 256 x 256 training images (synthetic glands,
5 per image, new images every step), batch 2, SGD lr 5e-3 momentum 0.9 weight decay 5e-4 with
the linear learning-rate warm-up of torchvision's detection reference recipe (from 1/1000 of the
rate over 1000 steps; see `keras_sgd`), the same for all three models;
predictions of one 775 x 522 image (GlaS testA_1 when `../shared/data/glas` exists, else
noise), batch 1, median of 3 calls after one warm-up call. Keys (seconds unless named otherwise):

- `ours_first_step_s` / `ours_step_s`: one `fit` epoch of `--steps` + 1 batches, timed by a
  callback: its first step (from the `fit` call, tracing included) / the mean of the others;
  `ours_rpn_matched_fraction`, `ours_proposal_recall`: boxes matched.
- `ours_predict_s`: the 775 x 522 uint8 image through our SavedModel's default serving graph
  (`keras_glas.export.make_serving_function(model, image_size=S, fold_batch_norms=True)`, as
  `keras_glas.export` writes it, S = `--image-size`): resized
  so that its longer side is S (256 x 172), network, instance map resized back to 775 x 522.
  The configuration torchvision's `torchvision_predict_s` uses.
- `ours_predict_native_s`: the same graph with `image_size=0`: the network at 775 x 522.
  `ours_first_predict*_s`: the warm-up calls (tracing included).
- `kcv_nightly_*`: keras-cv-nightly, installed with `pip install --no-deps --target DIR` and
  timed in a subprocess with DIR first on PYTHONPATH (it cannot share a process with keras-cv
  0.9.0), trained by the same one-epoch `fit`; `ratio` = `kcv_nightly_step_s / ours_step_s`.
- `torchvision_*` (with `--torchvision`): `maskrcnn_resnet50_fpn(weights=None,
  weights_backbone=None, num_classes=2, min_size=max_size=S)`, the same SGD and warm-up,
  `torch.set_num_threads(2)`, timed in a subprocess of `--torch-python`, an interpreter with
  torch and torchvision (never a keras-glas dependency; see `--help`); `torchvision_ratio` =
  `torchvision_step_s / ours_step_s`. `torchvision_step_losses`: without the warm-up this
  recipe diverges from random init within 3 steps (loss 206, 4316, 3e11, then NaN, recorded
  as null), and steps on NaN weights are ~30% faster because NaN proposals are dropped: a
  step time that is not a training step's. Predict uses a freshly initialised model.
  Eval-mode predict of the image resized by torchvision's own transform:
  `torchvision_predict_s` at min_size = max_size = S (256 x 172, as ours),
  `torchvision_predict_800_s` at its default (min_size 800, max_size 1333: about 1187 x 800),
  `torchvision_predict_native_s` at 775 x 522.
- Both models predict with score threshold 0 and detection NMS at IoU 1.0, so each returns
  its cap of 100 detections and pastes 100 masks (see PREDICT_SCORE_THRESHOLD);
  `*_detections`: detections of the last call.

Timings depend on the machine's load (recorded at start and end); run it on an idle machine.
"""
import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from keras_glas.testing import ellipse_glands

from benchmarks.machine import machine_info, save_results

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT.parent / "cache"
KCV_NIGHTLY = "keras-cv-nightly==0.10.0.dev2024100303"
DEFAULT_KCV_DIR = CACHE_DIR / "kcv_nightly"
DEFAULT_TORCH_PYTHON = CACHE_DIR / "torch_venv" / "bin" / "python"
TORCH_VENV_RECIPE = ("python3.11 -m venv {venv} && {venv}/bin/pip install torch==2.14.1 "
                     "torchvision==0.29.1 numpy pillow")
GLAS_IMAGE = REPO_ROOT.parent / "shared" / "data" / "glas" / "testA_1.bmp"
PREDICT_SHAPE = (522, 775)  # height, width of a GlaS image
PREDICT_REPEATS = 3
# Predict keeps the 100 best-scoring detections (both models' cap), so that both paste the
# same number of masks: with random weights their default thresholds (ours 0.5, torchvision's
# 0.05) keep none of ours and all 100 of torchvision's, and detection NMS at IoU 0.5 keeps
# fewer of ours than of torchvision's (whose RPN suppresses per FPN level), which would time
# different work. NMS with IoU 1.0 suppresses nothing.
PREDICT_SCORE_THRESHOLD = 0.0
PREDICT_NMS_IOU = 1.0
WORKER_RESULT = "WORKER_RESULT "  # prefix of the JSON line a worker subprocess prints
# The seed's SGD, warmed up as in torchvision's detection reference recipe
# (references/detection/train.py: LinearLR from 1/1000 over the first 1000 iterations).
SGD_LEARNING_RATE = 5e-3
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 5e-4
WARMUP_FACTOR = 1e-3
WARMUP_STEPS = 1000


def synthetic_batch(rng, batch_size, size):
    """The benchmark's training batch: 5 filled-ellipse glands of random colours on a pink
    background, in the pipeline's format (`keras_glas.testing.ellipse_glands`, N = 16).

    Returns x float32 (B, S, S, 3) in [0, 1] and y = {"boxes" (B, 16, 4) yxyx padded -1,
    "classes" (B, 16) 0 / -1, "instances" int32 (B, S, S)}.
    """
    return ellipse_glands(rng, batch_size, size, objects=5, max_instances=16,
                          centre_range=(0.15, 0.85), radius_range=(0.05, 0.14),
                          background_range=(0.7, 0.9))


def predict_image():
    """uint8 (1, 522, 775, 3): GlaS testA_1 when available, else noise."""
    if GLAS_IMAGE.is_file():
        from PIL import Image

        return np.array(Image.open(GLAS_IMAGE).convert("RGB"), np.uint8)[None]  # writable copy
    return np.random.default_rng(0).integers(0, 256, (1,) + PREDICT_SHAPE + (3,), dtype=np.uint8)


def _timed(function):
    """(seconds, result) of calling `function()`."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def time_predict(predict):
    """(first call s, median s of the next PREDICT_REPEATS calls, result of the last call)."""
    first, result = _timed(predict)
    times = []
    for _ in range(PREDICT_REPEATS):
        seconds, result = _timed(predict)
        times.append(seconds)
    return first, float(np.median(times)), result


def keras_sgd(weight_decay=None):
    """Keras SGD with the benchmark's learning rate, momentum and linear warm-up."""
    import keras

    warm_up = keras.optimizers.schedules.CosineDecay(
        SGD_LEARNING_RATE * WARMUP_FACTOR, decay_steps=1, alpha=1.0,  # constant after warm-up
        warmup_target=SGD_LEARNING_RATE, warmup_steps=WARMUP_STEPS)
    return keras.optimizers.SGD(warm_up, momentum=SGD_MOMENTUM, weight_decay=weight_decay)


def fit_timed(model, batches, label):
    """Train on `batches` in one `fit` epoch (as training runs) and time every step.

    Both Keras models are timed this way (keras-cv-nightly's `train_step` unpacks exactly
    `(x, y)`, which `train_on_batch` does not give). One `fit` call, not one per step: a call's
    own set-up (data adapter, callbacks) is not a training step's cost.

    Args:
        model: a compiled Keras model.
        batches: list of `(x, y)` NumPy batches of equal shapes.
        label: name printed with each step's time.

    Returns:
        `(first step s (from the `fit` call, tracing included), [s of each later step],
        logs of the last step)`.
    """
    import keras
    import tensorflow as tf

    class StepTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ends = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            # Reading a value waits for the step to finish, whatever Keras runs asynchronously.
            self.logs = {key: float(value) for key, value in logs.items()}
            self.ends.append(time.perf_counter())
            if batch:
                print(f"  {label} step {batch}: {self.ends[-1] - self.ends[-2]:.2f} s, "
                      f"loss {self.logs['loss']:.3f}", flush=True)

    stacked = tf.nest.map_structure(lambda *parts: np.stack(parts), *batches)
    timer = StepTimer()
    model.fit(tf.data.Dataset.from_tensor_slices(stacked), epochs=1, verbose=0, callbacks=[timer])
    steps = np.diff(timer.ends)
    return float(steps[0]), [float(step) for step in steps[1:]], timer.logs


def benchmark_ours(steps, image_size, batch_size, policy):
    """Train-step and predict times of keras_glas's Mask R-CNN (ResNet-50, random init)."""
    import keras
    import tensorflow as tf

    from keras_glas.export import IMAGE_SIGNATURE, make_serving_function
    from keras_glas.models.maskrcnn import boxes as box_ops
    from keras_glas.models.maskrcnn import build_maskrcnn, targets

    keras.mixed_precision.set_global_policy(policy)
    model = build_maskrcnn("resnet50")
    model.compile(optimizer=keras_sgd(weight_decay=SGD_WEIGHT_DECAY))
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(rng, batch_size, image_size) for _ in range(steps + 1)]
    first_step, times, logs = fit_timed(model, batches, "ours")

    # Boxes matched during training: objects of the last batch that own at least one positive
    # anchor of the RPN's sample (above: objects an RPN proposal overlaps with IoU >= 0.5).
    images, y = batches[-1]
    gt_boxes, gt_classes, gt_valid = targets.trim_padding(tf.constant(y["boxes"]),
                                                          tf.constant(y["classes"]))
    anchors = box_ops.generate_anchors(image_size, image_size, (4, 8, 16, 32, 64),
                                       model.options["anchor_sizes"],
                                       model.options["aspect_ratios"])
    rpn = targets.rpn_targets(anchors, gt_boxes, gt_valid)
    iou = tf.where(gt_valid[:, None, :],
                   box_ops.box_iou(tf.gather(anchors, rpn["indices"]), gt_boxes), -1.0)
    matched = tf.one_hot(tf.argmax(iou, axis=2), tf.shape(gt_boxes)[1]) > 0
    hit = tf.reduce_any(matched & rpn["positive"][:, :, None], axis=1) & gt_valid
    rpn_matched = float(tf.reduce_sum(tf.cast(hit, tf.float32))
                        / tf.reduce_sum(tf.cast(gt_valid, tf.float32)))

    predict_results = {}
    image = tf.constant(predict_image())
    # Read when `infer` is traced.
    model.options.update({"score_threshold": PREDICT_SCORE_THRESHOLD,
                          "detection_nms_iou": PREDICT_NMS_IOU})
    # Training scale (the SavedModel's default, torchvision's configuration) and native.
    for suffix, serving_size in (("", image_size), ("_native", 0)):
        serve = tf.function(make_serving_function(model, image_size=serving_size,
                                                  fold_batch_norms=True),
                            input_signature=[IMAGE_SIGNATURE])
        first, median, out = time_predict(functools.partial(serve, image))
        predict_results.update({
            f"ours_first_predict{suffix}_s": first,
            f"ours_predict{suffix}_s": median,
            f"ours_predict{suffix}_detections": int(np.sum(out["scores"].numpy() > 0)),
        })
    return {
        "ours_policy": policy,
        "ours_first_step_s": first_step,
        "ours_step_s": float(np.mean(times)),
        "ours_step_times_s": times,
        **predict_results,
        "ours_rpn_matched_fraction": rpn_matched,
        "ours_proposal_recall": logs["proposal_recall"],
    }


def kcv_nightly_worker(steps, image_size, batch_size):
    """Runs inside the subprocess (keras-cv-nightly first on sys.path); prints a JSON line."""
    import keras_cv

    backbone = keras_cv.models.ResNetBackbone(
        stackwise_filters=[64, 128, 256, 512], stackwise_blocks=[3, 4, 6, 3],
        stackwise_strides=[1, 2, 2, 2], include_rescaling=False,
        input_shape=(image_size, image_size, 3),  # its anchor generator needs a static size
    )
    model = keras_cv.models.MaskRCNN(backbone=backbone, num_classes=1, bounding_box_format="yxyx")
    model.compile(optimizer=keras_sgd(), rpn_box_loss="Huber",
                  rpn_classification_loss="BinaryCrossentropy", box_loss="Huber",
                  classification_loss="CategoricalCrossentropy", mask_loss="BinaryCrossentropy")
    rng = np.random.default_rng(0)

    def nightly_batch():
        images, y = synthetic_batch(rng, batch_size, image_size)
        # keras-cv classes are 1..num_classes (0 = background), -1 padding; its "segmask" is
        # the instance map with id k + 1 for boxes[:, k], like our pipeline's.
        classes = np.where(y["classes"] >= 0, y["classes"] + 1, -1).astype(np.float32)
        return images, {"boxes": y["boxes"], "classes": classes,
                        "segmask": y["instances"].astype(np.float32)}

    result = {}
    first_step, times, logs = fit_timed(model, [nightly_batch() for _ in range(steps + 1)],
                                        "kcv-nightly")
    result.update(kcv_nightly_first_step_s=first_step, kcv_nightly_step_s=float(np.mean(times)),
                  kcv_nightly_step_times_s=times, kcv_nightly_logs=logs)
    try:
        image = predict_image().astype(np.float32) / 255.0
        seconds, _ = _timed(lambda: model.predict(image, batch_size=1, verbose=0))
        result["kcv_nightly_predict_s"] = seconds
    except Exception as error:  # report, do not hide, the nightly's predict failure
        result["kcv_nightly_predict_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    print(WORKER_RESULT + json.dumps(result), flush=True)


def run_worker(python, worker_flag, steps, image_size, batch_size, path_entries, error_key):
    """Run `python -m benchmarks.maskrcnn WORKER_FLAG ...` and return the dict it prints.

    The worker's other stdout lines (its progress) are echoed as they come. PYTHONPATH is
    `path_entries` + this repository only (an inherited one could shadow the worker's own
    packages). A worker that prints no result gives `{error_key: exit code + end of stderr}`.
    """
    python_path = [str(entry) for entry in path_entries] + [str(REPO_ROOT)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(python_path))
    command = [str(python), "-m", "benchmarks.maskrcnn", worker_flag, "--steps", str(steps),
               "--image-size", str(image_size), "--batch-size", str(batch_size)]
    result = None
    # stderr goes to a file, not a pipe: a pipe nobody reads blocks a chatty worker.
    with tempfile.TemporaryFile("w+") as stderr:
        with subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=stderr, text=True) as process:
            for line in process.stdout:
                if line.startswith(WORKER_RESULT):
                    result = json.loads(line[len(WORKER_RESULT):])
                else:
                    print(line, end="", flush=True)
        if result is None:
            stderr.seek(0)
            return {error_key: f"{' '.join(command)} exited with {process.returncode}: "
                               f"{stderr.read()[-1500:]}"}
    return result


def benchmark_kcv_nightly(steps, image_size, batch_size, target_dir):
    """Install keras-cv-nightly into `target_dir` if needed and time it in a subprocess."""
    if not (Path(target_dir) / "keras_cv").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                        str(target_dir), KCV_NIGHTLY], check=True)
    return run_worker(sys.executable, "--kcv-nightly-worker", steps, image_size, batch_size,
                      [target_dir], "kcv_nightly_error")


def torchvision_targets(y):
    """Pipeline-format targets (see `synthetic_batch`) -> torchvision's per-image target dicts:
    boxes float32 (n, 4) xyxy, labels int64 (n,) all 1 (gland), masks uint8 (n, S, S)."""
    import torch

    targets = []
    for boxes, classes, instances in zip(y["boxes"], y["classes"], y["instances"], strict=True):
        valid = classes >= 0
        ids = np.nonzero(valid)[0] + 1  # instance id k + 1 belongs to boxes[k]
        targets.append({"boxes": torch.from_numpy(boxes[valid][:, [1, 0, 3, 2]]),
                        "labels": torch.ones(len(ids), dtype=torch.int64),
                        "masks": torch.from_numpy(
                            (instances[None] == ids[:, None, None]).astype(np.uint8))})
    return targets


def torchvision_worker(steps, image_size, batch_size):
    """Runs inside the subprocess of an interpreter with torch; prints a JSON line."""
    import torch
    import torchvision

    torch.set_num_threads(2)
    torch.manual_seed(0)

    def new_model():
        return torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=2, min_size=image_size,
            max_size=image_size)

    model = new_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LEARNING_RATE, momentum=SGD_MOMENTUM,
                                weight_decay=SGD_WEIGHT_DECAY)
    warm_up = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=WARMUP_FACTOR,
                                                total_iters=WARMUP_STEPS)
    rng = np.random.default_rng(0)

    def step():
        images, y = synthetic_batch(rng, batch_size, image_size)
        model.train()
        losses = model([torch.from_numpy(image).permute(2, 0, 1) for image in images],
                       torchvision_targets(y))
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warm_up.step()
        return loss.item()

    result = {"torch_version": torch.__version__, "torchvision_version": torchvision.__version__,
              "torch_threads": torch.get_num_threads()}
    result["torchvision_first_step_s"], _ = _timed(step)
    times, losses = [], []
    for _ in range(steps):
        seconds, loss = _timed(step)
        times.append(seconds)
        losses.append(loss if np.isfinite(loss) else None)  # strict JSON has no inf / NaN
        print(f"  torchvision step {len(times)}: {seconds:.2f} s, loss {loss:.3f}", flush=True)
    result["torchvision_step_s"] = float(np.mean(times))
    result["torchvision_step_times_s"] = times
    result["torchvision_step_losses"] = losses

    model = new_model().eval()  # the trained one may hold NaNs (see the module docstring)
    model.roi_heads.score_thresh = PREDICT_SCORE_THRESHOLD
    model.roi_heads.nms_thresh = PREDICT_NMS_IOU
    image = torch.from_numpy(predict_image()[0]).permute(2, 0, 1).float() / 255.0
    # (min_size, max_size) of torchvision's resize: as ours at the training scale, its
    # default, and the image's own size.
    resizes = {"": (image_size, image_size), "_800": (800, 1333),
               "_native": (min(PREDICT_SHAPE), max(PREDICT_SHAPE))}
    with torch.no_grad():
        for suffix, (min_size, max_size) in resizes.items():
            model.transform.min_size, model.transform.max_size = (min_size,), max_size
            first, median, out = time_predict(lambda: model([image]))
            result.update({f"torchvision_first_predict{suffix}_s": first,
                           f"torchvision_predict{suffix}_s": median,
                           f"torchvision_predict{suffix}_detections": len(out[0]["scores"])})
    print(WORKER_RESULT + json.dumps(result), flush=True)


def benchmark_torchvision(steps, image_size, batch_size, torch_python):
    """Time torchvision's Mask R-CNN in a subprocess of `torch_python` (see the docstring)."""
    if not Path(torch_python).is_file():
        venv = DEFAULT_TORCH_PYTHON.parents[1]
        return {"torchvision_error": (
            f"--torch-python {torch_python} does not exist: create a separate venv with torch "
            f"(never in the keras-glas venv): `{TORCH_VENV_RECIPE.format(venv=venv)}`, or pass "
            "--torch-python PATH to a Python that has torch and torchvision")}
    return run_worker(torch_python, "--torchvision-worker", steps, image_size, batch_size, [],
                      "torchvision_error")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--steps", type=int, default=8,
                        help="steady-state steps averaged (default 8)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--policy", default="float32", choices=["float32", "mixed_bfloat16"],
                        help="dtype policy of our model (keras-cv-nightly and torchvision run "
                             "float32)")
    parser.add_argument("--torchvision", action="store_true",
                        help="also time torchvision's maskrcnn_resnet50_fpn in a subprocess of "
                             "--torch-python")
    torch_venv_recipe = TORCH_VENV_RECIPE.format(venv=DEFAULT_TORCH_PYTHON.parents[1])
    parser.add_argument("--torch-python", default=str(DEFAULT_TORCH_PYTHON), metavar="PATH",
                        help="Python interpreter with torch and torchvision (default "
                             f"%(default)s; create it with `{torch_venv_recipe}`)")
    parser.add_argument("--skip-kcv-nightly", action="store_true")
    parser.add_argument("--kcv-nightly-dir", default=str(DEFAULT_KCV_DIR))
    parser.add_argument("--kcv-nightly-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--torchvision-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.kcv_nightly_worker:
        kcv_nightly_worker(args.steps, args.image_size, args.batch_size)
        return
    if args.torchvision_worker:
        torchvision_worker(args.steps, args.image_size, args.batch_size)
        return

    import psutil

    results = {"image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
               **machine_info(), "load_average_at_start": list(os.getloadavg()),
               "cpu_percent_at_start": psutil.cpu_percent(interval=1.0)}
    print("timing keras_glas Mask R-CNN ...", flush=True)
    results.update(benchmark_ours(args.steps, args.image_size, args.batch_size, args.policy))
    if not args.skip_kcv_nightly:
        print("timing keras-cv-nightly MaskRCNN in a subprocess ...", flush=True)
        results.update(benchmark_kcv_nightly(args.steps, args.image_size, args.batch_size,
                                             args.kcv_nightly_dir))
        if "kcv_nightly_step_s" in results:
            results["ratio"] = results["kcv_nightly_step_s"] / results["ours_step_s"]
    if args.torchvision:
        print("timing torchvision maskrcnn_resnet50_fpn in a subprocess ...", flush=True)
        results.update(benchmark_torchvision(args.steps, args.image_size, args.batch_size,
                                             args.torch_python))
        if "torchvision_step_s" in results:
            results["torchvision_ratio"] = results["torchvision_step_s"] / results["ours_step_s"]
    results["load_average_at_end"] = list(os.getloadavg())
    for key, value in results.items():
        print(f"{key:32s} {value}")
    save_results(args.out, results)


if __name__ == "__main__":
    main()
