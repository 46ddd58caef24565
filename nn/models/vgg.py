"""VGG-16/19 in the style of TF-slim's fully convolutional VGG, as the original AiryNet built it.

As in the original, every conv (the fc layers too) goes through the shared conv helper: variance-
scaling init, no bias, L1+L2 regularized, no batch norm. Each conv is followed by a leaky ReLU with a
fixed slope of 0.1 (not --relu_leakiness); the very first conv applies the log activation before its
leaky ReLU when --use_log_act.
"""
import keras

from nn.models import layers

# vgg_size -> convs per group; the groups have 64, 128, 256, 512, 512 filters.
SIZES = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
GROUP_FILTERS = (64, 128, 256, 512, 512)
LEAKINESS = 0.1
DROPOUT_RATE = 0.5  # the original's keep probability of 0.5
FC_WIDTH = 4096
MIN_SIZE = 32  # five 2x2 VALID pools need at least 32 px to leave a 1x1 map


def build(cfg):
    df = layers.data_format(cfg)
    stem = layers.stem_dtype(cfg)
    net = layers.Builder.from_flags(cfg)  # no batch norm: only its convs
    inputs, x = layers.network_input(cfg, stem)

    for group, (n_convs, filters) in enumerate(zip(SIZES[cfg.vgg_size], GROUP_FILTERS), 1):
        for i in range(n_convs):
            if group == 1 and i == 0:
                x = net.conv(x, filters, 3, 1, "initial_conv", dtype=stem)
                x = layers.log_activation(x, cfg)
            else:
                x = net.conv(x, filters, 3, 1, f"conv{group}_{i + 1}")
            x = layers.activation(x, LEAKINESS, f"conv{group}_{i + 1}_act")
        if group == len(GROUP_FILTERS):
            # The Grad-CAM target: the last conv group's output, before its pool.
            x = keras.layers.Identity(name=layers.GRADCAM_LAYER)(x)
        x = keras.layers.MaxPooling2D(2, strides=2, padding="valid", data_format=df, name=f"pool{group}")(x)

    # fc6 is a 7x7 stride-1 conv and so, through the original's conv helper, SAME-padded (slim's VALID
    # option was never used): at 224 px it maps the 7x7 pool5 output to 7x7, at 32 px it sees the 1x1
    # map through its centre tap. Either way the global average pool below makes the size irrelevant.
    x = net.conv(x, FC_WIDTH, 7, 1, "fc6")
    x = layers.activation(x, LEAKINESS, "fc6_act")
    x = keras.layers.Dropout(DROPOUT_RATE, name="dropout6")(x)  # Keras drops only when training
    x = net.conv(x, FC_WIDTH, 1, 1, "fc7")
    x = layers.activation(x, LEAKINESS, "fc7_act")
    x = keras.layers.GlobalAveragePooling2D(data_format=df, name="global_pool")(x)
    x = keras.layers.Dropout(DROPOUT_RATE, name="dropout7")(x)
    # fc8, a 1x1 conv on the pooled 1x1 map in the original, is a Dense on the pooled vector here, with
    # the same helper settings (no bias) and float32 logits under any dtype policy.
    logits = keras.layers.Dense(cfg.num_classes, use_bias=False, kernel_initializer=layers.kernel_initializer(),
                                kernel_regularizer=layers.kernel_regularizer(cfg), dtype="float32",
                                name="final_dense")(x)
    return keras.Model(inputs, logits, name=f"vgg{cfg.vgg_size}")
