"""keras_glas.config: YAML → typed dataclasses, overrides, validation with clear errors."""
from pathlib import Path

import pytest

from keras_glas.augment import AugmentOptions
from keras_glas.config import (
    Config,
    ConfigError,
    MaskRCNNConfig,
    UNetConfig,
    load_config,
    parse_override,
    save_config,
)
from keras_glas.postprocess import PostprocessOptions

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unet_yaml_is_the_seed_recipe():
    config = load_config(CONFIGS / "unet.yaml")
    assert isinstance(config.model, UNetConfig)
    assert (config.model.base_filters, config.model.depth) == (64, 4)
    assert (config.data.image_size, config.data.batch_size) == (512, 6)
    train = config.train
    assert (train.optimizer, train.learning_rate, train.weight_decay) == ("sgd", 0.1, 1e-5)
    assert (train.epochs, train.loss) == (900, "bce")
    finetune = train.finetune
    assert (finetune.epochs, finetune.optimizer, finetune.learning_rate,
            finetune.weight_decay) == (50, "adam", 1e-5, 1e-3)
    assert config.data.augment.flip and config.data.augment.crop
    assert config.data.augment.crop_probability == 0.5
    assert not (config.data.augment.elastic or config.data.augment.stain_jitter)
    assert config.postprocess == PostprocessOptions()


def test_maskrcnn_yaml_is_the_seed_recipe():
    config = load_config(CONFIGS / "maskrcnn.yaml")
    assert isinstance(config.model, MaskRCNNConfig)
    assert config.model.backbone == "resnet50"
    train = config.train
    assert (train.optimizer, train.momentum, train.learning_rate, train.weight_decay) == (
        "sgd", 0.9, 5e-3, 5e-4)
    assert (config.data.batch_size, train.epochs, train.monitor) == (2, 500, "val_mask_loss")
    assert train.finetune is None


def test_missing_keys_take_the_defaults(tmp_path):
    config = load_config(write(tmp_path, "train:\n  epochs: 3\n"))
    assert config == Config(train=Config().train.__class__(epochs=3))


