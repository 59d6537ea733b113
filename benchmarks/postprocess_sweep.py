"""Benchmark: a grid of U-Net post-processing settings on one SavedModel, predicting once.

    python -m benchmarks.postprocess_sweep SAVED_MODEL [SAVED_MODEL ...] \\
        --dataset glas/binary_masks --data-dir D \\
        --grid threshold=0.4,0.5,0.6 min_size=300,600,1000,1500 \\
        [--splits validation test_a test_b] [--out FILE]

The driver's post-processing study (`benchmarks.real_glas`) runs `keras_glas.evaluate` once per
variant, a whole inference each time (4 with test-time flips). A grid of numeric settings (the
foreground threshold, the smallest object kept) multiplies the variants, so this sweep runs the
SavedModel once per split, keeps its `probabilities` (+ `contour`) maps (float32, ~1.6 MB per
map of a 775x522 image), and post-processes them again in NumPy
(`keras_glas.postprocess.postprocess_instances`) under every combination of the grid, each over
the SavedModel's own options. Each combination is scored like `evaluate` scores a split
(official metrics, approximate on `glas/binary_masks`, and the seed's). With the `validation`
split (the run's held-out training images), `selected_on_validation` is the combination with
the best validation rank sum (`benchmarks.real_glas.select_on_validation`): its test scores
estimate choosing post-processing by this sweep without looking at the test splits.

Several SavedModels (U-Nets trained apart, e.g. two runs of one config) make an ensemble: each
predicts every image, their maps are averaged, and the mean maps are post-processed under the
grid, over the first SavedModel's options. Its cost is the sum of its members' training times.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import shlex
import sys
import time

from keras_glas.evaluate import (
    DATASETS,
    SPLITS,
    VALIDATION,
    ScoredImage,
    postprocessed,
    predicted_examples,
    repostprocess_options,
    score_split,
    validation_split,
)
from keras_glas.export import read_export_info
from keras_glas.predict import SavedModelPredictor

from benchmarks.machine import machine_info, save_results
from benchmarks.real_glas import METRIC_DIRECTIONS, select_on_validation

# The maps each prediction keeps for re-post-processing (the `instances` output is not needed).
MAP_KEYS = ("probabilities", "contour")


def parse_grid(entries) -> dict[str, list[str]]:
    """`["threshold=0.4,0.5", "min_size=300"]` → `{"threshold": ["0.4", "0.5"], "min_size":
    ["300"]}`, in the order given.

    Raises:
        ValueError: an entry is not `key=value[,value...]`, or names a key twice.
    """
    grid = {}
    for entry in entries:
        key, sep, values = entry.partition("=")
        key = key.strip()
        choices = [value.strip() for value in values.split(",") if value.strip()]
        if not sep or not key or not choices:
            raise ValueError(f"bad grid entry {entry!r}: expected key=value[,value...], "
                             "e.g. min_size=300,600,1000")
        if key in grid:
            raise ValueError(f"grid key {key!r} is given twice: list its values once, "
                             "comma-separated")
        grid[key] = choices
    return grid


def grid_overrides(grid: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every combination of `grid` as `{name: ["key=value", ...]}`, named `key=value,...` in
    the grid's key order (the first key varies slowest)."""
    combinations = itertools.product(*([f"{key}={value}" for value in values]
                                       for key, values in grid.items()))
    return {",".join(overrides): list(overrides) for overrides in combinations}


def averaged_maps(predictors, dataset, split, data_dir=None, progress=True):
    """The maps of every image of a split, averaged over `predictors`.

    Args:
        predictors: U-Net predictors (`keras_glas.predict.SavedModelPredictor`), each run over
            the whole split in turn; one predictor gives its own maps unchanged.
        dataset, split, data_dir, progress: as in `keras_glas.evaluate.predicted_examples`.
    Returns:
        list of `(name, ground_truth, maps)` in dataset order: str, int32 (H, W) and
        `{"probabilities": float32 (H, W)[, "contour": float32 (H, W)]}`, the mean over the
        predictors.
    Raises:
        ValueError: the predictors return different maps (one has a contour head, another
            not) or see the images in a different order.
    """
    examples = None
    for predictor in predictors:
        predicted = [(name, ground_truth,
                      {key: outputs[key] for key in MAP_KEYS if key in outputs})
                     for name, _, ground_truth, outputs in predicted_examples(
                         predictor, dataset, split, data_dir, progress)]
        if examples is None:
            examples = predicted
            continue
        for (name, _, sums), (other_name, _, maps) in zip(examples, predicted, strict=True):
            if other_name != name or set(maps) != set(sums):
                raise ValueError(
                    f"{split}: ensemble members disagree on image {name!r} ({sorted(sums)}) vs "
                    f"{other_name!r} ({sorted(maps)}): every SavedModel must be a U-Net with "
                    "the same outputs (all with a contour head, or none)")
            for key in sums:
                sums[key] = sums[key] + maps[key]
    return [(name, ground_truth, {key: value / len(predictors) for key, value in maps.items()})
            for name, ground_truth, maps in examples]


def ensemble_validation_split(saved_models) -> str:
    """The validation split every member of an ensemble held out (`validation_split`).

    Raises:
        ValueError: the members held out different training images.
    """
    splits = {str(saved_model): validation_split(saved_model) for saved_model in saved_models}
    if len(set(splits.values())) > 1:
        raise ValueError(f"the SavedModels held out different validation images ({splits}): "
                         "score the ensemble on test_a / test_b only (--splits test_a test_b)")
    return next(iter(splits.values()))


