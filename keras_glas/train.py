"""Training CLI: `python -m keras_glas.train {unet,maskrcnn} [options]`.

Loads `configs/<model>.yaml` (or `--config`), applies the flags and `--set section.key=value`
overrides, and trains into a run dir:

    RUN_DIR/config.yaml                   the resolved config (a rerun must match it)
    RUN_DIR/checkpoints/best.weights.h5   best `train.monitor` so far (all stages)
    RUN_DIR/checkpoints/last.weights.h5   end of the latest epoch
    RUN_DIR/backup/<stage>/               BackupAndRestore state: rerunning the same command
                                          after a crash or SIGKILL resumes at the killed epoch
    RUN_DIR/logs/                         TensorBoard
    RUN_DIR/history.csv                   one row per finished epoch (appended across resumes)

Training has a main stage and, when `train.finetune` is set, a fine-tune stage from the main
stage's final weights with a new optimizer (the seed: 900 SGD epochs, then 50 Adam epochs).
Epochs are numbered across stages, so the fine-tune epochs follow the main ones.
"""
import argparse
import csv
import dataclasses
import math
import os
import sys
from pathlib import Path

import keras
import tensorflow as tf
import yaml

import keras_glas
from keras_glas.atomic import atomic_path
from keras_glas.callbacks import GlasMetricsCallback, is_glas_log_name
from keras_glas.config import (
    MODEL_NAMES,
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    save_config,
)
from keras_glas.data import DatasetError, damaged_records_error

DATASETS = ("glas", "glas/synthetic", "glas/binary_masks")
SYNTHETIC = "glas/synthetic"
# ReduceLROnPlateau settings of `lr_schedule: plateau`.
PLATEAU_FACTOR = 0.1
PLATEAU_PATIENCE = 10


def default_config_path(model_name: str) -> Path:
    """`configs/<model_name>.yaml` of the repository this package lives in (any cwd)."""
    path = Path(keras_glas.__file__).resolve().parents[1] / "configs" / f"{model_name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"default config {path} not found (keras_glas is installed without the repository's "
            f"configs/ directory); pass --config PATH"
        )
    return path


def _prepare_command(dataset: str, data_dir: str) -> str:
    return f"tfds build {dataset} --imports tfds_glas --manual_dir DIR --data_dir {data_dir}"


def resolve_dataset(dataset: str, data_dir: str | None) -> tuple[str, str]:
    """Picks the TFDS dataset to train on and makes sure it is prepared.

    Args:
        dataset: `auto`, `glas`, `glas/synthetic` or `glas/binary_masks`. `auto` is `glas`
            where it is prepared in `data_dir`, else `glas/synthetic` (with one line saying how
            to prepare `glas`).
        data_dir: TFDS data dir, or None for TFDS's default (`$TFDS_DATA_DIR` or
            `~/tensorflow_datasets`).

    Returns:
        (dataset name, absolute data dir). `glas/synthetic` is built there if needed.

    Raises:
        ConfigError: a real-image dataset was asked for and is not prepared.
    """
    import tensorflow_datasets as tfds

    import tfds_glas  # noqa: F401  (registers the `glas` builder)

    data_dir = os.path.abspath(os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR))
    if dataset == "auto":
        if tfds.builder("glas", data_dir=data_dir).is_prepared():
            return "glas", data_dir
        print(
            f"glas is not prepared in {data_dir}; training on {SYNTHETIC} instead. To train on "
            f"the real images: {_prepare_command('glas', data_dir)}",
            flush=True,
        )
        dataset = SYNTHETIC
    builder = tfds.builder(dataset, data_dir=data_dir)
    if not builder.is_prepared():
        if dataset != SYNTHETIC:
            raise ConfigError(
                f"{dataset} is not prepared in {data_dir}. Prepare it with: "
                f"{_prepare_command(dataset, data_dir)} (DIR = the GlaS release folder or zip)"
            )
        print(f"Building {SYNTHETIC} in {data_dir} (once)...", flush=True)
        builder.download_and_prepare()
    return dataset, data_dir


