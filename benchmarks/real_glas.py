"""Real GlaS results: build `glas/binary_masks`, train, export, evaluate, publish (issue 8).

    python -m benchmarks.real_glas [--glas-dir ../shared/data/glas] [--work-dir runs/real_glas]
        [--models unet maskrcnn] [--out-dir results] [--smoke] [--max-images N]

Stages, each a subprocess of the project's CLIs with its output streamed to the terminal and
to `WORK_DIR/logs/<stage>.log` (a failing stage stops everything with a message naming the stage
and its log):

1. build `glas/binary_masks` from the GlaS folder into `WORK_DIR/tfds` (the TFDS API, as
   `tfds build glas/binary_masks --imports tfds_glas --manual_dir GLAS_DIR`); skipped when built;
2. per model: `python -m keras_glas.train MODEL --config configs/MODEL_glas_cpu.yaml` into
   `WORK_DIR/MODEL/run` (rerunning the script resumes an interrupted training);
3. `python -m keras_glas.export --no-test-time-flips` to `WORK_DIR/MODEL/saved_model`, and for
   the U-Net `--test-time-flips` (maps averaged over the four flips) to
   `WORK_DIR/unet/saved_model_test_time_flips`;
4. `python -m keras_glas.evaluate --split all --figures` of the export the config names
   (`train.export_test_time_flips`) on test A and B of `glas/binary_masks`:
   the seed study's metrics (exact: its helper binarises the masks anyway) and the official
   metrics (approximate: ground-truth instances are connected components, touching glands
   merge);
5. U-Net only: the post-processing study, the export without flips re-scored with each
   post-processing step alone and all together (`evaluate --postprocess`), and the
   flip-averaged export under the config's post-processing, on the test splits and on the
   run's validation images, which alone pick a variant (`select_on_validation`);
6. `python -m keras_glas.leaderboard` over every `OUT_DIR/real_glas_*.json`.

Outputs in OUT_DIR: `real_glas_<model>.json` (the evaluate JSON plus the exact commands, the
wall-clock time of each stage, a learning curve of the validation metrics against training
time, package versions and a machine description without host name), `postprocess_study.json`,
`figures/<model>/<split>_{best,average,worst}.png`, `leaderboard.md` and `leaderboard.png`.

`--smoke` runs the same chain with tiny settings (1 epoch of 2 steps at 64 px, 4-filter U-Net,
tiny Mask R-CNN, post-processing study reduced to its two ends) into a temporary work and out
dir, to check the chain in minutes; `--max-images N` builds the dataset from the first N
images of each split only. Neither ever writes into the repository's `results/`. The test
splits are only ever used for scoring.
"""
import argparse
import csv
import dataclasses
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from keras_glas.atomic import atomic_path, write_json, write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET = "glas/binary_masks"
MODELS = ("unet", "maskrcnn")
SPLITS = ("test_a", "test_b")
VALIDATION_SPLIT = "validation"  # evaluate --split validation: the run's held-out train[:K%]
FIGURE_LABELS = ("best", "average", "worst")
ROW_NAMES = {"unet": "keras-glas U-Net (2-core CPU)",
             "maskrcnn": "keras-glas Mask R-CNN (2-core CPU)"}
PACKAGES = ("keras-glas", "tensorflow-cpu", "tensorflow", "keras", "keras-cv",
            "tensorflow-datasets", "numpy", "scipy", "scikit-image", "opencv-python",
            "opencv-python-headless")
