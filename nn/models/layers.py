"""Building blocks shared by the ResNet and the VGG: the log activation and the conv/BN/activation helpers.

The helpers reproduce the original's layer settings (ORIGINAL.md §3) with Keras layers, so that a model
is a plain functional keras.Model that saves, loads and exports without custom code beyond
LogActivation.
"""
import math
from dataclasses import dataclass

import keras
import tensorflow as tf

BN_MOMENTUM = 0.997  # the original's; --recipe=modern's is in nn/recipe.py
BN_EPSILON = 1e-5
# The output of the last block group, before pooling: Grad-CAM++'s target in both architectures (its
# output is channels_first when --use_nchw).
GRADCAM_LAYER = "last_block_before_fc"


# XLA-compiled in every mode, whatever --jit_compile says (the flag's help and the startup log say so):
# XLA fuses the element-wise ops, the scaling by alpha and beta included, into one pass over the stem's
# feature map, the network's largest (64 x 112 x 112 per image at 224 px), instead of seven; prediction
# and training gain a little (docs/performance.md), and the function is small enough to compile quickly.
# alpha and beta are Python numbers, constants of the compiled function.
@tf.function(jit_compile=True)
def _log_activation(x, alpha, beta):
    return alpha * _signed_log1p_e(x) + beta


@tf.custom_gradient
def _signed_log1p_e(x):
    """sign(x) * ln(1 + e|x|) with its exact derivative e / (1 + e|x|).

    Only |x| goes into the logarithm, so no branch ever sees a negative argument (the original's
    tf.where over both branches did, and its gradient could turn NaN). The derivative is given
    explicitly because autodiff through sign() and abs() would report 0 at x = 0 instead of e.
    """
    e_abs_x = math.e * tf.abs(x)

    def grad(upstream):
        return upstream * (math.e / (1.0 + e_abs_x))

    return tf.sign(x) * tf.math.log1p(e_abs_x), grad


@keras.saving.register_keras_serializable(package="airynet")
class LogActivation(keras.layers.Layer):
    """alpha * (ln(x + 1/e) + 1) + beta for x > 0, and its mirror -alpha * (ln(-x + 1/e) + 1) + beta.

    Since ln(|x| + 1/e) + 1 = ln(1 + e|x|), this is alpha * sign(x) * ln(1 + e|x|) + beta: continuous at
    0 (value beta, slope alpha * e) and compressing the photon counts of a diffraction pattern, which
    span many orders of magnitude, to a few units.
    """

    def __init__(self, alpha, beta, **kwargs):
        super().__init__(**kwargs)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def call(self, x):
        return _log_activation(x, self.alpha, self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta}


def data_format(cfg):
    return "channels_first" if cfg.use_nchw else "channels_last"


def kernel_initializer():
    # TF1's tf.variance_scaling_initializer() defaults, which the original used for every conv.
    return keras.initializers.VarianceScaling(scale=1.0, mode="fan_in", distribution="truncated_normal")


def kernel_regularizer(cfg):
    # The original's l1_l2_regularizer computed scale_l2 * tf.nn.l2_loss(w) = scale_l2 * sum(w^2) / 2,
    # whereas Keras' L1L2 has no 1/2; halve the L2 factor to keep the same penalty.
    return keras.regularizers.L1L2(l1=cfg.l1_regularization_scale, l2=cfg.l2_regularization_scale / 2)


def activation(x, leakiness, name):
    """Leaky ReLU with the given slope; plain ReLU when the slope is not positive (as the original)."""
    if leakiness > 0:
        return keras.layers.LeakyReLU(negative_slope=leakiness, name=name)(x)
    return keras.layers.ReLU(name=name)(x)


