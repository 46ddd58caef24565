"""build_model(cfg): the network named by --airynet_type; the output head's rules; the layer Grad-CAM
looks at."""
import tensorflow as tf

from nn.models import resnet, vgg
from nn.config import AiryNetError
from nn.models.layers import BN_MOMENTUM
from nn.models.layers import GRADCAM_LAYER  # noqa: F401 (the name the rest of AiryNet looks it up by)


def build_model(cfg, bn_momentum=BN_MOMENTUM):
    """A keras.Model from NHWC float32 images [B, target_height, target_width, target_depth] to
    float32 logits [B, num_classes] (layer `final_dense`). `bn_momentum`: of the ResNet's batch-norm
    moving averages (the run's Recipe; the VGG has no batch norm)."""
    if cfg.airynet_type == "resnet":
        if cfg.resnet_size not in resnet.SIZES:
            raise AiryNetError(f"--resnet_size={cfg.resnet_size}: must be one of {sorted(resnet.SIZES)}")
        return resnet.build(cfg, bn_momentum)
    if cfg.airynet_type == "vgg":
        if cfg.vgg_size not in vgg.SIZES:
            raise AiryNetError(f"--vgg_size={cfg.vgg_size}: must be one of {sorted(vgg.SIZES)}")
        for side in ("height", "width"):
            if getattr(cfg, f"target_{side}") < vgg.MIN_SIZE:
                raise AiryNetError(f"--target_{side}={getattr(cfg, f'target_{side}')}: the VGG needs at "
                                   f"least {vgg.MIN_SIZE} px (five 2x2 pools)")
        return vgg.build(cfg)
    raise AiryNetError(f"--airynet_type={cfg.airynet_type}: must be resnet or vgg")


# The stem: the layers that see the detector's pixels first (the initial convolution and the first group of
# ResNet blocks or VGG convolutions); --freeze_stem keeps them as --init_from's run trained them.
STEM_PREFIXES = ("initial_", "group1_", "conv1_")


def freeze_stem(model, frozen=True):
    """Make the stem's layers untrainable (its batch norms then keep their averages), or trainable again.
    -> their names."""
    names = [layer.name for layer in model.layers if layer.name.startswith(STEM_PREFIXES)]
    for name in names:
        model.get_layer(name).trainable = not frozen
    return names


# ----------------------------------------------------------------------------------------------
# The output head: multi-label sigmoids (the original's helium data), or a softmax over exclusive
# classes with --single_label (the original's cifar10 path).

def probabilities(logits, single_label):
    return tf.nn.softmax(logits) if single_label else tf.sigmoid(logits)


def predicted_classes(logits, single_label, thresholds=None):
    """0/1 flags: round(sigmoid) for multi-label data, or `probability >= threshold` with per-class
    `thresholds` [C] (the run's calibrated thresholds); the arg-max one-hot for single-label data."""
    if single_label:
        return tf.one_hot(tf.argmax(logits, axis=-1), tf.shape(logits)[-1])
    if thresholds is not None:
        return tf.cast(tf.sigmoid(logits) >= tf.constant(thresholds, tf.float32), tf.float32)
    return tf.cast(logits > 0.0, tf.float32)  # round(sigmoid(x)) without the rounding at exactly 0.5
