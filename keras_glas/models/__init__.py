"""Model factory: one `model` config section → a `keras.Model`."""
import dataclasses


def build_model(model_config):
    """Builds the model a `keras_glas.config.UNetConfig` / `MaskRCNNConfig` describes.

    Args:
        model_config: the `model` section of a `keras_glas.config.Config`.

    Returns:
        The U-Net (functional, images float32 (B, H, W, 3) in [0, 1] of any H, W divisible by
        2**depth → `{"mask": (B, H, W, 1)}` [+ `"contour"`]) or the Mask R-CNN (`MaskRCNN`
        subclass of `keras.Model`), uncompiled. Call it inside `strategy.scope()` and after
        setting the dtype policy.
    """
    options = {
        field.name: getattr(model_config, field.name)
        for field in dataclasses.fields(model_config)
        if field.name != "name"
    }
    # Imported here so that building one model does not import (and trace) the other.
    if model_config.name == "unet":
        from keras_glas.models.unet import build_unet

        return build_unet(input_shape=(None, None, 3), **options)
    if model_config.name == "maskrcnn":
        from keras_glas.models.maskrcnn import build_maskrcnn

        return build_maskrcnn(**options)
    raise ValueError(f"unknown model name {model_config.name!r}; expected unet or maskrcnn")
