"""Mask R-CNN speed: our model vs keras-cv-nightly's MaskRCNN (and optionally torchvision's).

    python -m benchmarks.maskrcnn [--out FILE.json] [--torchvision] [--policy mixed_bfloat16]

Configuration of issue 7: ResNet-50, random init, 256 x 256 training images (synthetic glands,
5 per image, new images every step), batch 2, SGD; prediction of one 775 x 522 image at its own
resolution (a real GlaS image when `../shared/data/glas` exists), instance map included.
keras-cv-nightly cannot share a process with keras-cv 0.9.0: it is installed with
`pip install --no-deps --target DIR` and timed in a subprocess with DIR first on PYTHONPATH.
Timings depend on the machine's load; run it on an otherwise idle machine.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KCV_NIGHTLY = "keras-cv-nightly==0.10.0.dev2024100303"
DEFAULT_KCV_DIR = Path(__file__).resolve().parents[2] / "cache" / "kcv_nightly"
GLAS_IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glas" / "testA_1.bmp"
PREDICT_SHAPE = (522, 775)  # height, width of a GlaS image


def synthetic_batch(rng, batch_size, size, objects=5, max_instances=16):
    """Pipeline-format batch of filled-ellipse glands on a pink background.

    Returns x float32 (B, S, S, 3) in [0, 1] and y = {"boxes" (B, N, 4) yxyx padded -1,
    "classes" (B, N) 0 / -1, "instances" int32 (B, S, S)}, N = max_instances.
    """
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((batch_size, size, size, 3), np.float32)
    instances = np.zeros((batch_size, size, size), np.int32)
    boxes = -np.ones((batch_size, max_instances, 4), np.float32)
    classes = -np.ones((batch_size, max_instances), np.float32)
    for i in range(batch_size):
        images[i] = rng.uniform(0.7, 0.9, 3)
        for k in range(objects):
            cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
            ry, rx = rng.uniform(0.05 * size, 0.14 * size, 2)
            inside = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) & (instances[i] == 0)
            instances[i][inside] = k + 1
            images[i][inside] = rng.uniform(0.2, 0.5, 3)
            ys, xs = np.nonzero(inside)
            boxes[i, k] = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
            classes[i, k] = 0
    return images, {"boxes": boxes, "classes": classes, "instances": instances}


def predict_image():
    """float32 (1, 522, 775, 3) in [0, 1]: GlaS testA_1 when available, else noise."""
    if GLAS_IMAGE.is_file():
        from PIL import Image

        return (np.asarray(Image.open(GLAS_IMAGE).convert("RGB"), np.float32) / 255.0)[None]
    return np.random.default_rng(0).uniform(0, 1, (1,) + PREDICT_SHAPE + (3,)).astype(np.float32)


def _timed(function):
    """(seconds, result) of calling `function()`."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def fit_one_batch(model, batch):
    """One training step through `fit` (as training runs it) -> the history dict.

    Both models are timed this way: keras-cv-nightly's `train_step` unpacks exactly `(x, y)`,
    which `train_on_batch` does not give. Later calls reuse the traced train function.
    """
    import tensorflow as tf

    return model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0).history