# Environment variables that change the speed of the CLIs, recorded with the results.
RECORDED_ENVIRONMENT = ("TF_ENABLE_ONEDNN_OPTS", "CUDA_VISIBLE_DEVICES")
# Tiny settings of --smoke: every stage runs, on a model that trains in seconds.
SMOKE_TRAIN_ARGS = {
    # 48x64 inputs: the CPU config's 272x384 canvas scaled to the smoke size.
    "unet": ["--epochs", "1", "--steps-per-epoch", "2", "--image-size", "64",
             "--set", "data.input_height=48", "--batch-size", "2",
             "--set", "model.base_filters=4"],
    # 64x64 inputs: the model pads to a multiple of 64 rows anyway, so the CPU config's
    # 256x384 canvas scaled to the smoke size (43x64) would cost the same.
    "maskrcnn": ["--epochs", "1", "--steps-per-epoch", "2", "--image-size", "64",
                 "--set", "data.input_height=64",
                 "--batch-size", "2", "--set", "model.backbone=resnet_tiny",
                 "--set", "model.fpn_channels=16", "--set", "model.box_head_units=32",
                 "--set", "model.mask_head_channels=16",
                 "--set", "model.rpn_pre_nms_top_n_train=200",
                 "--set", "model.rpn_post_nms_top_n_train=50",
                 "--set", "model.rpn_pre_nms_top_n_test=200",
                 "--set", "model.rpn_post_nms_top_n_test=50",
                 "--set", "model.roi_batch_size_per_image=32"],
}
# Issue 8's goals: beat the seed's best row on its metrics and the best 2015 entrant on the
# (approximate) official ones. Rows of keras_glas/resources/glas2015_leaderboard.csv.
TARGETS = {"seed": "DTU-MASKRCNN", "official": "CUMedVision2"}
# +1: higher is better, -1: lower is better.
METRIC_DIRECTIONS = {"f1": 1, "object_dice": 1, "object_hausdorff": -1}
STUDY_NOTE = ("The test scores are for this report only: the exported model's post-processing "
              "is the config's, chosen beforehand; selected_on_validation is chosen from the "
              "validation scores alone.")
# The study's variant scoring a second export of the U-Net, with `--test-time-flips`, under the
# config's post-processing: the flip average is chosen on validation like post-processing is.
FLIPS_VARIANT = "config_test_time_flips"
# --smoke scores only the two ends of the post-processing study and the flip average (each
# variant is a pass).
SMOKE_STUDY_VARIANTS = ("none", "config", FLIPS_VARIANT)
# Minimum object size (pixels at full resolution) of the study's small-object-removal variant
# when the config's own post-processing removes nothing.
STUDY_MIN_SIZE = 300
# --max-images floor: the first 10% of the training images must hold one validation image.
MIN_SUBSET_IMAGES = 10


class StageError(RuntimeError):
    """A stage failed; the message names the stage and where its log is."""


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where everything of one invocation goes."""

    glas_dir: Path
    work_dir: Path
    out_dir: Path
    max_images: int | None = None

    @property
    def root(self) -> Path:
        """Artefacts of this dataset: `work_dir`, or `work_dir/first_N` for a subset (so a
        subset run never resumes or reuses a full one)."""
        if self.max_images is None:
            return self.work_dir
        return self.work_dir / f"first_{self.max_images}"

    @property
    def source_dir(self) -> Path:
        """The GlaS folder the dataset is built from: `glas_dir` or a subset of symlinks."""
        return self.glas_dir if self.max_images is None else self.root / "glas"

    @property
    def tfds_dir(self) -> Path:
        return self.root / "tfds"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def model_dir(self, model: str) -> Path:
        return self.root / model


# ------------------------------------------------------------------------------ utilities
def copy_file(source: Path, destination: Path) -> None:
    """Copies `source` to `destination` through a temp file + rename."""
    with atomic_path(destination) as temp:
        shutil.copyfile(source, temp)


def display_command(argv: list[str]) -> str:
    """The shell form of a CLI call, with `python` for the interpreter's full path."""
    return shlex.join(["python", *argv[1:]] if argv[0] == sys.executable else argv)


def subprocess_env() -> dict:
    """The driver's environment, quiet TF logs, oneDNN kernels, unbuffered output, this repo
    importable."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow turns its oneDNN kernels on by itself only on CPUs with AVX-512 VNNI/BF16 or
    # AMX; on an AVX2 CPU they make the U-Net's XLA train step ~25% faster (README).
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def recorded_environment() -> dict:
    """The `RECORDED_ENVIRONMENT` variables of the stages' environment (None where unset)."""
    env = subprocess_env()
    return {name: env.get(name) for name in RECORDED_ENVIRONMENT}


