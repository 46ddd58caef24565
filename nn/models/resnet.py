"""Pre-activation ResNet ("v2", He et al. 2016) as the original AiryNet built it (ORIGINAL.md §3).

Every block starts with BN + activation; the first block of each group takes its 1x1 projection
shortcut from that pre-activated tensor. The stem conv has no BN/activation of its own (v2), only the
log activation when --use_log_act.
"""
import keras

from nn.models import layers

# resnet_size -> (blocks per group, bottleneck blocks?)
SIZES = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),
}
GROUP_FILTERS = (64, 128, 256, 512)
GROUP_STRIDES = (1, 2, 2, 2)


def _pre_activation(x, net, shortcut_filters, strides, project, name):
    """-> (the block's input after BN + activation, its shortcut): the input itself, or in the first
    block of a group a strided 1x1 projection of the pre-activated input."""
    shortcut = x
    x = net.bn_act(x, f"{name}_pre")
    if project:
        shortcut = net.conv(x, shortcut_filters, 1, strides, f"{name}_proj")
    return x, shortcut


def _basic_block(x, net, filters, strides, project, name):
    """Two 3x3 convs, the first strided."""
    x, shortcut = _pre_activation(x, net, filters, strides, project, name)
    x = net.conv(x, filters, 3, strides, f"{name}_conv1")
    x = net.bn_act(x, f"{name}_mid1")
    x = net.conv(x, filters, 3, 1, f"{name}_conv2")
    return keras.layers.Add(name=f"{name}_add")([x, shortcut])


def _bottleneck_block(x, net, filters, strides, project, name):
    """1x1, 3x3 (strided) and 1x1 convs, the last with 4x the filters."""
    x, shortcut = _pre_activation(x, net, 4 * filters, strides, project, name)
    x = net.conv(x, filters, 1, 1, f"{name}_conv1")
    x = net.bn_act(x, f"{name}_mid1")
    x = net.conv(x, filters, 3, strides, f"{name}_conv2")
    x = net.bn_act(x, f"{name}_mid2")
    x = net.conv(x, 4 * filters, 1, 1, f"{name}_conv3")
    return keras.layers.Add(name=f"{name}_add")([x, shortcut])


def build(cfg, bn_momentum=layers.BN_MOMENTUM):
    blocks, bottleneck = SIZES[cfg.resnet_size]
    block = _bottleneck_block if bottleneck else _basic_block
    df = layers.data_format(cfg)
    stem = layers.stem_dtype(cfg)
    net = layers.Builder.from_flags(cfg, bn_momentum)
    inputs, x = layers.network_input(cfg, stem)

    x = net.conv(x, 64, 7, 2, "initial_conv", dtype=stem)
    x = layers.log_activation(x, cfg)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", data_format=df, name="initial_max_pool")(x)

    for group, (n_blocks, filters, strides) in enumerate(zip(blocks, GROUP_FILTERS, GROUP_STRIDES), 1):
        for i in range(n_blocks):
            first = i == 0
            x = block(x, net, filters, strides if first else 1, first, f"group{group}_block{i + 1}")
    # The Grad-CAM target: the fourth group's output, before the final BN + activation.
    x = keras.layers.Identity(name=layers.GRADCAM_LAYER)(x)

    x = net.bn_act(x, "final")
    # Global average pooling works for any input size; at 224 px the map is 7x7 and this equals the
    # original's 7x7 VALID average pool.
    x = keras.layers.GlobalAveragePooling2D(data_format=df, name="final_avg_pool")(x)
    # tf.layers.dense defaults as in the original (Glorot uniform, bias); float32 logits under any policy.
    logits = keras.layers.Dense(cfg.num_classes, kernel_regularizer=layers.kernel_regularizer(cfg),
                                dtype="float32", name="final_dense")(x)
    return keras.Model(inputs, logits, name=f"resnet{cfg.resnet_size}")
