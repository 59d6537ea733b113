"""Training configuration: YAML → typed, frozen dataclasses, validated in one place.

A config file has four sections, each mapped onto a dataclass:

```yaml
data:        # DataConfig: dataset, image size, batch size, validation split, augmentation
model:       # UNetConfig or MaskRCNNConfig, chosen by `name: unet | maskrcnn`
train:       # TrainConfig: epochs, optimizer, schedule, loss, precision, fine-tune stage
postprocess: # keras_glas.postprocess.PostprocessOptions
```

Keys left out take the dataclass defaults. `load_config(path, overrides)` applies command-line
overrides (`"section.key=value"`, values parsed as YAML scalars, nested keys such as
`data.augment.elastic=true`) to the raw YAML, then converts and validates everything once: an
unknown key is an error listing the valid keys, a value of the wrong type an error naming the
key, the expected type and where the value came from (file or `--set`).
"""
import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Literal

import yaml

from keras_glas.atomic import write_text
from keras_glas.augment import AugmentOptions
from keras_glas.data import BORDER_MAX_DISTANCE
from keras_glas.models.maskrcnn.model import DEFAULT_OPTIONS as MASKRCNN_HEAD_OPTIONS
from keras_glas.postprocess import PostprocessOptions

MODEL_NAMES = ("unet", "maskrcnn")
OPTIMIZERS = Literal["sgd", "adam", "adamw"]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key, the source and the fix."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they are batched.

    `dataset` is a TFDS name (`glas`, `glas/synthetic`, `glas/binary_masks`) or `auto`: `glas`
    where it is prepared in `data_dir`, else `glas/synthetic` (resolved by `keras_glas.train`).
    The validation set is the first `validation_fraction` of the TFDS `train` split
    (`train[:k%]`, training uses `train[k%:]`); the test splits are never touched.
    Training inputs are `input_height`×`image_size` (default square): `image_size` is the scale
    (the longer side of every resized image, in training and in the exported model) and
    `input_height` the canvas height (`keras_glas.data.make_dataset`).
    """

    dataset: str = "auto"
    data_dir: str | None = None
    image_size: int = 512
    input_height: int | None = None
    batch_size: int = 6
    validation_fraction: float = 0.1
    cache: bool = False
    augment: AugmentOptions = dataclasses.field(default_factory=AugmentOptions)
    max_instances: int = 100

    def __post_init__(self):
        if self.dataset != "auto" and self.dataset.split("/")[0] != "glas":
            raise ValueError(
                f"dataset must be auto, glas, glas/synthetic or glas/binary_masks, "
                f"got {self.dataset!r}"
            )
        _check_positive(image_size=self.image_size, batch_size=self.batch_size,
                        max_instances=self.max_instances)
        if self.input_height is not None and not 0 < self.input_height <= self.image_size:
            raise ValueError(
                f"input_height must be in 1..image_size ({self.image_size}) or null (a square "
                f"input), got {self.input_height}; a smaller image_size needs a smaller "
                f"input_height too (--set data.input_height=H)"
            )
        percent = self.validation_fraction * 100
        if not 0 <= self.validation_fraction < 1 or abs(percent - round(percent)) > 1e-9:
            raise ValueError(
                "validation_fraction must be a whole percent in [0, 1) (TFDS slices train by "
                f"whole percents), e.g. 0.1; got {self.validation_fraction}"
            )

    @property
    def validation_percent(self) -> int:
        """`validation_fraction` as the integer percent used in TFDS split slicing."""
        return round(self.validation_fraction * 100)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Options of `keras_glas.models.unet.build_unet` (the seed's U-Net by default)."""

    name: Literal["unet"] = "unet"
    base_filters: int = 64
    depth: int = 4
    batch_norm: bool = False
    dropout: float = 0.0
    contour_head: bool = False

    def __post_init__(self):
        _check_positive(base_filters=self.base_filters, depth=self.depth)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _check_maskrcnn_config(self):
    _check_positive(num_classes=self.num_classes)