def cpu_supports_bfloat16() -> bool:
    """Whether the CPU has native bfloat16 instructions (AVX512-BF16 or AMX-BF16; Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """`auto` → `mixed_float16` on a GPU, `mixed_bfloat16` on a bf16-capable CPU, else
    `float32`; any other value is returned as is."""
    if precision != "auto":
        return precision
    if tf.config.list_logical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_supports_bfloat16() else "float32"


def default_monitor(config: Config) -> str:
    """`val_loss` (U-Net) / `val_mask_loss` (Mask R-CNN, as the seed), without `val_` when
    there is no validation split."""
    name = "loss" if config.model.name == "unet" else "mask_loss"
    return f"val_{name}" if config.data.validation_fraction > 0 else name


def resolve_config(config: Config) -> Config:
    """Replaces the automatic choices (dataset, data dir, precision, monitor) by concrete ones,
    preparing `glas/synthetic` if it is the one picked."""
    dataset, data_dir = resolve_dataset(config.data.dataset, config.data.data_dir)
    train = config.train
    monitor = train.monitor or default_monitor(config)
    if monitor.startswith("val_") and config.data.validation_fraction == 0:
        raise ConfigError(
            f"train.monitor={monitor} needs validation data but data.validation_fraction is 0"
        )
    if is_glas_log_name(monitor) and train.glas_metrics_every is None:
        raise ConfigError(
            f"train.monitor={monitor} is logged by the GlaS validation metrics, which "
            f"train.glas_metrics_every=null switches off; set it to a number of epochs"
        )
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, dataset=dataset, data_dir=data_dir),
        train=dataclasses.replace(
            train, precision=resolve_precision(train.precision), monitor=monitor
        ),
    )


def select_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy when `TF_CONFIG` is set, MirroredStrategy over the visible
    GPUs when there are several, else the default (single-device) strategy."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def worker_run_dir(run_dir: Path, strategy: tf.distribute.Strategy) -> Path:
    """`run_dir` on the chief; `run_dir/workers/<type>-<id>` on the other workers of a
    multi-worker run, so that they do not overwrite the chief's checkpoints and each keeps
    the backup it resumes from."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if task_type in (None, "chief"):
        return run_dir
    if task_type == "worker" and resolver.task_id == 0 and \
            "chief" not in resolver.cluster_spec().as_dict():
        return run_dir
    return run_dir / "workers" / f"{task_type}-{resolver.task_id}"


