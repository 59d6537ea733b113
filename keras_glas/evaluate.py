"""Score an exported model on the GlaS test splits with the challenge metrics.

`python -m keras_glas.evaluate MODEL --split test_a|test_b|all|validation [--dataset glas|
glas/synthetic|glas/binary_masks] [--data-dir D] [--json FILE] [--figures DIR]
[--postprocess key=value ...] [--name ROW_NAME]`

MODEL is a SavedModel written by `keras_glas.export`, or a training run directory / `.keras`
file, which is exported to a temporary SavedModel first: every number comes from the artefact
users deploy. The SavedModel's `instances` output is scored as it is; with `--postprocess` its
`probabilities` (+ `contour`) are post-processed again in NumPy with the export's options
updated by the given ones (e.g. `--postprocess min_size=100 split=watershed`), U-Net only.

Per split it reports the official GlaS metrics pooled over the split (object F1, object Dice,
object Hausdorff, with TP/FP/FN), the seed's count score averaged per image, and the seed's
metric variants (`seed`, see `keras_glas.metrics.seed_compatible_scores`), prints them as a
table and writes them as JSON:
`{"model", "dataset", "ground_truth", "postprocess", "test_a": {"f1", "object_dice",
"object_hausdorff", "count", "tp", "fp", "fn", "n_images", "seed": {"f1", "object_dice",
"object_hausdorff", "count"}, "object_classes": {...}}, "test_b": {...}}`. `object_classes`
says why the official F1 counts each error (`keras_glas.metrics.official_object_classes`:
ground-truth objects missed, merged into another's prediction or only partly covered;
predictions on background or covering at most half of a gland), with each class's count and
median area in pixels; the CLI prints it under the table. `--figures DIR` saves the best, average
(median) and worst prediction of each split by per-image object Dice: image, ground truth
overlay, prediction overlay.

`--split validation` scores the training images the run held out to select its checkpoint
(`train[:K%]`, K from the run's `data.validation_fraction`, read from the SavedModel's copy of
its `config.yaml`), under the key `validation`: post-processing can then be chosen on images
the model never trained on, without looking at the test splits.
"""

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from keras_glas import metrics
from keras_glas.atomic import atomic_path, write_json
from keras_glas.config import load_config
from keras_glas.export import (
    ASSETS_EXTRA_DIR,
    CONFIG_FILE,
    ensure_saved_model,
    postprocess_options,
    read_export_info,
)
from keras_glas.postprocess import postprocess_instances
from keras_glas.predict import SavedModelPredictor, colour_overlay

SPLITS = ("test_a", "test_b")
# The held-out training images of the run (see the module docstring).
VALIDATION = "validation"
DATASETS = ("glas", "glas/synthetic", "glas/binary_masks")
TABLE_COLUMNS = (("F1", "f1"), ("Obj. Dice", "object_dice"), ("Obj. Hausdorff", "object_hausdorff"),
                 ("Count", "count"))


@dataclasses.dataclass
class ScoredImage:
    """One test image with its prediction; `image` is kept only when figures are requested."""

    name: str
    prediction: np.ndarray  # int32 (H, W)
    ground_truth: np.ndarray  # int32 (H, W)
    image: np.ndarray | None = None  # uint8 (H, W, 3)


def predicted_examples(predictor, dataset, split, data_dir=None, progress=True):
    """Run `predictor` over a split, one example at a time.

    Args:
        predictor: callable uint8 (H, W, 3) → dict with `instances`, `probabilities`
            (+ `contour`), e.g. `keras_glas.predict.SavedModelPredictor`.
        dataset: TFDS name (`glas`, `glas/synthetic`, `glas/binary_masks`).
        split: TFDS split name.
        data_dir: TFDS data_dir.
        progress: show a progress bar.
    Yields:
        `(name, image, ground_truth, outputs)`: str, uint8 (H, W, 3), int32 (H, W) and the
        predictor's dict of NumPy arrays, in dataset order.
    Raises:
        keras_glas.data.DatasetError: the split's records are damaged (it names the rebuild
            command).
    """
    from keras_glas.data import damaged_records_error, make_dataset

    examples = make_dataset(dataset, split=split, model="eval", data_dir=data_dir)
    total = int(examples.cardinality())
    try:
        for example in tqdm(examples.as_numpy_iterator(), desc=split, unit="image",
                            total=total if total > 0 else None, disable=not progress):
            image = example["image"][0]
            yield (example["name"][0].decode(), image, example["instances"][0].astype(np.int32),
                   predictor(image))
    except tf.errors.DataLossError as error:
        raise damaged_records_error(dataset, data_dir, error) from error


