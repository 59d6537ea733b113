"""ResNet backbone (KerasCV `ResNetBackbone`) + FPN P2-P6, and backbone weight loading.

Backbone weight sources (`backbone_weights=`):
- a `.weights.h5` file written by `ResNetBackbone.save_weights` for the same backbone;
- a Keras-applications ResNet50 `.h5` file
  (e.g. `resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`,
  or any `keras.applications.ResNet50` saved in legacy HDF5), mapped layer by layer
  (`convS_blockB_i_conv/bn` -> `v2_stack_{S-2}_blockB_i_conv/bn`); the applications' conv biases
  are folded into the following batch norm's moving mean (KerasCV convs have no bias), and the
  first conv is rewritten for this model's RGB ImageNet-normalised inputs instead of the
  applications' BGR "caffe" inputs. Only "resnet50" has such a file. KerasCV pads conv1/pool1
  "same" where applications pads 3/1 pixels explicitly, a shift of at most one pixel that
  fine-tuning absorbs;
- a KerasCV preset name (e.g. "resnet50_imagenet"), downloaded from Kaggle: works online only
  (its [0, 1]-input stem is rewritten for the normalised inputs the same way).
"""
import os

import keras
import keras_cv
import numpy as np

# Architectures of `ResNetBackbone` by name; "resnet_tiny" is a narrow bottleneck ResNet-14 for
# tests (KerasCV's basic-block stacks require 64 filters in the first stage).
BACKBONES = {
    "resnet50": {"stackwise_filters": [64, 128, 256, 512], "stackwise_blocks": [3, 4, 6, 3],
                 "block_type": "block"},
    "resnet18": {"stackwise_filters": [64, 128, 256, 512], "stackwise_blocks": [2, 2, 2, 2],
                 "block_type": "basic_block"},
    "resnet_tiny": {"stackwise_filters": [16, 32, 64, 128], "stackwise_blocks": [1, 1, 1, 1],
                    "block_type": "block"},
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel mean Keras-applications ResNet50 ("caffe" preprocessing) subtracts, BGR order.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
FPN_LEVELS = (2, 3, 4, 5, 6)


def build_resnet(name):
    """A randomly initialised KerasCV `ResNetBackbone` for images of any size."""
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is not one of {sorted(BACKBONES)}")
    return keras_cv.models.ResNetBackbone(
        stackwise_strides=[1, 2, 2, 2], include_rescaling=False, input_shape=(None, None, 3),
        name=name, **BACKBONES[name],
    )


def build_feature_model(resnet, fpn_channels):
    """Functional model: normalised images (B, H, W, 3), H and W multiples of 32 -> [P2..P6].

    FPN (Lin et al. 2017): 1x1 lateral convs on the four ResNet stage outputs, nearest 2x
    top-down upsampling and addition, a 3x3 conv per level; P6 is P5 subsampled by 2 (as in
    Mask R-CNN). Each output has `fpn_channels` channels and stride 2**level; dtype is the
    global policy's compute dtype. (KerasCV's `FeaturePyramid` computes the same but keeps its
    layers in int-keyed dicts, which `tf.saved_model.save` cannot serialise.)
    """
    levels = sorted(int(key[1:]) for key in resnet.pyramid_level_inputs)
    stages = keras.Model(
        resnet.inputs,
        [resnet.get_layer(resnet.pyramid_level_inputs[f"P{level}"]).output for level in levels],
        name=f"{resnet.name}_stages",
    )
    images = keras.Input((None, None, 3), name="images")
    merged = None
    outputs = []
    for level, stage in reversed(list(zip(levels, stages(images), strict=True))):
        lateral = keras.layers.Conv2D(fpn_channels, 1, name=f"fpn_lateral_P{level}")(stage)
        if merged is not None:
            upsampled = keras.layers.UpSampling2D(2, name=f"fpn_upsample_P{level + 1}")(merged)
            lateral = keras.layers.Add(name=f"fpn_merge_P{level}")([lateral, upsampled])
        merged = lateral
        outputs.insert(0, keras.layers.Conv2D(fpn_channels, 3, padding="same",
                                              name=f"fpn_output_P{level}")(merged))
    outputs.append(keras.layers.MaxPooling2D(pool_size=1, strides=2, name="fpn_P6")(outputs[-1]))
    return keras.Model(images, outputs, name="backbone_fpn")


def load_backbone_weights(resnet, source):
    """Load pretrained weights into `resnet` (a `ResNetBackbone` from `build_resnet`).

    Args:
        resnet: the backbone to fill.
        source: path to a `.weights.h5` / Keras-applications `.h5` file, or a KerasCV preset name.
    """
    source = str(source)
    if source.endswith(".weights.h5"):
        _require_file(source)
        resnet.load_weights(source)
    elif source.endswith(".h5"):
        _require_file(source)
        _load_applications_resnet50(resnet, source)
    elif os.sep in source or os.path.splitext(source)[1]:
        raise ValueError(
            f"backbone_weights={source!r}: expected a .weights.h5 of the same backbone or a "
            "Keras-applications ResNet50 .h5 file"
        )
    else:
        try:
            preset = keras_cv.models.ResNetBackbone.from_preset(source, input_shape=(None, None, 3))
        except Exception as error:  # the hub raises many kinds of network/lookup errors
            raise RuntimeError(
                f"backbone_weights={source!r}: could not load this KerasCV preset ({error}). "
                "Presets download from Kaggle and fail offline; pass a local .weights.h5 or a "
                "Keras-applications ResNet50 .h5 file instead."
            ) from error
        resnet.set_weights(preset.get_weights())
        # KerasCV's ImageNet presets take RGB in [0, 1] (0..255 rescaled by the model).
        conv, bn = resnet.get_layer("conv1_conv"), resnet.get_layer("conv1_bn")
        kernel, bias = _fold_input_normalisation(conv.kernel.numpy(), 0.0, IMAGENET_STD,
                                                 IMAGENET_MEAN)
        conv.kernel.assign(kernel)
        bn.moving_mean.assign(bn.moving_mean.numpy() - bias)


def _require_file(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone_weights={path!r}: no such file")


def _applications_name(keras_cv_name):
    """`v2_stack_1_block2_3_conv` -> `conv3_block2_3_conv`; stem names are shared."""
    if not keras_cv_name.startswith("v2_stack_"):
        return keras_cv_name
    stack, rest = keras_cv_name[len("v2_stack_"):].split("_", 1)
    return f"conv{int(stack) + 2}_{rest}"


def _load_applications_resnet50(resnet, path):
    import h5py

    with h5py.File(path, "r") as file:
        group = file["model_weights"] if "model_weights" in file else file
        stored = {name: [group[name][w][()] for w in group[name].attrs["weight_names"]]
                  for name in group.attrs["layer_names"]}
        stored = {(n.decode() if isinstance(n, bytes) else n): v for n, v in stored.items()}
    conv_biases = {}
    for layer in resnet.layers:
        if isinstance(layer, keras.layers.Conv2D):
            weights = _stored_weights(stored, layer, path)
            kernel, bias = weights[0], (weights[1] if len(weights) > 1 else 0.0)
            if layer.name == "conv1_conv":
                # Applications' weights expect "caffe" inputs: BGR, 0..255, minus CAFFE_MEAN_BGR.
                kernel, bias = _fold_input_normalisation(
                    kernel[:, :, ::-1, :], bias, 255.0 * np.asarray(IMAGENET_STD),
                    255.0 * np.asarray(IMAGENET_MEAN) - np.asarray(CAFFE_MEAN_BGR[::-1]))
            layer.kernel.assign(kernel)
            conv_biases[layer.name[: -len("_conv")]] = bias
    for layer in resnet.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = _stored_weights(stored, layer, path)
            # BN(conv(x) + b) == BN'(conv(x)) with moving mean - b.
            bias = conv_biases.get(layer.name[: -len("_bn")], 0.0)
            for variable, value in zip((layer.gamma, layer.beta, layer.moving_mean,
                                        layer.moving_variance),
                                       (gamma, beta, mean - bias, variance), strict=True):
                variable.assign(value)


def _fold_input_normalisation(kernel, bias, scale, offset):
    """Rewrite a first conv trained on inputs `scale * z + offset` for this model's inputs z.

    This model feeds RGB z = (x - IMAGENET_MEAN) / IMAGENET_STD with x in [0, 1]; a conv on
    `scale * z + offset` (per input channel) equals, away from the zero-padded border, a conv
    on z with the kernel scaled per input channel and the constant part moved into the bias.

    Args:
        kernel: float32 (kh, kw, 3, F) in this model's RGB input-channel order.
        bias: float32 (F,) or 0.
        scale, offset: float (3,) per RGB channel.

    Returns:
        (kernel (kh, kw, 3, F), bias (F,)).
    """
    bias = bias + np.einsum("hwcf,c->f", kernel, np.asarray(offset))
    return kernel * np.asarray(scale)[None, None, :, None], bias


def _stored_weights(stored, layer, path):
    name = _applications_name(layer.name)
    if name not in stored or not stored[name]:
        raise ValueError(
            f"{path}: no weights for layer {name!r}; expected Keras-applications ResNet50 weights "
            "(use backbone='resnet50')"
        )
    return stored[name]
