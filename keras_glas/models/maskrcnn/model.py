"""The Mask R-CNN model: ResNet-FPN features, RPN, box and mask heads, training and inference."""
import keras
import tensorflow as tf

from keras_glas.models.maskrcnn import boxes as box_ops
from keras_glas.models.maskrcnn import inference, losses, targets
from keras_glas.models.maskrcnn.backbone import (
    FPN_LEVELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_feature_model,
    build_resnet,
    load_backbone_weights,
)
from keras_glas.models.maskrcnn.heads import build_box_head, build_mask_head, build_rpn_head
from keras_glas.models.maskrcnn.roi_align import multilevel_roi_align

LOSS_NAMES = ("rpn_class_loss", "rpn_box_loss", "class_loss", "box_loss", "mask_loss")
# Images are zero-padded (after normalisation) to a multiple of the coarsest FPN stride.
SIZE_DIVISOR = 2 ** max(FPN_LEVELS)
ROI_LEVELS = 4  # P2-P5 pool RoIs; P6 only feeds the RPN.
BOX_POOL_SIZE = 7
MASK_POOL_SIZE = 14
# The graph code has no Python control flow on tensors; AutoGraph's source conversion would only
# add ~15 s of tracing to the first step.
DO_NOT_CONVERT = tf.autograph.experimental.do_not_convert

DEFAULT_OPTIONS = {
    "fpn_channels": 256,
    "anchor_sizes": (32, 64, 128, 256, 512),
    "aspect_ratios": (0.5, 1.0, 2.0),
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_train": 1000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_test": 1000,
    "rpn_nms_iou": 0.7,
    "rpn_batch_size_per_image": 256,
    "rpn_positive_fraction": 0.5,
    "rpn_positive_iou": 0.7,
    "rpn_negative_iou": 0.3,
    "roi_batch_size_per_image": 512,
    "roi_positive_fraction": 0.25,
    "roi_positive_iou": 0.5,
    "box_head_units": 1024,
    "mask_head_channels": 256,
    "score_threshold": 0.5,
    "detection_nms_iou": 0.5,
    "max_detections": 100,
    "mask_threshold": 0.5,
}


def run_on_rois(head, pooled, training=None):
    """`head` on `pooled` (float (R, S, S, C), R >= 0), its output for those R RoIs.

    With R = 0 one zero RoI is run instead and dropped: oneDNN's convolution (on by default on
    CPUs with AVX-512 VNNI / BF16) returns its empty input unchanged, whose channel count then
    fails the bias add.
    """
    count = tf.shape(pooled)[0]
    filler = tf.zeros(tf.concat([[tf.maximum(1 - count, 0)], tf.shape(pooled)[1:]], 0),
                      pooled.dtype)
    return head(tf.concat([pooled, filler], 0), training=training)[:count]


def select_class(per_class, classes):
    """Per-class outputs (M, ..., C) and int32 classes (M,) -> (M, ...) of each row's class."""
    return tf.gather(tf.experimental.numpy.moveaxis(per_class, -1, 1), classes, batch_dims=1)


