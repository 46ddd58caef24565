"""Grad-CAM++: a case worked out by hand, the degenerate cases, and both AiryNet networks."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from nn import config
from nn.models import gradcam, networks

LAYER = "last_block_before_fc"


def linear_head_model(kernel, bias, h, w):
    """A -> GAP -> Dense: dS_c/dA_ijk = kernel[k, c] / (h w) everywhere, known in closed form."""
    inputs = keras.Input((h, w, kernel.shape[0]))
    acts = keras.layers.Identity(name=LAYER)(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(acts)
    logits = keras.layers.Dense(kernel.shape[1], name="final_dense")(pooled)
    model = keras.Model(inputs, logits)
    model.get_layer("final_dense").set_weights([kernel, bias])
    return model


def nonlinear_head_model(k=4, classes=3, seed=0):
    """conv -> A -> BN + leaky ReLU -> GAP -> Dense, the shape of AiryNet's ResNet head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(k, 3, strides=2, padding="same")(inputs)
    x = keras.layers.Identity(name=LAYER)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.LeakyReLU(negative_slope=0.2)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="final_dense")(x))


def per_class_gradients(act_model, images, classes):
    """(A [h, w, K], [dS_c/dA for c in classes]) of the first image, with one ordinary gradient per
    class, independent of the batch Jacobian. (Batches of 2: oneDNN's channels_first conv costs
    ~0.2 s per call at batch 1 on this CPU.)"""
    @tf.function
    def grads():
        with tf.GradientTape(persistent=True) as tape:
            acts, logits = act_model(images, training=False)
            scores = [logits[0, c] for c in classes]
        return acts[0], [tape.gradient(score, acts)[0] for score in scores]

    acts, per_class = grads()
    return acts.numpy(), np.array([g.numpy() for g in per_class])


def reference_maps(acts, grads):
    """Eq. 19 written out per class and channel with plain numpy loops: acts [h, w, K], grads [C, h, w, K]."""
    maps = []
    for g in grads:
        cam = np.zeros(acts.shape[:2])
        for k in range(acts.shape[2]):
            a, gk = acts[..., k].astype(np.float64), g[..., k].astype(np.float64)
            denom = 2 * gk ** 2 + a.sum() * gk ** 3
            alpha = np.where(denom != 0, gk ** 2 / np.where(denom != 0, denom, 1), 0.0)
            cam += (alpha * np.maximum(gk, 0)).sum() * a
        cam = np.maximum(cam, 0)
        cam -= cam.min()
        maps.append(cam / cam.max() if cam.max() > 0 else cam)
    return np.array(maps)


def test_hand_computed_linear_head():
    # Two 2x2 channels, two classes. With the GAP + dense head g is W[k, c] / 4 at every pixel.
    acts = np.array([[[1.0, 0.0], [2.0, 1.0]],
                     [[0.0, 3.0], [1.0, 0.0]]], np.float32)  # [h=2, w=2, K=2]
    kernel = np.array([[4.0, -4.0],
                       [8.0, 4.0]], np.float32)  # [K, C]
    model = linear_head_model(kernel, np.zeros(2, np.float32), 2, 2)
    maps = gradcam.gradcam_plus_plus(model, acts[None], LAYER)
    assert maps.shape == (1, 2, 2, 2)
    # A_0 = [[1, 2], [0, 1]], A_1 = [[0, 1], [3, 0]], both with sum_ab(A) = 4.
    # Class 0: g = (1, 2): alpha_k = g^2 / (2 g^2 + 4 g^3) = (1/6, 1/10); w_k = 4 pixels * alpha_k * g_k
    # = (2/3, 4/5); map = [[2/3, 32/15], [12/5, 2/3]]; minus 2/3 and over 26/15: [[0, 11/13], [1, 0]].
    np.testing.assert_allclose(maps[0, 0], [[0, 11 / 13], [1, 0]], atol=1e-6)
    # Class 1: g = (-1, 1): relu(g) = 0 drops channel 0, w = (0, 2/3), map = 2/3 A_1 -> A_1 / 3.
    np.testing.assert_allclose(maps[0, 1], [[0, 1 / 3], [1, 0]], atol=1e-6)