def run_stage(name: str, argv: list[str], log_dir: Path, on_output=None) -> float:
    """Runs one CLI call, streaming its output to stdout and to `log_dir/<name>.log`.

    Args:
        name: stage name (also the log file's stem), e.g. `train-unet`.
        argv: the command.
        log_dir: directory of the stage logs.
        on_output: optional callable run after each chunk of output (e.g. history polling).

    Returns:
        Wall-clock seconds.

    Raises:
        StageError: the command could not start or exited non-zero.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    print(f"\n=== {name}: {display_command(argv)}\n    log: {log_path}", flush=True)
    start = time.monotonic()
    with log_path.open("wb") as log:
        log.write(f"$ {display_command(argv)}\n".encode())
        try:
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       env=subprocess_env())
        except OSError as error:
            raise StageError(f"stage {name} could not start ({error}); log: {log_path}") from None
        # Chunks, not lines: progress bars redraw with carriage returns.
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
            log.flush()
            if on_output is not None:
                on_output()
        code = process.wait()
    seconds = time.monotonic() - start
    if code != 0:
        raise StageError(f"stage {name} failed with exit code {code} after {seconds:.0f} s; "
                         f"see its log: {log_path}")
    print(f"=== {name}: done in {seconds:.1f} s", flush=True)
    return seconds


class HistoryClock:
    """Stamps each new row of a training run's `history.csv` with the elapsed training time.

    `history.csv` has no times; polled while the training streams output (and every second
    from a thread, for quiet stretches), each row gets the seconds since `start()` at which it
    appeared. Rows already present (a resumed run) get `None`.
    """

    def __init__(self, history_path: Path, poll_seconds: float = 1.0):
        self.path = history_path
        self.poll_seconds = poll_seconds
        self.stamps: list[float | None] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start = None
        self._thread = None

    def _count_rows(self) -> int:
        try:
            with self.path.open(newline="") as handle:
                return max(sum(1 for _ in handle) - 1, 0)
        except OSError:
            return 0

    def poll(self) -> None:
        """Stamps rows that appeared since the last poll."""
        with self._lock:
            rows = self._count_rows()
            elapsed = time.monotonic() - self._start
            self.stamps.extend([elapsed] * (rows - len(self.stamps)))

    def start(self) -> None:
        self._start = time.monotonic()
        self.stamps = [None] * self._count_rows()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.poll_seconds):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()


def learning_curve(history_path: Path, stamps: list) -> list[dict]:
    """Rows of `history.csv` (epoch, losses, validation metrics) with `elapsed_s` added.

    Returns:
        `[{"epoch": int, "elapsed_s": float | None, "<column>": float, ...}]` in epoch order;
        a column is left out of the epochs it has no value for.
    """
    if not history_path.is_file():
        return []
    with history_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    curve = []
    for index, row in enumerate(rows):
        point = {"epoch": int(row.pop("epoch")) + 1,
                 "elapsed_s": stamps[index] if index < len(stamps) else None}
        # "NA": a value not computed that epoch (the GlaS metrics run every few epochs).
        point.update({key: float(value) for key, value in row.items()
                      if value not in ("", None, "NA")})
        curve.append(point)
    return curve


def plot_learning_curve(curve: list[dict], path: Path, title: str) -> bool:
    """Saves the validation GlaS scores against training minutes as a PNG.

    Object F1 and object Dice on the left axis, object Hausdorff on the right, one point per
    epoch that was scored and stamped (see `learning_curve`).

    Returns:
        Whether a figure was written (False when no epoch has both a time and GlaS scores).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [point for point in curve
              if point.get("elapsed_s") is not None and "val_glas_f1" in point]
    if not points:
        return False
    minutes = [point["elapsed_s"] / 60 for point in points]
    figure, left = plt.subplots(figsize=(6, 3.5))
    for key, label in (("val_glas_f1", "object F1"), ("val_glas_object_dice", "object Dice")):
        left.plot(minutes, [point[key] for point in points], marker="o", label=label)
    left.set_xlabel("training time (min)")
    left.set_ylabel("validation score")
    left.set_ylim(0, 1)
    right = left.twinx()
    right.plot(minutes, [point["val_glas_object_hausdorff"] for point in points], marker="s",
               color="tab:red", label="object Hausdorff")
    right.set_ylabel("object Hausdorff (px)")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="center right")
    left.set_title(title)
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as temp:
        figure.savefig(temp, dpi=100)
    plt.close(figure)
    return True


def target_gaps(record: dict) -> dict:
    """Our scores against issue 8's target rows, per protocol, split and metric.

    Returns:
        `{protocol: {"target": row name, split: {metric: {"ours", "target", "better_by"}}}}`,
        `better_by` > 0 where we beat the target (for Hausdorff: target minus ours).
    """
    from keras_glas.leaderboard import load_reference_rows

    rows = {(row.protocol, row.name): row for row in load_reference_rows()}
    gaps = {}
    for protocol, target in TARGETS.items():
        scores = rows[(protocol, target)].scores
        gaps[protocol] = {"target": target}
        for split, part in (("test_a", "a"), ("test_b", "b")):
            ours = record[split] if protocol == "official" else record[split]["seed"]
            gaps[protocol][split] = {
                metric: {"ours": ours[metric], "target": scores[f"{metric}_{part}"],
                         "better_by": direction * (ours[metric] - scores[f"{metric}_{part}"])}
                for metric, direction in METRIC_DIRECTIONS.items()}
    return gaps


