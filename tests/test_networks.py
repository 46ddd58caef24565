"""The networks: architecture (parameter counts from the paper's description), named layers, the log
activation's values and gradients, data formats, dropout, regularizers, serialisation."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from nn import config
from nn.models import networks
from nn.models.layers import FusedBatchNormalization, LogActivation

NUM_CLASSES = 11
RESNET_BLOCKS = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True),
                 101: ((3, 4, 23, 3), True), 152: ((3, 8, 36, 3), True), 200: ((3, 24, 36, 3), True)}
VGG_GROUPS = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


def make_cfg(*flags, size=32):
    return config.parse_args([f"--target_height={size}", f"--target_width={size}",
                              f"--num_classes={NUM_CLASSES}", "--use_nchw=false", *flags])


_models = {}


def model(*flags, size=32):
    """Each configuration is built once per test session: the large networks take seconds to build."""
    key = (flags, size)
    if key not in _models:
        _models[key] = networks.build_model(make_cfg(*flags, size=size))
    return _models[key]


def resnet_flags(size):
    return ("--airynet_type=resnet", f"--resnet_size={size}")


def vgg_flags(size):
    return ("--airynet_type=vgg", f"--vgg_size={size}")


def expected_resnet(size, depth, classes):
    """(trainable parameters, regularized kernels) of a pre-activation ResNet, from ORIGINAL.md §3."""
    blocks, bottleneck = RESNET_BLOCKS[size]
    params, kernels = 7 * 7 * depth * 64, 1
    c_in = 64
    for filters, n in zip((64, 128, 256, 512), blocks):
        c_out = 4 * filters if bottleneck else filters
        for i in range(n):
            params += 2 * c_in  # pre-activation BN: gamma and beta
            if i == 0:
                params += c_in * c_out  # 1x1 projection shortcut
                kernels += 1
            if bottleneck:
                params += c_in * filters + 2 * filters + 9 * filters * filters + 2 * filters + filters * c_out
                kernels += 3
            else:
                params += 9 * c_in * filters + 2 * filters + 9 * filters * filters
                kernels += 2
            c_in = c_out
    params += 2 * c_in + c_in * classes + classes  # final BN, dense with bias
    return params, kernels + 1


def expected_vgg(size, depth, classes):
    """(trainable parameters, regularized kernels): bias-free 3x3 convs, fc6 7x7, fc7 1x1, fc8."""
    params, c_in, kernels = 0, depth, 0
    for filters, n in zip((64, 128, 256, 512, 512), VGG_GROUPS[size]):
        for _ in range(n):
            params += 9 * c_in * filters
            c_in = filters
            kernels += 1
    params += 49 * 512 * 4096 + 4096 * 4096 + 4096 * classes
    return params, kernels + 3


def trainable_count(m):
    return sum(int(np.prod(w.shape)) for w in m.trainable_weights)


def kernel_count(m):
    return sum(isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) for layer in m.layers)


# --- the log activation -------------------------------------------------------------------------

def original_log_act(x, alpha, beta):
    """The original's two branches, in float64."""
    if x > 0:
        return alpha * (math.log(x + math.exp(-1)) + 1) + beta
    return -alpha * (math.log(-x + math.exp(-1)) + 1) + beta


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_log_activation_matches_the_original_formula(beta):
    xs = [-2.0, 0.0, 1e-3, 5.0, 65535.0]
    got = LogActivation(0.2, beta)(tf.constant(xs)).numpy()
    want = [original_log_act(x, 0.2, beta) for x in xs]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # by hand: 0.2 * (ln(5 + 1/e) + 1) = 0.536087 and 0.2 * (ln(65535 + 1/e) + 1) = 2.418069
    np.testing.assert_allclose(got[3:] - beta, [0.536087, 2.418069], rtol=2e-6)
    assert got[1] == pytest.approx(beta)


def test_log_activation_is_continuous_at_zero():
    eps = 1e-4
    left, mid, right = LogActivation(0.2, 0.3)(tf.constant([-eps, 0.0, eps])).numpy()
    step = 0.2 * math.e * eps  # slope at 0 times eps; the curvature changes it by e * eps / 2
    assert mid == pytest.approx(0.3)
    assert right - mid == pytest.approx(step, rel=2e-3)
    assert mid - left == pytest.approx(step, rel=2e-3)