def postprocessed(outputs, postprocess=None):
    """The instance map int32 (H, W) of one prediction's `outputs`: their `instances` when
    `postprocess` is None, else `probabilities` (+ `contour`) post-processed again in NumPy
    with the `PostprocessOptions` given."""
    if postprocess is None:
        return outputs["instances"].astype(np.int32)
    return postprocess_instances(outputs["probabilities"], outputs.get("contour"),
                                 postprocess).astype(np.int32)


def predict_split(predictor, dataset, split, data_dir=None, postprocess=None, keep_images=False,
                  progress=True):
    """Run `predictor` over a test split (`predicted_examples`) and keep the instance maps.

    Args:
        predictor, dataset, split, data_dir, progress: as in `predicted_examples`.
        postprocess: None to use the `instances` output; a `PostprocessOptions` to rebuild
            instances from `probabilities` (+ `contour`) with NumPy `postprocess_instances`.
        keep_images: keep each input image (for figures).
    Returns:
        list of `ScoredImage`, in dataset order.
    """
    return [ScoredImage(name=name, prediction=postprocessed(outputs, postprocess),
                        ground_truth=ground_truth, image=image if keep_images else None)
            for name, image, ground_truth, outputs in predicted_examples(
                predictor, dataset, split, data_dir, progress)]


def score_split(scored):
    """The JSON record of one split (see the module docstring) from a list of `ScoredImage`."""
    preds = [item.prediction for item in scored]
    gts = [item.ground_truth for item in scored]
    official = metrics.glas_scores(preds, gts)
    seed = metrics.seed_compatible_scores(preds, gts)
    return {
        "f1": float(official["f1"]),
        "object_dice": float(official["object_dice"]),
        "object_hausdorff": float(official["object_hausdorff"]),
        "count": float(np.mean([metrics.count_score(p, g)
                                for p, g in zip(preds, gts, strict=True)])),
        "tp": int(official["tp"]),
        "fp": int(official["fp"]),
        "fn": int(official["fn"]),
        "n_images": len(scored),
        "seed": {key: float(seed[key])
                 for key in ("f1", "object_dice", "object_hausdorff", "count")},
        "object_classes": metrics.pool_object_classes(
            [metrics.official_object_classes(p, g) for p, g in zip(preds, gts, strict=True)]),
    }