@keras.saving.register_keras_serializable(package="airynet")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization, trained through TensorFlow's fused kernel, as the original's
    tf.layers.batch_normalization(fused=True) was.

    Keras 3 computes the batch moments and the normalisation as separate ops, forward and backward; the
    fused kernel does each in one pass over the feature map, which makes training steps faster
    (docs/performance.md). The variables, the moving-average rule (biased batch variance) and inference
    (Keras' own path; the fused kernel gained nothing there) are those of the parent class, so checkpoints
    are interchangeable.
    """

    def call(self, inputs, training=None, mask=None):
        if (not (training and self.trainable) or mask is not None or len(inputs.shape) != 4 or self.renorm
                or not (self.scale and self.center)):
            return super().call(inputs, training=training, mask=mask)
        data_format = "NCHW" if self.axis == 1 else "NHWC"
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, self.gamma, self.beta, epsilon=self.epsilon, data_format=data_format, is_training=True)
        # The kernel returns the Bessel-corrected variance; Keras averages the biased one.
        count = tf.cast(tf.size(inputs) // tf.size(mean), variance.dtype)
        variance = variance * (count - 1) / tf.maximum(count, 1)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return outputs


@dataclass(frozen=True)
class Builder:
    """What every conv and batch-norm layer of a network shares (the data format, one kernel regularizer,
    the activation's slope, the batch-norm momentum), and the helpers that make those layers."""
    data_format: str
    regularizer: keras.regularizers.Regularizer
    leakiness: float
    bn_momentum: float = BN_MOMENTUM

    @classmethod
    def from_flags(cls, cfg, bn_momentum=BN_MOMENTUM):
        return cls(data_format(cfg), kernel_regularizer(cfg), cfg.relu_leakiness, bn_momentum)

    def conv(self, x, filters, kernel_size, strides, name, dtype=None):
        """Bias-free conv with the original's "fixed padding".

        A strided conv pads (k-1)//2 before and the rest after, then runs VALID, so the padding depends
        on the kernel only and not on the input size (SAME would shift it with the parity of the input);
        a stride-1 conv uses SAME.
        """
        padding = "same"
        if strides > 1:
            padding = "valid"
            before = (kernel_size - 1) // 2
            after = kernel_size - 1 - before
            if after:
                x = keras.layers.ZeroPadding2D(((before, after), (before, after)), data_format=self.data_format,
                                               name=f"{name}_pad", dtype=dtype)(x)
        return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding,
                                   data_format=self.data_format, use_bias=False,
                                   kernel_initializer=kernel_initializer(), kernel_regularizer=self.regularizer,
                                   name=name, dtype=dtype)(x)

    def bn_act(self, x, name):
        """Batch norm on the channel axis, then the activation."""
        axis = 1 if self.data_format == "channels_first" else -1
        x = FusedBatchNormalization(axis=axis, momentum=self.bn_momentum, epsilon=BN_EPSILON, center=True,
                                    scale=True, name=f"{name}_bn")(x)
        return activation(x, self.leakiness, f"{name}_act")


def stem_dtype(cfg):
    """float32 for the layers that see raw photon counts, whatever the global dtype policy.

    With --use_log_act the input holds counts up to 65535, above float16's maximum of 65504; under a
    mixed-precision policy every layer up to and including the log activation must stay in float32.
    None means: the global policy.
    """
    return "float32" if cfg.use_log_act else None


def network_input(cfg, stem_dtype):
    """The NHWC image input, and the tensor the network starts from (transposed when cfg.use_nchw)."""
    inputs = keras.Input(shape=(cfg.target_height, cfg.target_width, cfg.target_depth), name="image")
    # Both formats get a layer here: tf.train.Checkpoint matches a functional model's layers by
    # position, so an NHWC-trained checkpoint (CPU) restores into an NCHW model (GPU) and back.
    if cfg.use_nchw:
        return inputs, keras.layers.Permute((3, 1, 2), name="data_layout", dtype=stem_dtype)(inputs)
    return inputs, keras.layers.Identity(name="data_layout", dtype=stem_dtype)(inputs)


def log_activation(x, cfg):
    if not cfg.use_log_act:
        return x
    return LogActivation(cfg.alpha, cfg.beta, name="log_activation", dtype="float32")(x)
