"""U-Net: the seed configuration's size, shapes, options and mixed precision."""
import keras
import numpy as np
import pytest

from keras_glas.losses import get_loss
from keras_glas.models.unet import build_unet


def test_seed_configuration_parameter_count_and_bottleneck():
    # Hand count for base 64, depth 4, one head (3x3 conv: 9*cin*cout + cout; 2x2 transposed
    # conv: 4*cin*cout + cout; 1x1 head: 64 + 1):
    #   encoder1 (3->64, 64->64)          1,792 +    36,928 =     38,720
    #   encoder2 (64->128, 128->128)     73,856 +   147,584 =    221,440
    #   encoder3 (128->256, 256->256)   295,168 +   590,080 =    885,248
    #   encoder4 (256->512, 512->512) 1,180,160 + 2,359,808 =  3,539,968
    #   bottleneck (512->1024, 1024->1024)
    #                                 4,719,616 + 9,438,208 = 14,157,824
    #   decoder4 up 1024->512, conv 1024->512, 512->512
    #                     2,097,664 + 4,719,104 + 2,359,808 =  9,176,576
    #   decoder3 up 512->256, conv 512->256, 256->256
    #                       524,544 + 1,179,904 +   590,080 =  2,294,528
    #   decoder2 up 256->128, conv 256->128, 128->128
    #                       131,200 +   295,040 +   147,584 =    573,824
    #   decoder1 up 128->64, conv 128->64, 64->64
    #                        32,832 +    73,792 +    36,928 =    143,552
    #   head 64->1                                                    65
    #   total                                                 31,031,745  (~31 M, the seed's)
    model = build_unet((512, 512, 3))
    assert model.count_params() == 31_031_745
    assert model.get_layer("bottleneck_relu2").output.shape == (None, 32, 32, 1024)
    assert model.output["mask"].shape == (None, 512, 512, 1)
    # The contour head adds one more 1x1 conv (65 parameters).
    assert build_unet((512, 512, 3), contour_head=True).count_params() == 31_031_745 + 65


@pytest.mark.parametrize("height,width", [(48, 80), (16, 112)])
def test_any_size_divisible_by_two_to_the_depth(height, width):
    model = build_unet(base_filters=4, depth=4, contour_head=True)
    images = np.random.default_rng(0).random((2, height, width, 3), dtype=np.float32)
    outputs = model(images)
    assert set(outputs) == {"mask", "contour"}
    for value in outputs.values():
        value = keras.ops.convert_to_numpy(value)
        assert value.shape == (2, height, width, 1)
        assert np.all((value >= 0) & (value <= 1))


def test_static_size_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match=r"width 100 is not divisible by 2\*\*depth = 8"):
        build_unet((96, 100, 3), depth=3)
    with pytest.raises(ValueError, match="dropout"):
        build_unet(dropout=1.0)


def test_options_batch_norm_dropout_depth():
    model = build_unet((32, 32, 3), base_filters=4, depth=2, batch_norm=True, dropout=0.5)
    names = {layer.name for layer in model.layers}
    assert {"encoder1_bn1", "bottleneck_bn2", "encoder2_dropout", "bottleneck_dropout"} <= names
    assert "encoder3_conv1" not in names
    assert model.get_layer("bottleneck_relu2").output.shape == (None, 8, 8, 16)
    # No conv bias in front of batch norm.
    assert not model.get_layer("encoder1_conv1").use_bias


def test_mixed_bfloat16_gives_float32_outputs_and_finite_loss():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_unet((32, 32, 3), base_filters=4, depth=2, contour_head=True)
        assert model.get_layer("encoder1_conv1").compute_dtype == "bfloat16"
        rng = np.random.default_rng(1)
        images = rng.random((2, 32, 32, 3), dtype=np.float32)
        targets = (rng.random((2, 32, 32, 1)) > 0.5).astype(np.float32)
        outputs = model(images)
        for value in outputs.values():
            assert keras.backend.standardize_dtype(value.dtype) == "float32"
        for name in ("bce", "dice", "bce_dice"):
            loss = float(get_loss(name)(targets, outputs["mask"]))
            assert np.isfinite(loss) and loss > 0
    finally:
        keras.config.set_dtype_policy(previous)
    assert keras.config.dtype_policy().name == previous.name
