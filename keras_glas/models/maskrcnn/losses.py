"""Mask R-CNN losses on sampled anchors / RoIs; each returns a float32 scalar."""
import tensorflow as tf

# Smooth-L1 transition point of torchvision's RPN and box losses.
SMOOTH_L1_BETA = 1.0 / 9.0


def _count(mask):
    return tf.maximum(tf.reduce_sum(tf.cast(mask, tf.float32)), 1.0)


def smooth_l1(difference, beta=SMOOTH_L1_BETA):
    """Elementwise smooth L1 (Huber / beta) of a float32 tensor."""
    absolute = tf.abs(difference)
    return tf.where(absolute < beta, 0.5 * tf.square(absolute) / beta, absolute - 0.5 * beta)


def objectness_loss(logits, positive, valid):
    """Binary cross-entropy averaged over valid samples; all (B, S)."""
    losses = tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(positive, tf.float32), logits)
    return tf.reduce_sum(tf.where(valid, losses, 0.0)) / _count(valid)


def classification_loss(logits, classes, valid):
    """Softmax cross-entropy of logits (..., C + 1) against int classes (...), over valid."""
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(classes, logits)
    return tf.reduce_sum(tf.where(valid, losses, 0.0)) / _count(valid)


def box_loss(deltas, targets, positive, valid):
    """Smooth L1 summed over positives' 4 coordinates, divided by the number of valid samples
    (torchvision's normalisation); deltas and targets (..., 4)."""
    losses = tf.reduce_sum(smooth_l1(deltas - targets), axis=-1)
    return tf.reduce_sum(tf.where(positive, losses, 0.0)) / _count(valid)


def mask_loss(logits, targets):
    """Per-pixel binary cross-entropy averaged over (M, S, S); 0 when M is 0."""
    losses = tf.nn.sigmoid_cross_entropy_with_logits(targets, logits)
    return tf.math.divide_no_nan(tf.reduce_sum(losses), tf.cast(tf.size(losses), tf.float32))