def machine_description() -> dict:
    """Cores, CPU model, bf16 instruction flags, memory, OS (no host name)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                      if line.startswith("flags")), []))
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gb = None
    return {
        "cpu_model": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "bf16_flags": {flag: flag in flags for flag in ("avx512_bf16", "amx_bf16", "avx512f")},
        "memory_gb": memory_gb,
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
    }


def package_versions() -> dict:
    """Installed versions of the packages the results depend on."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# ------------------------------------------------------------------------------ stages
def link_subset(glas_dir: Path, subset_dir: Path, max_images: int) -> None:
    """Fills `subset_dir` with symlinks to the first `max_images` images of each split (release
    order: train_1, train_2, ...) and their binary masks, and their rows of `Grade.csv`.

    Raises:
        StageError: `glas_dir` lacks `Grade.csv` or holds no image of a split.
    """
    from tfds_glas.glas import release

    if not (glas_dir / release.GRADE_FILE).is_file():
        raise StageError(f"stage build-dataset: {glas_dir / release.GRADE_FILE} not found; "
                         "--glas-dir must be the GlaS folder")
    names = sorted((path.name[:-4] for path in glas_dir.glob("*.bmp")
                    if not path.name.endswith("_anno.bmp")), key=release.example_sort_key)
    (subset_dir / "binary_masks").mkdir(parents=True, exist_ok=True)
    chosen = []
    for prefix in release.SPLIT_PREFIXES.values():
        split_names = [name for name in names if name.rpartition("_")[0] == prefix][:max_images]
        if not split_names:
            raise StageError(f"stage build-dataset: {glas_dir} holds no {prefix}_*.bmp image")
        chosen += split_names
    for relative in [f"{name}.bmp" for name in chosen] + [f"binary_masks/{name}.png"
                                                          for name in chosen]:
        link = subset_dir / relative
        if not link.is_symlink():
            link.symlink_to((glas_dir / relative).resolve())
    # The builder wants an image for every row of Grade.csv: keep the header and our rows.
    lines = (glas_dir / release.GRADE_FILE).read_text(encoding="utf-8-sig").splitlines()
    rows = [line for line in lines[1:] if line.split(",")[0].strip() in set(chosen)]
    grades = subset_dir / release.GRADE_FILE
    write_text(grades, "\n".join([lines[0], *rows]) + "\n")


def build_dataset(paths: Paths) -> tuple[float, str]:
    """Prepares `glas/binary_masks` in `paths.tfds_dir` from `paths.source_dir` (once).

    Returns:
        (wall-clock seconds, the equivalent `tfds build` command).

    Raises:
        StageError: the GlaS folder is missing or the builder rejects it.
    """
    command = (f"tfds build {DATASET} --imports tfds_glas --manual_dir {paths.source_dir} "
               f"--data_dir {paths.tfds_dir}")
    print(f"\n=== build-dataset: {command}", flush=True)
    if not paths.glas_dir.is_dir():
        raise StageError(f"stage build-dataset: GlaS folder {paths.glas_dir} not found; pass "
                         "--glas-dir DIR (the release images, Grade.csv and binary_masks/)")
    import tensorflow_datasets as tfds

    import tfds_glas  # noqa: F401  (registers the `glas` builder)

    start = time.monotonic()
    if paths.max_images is not None:
        link_subset(paths.glas_dir, paths.source_dir, paths.max_images)
    builder = tfds.builder(DATASET, data_dir=str(paths.tfds_dir))
    if builder.is_prepared():
        print(f"    already prepared in {paths.tfds_dir}", flush=True)
    else:
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=str(paths.source_dir)))
        except Exception as error:  # noqa: BLE001  (any builder failure stops this stage)
            raise StageError(f"stage build-dataset failed: {type(error).__name__}: {error}") \
                from error
    seconds = time.monotonic() - start
    print(f"=== build-dataset: done in {seconds:.1f} s", flush=True)
    return seconds, command


def config_path(model: str) -> Path:
    return REPO_ROOT / "configs" / f"{model}_glas_cpu.yaml"


def short_path(path: Path) -> str:
    """`path` relative to the working directory when inside it (so that the recorded commands
    work in any checkout), else as given."""
    relative = os.path.relpath(Path(path).resolve(), Path.cwd())
    return str(path) if relative.startswith("..") else relative


