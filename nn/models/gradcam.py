"""Grad-CAM++ (Chattopadhyay et al., WACV 2018, eq. 19) for every class of a multi-label network.

For class c with score S_c (the class logit, not the sigmoid) and the activations A [h, w, K] of the
target layer, with g = dS_c/dA:

    alpha = g^2 / (2 g^2 + sum_ab(A_k) g^3)        (0 where g = 0 or the denominator is 0)
    w_k   = sum_ij alpha * relu(g)
    map   = relu(sum_k w_k A_k)
    map   = (map - min(map)) / max(map - min(map))   (a constant map becomes 0, never NaN)

sum_ab(A_k) is the spatial sum of channel k, as in eq. 19 and pytorch-grad-cam (tf-keras-vis instead
normalises alpha per channel). The gradients of all classes come from one batch Jacobian of the logits
with respect to A: it only runs backwards through the network's head (the layers after A), so the maps
for all classes cost little over the forward pass, which is computed once.
"""
import keras
import tensorflow as tf


def activation_model(model, layer_name):
    """A model with the same input that returns (activations of `layer_name`, logits)."""
    return keras.Model(model.input, [model.get_layer(layer_name).output, model.output])


def is_channels_first(model):
    """Whether the model's feature maps are channels_first (AiryNet's --use_nchw transposes once at
    the input, then every conv and pool has data_format="channels_first")."""
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        if getattr(layer, "data_format", None) == "channels_first":
            return True
        stack.extend(getattr(layer, "layers", []))
    return False


def maps_from_gradients(acts, grads):
    """Grad-CAM++ maps from activations [B, h, w, K] and per-class gradients [B, C, h, w, K].

    Returns float32 [B, C, h, w] in [0, 1].
    """
    acts = tf.cast(acts, tf.float32)
    grads = tf.cast(grads, tf.float32)
    sum_a = tf.reduce_sum(acts, axis=[1, 2])[:, None, None, None, :]  # [B, 1, 1, 1, K]
    g2 = tf.square(grads)
    # Where g = 0 the denominator is 0 too, so divide_no_nan gives alpha = 0 in both cases.
    alpha = tf.math.divide_no_nan(g2, 2.0 * g2 + sum_a * g2 * grads)
    weights = tf.reduce_sum(alpha * tf.nn.relu(grads), axis=[2, 3])  # [B, C, K]
    cams = tf.nn.relu(tf.einsum("bhwk,bck->bchw", acts, weights))
    cams -= tf.reduce_min(cams, axis=[2, 3], keepdims=True)
    return tf.math.divide_no_nan(cams, tf.reduce_max(cams, axis=[2, 3], keepdims=True))


def head_model(model, layer_name):
    """The layers after `layer_name` as a model of their own: that layer's activations -> logits."""
    return keras.Model(model.get_layer(layer_name).output, model.output)


def head_maps(head, acts, channels_first, class_indices=None):
    """Logits [B, num_classes] and Grad-CAM++ maps [B, C, h, w] from the target layer's activations `acts`
    (as `head`, from head_model, takes them), for the classes (all when None). The maps' spatial axes
    are in NHWC order whatever the layout.

    Only the head is run under the tape and differentiated: the forward pass up to the target layer
    happens once, outside, and is not recorded."""
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(acts)
        logits = head(acts, training=False)
        scores = logits if class_indices is None else tf.gather(logits, class_indices, axis=1)
    grads = tape.batch_jacobian(scores, acts)  # [B, C] + acts.shape[1:]
    if channels_first:
        acts = tf.transpose(acts, [0, 2, 3, 1])
        grads = tf.transpose(grads, [0, 1, 3, 4, 2])
    return logits, maps_from_gradients(acts, grads)


def resize_maps(maps, size):
    """Bilinear resize of maps [B, C, h, w] to [B, C, size[0], size[1]], staying in [0, 1]."""
    resized = tf.image.resize(tf.transpose(maps, [0, 2, 3, 1]), size, method="bilinear")
    # Bilinear weights sum to 1, so only rounding can step outside [0, 1].
    return tf.clip_by_value(tf.transpose(resized, [0, 3, 1, 2]), 0.0, 1.0)


def gradcam_plus_plus(model, images, layer_name, class_indices=None):
    """Grad-CAM++ maps [batch, classes, h, w] (numpy float32, in [0, 1]) at the resolution of the
    layer `layer_name`, for all classes or the listed `class_indices`, in that order."""
    act_model, head = activation_model(model, layer_name), head_model(model, layer_name)
    channels_first = is_channels_first(model)
    indices = None if class_indices is None else tf.constant(list(class_indices), tf.int32)
    fn = tf.function(lambda x: head_maps(head, act_model(x, training=False)[0], channels_first, indices)[1])
    return fn(tf.convert_to_tensor(images, tf.float32)).numpy()