@keras.saving.register_keras_serializable(package="keras_glas")
class MaskRCNN(keras.Model):
    """Mask R-CNN (He et al. 2017) with a ResNet-FPN backbone, trained by `fit` without a loss.

    `fit` takes the pipeline's `model="maskrcnn"` batches: x float32 (B, H, W, 3) in [0, 1],
    y = {"boxes" (B, N, 4) pixel yxyx padded -1, "classes" (B, N) padded -1, "instances" int32
    (B, H, W)} and logs `loss`, the five component losses and `proposal_recall` (fraction of
    objects an RPN proposal overlaps with IoU >= 0.5). `infer` (also `__call__`) predicts.

    Args:
        backbone: "resnet50", "resnet18" or "resnet_tiny" (tests).
        backbone_weights: None (random) or a weights source, see `backbone.load_backbone_weights`.
        num_classes: foreground classes (1 = gland).
        **options: see `DEFAULT_OPTIONS` (head widths, anchor, sampling and NMS settings,
            `score_threshold` of the returned detections, `mask_threshold` of the instance map).
    """

    def __init__(self, backbone="resnet50", backbone_weights=None, num_classes=1, name="maskrcnn",
                 **options):
        unknown = sorted(set(options) - set(DEFAULT_OPTIONS) - {"dtype", "trainable"})
        if unknown:
            raise ValueError(f"unknown Mask R-CNN options {unknown}; "
                             f"valid: {sorted(DEFAULT_OPTIONS)}")
        keras_kwargs = {key: options.pop(key) for key in ("dtype", "trainable") if key in options}
        super().__init__(name=name, **keras_kwargs)
        self.backbone_name = backbone
        self.num_classes = int(num_classes)
        self.options = {**DEFAULT_OPTIONS, **options}
        resnet = build_resnet(backbone)
        if backbone_weights:
            load_backbone_weights(resnet, backbone_weights)
        channels = self.options["fpn_channels"]
        self.feature_model = build_feature_model(resnet, channels)
        self.rpn_head = build_rpn_head(channels, len(self.options["aspect_ratios"]))
        self.box_head = build_box_head(channels, self.num_classes, BOX_POOL_SIZE,
                                       self.options["box_head_units"])
        self.mask_head = build_mask_head(channels, self.num_classes, MASK_POOL_SIZE,
                                         self.options["mask_head_channels"])
        self.trackers = {key: keras.metrics.Mean(name=key)
                         for key in ("loss",) + LOSS_NAMES + ("proposal_recall",)}
        self.built = True

    def get_config(self):
        # Backbone weights are not part of the config: a rebuilt model gets trained weights.
        return {"name": self.name, "backbone": self.backbone_name, "num_classes": self.num_classes,
                **self.options}

    def compile(self, optimizer="rmsprop", **kwargs):
        """`keras.Model.compile`; no loss is needed (the model computes its own)."""
        super().compile(optimizer=optimizer, **kwargs)
        # Create the optimizer's slot variables now: created inside the first traced step they
        # make tf.function trace the whole training step a second time.
        self.optimizer.build(self.trainable_variables)

    @property
    def metrics(self):
        return list(self.trackers.values())

    # ----------------------------------------------------------------------------- features
    def _features(self, images, training, feature_model=None):
        """Normalise, pad to SIZE_DIVISOR and run backbone+FPN (`feature_model`, default the
        model's own) -> float32 [P2..P6], padded size."""
        images = tf.cast(images, tf.float32)
        images = (images - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)
        shape = tf.shape(images)
        pad_h = -shape[1] % SIZE_DIVISOR
        pad_w = -shape[2] % SIZE_DIVISOR
        images = tf.pad(images, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])
        if feature_model is None:
            feature_model = self.feature_model
        features = feature_model(images, training=training)
        return ([tf.cast(level, tf.float32) for level in features], shape[1] + pad_h,
                shape[2] + pad_w)

    def _rpn(self, features, padded_height, padded_width):
        """RPN outputs flattened in anchor order: logits (B, A), deltas (B, A, 4),
        anchors (A, 4)."""
        logits, deltas = [], []
        for level in features:
            level_logits, level_deltas = self.rpn_head(level)
            batch = tf.shape(level_logits)[0]
            logits.append(tf.reshape(level_logits, (batch, -1)))
            deltas.append(tf.reshape(level_deltas, (batch, -1, 4)))
        anchors = box_ops.generate_anchors(
            padded_height, padded_width, [2 ** level for level in FPN_LEVELS],
            self.options["anchor_sizes"], self.options["aspect_ratios"],
        )
        return tf.concat(logits, axis=1), tf.concat(deltas, axis=1), anchors

    def _pool(self, features, rois, size):
        """RoIAlign of (B, K, 4) RoIs -> (B * K, size, size, C)."""
        shape = tf.shape(rois)
        box_indices = tf.repeat(tf.range(shape[0]), shape[1])
        return multilevel_roi_align(features[:ROI_LEVELS], tf.reshape(rois, (-1, 4)), box_indices,
                                    size)

    # ----------------------------------------------------------------------------- training
    @DO_NOT_CONVERT
    def compute_losses(self, images, y, training):
        """Losses of one batch.

        Returns `(dict of float32 scalars named LOSS_NAMES, proposal recall float32 scalar)`.
        """
        o = self.options
        gt_boxes, gt_classes, gt_valid = targets.trim_padding(
            tf.cast(y["boxes"], tf.float32), tf.cast(y["classes"], tf.float32)
        )
        instances = tf.cast(y["instances"], tf.int32)
        features, padded_h, padded_w = self._features(images, training)
        objectness, deltas, anchors = self._rpn(features, padded_h, padded_w)

        rpn = targets.rpn_targets(anchors, gt_boxes, gt_valid, o["rpn_batch_size_per_image"],
                                  o["rpn_positive_fraction"], o["rpn_positive_iou"],
                                  o["rpn_negative_iou"])
        result = {
            "rpn_class_loss": losses.objectness_loss(
                tf.gather(objectness, rpn["indices"], batch_dims=1), rpn["positive"], rpn["valid"]),
            "rpn_box_loss": losses.box_loss(
                tf.gather(deltas, rpn["indices"], batch_dims=1), rpn["box_targets"],
                rpn["positive"], rpn["valid"]),
        }

        shape = tf.shape(images)
        proposals, proposal_valid = inference.propose(
            tf.stop_gradient(objectness), tf.stop_gradient(deltas), anchors, shape[1], shape[2],
            o["rpn_pre_nms_top_n_train"], o["rpn_post_nms_top_n_train"], o["rpn_nms_iou"])
        recall = targets.proposal_recall(proposals, proposal_valid, gt_boxes, gt_valid)
        rois = targets.roi_targets(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid,
                                   o["roi_batch_size_per_image"], o["roi_positive_fraction"],
                                   o["roi_positive_iou"])
        flat = {key: tf.reshape(value, (-1,) + tuple(value.shape[2:]))
                for key, value in rois.items()}
        class_logits, box_deltas = self.box_head(self._pool(features, rois["rois"], BOX_POOL_SIZE),
                                                 training=training)
        foreground = tf.maximum(flat["classes"] - 1, 0)
        box_deltas = tf.gather(tf.reshape(box_deltas, (-1, self.num_classes, 4)), foreground,
                               batch_dims=1)
        result["class_loss"] = losses.classification_loss(class_logits, flat["classes"],
                                                          flat["valid"])
        result["box_loss"] = losses.box_loss(box_deltas, flat["box_targets"], flat["positive"],
                                             flat["valid"])

        # The mask head only sees positive RoIs (a dynamic number, as in torchvision).
        positive = tf.where(flat["positive"])[:, 0]
        box_indices = tf.repeat(tf.range(shape[0]), o["roi_batch_size_per_image"])
        mask_rois = tf.gather(flat["rois"], positive)
        mask_images = tf.gather(box_indices, positive)
        mask_logits = run_on_rois(
            self.mask_head,
            multilevel_roi_align(features[:ROI_LEVELS], mask_rois, mask_images, MASK_POOL_SIZE),
            training=training)
        mask_logits = select_class(mask_logits, tf.gather(foreground, positive))
        mask_targets = targets.mask_targets(instances, mask_rois, mask_images,
                                            tf.gather(flat["matched"], positive) + 1,
                                            mask_logits.shape[-1])
        result["mask_loss"] = losses.mask_loss(mask_logits, mask_targets)
        return result, recall

    def _record(self, component_losses, recall):
        total = tf.add_n([component_losses[key] for key in LOSS_NAMES])
        self.trackers["loss"].update_state(total)
        for key in LOSS_NAMES:
            self.trackers[key].update_state(component_losses[key])
        self.trackers["proposal_recall"].update_state(recall)
        return {key: tracker.result() for key, tracker in self.trackers.items()}

    @DO_NOT_CONVERT
    def train_step(self, data):
        images, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            component_losses, recall = self.compute_losses(images, y, training=True)
            total = tf.add_n([component_losses[key] for key in LOSS_NAMES])
            # Replica gradients are summed, so each replica contributes its mean / replicas.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(total / replicas)
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        return self._record(component_losses, recall)

    @DO_NOT_CONVERT
    def test_step(self, data):
        images, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self._record(*self.compute_losses(images, y, training=False))

    # ---------------------------------------------------------------------------- inference
    @DO_NOT_CONVERT
    def infer(self, images, score_threshold=None, feature_model=None):
        """Detect and segment objects in images of any size.

        Args:
            images: float32 (N, H, W, 3) in [0, 1].
            score_threshold: detections below this score are dropped (default: the
                `score_threshold` option).
            feature_model: a stand-in for `self.feature_model` computing the same function,
                e.g. its copy with batch norms folded (`keras_glas.models.fold_batch_norm`)
                that exported SavedModels run.

        Returns:
            dict: `instances` int32 (N, H, W) (id k + 1 = detection k, overlaps go to the
            higher score), `probabilities` float32 (N, H, W) (max mask probability per pixel),
            `boxes` float32 (N, D, 4) pixel yxyx, `scores` float32 (N, D) sorted decreasing;
            rows with score 0 are padding (D = max detections over the batch, at least 1).
        """
        o = self.options
        threshold = o["score_threshold"] if score_threshold is None else score_threshold
        images = tf.convert_to_tensor(images, tf.float32)
        shape = tf.shape(images)
        height, width = shape[1], shape[2]
        features, padded_h, padded_w = self._features(images, False, feature_model)
        objectness, deltas, anchors = self._rpn(features, padded_h, padded_w)
        proposals, proposal_valid = inference.propose(
            objectness, deltas, anchors, height, width, o["rpn_pre_nms_top_n_test"],
            o["rpn_post_nms_top_n_test"], o["rpn_nms_iou"])
        class_logits, box_deltas = self.box_head(self._pool(features, proposals, BOX_POOL_SIZE))
        num_proposals = o["rpn_post_nms_top_n_test"]
        boxes, scores, classes, count = inference.detect(
            tf.reshape(class_logits, (shape[0], num_proposals, self.num_classes + 1)),
            tf.reshape(box_deltas, (shape[0], num_proposals, 4 * self.num_classes)),
            proposals, proposal_valid, height, width, threshold, o["detection_nms_iou"],
            o["max_detections"])
        valid = tf.range(tf.shape(boxes)[1])[None, :] < count[:, None]
        mask_logits = self.mask_head(self._pool(features, boxes, MASK_POOL_SIZE))
        masks = tf.sigmoid(select_class(mask_logits, tf.reshape(classes, (-1,))))
        masks = tf.reshape(masks, (shape[0], -1) + tuple(masks.shape[1:]))
        instances, probabilities = inference.paste_instances(
            masks, boxes, valid, height, width, o["mask_threshold"])
        return {
            "instances": instances,
            "probabilities": probabilities,
            "boxes": tf.where(valid[:, :, None], boxes, 0.0),
            "scores": tf.where(valid, scores, 0.0),
        }

    def call(self, images, training=False):
        return self.infer(images)


def build_maskrcnn(backbone="resnet50", backbone_weights=None, num_classes=1, **head_options):
    """Build a `MaskRCNN`; see its docstring and `DEFAULT_OPTIONS` for `head_options`."""
    return MaskRCNN(backbone=backbone, backbone_weights=backbone_weights, num_classes=num_classes,
                    **head_options)