def test_matches_per_class_reference_on_nonlinear_head():
    model = nonlinear_head_model()
    images = np.random.default_rng(1).gamma(1.0, 5.0, (3, 8, 8, 1)).astype(np.float32)
    maps = gradcam.gradcam_plus_plus(model, images, LAYER)
    act_model = gradcam.activation_model(model, LAYER)
    for b in range(3):
        acts, grads = per_class_gradients(act_model, np.roll(images, -b, axis=0), range(3))
        np.testing.assert_allclose(maps[b], reference_maps(acts, grads), atol=1e-5)
    # Each map is scaled to [0, 1]: its maximum is 1, or 0 for a class with no positive evidence.
    peaks = maps.max(axis=(2, 3))
    assert maps.min() >= 0 and np.all(np.isclose(peaks, 1) | (peaks == 0)) and (peaks == 1).sum() >= 6


def test_all_zero_map_stays_zero():
    # Negative weights only: relu(g) = 0 for every channel, so every weight and map is 0, not NaN.
    model = linear_head_model(-np.ones((2, 3), np.float32), np.zeros(3, np.float32), 3, 3)
    maps = gradcam.gradcam_plus_plus(model, np.ones((2, 3, 3, 2), np.float32), LAYER)
    assert not np.isnan(maps).any() and np.all(maps == 0)
    # All-zero activations: g is nonzero but the map is constant 0.
    model = linear_head_model(np.ones((2, 3), np.float32), np.zeros(3, np.float32), 3, 3)
    maps = gradcam.gradcam_plus_plus(model, np.zeros((1, 3, 3, 2), np.float32), LAYER)
    assert not np.isnan(maps).any() and np.all(maps == 0)


def test_class_subset_matches_full():
    model = nonlinear_head_model(classes=5)
    images = np.random.default_rng(2).gamma(1.0, 5.0, (2, 8, 8, 1)).astype(np.float32)
    full = gradcam.gradcam_plus_plus(model, images, LAYER)
    subset = gradcam.gradcam_plus_plus(model, images, LAYER, class_indices=[4, 1])
    assert subset.shape == (2, 2, 4, 4)
    np.testing.assert_allclose(subset, full[:, [4, 1]], atol=1e-6)


def test_resize_maps_keeps_range_and_shape():
    maps = tf.constant(np.random.default_rng(3).random((2, 3, 4, 4)), tf.float32)
    resized = gradcam.resize_maps(maps, (16, 12)).numpy()
    assert resized.shape == (2, 3, 16, 12)
    assert resized.min() >= 0 and resized.max() <= 1


@pytest.mark.parametrize("arch, size", [("resnet", 64), ("vgg", 32)])
def test_real_networks(arch, size):
    """Both networks (channels_first, the default) give maps [B, 11, h, w] at the resolution of
    last_block_before_fc that equal eq. 19 from one ordinary gradient per class."""
    cfg = config.parse_args([f"--airynet_type={arch}", f"--target_height={size}", f"--target_width={size}",
                             "--num_classes=11", "--use_nchw=true"])
    keras.utils.set_random_seed(0)
    model = networks.build_model(cfg)
    layer = networks.GRADCAM_LAYER
    images = np.random.default_rng(4).gamma(0.5, 50.0, (2, size, size, 1)).astype(np.float32)
    maps = gradcam.gradcam_plus_plus(model, images, layer)
    # ResNet: 64 px / stride 32 = 2; VGG: 32 px / 4 pools before the target = 2.
    assert maps.shape == (2, 11, 2, 2)
    assert not np.isnan(maps).any() and maps.min() >= 0 and maps.max() <= 1
    assert (maps.max(axis=(2, 3)) == 1).any()
    # Three classes suffice and keep the VGG's 4096-wide head affordable (one backward pass each).
    classes = [0, 5, 10]
    acts, grads = per_class_gradients(gradcam.activation_model(model, layer), images, classes)
    expected = reference_maps(np.transpose(acts, [1, 2, 0]), np.transpose(grads, [0, 2, 3, 1]))
    np.testing.assert_allclose(maps[0, classes], expected, atol=1e-4)


def test_channels_first_equals_channels_last():
    """The same ResNet weights built NCHW and NHWC give the same maps (the layout is detected)."""
    args = ["--target_height=64", "--target_width=64", "--num_classes=11"]
    models = [networks.build_model(config.parse_args(args + [f"--use_nchw={v}"])) for v in ("true", "false")]
    models[1].set_weights(models[0].get_weights())  # kernels are layout-independent
    assert gradcam.is_channels_first(models[0]) and not gradcam.is_channels_first(models[1])
    images = np.random.default_rng(5).gamma(0.5, 50.0, (2, 64, 64, 1)).astype(np.float32)
    nchw, nhwc = (gradcam.gradcam_plus_plus(m, images, LAYER) for m in models)
    np.testing.assert_allclose(nchw, nhwc, atol=1e-4)