def test_log_activation_gradient_is_finite_and_exact_everywhere():
    huge = 65535.0 * 49 * 1000  # a 7x7 patch of saturated pixels through a large kernel
    xs = tf.constant([-huge, -2.0, -1e-30, 0.0, 1e-30, 1e-3, 5.0, 65535.0, huge])
    with tf.GradientTape() as tape:
        tape.watch(xs)
        ys = LogActivation(0.2, 0.0)(xs)
    grads = tape.gradient(ys, xs).numpy()
    assert np.isfinite(ys.numpy()).all() and np.isfinite(grads).all()
    # d/dx alpha * (ln(|x| + 1/e) + 1) = alpha / (|x| + 1/e) on both branches, alpha * e at 0.
    want = [0.2 / (abs(x) + math.exp(-1)) for x in xs.numpy().astype(np.float64)]
    np.testing.assert_allclose(grads, want, rtol=1e-5)


def test_log_activation_serialises():
    layer = LogActivation(0.25, -0.5, name="log")
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert (clone.alpha, clone.beta, clone.name) == (0.25, -0.5, "log")


def test_input_gradients_are_finite_through_the_stem():
    """Raw counts with zeros and saturated pixels: no NaN in the gradient w.r.t. the image."""
    m = networks.build_model(make_cfg(*resnet_flags(18)))
    x = tf.constant(np.random.default_rng(0).choice([0.0, 1.0, 65535.0], size=(2, 32, 32, 1)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(m(x, training=True))
    grads = [tape.gradient(loss, x)]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(m(x, training=True))
    grads += tape.gradient(loss, m.trainable_weights)
    assert all(np.isfinite(g.numpy()).all() for g in grads)


# --- architectures ------------------------------------------------------------------------------

@pytest.mark.parametrize("size", sorted(RESNET_BLOCKS))
def test_resnet_parameter_count_and_output(size):
    m = model(*resnet_flags(size))
    params, kernels = expected_resnet(size, 1, NUM_CLASSES)
    assert m.name == f"resnet{size}"
    assert trainable_count(m) == params
    assert len(m.losses) == kernel_count(m) == kernels
    assert m.output_shape == (None, NUM_CLASSES)
    assert m.get_layer("last_block_before_fc").output.shape[1:] == (1, 1, 512 if size < 50 else 2048)


def test_resnet50_formula_matches_the_published_size():
    """The formula above gives the known ~25.5M parameters of ResNet-50 on ImageNet (224x224x3, 1000)."""
    params, _ = expected_resnet(50, 3, 1000)
    assert 25.4e6 < params < 25.6e6


@pytest.mark.parametrize("size", sorted(VGG_GROUPS))
def test_vgg_parameter_count_and_output(size):
    m = model(*vgg_flags(size))
    params, kernels = expected_vgg(size, 1, NUM_CLASSES)
    assert m.name == f"vgg{size}"
    assert trainable_count(m) == params
    assert len(m.losses) == kernel_count(m) == kernels
    assert m.get_layer("last_block_before_fc").output.shape[1:] == (2, 2, 512)  # 32 px before pool5
    logits = m(np.ones((2, 32, 32, 1), np.float32), training=False)  # pool5 leaves a 1x1 map at 32 px
    assert logits.shape == (2, NUM_CLASSES) and logits.dtype == tf.float32


def test_named_layers():
    resnet, vgg = model(*resnet_flags(18)), model(*vgg_flags(16))
    for m in (resnet, vgg):
        for name in ("initial_conv", "log_activation", "last_block_before_fc", "final_dense"):
            m.get_layer(name)
    assert resnet.get_layer("initial_max_pool").output.shape[1:] == (8, 8, 64)
    assert resnet.get_layer("final_avg_pool").output.shape[1:] == (512,)
    assert resnet.get_layer("final_dense").dtype_policy.compute_dtype == "float32"


def test_without_log_activation_the_stem_is_a_plain_conv():
    m = networks.build_model(make_cfg(*resnet_flags(18), "--use_log_act=false"))
    assert "log_activation" not in [layer.name for layer in m.layers]
    assert m.get_layer("initial_max_pool").input is m.get_layer("initial_conv").output


def test_any_target_size_works():
    """At 224 px the last map is 7x7 (the original's 7x7 average pool); odd, non-square sizes work too."""
    m = networks.build_model(make_cfg(*resnet_flags(18), size=224))
    assert m.get_layer("last_block_before_fc").output.shape[1:] == (7, 7, 512)
    cfg = make_cfg(*resnet_flags(18))
    cfg.target_height, cfg.target_width = 50, 37
    assert networks.build_model(cfg)(np.ones((1, 50, 37, 1), np.float32)).shape == (1, NUM_CLASSES)


def test_bad_sizes_name_the_flag():
    cfg = make_cfg(*resnet_flags(18))
    cfg.resnet_size = 20
    with pytest.raises(config.AiryNetError, match="--resnet_size=20"):
        networks.build_model(cfg)
    cfg = make_cfg(*vgg_flags(16))
    cfg.vgg_size = 11
    with pytest.raises(config.AiryNetError, match="--vgg_size=11"):
        networks.build_model(cfg)
    with pytest.raises(config.AiryNetError, match="--target_height=16"):
        networks.build_model(make_cfg(*vgg_flags(16), size=16))


def test_kernel_penalty_is_the_originals_l1_l2():
    """scale_l1 * sum|w| + scale_l2 * sum(w^2) / 2 (tf.nn.l2_loss), per kernel."""
    layer = model(*resnet_flags(18)).get_layer("initial_conv")
    w = layer.kernel.numpy().astype(np.float64)
    want = 1e-5 * np.abs(w).sum() + 1e-5 * (w ** 2).sum() / 2
    assert float(layer.losses[0]) == pytest.approx(want, rel=1e-5)


# --- data formats, dropout, dtype, serialisation ------------------------------------------------

def test_nchw_matches_nhwc_with_the_same_weights():
    nhwc = networks.build_model(make_cfg(*resnet_flags(18)))
    nchw = networks.build_model(make_cfg(*resnet_flags(18), "--use_nchw=true"))
    assert nchw.get_layer("initial_conv").data_format == "channels_first"
    nchw.set_weights(nhwc.get_weights())
    x = np.random.default_rng(1).poisson(20.0, size=(4, 32, 32, 1)).astype(np.float32)
    for training in (False, True):
        a = nhwc(x, training=training).numpy()
        b = nchw(x, training=training).numpy()
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.abs(a).max())
    feats = keras.Model(nchw.input, nchw.get_layer("last_block_before_fc").output)(x).numpy()
    assert feats.shape == (4, 512, 1, 1)


@pytest.mark.parametrize("axis", [-1, 1])
def test_fused_batch_norm_trains_as_keras_batch_norm(axis):
    """The fused training path gives Keras' outputs, gradients and moving averages (float round-off)."""
    x = tf.constant(np.random.default_rng(4).gamma(2.0, 3.0, size=(6, 5, 7, 8)).astype(np.float32))
    layers = [cls(axis=axis, momentum=0.9, epsilon=1e-5) for cls in (keras.layers.BatchNormalization,
                                                                     FusedBatchNormalization)]
    results = []
    for layer in layers:
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 8 if axis == -1 else 5))
        layer.beta.assign(np.linspace(-1.0, 1.0, 8 if axis == -1 else 5))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.sin(y) * tf.range(y.shape[-1], dtype=y.dtype))
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([y, *grads, layer.moving_mean, layer.moving_variance, layer(x, training=False)])
    for keras_value, fused_value in zip(*results):
        np.testing.assert_allclose(np.asarray(fused_value), np.asarray(keras_value), rtol=1e-4, atol=1e-4)
    assert not np.allclose(results[1][5], 1.0)  # the moving variance was updated