# One field per option of `build_maskrcnn`, the head options (widths, anchors, sampling, NMS)
# taken with their types and defaults from the model's `DEFAULT_OPTIONS`, so the two never
# disagree.
MaskRCNNConfig = dataclasses.make_dataclass(
    "MaskRCNNConfig",
    [
        ("name", Literal["maskrcnn"], "maskrcnn"),
        ("backbone", str, "resnet50"),
        ("backbone_weights", str | None, None),
        ("num_classes", int, 1),
        *[(key, type(value), value) for key, value in MASKRCNN_HEAD_OPTIONS.items()],
    ],
    frozen=True,
    namespace={
        "__doc__": "Options of `keras_glas.models.maskrcnn.build_maskrcnn` (ResNet-50-FPN by "
                   "default). `backbone_weights` is a local weights file (or a preset name where "
                   "the machine is online); `None` is random initialisation. The other keys "
                   "are the model's `DEFAULT_OPTIONS`.",
        "__post_init__": _check_maskrcnn_config,
        "__module__": __name__,
    },
)


ModelConfig = UNetConfig | MaskRCNNConfig


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """A second training stage run after the main one, from its final weights, with a new
    optimizer (the seed fine-tuned its U-Net with Adam)."""

    epochs: int
    optimizer: OPTIMIZERS = "adam"
    learning_rate: float = 1e-5
    weight_decay: float = 0.0

    def __post_init__(self):
        _check_positive(epochs=self.epochs, learning_rate=self.learning_rate)
        _check_non_negative(weight_decay=self.weight_decay)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe.

    `weight_decay` is the optimizer's own decay (Keras applies it to the weights directly,
    `w -= lr * weight_decay * w`, which for plain SGD is the L2 penalty of PyTorch's
    `weight_decay`). `loss` applies to the U-Net only (Mask R-CNN computes its own losses).
    `monitor` defaults to `val_loss` (U-Net) or `val_mask_loss` (Mask R-CNN), or `loss` when
    there is no validation split. `early_stopping_patience: null` disables early stopping.
    `precision: auto` is mixed_float16 on a GPU, mixed_bfloat16 on a CPU with bf16
    instructions and float32 elsewhere. `glas_metrics_every: N` scores the validation images
    with the GlaS metrics every N epochs (`keras_glas.callbacks.GlasMetricsCallback`: logged as
    `val_glas_f1`, `val_glas_object_dice`, `val_glas_object_hausdorff`, usable as `monitor`);
    `null` switches it off. `jit_compile` is passed to `Model.compile`: `auto` is Keras's
    choice (XLA on a GPU, off on a CPU); `true` compiles the U-Net's train step with XLA, which
    on an AVX2 CPU in float32 is ~25% faster a step (README: performance). Mask R-CNN's train
    step runs TensorFlow's CombinedNonMaxSuppression, which has no XLA kernel, so it takes
    `auto` or `false` only. `export_checkpoint` is the checkpoint `keras_glas.export` takes
    unless `--checkpoint` says otherwise: `best` (the best `monitor` so far) or `last` (the
    end of training, for a schedule fixed in advance, e.g. cosine to 0).
    `export_test_time_flips` (U-Net only) is `keras_glas.export`'s default for
    `--test-time-flips`: the SavedModel averages the maps over the four flips of each image.
    The validation GlaS metrics of training score without flips, at a quarter of the cost.
    `contour_gap: g` (U-Net with `contour_head` only) widens the contour head's target from the
    gland boundaries to the whole of every gap of at most g input pixels between two glands
    (`keras_glas.data.contour_map`); 0 = boundaries only.
    `ema_momentum: m` keeps an exponential moving average of the weights in every stage's
    optimizer (Keras `use_ema`, `average = m * average + (1 - m) * weights` each step, so it
    spans ~1 / (1 - m) steps); validation, the GlaS metrics, the checkpoints and so the
    exported model use the average, while training goes on from the raw weights. `null`: off.
    """

    epochs: int = 900
    steps_per_epoch: int | None = None
    optimizer: OPTIMIZERS = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine", "plateau"] = "constant"
    loss: Literal["bce", "dice", "bce_dice", "weighted_bce"] = "bce"
    contour_gap: int = 0
    early_stopping_patience: int | None = None
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"
    jit_compile: Literal["auto"] | bool = "auto"
    seed: int = 0
    monitor: str | None = None
    export_checkpoint: Literal["best", "last"] = "best"
    export_test_time_flips: bool = False
    glas_metrics_every: int | None = 1
    ema_momentum: float | None = None
    finetune: FinetuneConfig | None = None

    def __post_init__(self):
        _check_positive(epochs=self.epochs, learning_rate=self.learning_rate)
        if self.steps_per_epoch is not None:
            _check_positive(steps_per_epoch=self.steps_per_epoch)
        if self.glas_metrics_every is not None:
            _check_positive(glas_metrics_every=self.glas_metrics_every)
        if self.early_stopping_patience is not None:
            _check_positive(early_stopping_patience=self.early_stopping_patience)
        _check_non_negative(momentum=self.momentum, weight_decay=self.weight_decay)
        if not 0 <= self.contour_gap <= BORDER_MAX_DISTANCE:
            raise ValueError(
                f"contour_gap must be in 0..{BORDER_MAX_DISTANCE} (pixels of the network "
                f"input), got {self.contour_gap}"
            )
        if self.ema_momentum is not None and not 0.0 < self.ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in (0, 1) or null, got {self.ema_momentum}")


@dataclasses.dataclass(frozen=True)
class Config:
    """A complete, validated training configuration."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=UNetConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    postprocess: PostprocessOptions = dataclasses.field(default_factory=PostprocessOptions)