def benchmark_ours(steps, image_size, batch_size, policy):
    """Train-step and predict times of keras_glas's Mask R-CNN (ResNet-50, random init)."""
    import keras
    import tensorflow as tf

    from keras_glas.models.maskrcnn import build_maskrcnn
    from keras_glas.models.maskrcnn import boxes as box_ops
    from keras_glas.models.maskrcnn import targets

    keras.mixed_precision.set_global_policy(policy)
    model = build_maskrcnn("resnet50")
    model.compile(optimizer=keras.optimizers.SGD(5e-3, momentum=0.9, weight_decay=5e-4))
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(rng, batch_size, image_size) for _ in range(steps + 1)]
    first_step, _ = _timed(lambda: fit_one_batch(model, batches[0]))
    times, recalls = [], []
    for batch in batches[1:]:
        seconds, history = _timed(lambda: fit_one_batch(model, batch))
        times.append(seconds)
        recalls.append(history["proposal_recall"][-1])
        print(f"  ours step {len(times)}: {seconds:.2f} s, loss {history['loss'][-1]:.3f}", flush=True)

    # Boxes matched during training: objects of the last batch that own at least one positive
    # anchor of the RPN's sample (above: objects an RPN proposal overlaps with IoU >= 0.5).
    images, y = batches[-1]
    gt_boxes, gt_classes, gt_valid = targets.trim_padding(tf.constant(y["boxes"]), tf.constant(y["classes"]))
    anchors = box_ops.generate_anchors(image_size, image_size, (4, 8, 16, 32, 64),
                                       model.options["anchor_sizes"], model.options["aspect_ratios"])
    rpn = targets.rpn_targets(anchors, gt_boxes, gt_valid)
    iou = tf.where(gt_valid[:, None, :], box_ops.box_iou(tf.gather(anchors, rpn["indices"]), gt_boxes), -1.0)
    matched = tf.one_hot(tf.argmax(iou, axis=2), tf.shape(gt_boxes)[1]) > 0
    hit = tf.reduce_any(matched & rpn["positive"][:, :, None], axis=1) & gt_valid
    rpn_matched = float(tf.reduce_sum(tf.cast(hit, tf.float32)) / tf.reduce_sum(tf.cast(gt_valid, tf.float32)))

    infer = tf.function(model.infer, input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)])
    image = tf.constant(predict_image())
    first_predict, _ = _timed(lambda: infer(image))
    predict_times = []
    for _ in range(3):
        seconds, out = _timed(lambda: infer(image))
        predict_times.append(seconds)
    return {
        "ours_policy": policy,
        "ours_first_step_s": first_step,
        "ours_step_s": float(np.mean(times)),
        "ours_step_times_s": times,
        "ours_first_predict_s": first_predict,
        "ours_predict_s": float(np.median(predict_times)),
        "ours_predict_detections": int(np.sum(out["scores"].numpy() > 0)),
        "ours_rpn_matched_fraction": rpn_matched,
        "ours_proposal_recall": float(np.mean(recalls)),
    }


def kcv_nightly_worker(steps, image_size, batch_size):
    """Runs inside the subprocess (keras-cv-nightly first on sys.path); prints a JSON line."""
    import keras
    import keras_cv

    backbone = keras_cv.models.ResNetBackbone(
        stackwise_filters=[64, 128, 256, 512], stackwise_blocks=[3, 4, 6, 3],
        stackwise_strides=[1, 2, 2, 2], include_rescaling=False,
        input_shape=(image_size, image_size, 3),  # its anchor generator needs a static size
    )
    model = keras_cv.models.MaskRCNN(backbone=backbone, num_classes=1, bounding_box_format="yxyx")
    model.compile(optimizer=keras.optimizers.SGD(5e-3, momentum=0.9), rpn_box_loss="Huber",
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
    result["kcv_nightly_first_step_s"], history = _timed(lambda: fit_one_batch(model, nightly_batch()))
    times = []
    for _ in range(steps):
        seconds, history = _timed(lambda: fit_one_batch(model, nightly_batch()))
        times.append(seconds)
        print(f"  kcv-nightly step {len(times)}: {seconds:.2f} s", flush=True)
    result["kcv_nightly_step_s"] = float(np.mean(times))
    result["kcv_nightly_logs"] = {key: float(value[-1]) for key, value in history.items()}
    try:
        seconds, _ = _timed(lambda: model.predict(predict_image(), batch_size=1, verbose=0))
        result["kcv_nightly_predict_s"] = seconds
    except Exception as error:  # report, do not hide, the nightly's predict failure
        result["kcv_nightly_predict_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    print("KCV_NIGHTLY_RESULT " + json.dumps(result), flush=True)


def benchmark_kcv_nightly(steps, image_size, batch_size, target_dir):
    """Install keras-cv-nightly into `target_dir` if needed and time it in a subprocess."""
    if not (Path(target_dir) / "keras_cv").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                        str(target_dir), KCV_NIGHTLY], check=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(target_dir), str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "benchmarks.maskrcnn", "--kcv-nightly-worker", "--steps",
               str(steps), "--image-size", str(image_size), "--batch-size", str(batch_size)]
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in run.stdout.splitlines():
        if line.startswith("KCV_NIGHTLY_RESULT "):
            return json.loads(line[len("KCV_NIGHTLY_RESULT "):])
    return {"kcv_nightly_error": (run.stderr or run.stdout)[-1500:]}