def sweep(saved_model, dataset, data_dir, grid, splits=(VALIDATION, *SPLITS), progress=True):
    """Scores `saved_model` (a U-Net SavedModel, or an ensemble of them) under every
    combination of `grid`.

    Args:
        saved_model: path of a SavedModel written by `keras_glas.export`, or a list of paths:
            an ensemble whose averaged maps (`averaged_maps`) are post-processed over the
            first one's options.
        dataset, data_dir: TFDS dataset name and data_dir.
        grid: `{option: [value text, ...]}` over `PostprocessOptions` fields (`parse_grid`).
        splits: `validation` and / or test split names.
        progress: show progress bars.
    Returns:
        `{"base_postprocess", "grid", "variants": {name: {"postprocess", <split>: scores}},
        "seconds": {"predict", "postprocess_and_score"}[, "validation_split"]
        [, "selected_on_validation"]}`.
    Raises:
        ValueError (before any prediction): a SavedModel is not a U-Net, the members held out
            different validation images, or the grid names an unknown option or a bad value
            (`keras_glas.evaluate.repostprocess_options`); (while predicting) the members'
            maps differ (`averaged_maps`).
    """
    saved_models = [saved_model] if isinstance(saved_model, (str, os.PathLike)) else saved_model
    infos = [read_export_info(path) for path in saved_models]
    for path, info in zip(saved_models, infos, strict=True):
        if info.get("model_kind", "unet") != "unet":
            raise ValueError(f"{path} is a {info['model_kind']} SavedModel: the sweep "
                             "post-processes U-Net maps again")
    variants = {name: repostprocess_options(infos[0], overrides)
                for name, overrides in grid_overrides(grid).items()}
    if VALIDATION in splits:
        held_out = ensemble_validation_split(saved_models)
    predictors = [SavedModelPredictor(path) for path in saved_models]
    record = {"base_postprocess": infos[0].get("postprocess"), "grid": grid, "variants": {}}
    kept, start = {}, time.perf_counter()
    for split in splits:
        tfds_split = split
        if split == VALIDATION:
            tfds_split = record["validation_split"] = held_out
        kept[split] = averaged_maps(predictors, dataset, tfds_split, data_dir, progress)
    predict_seconds, start = time.perf_counter() - start, time.perf_counter()
    for name, options in variants.items():
        record["variants"][name] = {"postprocess": dataclasses.asdict(options)}
        for split, examples in kept.items():
            scored = [ScoredImage(image_name, postprocessed(maps, options), ground_truth)
                      for image_name, ground_truth, maps in examples]
            record["variants"][name][split] = score_split(scored)
        if progress:
            print(f"  {name}: " + ", ".join(
                f"{split} F1 {scores['f1']:.3f} Dice {scores['object_dice']:.3f} "
                f"Hausdorff {scores['object_hausdorff']:.1f}"
                for split, scores in record["variants"][name].items() if split in kept))
    record["seconds"] = {"predict": round(predict_seconds, 1),
                         "postprocess_and_score": round(time.perf_counter() - start, 1)}
    if VALIDATION in kept:
        record["selected_on_validation"] = select_on_validation(record["variants"])
    return record


def format_table(record) -> str:
    """Markdown table: one row per combination, official metrics of each split scored."""
    splits = [split for split in (VALIDATION, *SPLITS) if split in next(
        iter(record["variants"].values()))]
    selected = record.get("selected_on_validation", {})
    header = ["post-processing"] + [f"{split} {metric}" for split in splits
                                    for metric in METRIC_DIRECTIONS]
    if selected:
        header.append("validation rank sum")
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, variant in record["variants"].items():
        label = f"**{name}**" if name == selected.get("variant") else name
        cells = [label] + [f"{variant[split][metric]:.3f}" for split in splits
                           for metric in METRIC_DIRECTIONS]
        if selected:
            cells.append(str(selected["rank_sums"][name]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.postprocess_sweep",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("saved_models", nargs="+", metavar="SAVED_MODEL",
                        help="a U-Net SavedModel from python -m keras_glas.export; several: "
                             "their ensemble (maps averaged)")
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                        help="post-processing options and the values to try, e.g. "
                             "threshold=0.4,0.5,0.6 min_size=300,1000")
    parser.add_argument("--dataset", default="glas/binary_masks", choices=DATASETS)
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir")
    parser.add_argument("--splits", nargs="+", default=[VALIDATION, *SPLITS],
                        choices=(VALIDATION, *SPLITS))
    parser.add_argument("--out", default=None, metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    try:
        record = sweep(args.saved_models, args.dataset, args.data_dir, parse_grid(args.grid),
                       tuple(args.splits))
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    saved_model = args.saved_models[0] if len(args.saved_models) == 1 else args.saved_models
    record = {"saved_model": saved_model, "dataset": args.dataset,
              "command": shlex.join(["python", "-m", "benchmarks.postprocess_sweep",
                                     *(argv if argv is not None else sys.argv[1:])]),
              **record, **machine_info()}
    print(format_table(record))
    if "selected_on_validation" in record:
        print(f"selected on validation: {record['selected_on_validation']['variant']} "
              f"(rank sum {record['selected_on_validation']['rank_sum']})")
    save_results(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
