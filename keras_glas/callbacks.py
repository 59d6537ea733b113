"""Training callbacks: the GlaS challenge metrics of the validation images, every few epochs.

Losses and pixel IoU say little about what GlaS scores: a few specks or two merged glands
barely move them and cost a lot of object F1. `GlasMetricsCallback` (in the spirit of KerasCV's
`PyCOCOCallback`) scores the model being trained the way `keras_glas.evaluate` scores an
exported SavedModel, so the learning curve, TensorBoard and model selection can use the
challenge's own numbers.
"""
import dataclasses

import keras
import tensorflow as tf

from keras_glas import metrics
from keras_glas.evaluate import predict_split
from keras_glas.export import IMAGE_SIGNATURE, make_serving_function
from keras_glas.postprocess import PostprocessOptions

# `glas_scores` key -> logged name.
GLAS_LOG_NAMES = {
    "f1": "val_glas_f1",
    "object_dice": "val_glas_object_dice",
    "object_hausdorff": "val_glas_object_hausdorff",
}


def is_glas_log_name(name: str) -> bool:
    """Whether `name` is one of the values `GlasMetricsCallback` logs (not every epoch)."""
    return name in GLAS_LOG_NAMES.values()


def model_predictor(model, postprocess: PostprocessOptions, image_size: int):
    """A `predict_split` predictor running a Keras model as its exported SavedModel would.

    Args:
        model: a U-Net or Mask R-CNN (any dtype policy).
        postprocess: U-Net post-processing, applied in graph; `split="watershed"` (NumPy only)
            is left to the caller (see `GlasMetricsCallback`).
        image_size: training scale S (the longer side the network sees); 0 = native.
    Returns:
        `(predictor, numpy_postprocess)`: the callable uint8 (H, W, 3) → dict of NumPy outputs
        without the batch axis, and the options to post-process its probabilities with in NumPy
        (None when the graph already did it).
    """
    numpy_postprocess = None
    if postprocess.split == "watershed":
        numpy_postprocess = postprocess
        postprocess = dataclasses.replace(postprocess, split="none")
    serve = tf.function(make_serving_function(model, postprocess, image_size),
                        input_signature=[IMAGE_SIGNATURE])

    def predictor(image):
        return {key: value.numpy()[0] for key, value in serve(tf.constant(image[None])).items()}

    return predictor, numpy_postprocess


class GlasMetricsCallback(keras.callbacks.Callback):
    """Adds the pooled GlaS scores of a validation split to the epoch's logs.

    At the end of an epoch the model predicts each validation image at native resolution as
    its SavedModel does (resized to the training scale, outputs resized back, post-processed),
    and `keras_glas.metrics.glas_scores` pools object F1, object Dice and object Hausdorff over
    the split. They are logged as `val_glas_f1`, `val_glas_object_dice` and
    `val_glas_object_hausdorff` for the callbacks placed after this one (checkpoints, CSV
    history, TensorBoard). Scoring costs about one inference per validation image, so it runs
    every `every` epochs, and always on the first epoch of a `fit` call (so that `CSVLogger`
    takes the columns into its header) and on its last; other epochs log no GlaS values.

    Args:
        dataset: TFDS name of the validation data (`glas`, `glas/synthetic`,
            `glas/binary_masks`).
        split: TFDS split string, e.g. `train[:10%]`.
        data_dir: TFDS data dir.
        image_size: training scale S (0 = native resolution).
        postprocess: the post-processing the exported model will apply.
        every: score every this many epochs (>= 1).
    """

    def __init__(self, dataset, split, data_dir=None, image_size=0,
                 postprocess=PostprocessOptions(), every=1):
        super().__init__()
        if every < 1:
            raise ValueError(f"GlasMetricsCallback: every must be >= 1, got {every}")
        self.dataset, self.split, self.data_dir = dataset, split, data_dir
        self.image_size, self.postprocess, self.every = image_size, postprocess, every
        self._first_epoch = None
        self._predictor = None

    def on_train_begin(self, logs=None):
        self._first_epoch = None
        self._predictor = None

    def _due(self, epoch):
        if self._first_epoch is None:
            self._first_epoch = epoch
        return (epoch == self._first_epoch or (epoch + 1) % self.every == 0
                or epoch + 1 == self.params.get("epochs"))

    def scores(self):
        """The pooled `glas_scores` of the current model on the validation split."""
        if self._predictor is None:
            # Traced once per fit: the graph reads the model's variables, so it sees updates.
            self._predictor = model_predictor(self.model, self.postprocess, self.image_size)
        predictor, numpy_postprocess = self._predictor
        scored = predict_split(predictor, self.dataset, self.split, self.data_dir,
                               numpy_postprocess, progress=False)
        if not scored:
            raise ValueError(f"GlasMetricsCallback: split {self.split} of {self.dataset} holds "
                             "no image; raise data.validation_fraction")
        return metrics.glas_scores([item.prediction for item in scored],
                                   [item.ground_truth for item in scored])

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not self._due(epoch):
            return
        scores = self.scores()
        for key, name in GLAS_LOG_NAMES.items():
            logs[name] = float(scores[key])