def train_command(model: str, paths: Paths, smoke: bool) -> list[str]:
    argv = [sys.executable, "-m", "keras_glas.train", model,
            "--config", short_path(config_path(model)), "--dataset", DATASET,
            "--data-dir", str(paths.tfds_dir),
            "--run-dir", str(paths.model_dir(model) / "run")]
    return argv + (SMOKE_TRAIN_ARGS[model] if smoke else [])


def export_command(run_dir: Path, saved_model: Path, *options: str) -> list[str]:
    """`keras_glas.export` of `run_dir` to `saved_model` (replaced if there), with `options`."""
    return [sys.executable, "-m", "keras_glas.export", str(run_dir), str(saved_model), *options,
            "--overwrite"]


def evaluate_command(saved_model: Path, paths: Paths, json_path: Path, name: str,
                     figures: Path | None = None, postprocess=(), split="all") -> list[str]:
    argv = [sys.executable, "-m", "keras_glas.evaluate", str(saved_model), "--split", split,
            "--dataset", DATASET, "--data-dir", str(paths.tfds_dir), "--json", str(json_path),
            "--name", name]
    if figures is not None:
        argv += ["--figures", str(figures)]
    if postprocess:
        argv += ["--postprocess", *postprocess]
    return argv


def study_variants(postprocess: dict, has_contour: bool) -> dict[str, list[str]]:
    """Post-processing variants of the study: `{name: evaluate --postprocess key=value list}`.

    `none` is the bare threshold + connected components; each step is then added alone
    (hole filling, small-object removal, touching-gland splitting by the contour head and by a
    distance-transform watershed); `config` is the config's own combination, and
    `config_split_<method>` the same with each other split method, so that the split's effect
    on top of the other steps shows too. With a contour head, `split_contour_min_seed` and
    `config_split_contour_min_seed` split along the contours from seeds of at least the study's
    minimum object size only (a smaller seed cannot be a gland: it is a sliver cut off by a
    noisy contour).
    """
    min_size = postprocess.get("min_size") or STUDY_MIN_SIZE
    off = ["min_size=0", "fill_holes=false", "split=none"]
    variants = {
        "none": off,
        "fill_holes": [*off[:1], "fill_holes=true", off[2]],
        "min_size": [f"min_size={min_size}", *off[1:]],
        "split_watershed": [*off[:2], "split=watershed"],
    }
    splits = ["none", "watershed"] + (["contour"] if has_contour else [])
    if has_contour:
        variants["split_contour"] = [*off[:2], "split=contour"]
        variants["split_contour_min_seed"] = [*off[:2], "split=contour",
                                              f"min_seed_size={min_size}"]
    configured = option_values(postprocess)

    def configured_with(**changes):
        return [f"{key}={value}" for key, value in {**configured, **changes}.items()]

    variants["config"] = configured_with()
    for split in splits:
        if split != configured.get("split"):
            variants[f"config_split_{split}"] = configured_with(split=split)
    if has_contour:
        variants["config_split_contour_min_seed"] = configured_with(
            split="contour", min_seed_size=str(min_size))
    return variants


def option_values(postprocess: dict) -> dict[str, str]:
    """Post-processing options as `evaluate --postprocess` spells them: `{key: "value"}`."""
    return {key: str(value).lower() if isinstance(value, bool) else str(value)
            for key, value in postprocess.items()}


def same_variants(postprocess: dict, variants: dict[str, list[str]]) -> dict[str, str]:
    """`{variant: earlier variant}` for each variant whose options, over the exported model's
    `postprocess`, resolve to the same post-processing as an earlier one: `config` is
    `min_size` when the config neither fills holes nor splits. The study scores it once."""
    configured = option_values(postprocess)
    first, same = {}, {}
    for name, options in variants.items():
        resolved = {**configured, **dict(option.split("=", 1) for option in options)}
        key = tuple(sorted(resolved.items()))
        if key in first:
            same[name] = first[key]
        else:
            first[key] = name
    return same