def benchmark_torchvision(steps, image_size, batch_size):
    """torchvision maskrcnn_resnet50_fpn, random init, min_size = max_size = image_size."""
    try:
        import torch
        import torchvision
    except ImportError:
        return {"torchvision_error": "torch/torchvision not installed"}
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=2, min_size=image_size, max_size=image_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=5e-3, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(0)

    def step():
        images, y = synthetic_batch(rng, batch_size, image_size)
        inputs = [torch.from_numpy(image).permute(2, 0, 1) for image in images]
        labels = []
        for i in range(batch_size):
            valid = y["classes"][i] >= 0
            ids = np.nonzero(valid)[0] + 1
            boxes = y["boxes"][i][valid][:, [1, 0, 3, 2]]
            labels.append({"boxes": torch.from_numpy(boxes), "labels": torch.ones(len(ids), dtype=torch.int64),
                           "masks": torch.from_numpy((y["instances"][i][None] == ids[:, None, None]).astype(np.uint8))})
        model.train()
        loss = sum(model(inputs, labels).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    first, _ = _timed(step)
    times = [_timed(step)[0] for _ in range(steps)]
    model.eval()
    image = torch.from_numpy(predict_image()[0]).permute(2, 0, 1)
    with torch.no_grad():
        model.transform.min_size, model.transform.max_size = (min(PREDICT_SHAPE),), max(PREDICT_SHAPE)
        predict = float(np.median([_timed(lambda: model([image]))[0] for _ in range(3)]))
    return {"torchvision_first_step_s": first, "torchvision_step_s": float(np.mean(times)),
            "torchvision_predict_s": predict}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--steps", type=int, default=5, help="steady-state steps averaged (default 5)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--policy", default="float32", choices=["float32", "mixed_bfloat16"],
                        help="dtype policy of our model (keras-cv-nightly and torchvision run float32)")
    parser.add_argument("--torchvision", action="store_true", help="also time torchvision (needs torch)")
    parser.add_argument("--skip-kcv-nightly", action="store_true")
    parser.add_argument("--kcv-nightly-dir", default=str(DEFAULT_KCV_DIR))
    parser.add_argument("--kcv-nightly-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.kcv_nightly_worker:
        kcv_nightly_worker(args.steps, args.image_size, args.batch_size)
        return

    import psutil

    results = {"image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
               "cpu_count": os.cpu_count(), "load_average_at_start": list(os.getloadavg()),
               "cpu_percent_at_start": psutil.cpu_percent(interval=1.0)}
    print("timing keras_glas Mask R-CNN ...", flush=True)
    results.update(benchmark_ours(args.steps, args.image_size, args.batch_size, args.policy))
    if not args.skip_kcv_nightly:
        print("timing keras-cv-nightly MaskRCNN in a subprocess ...", flush=True)
        results.update(benchmark_kcv_nightly(args.steps, args.image_size, args.batch_size, args.kcv_nightly_dir))
        if "kcv_nightly_step_s" in results:
            results["ratio"] = results["kcv_nightly_step_s"] / results["ours_step_s"]
    if args.torchvision:
        print("timing torchvision maskrcnn_resnet50_fpn ...", flush=True)
        results.update(benchmark_torchvision(args.steps, args.image_size, args.batch_size))
    results["load_average_at_end"] = list(os.getloadavg())
    for key, value in results.items():
        print(f"{key:32s} {value}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=out.parent, suffix=".tmp", delete=False) as file:
            json.dump(results, file, indent=2)
        os.replace(file.name, out)


if __name__ == "__main__":
    main()