def _check_positive(**values):
    for key, value in values.items():
        if value <= 0:
            raise ValueError(f"{key} must be > 0, got {value}")


def _check_non_negative(**values):
    for key, value in values.items():
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float (YAML 1.1 insists on `1.0e-5`)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _Sources:
    """Where each dotted key came from, for error messages (the file unless overridden)."""

    def __init__(self, path):
        self.path = str(path) if path is not None else "<defaults>"
        self.overrides = {}

    def of(self, key):
        """The source of `key`: the `--set` that set it (or a parent), else the file, naming
        the `--set`s that changed keys inside it."""
        for override_key, text in self.overrides.items():
            if key == override_key or key.startswith(override_key + "."):
                return f"--set {text}"
        inside = [f"--set {text}" for override_key, text in self.overrides.items()
                  if override_key.startswith(key + ".")]
        return " with ".join([self.path, *inside])

    def of_new_key(self, key):
        """The source of a key that may not exist in the file: the `--set` that created it
        (at or below `key`), else the file."""
        for override_key, text in self.overrides.items():
            if override_key == key or override_key.startswith(key + "."):
                return f"--set {text}"
        return self.of(key)


def parse_override(text: str) -> tuple[list[str], object]:
    """Splits `"section.key=value"` into (`["section", "key"]`, value parsed as a YAML scalar)."""
    key, sep, raw_value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(
            f"--set {text!r}: expected section.key=value (e.g. model.base_filters=16)"
        )
    try:
        value = yaml.load(raw_value, Loader=_YamlLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {error}") from None
    return parts, value


def load_config(path: str | os.PathLike | None, overrides=()) -> Config:
    """Reads a YAML config, applies `section.key=value` overrides and validates the result.

    Args:
        path: YAML file, or None for the built-in defaults.
        overrides: iterable of `"section.key=value"` strings, applied in order.

    Returns:
        A frozen `Config`.

    Raises:
        ConfigError: unreadable YAML, unknown key (the message lists the valid ones), wrong
            type or out-of-range value; the message names the file or the `--set` flag.
    """
    sources = _Sources(path)
    raw = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
        try:
            raw = yaml.load(text, Loader=_YamlLoader) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for text in overrides:
        parts, value = parse_override(text)
        sources.overrides[".".join(parts)] = text
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return _to_config(raw, sources)


def _to_config(raw: dict, sources: _Sources) -> Config:
    sections = {field.name: field for field in dataclasses.fields(Config)}
    _reject_unknown(raw, sections, "", sources)
    values = {}
    for name, value in raw.items():
        if value is None:
            continue
        if name == "model":
            values[name] = _to_model_config(value, sources)
        else:
            values[name] = _convert(value, typing.get_type_hints(Config)[name], name, sources)
    config = Config(**values)
    if config.model.name == "maskrcnn" and config.train.jit_compile is True:
        raise ConfigError(
            f"{sources.of('train.jit_compile')}: train.jit_compile=true applies to the U-Net "
            "only: Mask R-CNN's train step runs CombinedNonMaxSuppression, which XLA cannot "
            "compile. Use auto or false"
        )
    if config.model.name == "maskrcnn" and config.train.export_test_time_flips:
        raise ConfigError(
            f"{sources.of('train.export_test_time_flips')}: train.export_test_time_flips "
            "applies to the U-Net only: averaging Mask R-CNN's instances over flips is not "
            "defined. Set it to false"
        )
    if config.train.contour_gap and not (
        config.model.name == "unet" and config.model.contour_head
    ):
        raise ConfigError(
            f"{sources.of('train.contour_gap')}: train.contour_gap shapes the target of the "
            "U-Net's contour head: set model.contour_head=true, or contour_gap to 0"
        )
    if config.model.name == "unet":
        _check_unet_input_divisible(config, sources)
    return config


def _check_unet_input_divisible(config: Config, sources: _Sources) -> None:
    """The U-Net's `depth` poolings halve the input that many times, and its decoder must meet
    every skip at the same size: training inputs must be multiples of 2**depth (the exported
    model pads test images itself)."""
    stride = 2**config.model.depth
    for key, size in (("data.image_size", config.data.image_size),
                      ("data.input_height", config.data.input_height)):
        if size is not None and size % stride:
            lower = max(size // stride, 1) * stride
            raise ConfigError(
                f"{sources.of(key)}: {key}={size} is not a multiple of 2**model.depth = "
                f"{stride}, as the U-Net's training inputs must be; use {lower} or "
                f"{lower + stride} (--set {key}=...)"
            )


def _to_model_config(raw, sources: _Sources) -> ModelConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{sources.of('model')}: 'model' must be a mapping, got {raw!r}")
    name = raw.get("name", "unet")
    classes = {"unet": UNetConfig, "maskrcnn": MaskRCNNConfig}
    if name not in classes:
        raise ConfigError(
            f"{sources.of('model.name')}: model.name must be one of {', '.join(MODEL_NAMES)}, "
            f"got {name!r}"
        )
    return _convert(raw, classes[name], "model", sources)


def _reject_unknown(raw: dict, fields: dict, prefix: str, sources: _Sources):
    for key in raw:
        if key not in fields:
            dotted = f"{prefix}{key}"
            where = f"section '{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(
                f"{sources.of_new_key(dotted)}: unknown key '{dotted}'. Valid keys in {where}: "
                f"{', '.join(fields)}"
            )


def _type_name(type_) -> str:
    if typing.get_origin(type_) is Literal:
        return " | ".join(repr(arg) for arg in typing.get_args(type_))
    if typing.get_origin(type_) in (typing.Union, types.UnionType):
        return " | ".join("null" if arg is type(None) else _type_name(arg)
                          for arg in typing.get_args(type_))
    if dataclasses.is_dataclass(type_):
        return f"a mapping ({type_.__name__})"
    return getattr(type_, "__name__", None) or str(type_).replace("typing.", "")


def _convert(value, type_, key: str, sources: _Sources):
    """Checks `value` against the annotation `type_` and converts it (dicts → dataclasses,
    lists → tuples, ints → floats)."""

    def wrong_type(expected=None):
        return ConfigError(
            f"{sources.of(key)}: '{key}' must be {expected or _type_name(type_)}, "
            f"got {value!r} ({type(value).__name__})"
        )

    origin = typing.get_origin(type_)
    if dataclasses.is_dataclass(type_):
        if not isinstance(value, dict):
            raise wrong_type()
        fields = {field.name: field for field in dataclasses.fields(type_)}
        _reject_unknown(value, fields, key + ".", sources)
        hints = typing.get_type_hints(type_)
        converted = {
            name: _convert(item, hints[name], f"{key}.{name}", sources)
            for name, item in value.items()
        }
        try:
            return type_(**converted)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{sources.of(key)}: invalid '{key}': {error}") from None
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(type_)
        if value is None:
            if type(None) in options:
                return None
            raise wrong_type()
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key, sources)
            except ConfigError:
                if len(options) == 2 and type(None) in options:
                    raise
        raise wrong_type()
    if origin is Literal:
        if value not in typing.get_args(type_):
            raise wrong_type(f"one of {_type_name(type_)}")
        return value
    if type_ is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong_type("a list")
        args = typing.get_args(type_) or (typing.Any, Ellipsis)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) != len(value):
            raise wrong_type(f"a list of {len(args)} values")
        return tuple(
            _convert(item, arg, f"{key}[{index}]", sources)
            for index, (item, arg) in enumerate(zip(value, args, strict=True))
        )
    if type_ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong_type("a number (float)")
        return float(value)
    if type_ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong_type("an integer")
        return value
    if type_ in (bool, str):
        if not isinstance(value, type_):
            raise wrong_type("true or false" if type_ is bool else "a string")
        return value
    if type_ is typing.Any or (isinstance(type_, type) and isinstance(value, type_)):
        return value
    raise wrong_type()


def config_to_dict(config: Config) -> dict:
    """The config as plain YAML-safe data (nested dicts, lists, scalars)."""

    def plain(value):
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: Config, path: str | os.PathLike):
    """Writes `config` as YAML to `path` atomically (temp file in the same dir, then rename).

    `load_config(path)` gives back an equal `Config`.
    """
    write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False,
                                    default_flow_style=False))