def postprocess_study(model_dir: Path, saved_model: Path, paths: Paths, export_info: dict,
                      row_name: str, only=None, flipped_saved_model: Path | None = None,
                      flipped_export_command: str | None = None) -> dict:
    """Scores the same SavedModel under each `study_variants` post-processing (or those named
    in `only`), and `flipped_saved_model` (the same weights exported with `--test-time-flips`,
    made by `flipped_export_command`), if given, under the config's as `FLIPS_VARIANT`.

    Each variant is scored on the test splits and on the run's validation images
    (`evaluate --split validation`); `selected_on_validation` is the variant that
    `select_on_validation` picks from the validation scores alone, so its test scores are an
    honest estimate of choosing post-processing by this study. A variant that resolves to the
    same post-processing as an earlier one (`same_variants`) reuses its scores, marked
    `"same_as": <earlier>`, and keeps its name for the ranking.

    Returns:
        `{"variants": {name: {"postprocess", "command", "validation_command", "seconds",
        "test_a", "test_b", "validation"[, "same_as"][, "export_command"]}},
        "selected_on_validation": {...},
        "deltas_vs_none": {name: {split: {metric: difference}}}, "helps": {...}}`.
    """
    variants = study_variants(export_info["postprocess"], "contour" in export_info["outputs"])
    same = same_variants(export_info["postprocess"], variants)
    models = dict.fromkeys(variants, saved_model)
    if flipped_saved_model is not None:
        variants[FLIPS_VARIANT] = variants["config"]
        models[FLIPS_VARIANT] = flipped_saved_model
    if only is not None:
        variants = {name: options for name, options in variants.items() if name in only}
    study = {"model": row_name, "saved_model": str(saved_model),
             "note": STUDY_NOTE, "variants": {}}
    for variant, options in variants.items():
        if same.get(variant) in variants:
            study["variants"][variant] = {**study["variants"][same[variant]],
                                          "same_as": same[variant], "seconds": 0.0}
            continue
        json_path = model_dir / "study" / f"{variant}.json"
        argv = evaluate_command(models[variant], paths, json_path, f"{row_name} [{variant}]",
                                postprocess=options)
        seconds = run_stage(f"study-{variant}", argv, paths.log_dir)
        scores = json.loads(json_path.read_text())
        validation_json = model_dir / "study" / f"{variant}_validation.json"
        validation_argv = evaluate_command(models[variant], paths, validation_json,
                                           f"{row_name} [{variant}]", postprocess=options,
                                           split=VALIDATION_SPLIT)
        seconds += run_stage(f"study-{variant}-validation", validation_argv, paths.log_dir)
        study["variants"][variant] = {
            "postprocess": scores["postprocess"], "command": display_command(argv),
            "validation_command": display_command(validation_argv),
            "seconds": round(seconds, 1), **{split: scores[split] for split in SPLITS},
            VALIDATION_SPLIT: json.loads(validation_json.read_text())[VALIDATION_SPLIT]}
        if variant == FLIPS_VARIANT:
            study["variants"][variant]["export_command"] = flipped_export_command
    study["selected_on_validation"] = select_on_validation(study["variants"])
    study.update(compare_to_baseline(study["variants"]))
    return study


def select_on_validation(variants: dict) -> dict:
    """The variant with the best rank sum on the validation images' three official metrics.

    The challenge's rule, applied to the study's variants: each metric ranks the variants (1 =
    best; ties share the better rank; `keras_glas.leaderboard.competition_ranks`), and the
    smallest sum of ranks wins; on equal sums, the earlier variant of the study. Only the
    `validation` scores are read.

    Returns:
        `{"variant", "rank_sum", "rank_sums": {variant: sum}, "rule"}`.
    """
    from keras_glas.leaderboard import competition_ranks

    rank_sums = dict.fromkeys(variants, 0)
    for metric, direction in METRIC_DIRECTIONS.items():
        values = [scores[VALIDATION_SPLIT][metric] for scores in variants.values()]
        for name, rank in zip(variants, competition_ranks(values, direction > 0), strict=True):
            rank_sums[name] += rank
    best = min(rank_sums, key=rank_sums.get)  # min keeps the first of equal sums
    return {"variant": best, "rank_sum": rank_sums[best], "rank_sums": rank_sums,
            "rule": "smallest rank sum of validation object F1, object Dice and object "
                    "Hausdorff (official protocol, approximate) over the study's variants"}