def test_unknown_key_lists_the_valid_ones_and_names_the_file(tmp_path):
    path = write(tmp_path, "data:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message and "data.batch_sise" in message
    for key in ("dataset", "batch_size", "image_size", "validation_fraction", "augment"):
        assert key in message


def test_unknown_section_and_nested_key(tmp_path):
    with pytest.raises(ConfigError, match="Valid keys in the top level: data, model, train, "
                                          "postprocess"):
        load_config(write(tmp_path, "training:\n  epochs: 3\n"))
    with pytest.raises(ConfigError, match=r"data\.augment\.blur.*elastic"):
        load_config(None, ["data.augment.blur=true"])


def test_model_keys_depend_on_the_model_name(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.backbone.*base_filters"):
        load_config(None, ["model.backbone=resnet18"])
    config = load_config(write(tmp_path, "model:\n  name: maskrcnn\n  backbone: resnet18\n"))
    assert config.model == MaskRCNNConfig(backbone="resnet18")
    with pytest.raises(ConfigError, match="model.name must be one of unet, maskrcnn"):
        load_config(None, ["model.name=fcn"])


def test_wrong_type_names_key_expected_type_and_file(tmp_path):
    path = write(tmp_path, "train:\n  epochs: ten\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value)
    assert "'train.epochs' must be an integer" in str(error.value)
    with pytest.raises(ConfigError, match="'data.cache' must be true or false, got 1"):
        load_config(None, ["data.cache=1"])
    with pytest.raises(ConfigError, match="'train.optimizer' must be one of 'sgd'"):
        load_config(write(tmp_path, "train:\n  optimizer: rmsprop\n"))
    with pytest.raises(ConfigError, match=r"--set train\.learning_rate=fast"):
        load_config(None, ["train.learning_rate=fast"])


def test_out_of_range_values_are_errors():
    with pytest.raises(ConfigError, match="batch_size must be > 0"):
        load_config(None, ["data.batch_size=0"])
    with pytest.raises(ConfigError, match="whole percent"):
        load_config(None, ["data.validation_fraction=0.125"])
    with pytest.raises(ConfigError, match="input_height must be in 1..image_size"):
        load_config(None, ["data.image_size=64", "data.input_height=96"])
    with pytest.raises(ConfigError, match="threshold"):
        load_config(None, ["postprocess.threshold=1.5"])
    with pytest.raises(ConfigError, match=r"ema_momentum must be in \(0, 1\) or null, got 1"):
        load_config(None, ["train.ema_momentum=1"])
    assert load_config(None, ["train.ema_momentum=0.99"]).train.ema_momentum == 0.99


def test_unet_inputs_must_be_multiples_of_its_pooling_stride(tmp_path):
    with pytest.raises(ConfigError, match=r"--set data\.input_height=270: data\.input_height=270 "
                                          r"is not a multiple of 2\*\*model\.depth = 16"
                                          r".*use 256 or 272"):
        load_config(None, ["data.image_size=384", "data.input_height=270"])
    path = write(tmp_path, "data:\n  image_size: 90\nmodel:\n  name: unet\n  depth: 2\n")
    with pytest.raises(ConfigError, match=rf"{path}: data\.image_size=90 is not a multiple of "
                                          r"2\*\*model\.depth = 4, .*use 88 or 92"):
        load_config(path)
    assert load_config(path, ["model.depth=1"]).data.image_size == 90  # 90 = 45 * 2
    # Mask R-CNN pads its inputs to its FPN stride itself.
    assert load_config(None, ["model.name=maskrcnn", "data.image_size=90"]).data.image_size == 90


def test_override_values_are_yaml_scalars():
    assert parse_override("train.learning_rate=1e-5") == (["train", "learning_rate"], 1e-5)
    assert parse_override("data.data_dir=null") == (["data", "data_dir"], None)
    assert parse_override("data.augment.elastic=true") == (["data", "augment", "elastic"], True)
    assert parse_override("data.augment.scale_range=[0.8, 1.25]")[1] == [0.8, 1.25]
    assert parse_override("data.dataset=glas/synthetic")[1] == "glas/synthetic"
    for bad in ("epochs=3", "train.epochs", "train..epochs=3"):
        with pytest.raises(ConfigError, match="section.key=value"):
            parse_override(bad)


def test_overrides_apply_in_order_and_create_sections(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n  learning_rate: 0.1\n")
    config = load_config(path, [
        "train.epochs=5",
        "train.epochs=7",
        "train.learning_rate=2",
        "data.augment.elastic=true",
        "data.augment.scale_range=[0.8, 1.25]",
        "train.finetune.epochs=2",
    ])
    assert config.train.epochs == 7
    assert config.train.learning_rate == 2.0 and isinstance(config.train.learning_rate, float)
    assert config.data.augment == AugmentOptions(elastic=True, scale_range=(0.8, 1.25))
    assert config.train.finetune.epochs == 2 and config.train.finetune.optimizer == "adam"
    assert load_config(path, ["train.finetune=null"]).train.finetune is None


def test_save_then_load_gives_the_same_config(tmp_path):
    config = load_config(CONFIGS / "unet.yaml", ["data.augment.scale_range=[0.5, 2]",
                                                 "model.contour_head=true"])
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_jit_compile_is_auto_or_a_bool_and_unet_only_when_forced(tmp_path):
    assert load_config(None).train.jit_compile == "auto"
    assert load_config(None, ["train.jit_compile=true"]).train.jit_compile is True
    assert load_config(None, ["train.jit_compile=false"]).train.jit_compile is False
    with pytest.raises(ConfigError, match=r"'train\.jit_compile' must be .*'auto'.*bool"):
        load_config(None, ["train.jit_compile=yes_please"])
    with pytest.raises(ConfigError, match=r"'train\.jit_compile' must be"):
        load_config(None, ["train.jit_compile=1"])
    path = write(tmp_path, "model:\n  name: maskrcnn\ntrain:\n  jit_compile: true\n")
    with pytest.raises(ConfigError, match=rf"{path}.*U-Net only.*auto or false"):
        load_config(path)
    assert load_config(path, ["train.jit_compile=auto"]).train.jit_compile == "auto"


def test_contour_gap_needs_the_unet_contour_head_and_a_reachable_width(tmp_path):
    assert load_config(None).train.contour_gap == 0
    path = write(tmp_path, "model:\n  contour_head: true\n")
    assert load_config(path, ["train.contour_gap=8"]).train.contour_gap == 8
    with pytest.raises(ConfigError, match=r"--set train\.contour_gap=8.*model\.contour_head=true"):
        load_config(None, ["train.contour_gap=8"])
    with pytest.raises(ConfigError, match=r"contour_gap must be in 0\.\.20.*got 21"):
        load_config(path, ["train.contour_gap=21"])
    with pytest.raises(ConfigError, match=r"contour_gap must be in 0\.\.20.*got -1"):
        load_config(path, ["train.contour_gap=-1"])


def test_export_test_time_flips_is_a_bool_for_the_unet_only(tmp_path):
    assert load_config(None).train.export_test_time_flips is False
    assert load_config(None, ["train.export_test_time_flips=true"]).train.export_test_time_flips
    path = write(tmp_path, "model:\n  name: maskrcnn\ntrain:\n  export_test_time_flips: true\n")
    with pytest.raises(ConfigError, match=rf"{path}.*U-Net only.*Set it to false"):
        load_config(path)
    flips_off = load_config(path, ["train.export_test_time_flips=false"])
    assert flips_off.train.export_test_time_flips is False