def test_vgg_dropout_only_while_training():
    m = model(*vgg_flags(16))
    x = np.random.default_rng(2).poisson(20.0, size=(2, 32, 32, 1)).astype(np.float32)
    np.testing.assert_array_equal(m(x, training=False), m(x, training=False))
    assert not np.allclose(m(x, training=True), m(x, training=True))


def test_mixed_precision_keeps_raw_counts_and_logits_in_float32():
    """65535 counts overflow float16 (max 65504): the stem up to the log activation stays float32."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        m = networks.build_model(make_cfg(*resnet_flags(18)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert m.get_layer("group1_block1_conv1").compute_dtype == "float16"
    logits = m(np.full((1, 32, 32, 1), 65535.0, np.float32), training=False)
    assert logits.dtype == tf.float32 and np.isfinite(logits.numpy()).all()


def test_keras_save_and_load_round_trip(tmp_path):
    m = model(*resnet_flags(18))
    m.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    x = np.random.default_rng(3).poisson(5.0, size=(2, 32, 32, 1)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x, training=False), m(x, training=False))


@pytest.mark.parametrize("airynet_type", ["resnet", "vgg"])
def test_checkpoints_move_between_data_formats(tmp_path, airynet_type):
    """A checkpoint written in NHWC (CPU training) restores into the NCHW model (GPUs) and back."""
    flags = [f"--airynet_type={airynet_type}", "--target_width=32", "--target_height=32"]
    nhwc = networks.build_model(config.parse_args(flags + ["--use_nchw=false"]))
    nchw = networks.build_model(config.parse_args(flags + ["--use_nchw=true"]))
    path = tf.train.Checkpoint(model=nhwc).save(str(tmp_path / "ckpt"))
    status = tf.train.Checkpoint(model=nchw).restore(path)
    status.assert_existing_objects_matched()
    x = tf.random.uniform([2, 32, 32, 1], 0, 500, seed=3)
    np.testing.assert_allclose(nchw(x).numpy(), nhwc(x).numpy(), rtol=1e-4, atol=1e-4)