def _flatten(tree: dict, prefix="") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def prepare_run_dir(run_dir: Path, config: Config):
    """Saves `config` as `run_dir/config.yaml`, or checks that an existing one is the same.

    Raises:
        ConfigError: the run dir holds a run with a different config (it would be resumed or
            overwritten with settings it was not made with).
    """
    path = run_dir / "config.yaml"
    if path.is_file():
        saved = _flatten(yaml.safe_load(path.read_text()) or {})
        wanted = _flatten(config_to_dict(config))
        changed = [
            f"{key}: {saved.get(key, '<missing>')!r} -> {wanted.get(key, '<missing>')!r}"
            for key in sorted(set(saved) | set(wanted))
            if saved.get(key) != wanted.get(key)
        ]
        if changed:
            raise ConfigError(
                f"run dir {run_dir} holds a run with a different config ({'; '.join(changed)}); "
                f"pick a new --run-dir (or delete {run_dir})"
            )
        return
    save_config(config, path)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One `fit()` call: epochs [initial_epoch, epochs) with its own optimizer."""

    name: str
    initial_epoch: int
    epochs: int
    optimizer: str
    learning_rate: float
    momentum: float
    weight_decay: float
    ema_momentum: float | None = None


def training_stages(config: Config) -> list[Stage]:
    """The main stage, then the fine-tune stage when configured."""
    train = config.train
    stages = [Stage("main", 0, train.epochs, train.optimizer, train.learning_rate,
                    train.momentum, train.weight_decay, train.ema_momentum)]
    if train.finetune is not None:
        finetune = train.finetune
        stages.append(Stage("finetune", train.epochs, train.epochs + finetune.epochs,
                            finetune.optimizer, finetune.learning_rate, 0.0,
                            finetune.weight_decay, train.ema_momentum))
    return stages


def make_optimizer(stage: Stage) -> keras.optimizers.Optimizer:
    """SGD / Adam / AdamW with the stage's learning rate and weight decay (None when 0), and a
    moving average of the weights when `stage.ema_momentum` is set."""
    weight_decay = stage.weight_decay or None
    ema = ({} if stage.ema_momentum is None
           else {"use_ema": True, "ema_momentum": stage.ema_momentum})
    if stage.optimizer == "sgd":
        return keras.optimizers.SGD(stage.learning_rate, momentum=stage.momentum,
                                    weight_decay=weight_decay, **ema)
    if stage.optimizer == "adam":
        return keras.optimizers.Adam(stage.learning_rate, weight_decay=weight_decay, **ema)
    return keras.optimizers.AdamW(stage.learning_rate, weight_decay=stage.weight_decay, **ema)


def compile_model(model: keras.Model, config: Config, optimizer: keras.optimizers.Optimizer):
    """U-Net: the configured loss on `mask` (+ BCE on `contour`) and mask IoU; Mask R-CNN
    computes its own losses. Call inside `strategy.scope()`."""
    from keras_glas.losses import get_loss

    jit_compile = config.train.jit_compile
    if config.model.name == "maskrcnn":
        model.compile(optimizer=optimizer, jit_compile=jit_compile)
        return
    loss = {"mask": get_loss(config.train.loss)}
    if config.model.contour_head:
        loss["contour"] = get_loss("bce")
    metrics = {"mask": [keras.metrics.BinaryIoU(target_class_ids=[1], threshold=0.5,
                                                name="iou")]}
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit_compile)


def make_datasets(config: Config) -> tuple[tf.data.Dataset, tf.data.Dataset | None]:
    """Training batches from `train[k%:]` and validation batches from `train[:k%]`.

    The training set repeats when `train.steps_per_epoch` is set (an epoch is then that many
    batches); the validation set is read once per epoch, unaugmented.
    """
    from keras_glas.data import make_dataset

    data, model = config.data, config.model
    percent = data.validation_percent
    options = dict(
        model=model.name,
        batch_size=data.batch_size,
        image_size=data.image_size,
        input_height=data.input_height,
        data_dir=data.data_dir,
        cache=data.cache,
        max_instances=data.max_instances,
        seed=config.train.seed,
    )
    if model.name == "unet":
        options.update(contour=model.contour_head, contour_gap=config.train.contour_gap,
                       border_weights=config.train.loss == "weighted_bce")
    train_split = f"train[{percent}%:]" if percent else "train"
    train_ds = make_dataset(data.dataset, split=train_split, augment=data.augment, **options)
    if config.train.steps_per_epoch is not None:
        train_ds = train_ds.repeat()
    val_ds = None
    if percent:
        val_ds = make_dataset(data.dataset, split=f"train[:{percent}%]", augment=False,
                              shuffle=False, **options)
    return train_ds, val_ds


class WeightsCheckpoint(keras.callbacks.Callback):
    """Saves the weights at the end of every epoch, or only when `monitor` improves.

    Unlike `keras.callbacks.ModelCheckpoint` it writes to a temp file and renames it, so a kill
    during the save never leaves a truncated checkpoint, and it starts from a given best value
    (so a resumed run does not overwrite a better checkpoint with a worse one).
    """

    def __init__(self, path, monitor=None, mode="min", best=None):
        super().__init__()
        self.path = Path(path)
        self.monitor = monitor
        self.sign = 1.0 if mode == "min" else -1.0
        self.best = best

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor is not None:
            value = (logs or {}).get(self.monitor)
            if value is None and is_glas_log_name(self.monitor):
                return  # the GlaS metrics are scored every few epochs only
            if value is None:
                raise ConfigError(
                    f"train.monitor={self.monitor} is not among the logged values "
                    f"({', '.join(sorted(logs or {}))}); pass --set train.monitor=<one of them>"
                )
            if self.best is not None and self.sign * value >= self.sign * self.best:
                return
            self.best = float(value)
        with atomic_path(self.path, suffix=".weights.h5") as temp:
            self.model.save_weights(temp)


def _monitor_mode(monitor: str) -> str:
    return "min" if "loss" in monitor or "hausdorff" in monitor else "max"


def logged_values(history_path: Path, monitor: str,
                  first_epoch: int = 0) -> list[tuple[int, float]]:
    """`(epoch, value)` of `monitor` for every epoch from `first_epoch` on that `history.csv`
    logged a finite value of it (none when the file is absent)."""
    if not history_path.is_file():
        return []
    with history_path.open(newline="") as handle:
        # CSVLogger writes "NA" for epochs without a value (GlaS metrics are not every epoch).
        rows = [(int(row["epoch"]), row.get(monitor) or "NA") for row in csv.DictReader(handle)]
    values = [(epoch, float(text)) for epoch, text in rows if epoch >= first_epoch and text != "NA"]
    return [(epoch, value) for epoch, value in values if math.isfinite(value)]


def best_logged_value(history_path: Path, monitor: str) -> float | None:
    """The best value of `monitor` in `history.csv` (None when absent), so the best checkpoint
    of a resumed or fine-tune stage only replaces a better one."""
    values = [value for _, value in logged_values(history_path, monitor)]
    if not values:
        return None
    return min(values) if _monitor_mode(monitor) == "min" else max(values)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """`EarlyStopping` that carries on counting after an interrupted run is resumed.

    Keras resets the patience counter in `on_train_begin`, so a run killed and resumed every
    few epochs would never stop. This one replays the monitor values that `history.csv` logged
    for its stage (epochs from `first_epoch` on) through `EarlyStopping`'s own rule first.
    """

    def __init__(self, history_path: Path, first_epoch: int, **kwargs):
        super().__init__(**kwargs)
        self.history_path = Path(history_path)
        self.first_epoch = first_epoch

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        for epoch, value in logged_values(self.history_path, self.monitor, self.first_epoch):
            self.on_epoch_end(epoch, {self.monitor: value})


def make_callbacks(run_dir: Path, config: Config, stage: Stage) -> list:
    """Backup (first, so every history row has its backup), the swap to the averaged weights
    (with `ema_momentum`), the GlaS validation metrics (before everything that reads the logs),
    checkpoints, early stopping, LR schedule, TensorBoard and the CSV history."""
    train = config.train
    monitor, mode = train.monitor, _monitor_mode(train.monitor)
    history = run_dir / "history.csv"
    callbacks = [
        # Kept after the stage ends: rerunning a finished stage restores its last epoch and
        # trains zero more, instead of starting over.
        keras.callbacks.BackupAndRestore(str(run_dir / "backup" / stage.name),
                                         delete_checkpoint=False),
    ]
    if stage.ema_momentum is not None:
        # After the backup, which must hold the raw weights to resume training from, and before
        # everything that scores or saves the model: from the end of each epoch to the start of
        # the next the model holds the averaged weights (validation swaps them in by itself).
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if train.glas_metrics_every is not None and config.data.validation_fraction > 0:
        callbacks.append(GlasMetricsCallback(
            config.data.dataset, f"train[:{config.data.validation_percent}%]",
            config.data.data_dir, config.data.image_size, config.postprocess,
            every=train.glas_metrics_every))
    callbacks += [
        WeightsCheckpoint(run_dir / "checkpoints" / "best.weights.h5", monitor, mode,
                          best=best_logged_value(history, monitor)),
        WeightsCheckpoint(run_dir / "checkpoints" / "last.weights.h5"),
    ]
    if train.early_stopping_patience is not None:
        callbacks.append(ResumableEarlyStopping(
            history, stage.initial_epoch, monitor=monitor,
            patience=train.early_stopping_patience, mode=mode))
    if train.lr_schedule == "cosine":
        span = stage.epochs - stage.initial_epoch
        callbacks.append(keras.callbacks.LearningRateScheduler(
            lambda epoch: stage.learning_rate * 0.5 * (
                1 + math.cos(math.pi * (epoch - stage.initial_epoch) / span))))
    elif train.lr_schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor, factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE, mode=mode))
    callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "logs")))
    callbacks.append(keras.callbacks.CSVLogger(str(history), append=True))
    return callbacks


def _stage_done_marker(run_dir: Path, stage: Stage) -> Path:
    return run_dir / "backup" / f"{stage.name}.done"


def _build_for_stage(config: Config, run_dir: Path, stage_index: int) -> keras.Model:
    from keras_glas.models import build_model

    model = build_model(config.model)
    if stage_index > 0:
        # Weights only: the previous stage's optimizer state does not carry over.
        model.load_weights(run_dir / "checkpoints" / "last.weights.h5")
    return model


def train(config: Config, run_dir, strategy: tf.distribute.Strategy | None = None,
          verbose="auto") -> list[keras.callbacks.History]:
    """Trains the configured model into `run_dir`, resuming whatever an earlier call left.

    Args:
        config: a `Config` (automatic choices are resolved here).
        run_dir: output directory (see the module docstring).
        strategy: distribution strategy; default `select_strategy()`.
        verbose: `fit` verbosity (progress bar by default).

    Returns:
        The `History` of each stage run by this call (finished stages are skipped).
    """
    # First: MultiWorkerMirroredStrategy must exist before TensorFlow initialises its runtime.
    strategy = strategy or select_strategy()
    run_dir = worker_run_dir(Path(run_dir), strategy)
    config = resolve_config(config)
    prepare_run_dir(run_dir, config)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(config.train.precision)
    try:
        keras.utils.set_random_seed(config.train.seed)
        train_ds, val_ds = make_datasets(config)
        histories = []
        for index, stage in enumerate(training_stages(config)):
            marker = _stage_done_marker(run_dir, stage)
            if marker.exists():
                continue
            print(f"Stage {stage.name}: epochs {stage.initial_epoch + 1}-{stage.epochs}, "
                  f"{stage.optimizer} lr {stage.learning_rate}, "
                  f"precision {config.train.precision}", flush=True)
            with strategy.scope():
                model = _build_for_stage(config, run_dir, index)
                compile_model(model, config, make_optimizer(stage))
            # fit() starts at the epoch BackupAndRestore restored into the model, if any; clear
            # what a previous stage left there.
            model._initial_epoch = None
            try:
                histories.append(model.fit(
                    train_ds,
                    validation_data=val_ds,
                    epochs=stage.epochs,
                    initial_epoch=stage.initial_epoch,
                    steps_per_epoch=config.train.steps_per_epoch,
                    callbacks=make_callbacks(run_dir, config, stage),
                    shuffle=False,  # make_dataset shuffles; fit() cannot shuffle tf.data input
                    verbose=verbose,
                ))
            except tf.errors.DataLossError as error:
                raise damaged_records_error(config.data.dataset, config.data.data_dir,
                                            error) from error
            marker.touch()
    finally:
        keras.config.set_dtype_policy(previous_policy)
    return histories


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The flags as `section.key=value` overrides, before the explicit `--set`s."""
    flags = {
        "data.dataset": args.dataset,
        "data.data_dir": args.data_dir,
        "data.batch_size": args.batch_size,
        "data.image_size": args.image_size,
        "train.epochs": args.epochs,
        "train.steps_per_epoch": args.steps_per_epoch,
    }
    return [f"{key}={value}" for key, value in flags.items() if value is not None] + args.set


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m keras_glas.train",
        description="Train a U-Net or a Mask R-CNN on GlaS. Rerun the same command to resume.",
    )
    parser.add_argument("model", choices=MODEL_NAMES)
    parser.add_argument("--config", help="YAML config (default: configs/<model>.yaml)")
    parser.add_argument("--dataset", choices=DATASETS,
                        help="TFDS dataset (default: glas if prepared, else glas/synthetic)")
    parser.add_argument("--data-dir", help="TFDS data dir")
    parser.add_argument("--run-dir", help="output dir (default: runs/<model>)")
    parser.add_argument("--epochs", type=int, help="main-stage epochs")
    parser.add_argument("--steps-per-epoch", type=int, help="batches per epoch")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--image-size", type=int,
                        help="training scale: images are resized to a longer side of S and "
                             "padded to S×S (or data.input_height×S)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key, e.g. --set model.base_filters=16")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_dir = Path(args.run_dir or Path("runs") / args.model).resolve()
    try:
        config_path = args.config or default_config_path(args.model)
        config = load_config(config_path, overrides_from_args(args))
        if config.model.name != args.model:
            raise ConfigError(
                f"{config_path} configures model.name={config.model.name}, not {args.model}; "
                f"pass a {args.model} config (e.g. configs/{args.model}.yaml) to --config"
            )
        histories = train(config, run_dir)
    except (ConfigError, DatasetError) as error:
        sys.exit(f"keras_glas.train: error: {error}")
    if not histories:
        print(f"{run_dir} has finished training already; nothing to do.")
    checkpoints = run_dir / "checkpoints"
    print(f"Checkpoints: {checkpoints / 'best.weights.h5'} (best), "
          f"{checkpoints / 'last.weights.h5'} (last)")
    if (run_dir / "logs").is_dir():
        print(f"TensorBoard: tensorboard --logdir {run_dir / 'logs'}")
    print(f"Next: python -m keras_glas.export {run_dir} OUT_DIR")


if __name__ == "__main__":
    main()
