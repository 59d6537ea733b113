"""Mask R-CNN learns: a tiny model overfits a few synthetic images and segments their glands."""
import keras
import numpy as np
import tensorflow as tf

from keras_glas.models.maskrcnn import build_maskrcnn
from test_maskrcnn_model import TINY, glands

SIZE = 64


def best_iou(truth, instances):
    """IoU of the boolean mask `truth` with the predicted instance overlapping it most."""
    ids, counts = np.unique(instances[truth], return_counts=True)
    counts, ids = counts[ids > 0], ids[ids > 0]
    if not len(ids):
        return 0.0
    predicted = instances == ids[np.argmax(counts)]
    return (predicted & truth).sum() / (predicted | truth).sum()


def test_overfits_a_few_images_and_segments_their_glands():
    keras.utils.set_random_seed(0)
    model = build_maskrcnn("resnet_tiny", **{**TINY, "anchor_sizes": (8, 16, 32, 64, 128)})
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    images, y = glands(4, SIZE, per_image=3, seed=5)
    data = tf.data.Dataset.from_tensor_slices((images, y)).repeat().batch(2)
    history = model.fit(data, steps_per_epoch=50, epochs=4, verbose=0).history
    assert history["loss"][-1] < 0.5 * history["loss"][0]

    instances = model.infer(images)["instances"].numpy()
    ious = [best_iou(y["instances"][i] == k, instances[i])
            for i in range(len(images)) for k in range(1, 4)]
    assert np.mean(np.array(ious) > 0.5) >= 0.75, ious