def compare_to_baseline(variants: dict) -> dict:
    """Differences of each variant from `none` on both metric protocols, and which help.

    A variant "helps" on a split when it improves the majority of the three metrics (F1 and
    object Dice up, object Hausdorff down) of the official protocol.

    Returns:
        `{"deltas_vs_none": {variant: {split: {"official": {metric: d}, "seed": {...}}}},
        "helps": {variant: {split: bool}}}`.
    """
    base = variants["none"]
    deltas, helps = {}, {}
    for name, scores in variants.items():
        if name == "none":
            continue
        deltas[name], helps[name] = {}, {}
        for split in SPLITS:
            official = {metric: scores[split][metric] - base[split][metric]
                        for metric in METRIC_DIRECTIONS}
            seed = {metric: scores[split]["seed"][metric] - base[split]["seed"][metric]
                    for metric in METRIC_DIRECTIONS}
            deltas[name][split] = {"official": official, "seed": seed}
            better = sum(direction * official[metric] > 0
                         for metric, direction in METRIC_DIRECTIONS.items())
            helps[name][split] = better >= 2
    return {"deltas_vs_none": deltas, "helps": helps}


def run_model(model: str, paths: Paths, smoke: bool, dataset_stage: dict) -> dict:
    """Train → export → evaluate (→ post-processing study) one model; writes its outputs.

    Returns:
        The `real_glas_<model>.json` record.
    """
    import yaml

    model_dir = paths.model_dir(model)
    run_dir = model_dir / "run"
    saved_model = model_dir / "saved_model"
    row_name = f"smoke {model}" if smoke else ROW_NAMES[model]
    commands = {"build_dataset": dataset_stage["command"]}
    timings = {"build_dataset_s": round(dataset_stage["seconds"], 1)}

    argv = train_command(model, paths, smoke)
    clock = HistoryClock(run_dir / "history.csv")
    clock.start()
    resumed_epochs = len(clock.stamps)
    try:
        timings["train_s"] = round(run_stage(f"train-{model}", argv, paths.log_dir,
                                             on_output=clock.poll), 1)
    finally:
        clock.stop()
    commands["train"] = display_command(argv)

    argv = export_command(run_dir, saved_model, "--no-test-time-flips")
    timings["export_s"] = round(run_stage(f"export-{model}", argv, paths.log_dir), 1)
    commands["export"] = display_command(argv)
    resolved_config = yaml.safe_load((run_dir / "config.yaml").read_text())
    row_model = saved_model
    if model == "unet":
        flipped_saved_model = model_dir / "saved_model_test_time_flips"
        argv = export_command(run_dir, flipped_saved_model, "--test-time-flips")
        timings["export_test_time_flips_s"] = round(
            run_stage(f"export-{model}-test-time-flips", argv, paths.log_dir), 1)
        commands["export_test_time_flips"] = display_command(argv)
        if resolved_config["train"]["export_test_time_flips"]:
            row_model = flipped_saved_model

    figures = model_dir / "figures"
    eval_json = model_dir / "evaluate.json"
    argv = evaluate_command(row_model, paths, eval_json, row_name, figures=figures)
    timings["evaluate_s"] = round(run_stage(f"evaluate-{model}", argv, paths.log_dir), 1)
    commands["evaluate"] = display_command(argv)

    record = json.loads(eval_json.read_text())
    export_info = json.loads((saved_model / "assets.extra" / "keras_glas_export.json").read_text())
    if model == "unet":
        start = time.monotonic()
        study = postprocess_study(model_dir, saved_model, paths, export_info, row_name,
                                  only=SMOKE_STUDY_VARIANTS if smoke else None,
                                  flipped_saved_model=flipped_saved_model,
                                  flipped_export_command=commands["export_test_time_flips"])
        timings["postprocess_study_s"] = round(time.monotonic() - start, 1)
        write_json(paths.out_dir / "postprocess_study.json", study)

    copied = []
    for split in SPLITS:
        for label in FIGURE_LABELS:
            source = figures / f"{split}_{label}.png"
            if not source.is_file():
                raise StageError(f"stage evaluate-{model}: figure {source} was not written; see "
                                 f"{paths.log_dir / f'evaluate-{model}.log'}")
            destination = paths.out_dir / "figures" / model / source.name
            copy_file(source, destination)
            copied.append(str(destination.relative_to(paths.out_dir)))

    curve = learning_curve(run_dir / "history.csv", clock.stamps)
    curve_png = paths.out_dir / "figures" / model / "learning_curve.png"
    if plot_learning_curve(curve, curve_png, f"{row_name}: validation (train[:10%])"):
        copied.append(str(curve_png.relative_to(paths.out_dir)))

    record.update({
        "smoke": smoke,
        "max_images_per_split": paths.max_images,
        "metric_protocols": {
            "seed": "seed study's metrics: exact here (its helper binarises the masks anyway)",
            "official": "official GlaS metrics, APPROXIMATE here: ground-truth instances are the "
                        "connected components of the binarised annotations (touching glands "
                        "merge)",
        },
        "config_file": str(config_path(model).relative_to(REPO_ROOT)),
        "resolved_config": resolved_config,
        "commands": commands,
        "timings": timings,
        # elapsed_s: seconds since the train command started, when the epoch's row appeared;
        # None for epochs trained by an earlier, interrupted invocation.
        "learning_curve": curve,
        "epochs_resumed_from_earlier_runs": resumed_epochs,
        "target_gaps": target_gaps(record),
        "figures": copied,
        "versions": package_versions(),
        "machine": machine_description(),
        "environment": recorded_environment(),
    })
    write_json(paths.out_dir / f"real_glas_{model}.json", record)
    return record


