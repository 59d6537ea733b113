"""Prediction CLI: instance maps and overlays per image, unreadable files reported and skipped."""
import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_glas import export, predict
from keras_glas.models.unet import build_unet


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    keras.utils.set_random_seed(3)
    out_dir = tmp_path_factory.mktemp("predict") / "saved_model"
    return export.export_model(build_unet(base_filters=4, depth=2), out_dir)


def test_predict_cli_skips_a_corrupt_file_and_writes_the_others(saved_model, tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = {"a.png": rng.integers(0, 256, (37, 50, 3), dtype=np.uint8),
              "b.bmp": rng.integers(0, 256, (48, 41, 3), dtype=np.uint8)}
    for name, image in images.items():
        Image.fromarray(image).save(tmp_path / name)
    corrupt = tmp_path / "broken.bmp"
    corrupt.write_bytes(b"BM" + bytes(100))
    out = tmp_path / "out"

    status = predict.main([str(saved_model), str(tmp_path / "a.png"), str(corrupt),
                           str(tmp_path / "b.bmp"), "--out", str(out)])

    assert status == 1
    assert "broken.bmp" in capsys.readouterr().err
    assert sorted(path.name for path in out.iterdir()) == [
        "a_instances.png", "a_overlay.png", "b_instances.png", "b_overlay.png"]
    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    for name, image in images.items():
        stem = name.split(".")[0]
        instances = cv2.imread(str(out / f"{stem}_instances.png"), cv2.IMREAD_UNCHANGED)
        assert instances.dtype == np.uint16
        expected = serve(images=tf.constant(image[None]))["instances"][0].numpy()
        np.testing.assert_array_equal(instances, expected)
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        assert overlay.shape == image.shape and overlay.dtype == np.uint8
        np.testing.assert_array_equal(overlay[expected == 0], image[expected == 0])


def test_predict_cli_all_good_exits_zero_and_rejects_name_clashes(saved_model, tmp_path):
    image = np.full((20, 24, 3), 128, np.uint8)
    (tmp_path / "x").mkdir()
    for path in (tmp_path / "one.png", tmp_path / "x" / "one.jpg"):
        Image.fromarray(image).save(path)
    assert predict.main([str(saved_model), str(tmp_path / "one.png"), "--out",
                         str(tmp_path / "out")]) == 0
    with pytest.raises(SystemExit) as clash:
        predict.main([str(saved_model), str(tmp_path / "one.png"), str(tmp_path / "x" / "one.jpg"),
                      "--out", str(tmp_path / "out2")])
    assert clash.value.code == 2


def test_colour_overlay_tints_instances_and_keeps_background():
    image = np.full((10, 12, 3), 100, np.uint8)
    instances = np.zeros((10, 12), np.int32)
    instances[2:6, 2:6] = 1
    instances[6:9, 7:11] = 2
    overlay = predict.colour_overlay(image, instances)
    assert overlay.dtype == np.uint8 and overlay.shape == image.shape
    np.testing.assert_array_equal(overlay[instances == 0], image[instances == 0])
    assert (overlay[instances > 0] != 100).any(axis=-1).all()
    assert not np.array_equal(overlay[3, 3], overlay[7, 8])  # different glands, different colours