def format_table(name, results):
    """Markdown table, one row per split: official metrics then the seed-compatible ones."""
    header = ["Model", "Split"] + [title for title, _ in TABLE_COLUMNS] + [
        f"Seed {title}" for title, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for split in (*SPLITS, VALIDATION):
        if split not in results:
            continue
        row = results[split]
        cells = [name, split] + [f"{row[key]:.3f}" for _, key in TABLE_COLUMNS] + [
            f"{row['seed'][key]:.3f}" for _, key in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_object_classes(results):
    """One line per split: the official F1's errors by class, with median areas in pixels."""
    lines = []
    for split in (*SPLITS, VALIDATION):
        if split not in results:
            continue
        classes = results[split]["object_classes"]
        cells = [f"{name} {value['count']}" + (f" (median {value['median_area']:.0f} px)"
                                                 if value["count"] else "")
                 for name, value in classes.items()]
        lines.append(f"{split} objects: " + ", ".join(cells))
    return "\n".join(lines)


def pick_examples(scored):
    """Best, average (median) and worst images by per-image object Dice: [(label, item, dice)]."""
    dice = np.array([metrics.object_dice(item.prediction, item.ground_truth) for item in scored])
    order = np.argsort(-dice, kind="stable")
    picks = {"best": order[0], "average": order[len(order) // 2], "worst": order[-1]}
    return [(label, scored[index], float(dice[index])) for label, index in picks.items()]


def save_figures(scored, split, figures_dir):
    """Save `DIR/<split>_{best,average,worst}.png` (image | ground truth | prediction).

    Returns:
        list of the written paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for label, item, dice in pick_examples(scored):
        figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        panels = [(item.image, item.name),
                  (colour_overlay(item.image, item.ground_truth),
                   f"ground truth ({item.ground_truth.max()} ids)"),
                  (colour_overlay(item.image, item.prediction),
                   f"prediction, object Dice {dice:.3f}")]
        for axis, (picture, title) in zip(axes, panels, strict=True):
            axis.imshow(picture)
            axis.set_title(title, fontsize=9)
            axis.axis("off")
        figure.suptitle(f"{split}: {label}")
        figure.tight_layout()
        path = figures_dir / f"{split}_{label}.png"
        with atomic_path(path) as temp:
            figure.savefig(temp, format="png", dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def validation_split(saved_model):
    """The TFDS split `train[:K%]` that the SavedModel's training run held out for validation.

    Raises:
        ValueError: the SavedModel holds no training config, or its run had no validation split.
    """
    config_path = Path(saved_model) / ASSETS_EXTRA_DIR / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(
            f"--split validation needs the training run's config, which {saved_model} does not "
            f"hold ({ASSETS_EXTRA_DIR}/{CONFIG_FILE}); export the model from its run directory "
            "with python -m keras_glas.export RUN_DIR OUT_DIR"
        )
    percent = load_config(config_path).data.validation_percent
    if not percent:
        raise ValueError(
            f"--split validation: the run of {saved_model} held out no training images "
            "(data.validation_fraction is 0); score test_a / test_b instead"
        )
    return f"train[:{percent}%]"


def repostprocess_options(export_info, overrides):
    """`PostprocessOptions` to post-process a U-Net SavedModel's probabilities again: its
    export's options (`export_info["postprocess"]`, from `read_export_info`) updated by the
    `key=value` `overrides`.

    Raises:
        ValueError: the SavedModel is not a U-Net, or an override names an unknown option or
            has a bad value (`keras_glas.export.postprocess_options`).
    """
    if export_info.get("model_kind", "unet") != "unet":
        raise ValueError("--postprocess re-post-processes U-Net probabilities; a Mask R-CNN "
                         "builds its instance map itself: score it without --postprocess")
    return postprocess_options(export_info.get("postprocess"), overrides)


def evaluate(model_path, splits=SPLITS, dataset="glas", data_dir=None, postprocess_overrides=(),
             figures_dir=None, name=None):
    """Evaluate MODEL (SavedModel, run dir or `.keras`) on `splits`; returns the JSON record."""
    with tempfile.TemporaryDirectory() as work_dir:
        saved_model = ensure_saved_model(model_path, work_dir)
        info = read_export_info(saved_model)
        options = (repostprocess_options(info, postprocess_overrides)
                   if postprocess_overrides else None)
        predictor = SavedModelPredictor(saved_model)
        results = {
            "model": name or Path(model_path).name,
            "dataset": dataset,
            "ground_truth": "binary_masks" if dataset == "glas/binary_masks" else "instances",
            "postprocess": dataclasses.asdict(options) if options else info.get("postprocess"),
        }
        for split in splits:
            tfds_split = split
            if split == VALIDATION:
                tfds_split = results["validation_split"] = validation_split(saved_model)
            scored = predict_split(predictor, dataset, tfds_split, data_dir, options,
                                   keep_images=figures_dir is not None)
            if not scored:
                raise ValueError(f"split {split} of {dataset} holds no image")
            results[split] = score_split(scored)
            if figures_dir is not None:
                save_figures(scored, split, figures_dir)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m keras_glas.evaluate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("model", metavar="MODEL",
                        help="SavedModel dir, training run dir or .keras file")
    parser.add_argument("--split", required=True, choices=(*SPLITS, "all", VALIDATION),
                        help="a test split, both (all), or the run's held-out training images")
    parser.add_argument("--dataset", default="glas", choices=DATASETS)
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the scores as JSON")
    parser.add_argument("--figures", default=None, metavar="DIR",
                        help="save best / average / worst predictions as PNG")
    parser.add_argument("--postprocess", nargs="+", default=(), metavar="KEY=VALUE",
                        help="re-post-process probabilities in NumPy, e.g. min_size=100 "
                             "split=watershed")
    parser.add_argument("--name", default=None,
                        help="row name in the table and JSON (default: MODEL's name)")
    args = parser.parse_args(argv)
    splits = SPLITS if args.split == "all" else (args.split,)
    try:
        results = evaluate(args.model, splits, args.dataset, args.data_dir, args.postprocess,
                           args.figures, args.name)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print(format_table(results["model"], results))
    print(format_object_classes(results))
    if args.json:
        write_json(args.json, results)
        print(f"scores written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