def run_leaderboard(paths: Paths) -> None:
    results = sorted(paths.out_dir.glob("real_glas_*.json"))
    argv = [sys.executable, "-m", "keras_glas.leaderboard", *map(str, results),
            "--markdown", str(paths.out_dir / "leaderboard.md"),
            "--png", str(paths.out_dir / "leaderboard.png")]
    run_stage("leaderboard", argv, paths.log_dir)


def summary_lines(records: dict) -> list[str]:
    """One line per model and split: the six numbers of each protocol."""
    lines = []
    for model, record in records.items():
        for split in SPLITS:
            scores = record[split]
            seed = scores["seed"]
            lines.append(
                f"{model:8s} {split}: seed F1 {seed['f1']:.3f} Dice {seed['object_dice']:.3f} "
                f"Hausdorff {seed['object_hausdorff']:.1f} | official (approx.) F1 "
                f"{scores['f1']:.3f} Dice {scores['object_dice']:.3f} Hausdorff "
                f"{scores['object_hausdorff']:.1f} | train {record['timings']['train_s']:.0f} s")
    return lines


# ------------------------------------------------------------------------------ CLI
def resolve_paths(args: argparse.Namespace) -> Paths:
    """Work and out dirs: temp dirs in smoke mode unless given. Smoke and subset runs never
    write into the repository's `results/`.

    Raises:
        SystemExit: such a run pointed at `results/`, or `--max-images` below
            `MIN_SUBSET_IMAGES`.
    """
    if args.max_images is not None and args.max_images < MIN_SUBSET_IMAGES:
        sys.exit(f"real_glas: error: --max-images must be >= {MIN_SUBSET_IMAGES} (training "
                 f"validates on the first 10% of the training images), got {args.max_images}")
    if args.smoke:
        work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="real_glas_smoke_work_"))
        out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="real_glas_smoke_out_"))
    else:
        work_dir = Path(args.work_dir or "runs/real_glas")
        out_dir = Path(args.out_dir or "results")
    partial = args.smoke or args.max_images is not None
    if partial and out_dir.resolve() == (REPO_ROOT / "results").resolve():
        sys.exit("real_glas: error: --smoke and --max-images runs never write into the "
                 "repository's results/; pass another --out-dir (--smoke alone uses a temp dir)")
    return Paths(glas_dir=Path(args.glas_dir), work_dir=work_dir, out_dir=out_dir,
                 max_images=args.max_images)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_glas",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--glas-dir",
                        default=os.path.relpath(REPO_ROOT.parent / "shared" / "data" / "glas"),
                        help="GlaS folder: release images, Grade.csv, binary_masks/ "
                             "(default: ../shared/data/glas next to the repository)")
    parser.add_argument("--work-dir", default=None,
                        help="TFDS data, runs, SavedModels, logs (default: runs/real_glas; "
                             "a temp dir with --smoke)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--out-dir", default=None,
                        help="results (default: results; a temp dir with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings: checks the whole chain in minutes")
    parser.add_argument("--max-images", type=int, default=None, metavar="N",
                        help=f"use only the first N (>= {MIN_SUBSET_IMAGES}) images of each "
                             "split, for quick checks (default: all)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = resolve_paths(args)
    print(f"work dir {paths.work_dir}, results in {paths.out_dir}", flush=True)
    records = {}
    try:
        seconds, command = build_dataset(paths)
        dataset_stage = {"seconds": seconds, "command": command}
        for model in args.models:
            records[model] = run_model(model, paths, args.smoke, dataset_stage)
        run_leaderboard(paths)
    except StageError as error:
        print(f"real_glas: error: {error}", file=sys.stderr, flush=True)
        return 1
    print("\n" + "\n".join(summary_lines(records)))
    print(f"results written to {paths.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
