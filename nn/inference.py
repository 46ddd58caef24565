"""The network applied to a batch of images, as one tf.function: probabilities, 0/1 classes by the run's
decision rule (--thresholds) and, where asked for, the Grad-CAM++ maps and the activations they come
from. Shared by --mode=predict, --mode=live and scripts/benchmark.py.
"""
import time

import tensorflow as tf

from nn import checkpoints
from nn.models import gradcam, networks


def make_step(cfg, model, maps="layer", conv=False):
    """tf.function images [B, H, W, D] -> {"probabilities", "classes" (uint8) and, unless `maps` is
    None, "grad_cam" float32 [B, C, h, w]}: at the target layer's resolution ("layer") or resized to
    the input size ("resized"); with `conv`, also the target layer's activations "conv" float32
    [B, h, w, K]."""
    spec = tf.TensorSpec([None, cfg.target_height, cfg.target_width, cfg.target_depth], tf.float32)
    thresholds = checkpoints.decision_thresholds(cfg)

    def outputs(logits):
        return {"probabilities": networks.probabilities(logits, cfg.single_label),
                "classes": tf.cast(networks.predicted_classes(logits, cfg.single_label, thresholds), tf.uint8)}

    if maps is None and not conv:
        return tf.function(lambda images: outputs(model(images, training=False)), input_signature=[spec])
    act_model = gradcam.activation_model(model, networks.GRADCAM_LAYER)
    channels_first = gradcam.is_channels_first(model)

    @tf.function(input_signature=[spec])
    def step(images):
        if maps is None:
            acts, logits = act_model(images, training=False)
            result = outputs(logits)
            if channels_first:
                acts = tf.transpose(acts, [0, 2, 3, 1])
        else:
            logits, cams, acts = gradcam.logits_and_maps(act_model, images, channels_first, with_activations=True)
            if maps == "resized":
                cams = gradcam.resize_maps(cams, (cfg.target_height, cfg.target_width))
            result = {**outputs(logits), "grad_cam": cams}
        if conv:
            result["conv"] = tf.cast(acts, tf.float32)
        return result

    return step


def map_size(model):
    """(h, w) of the Grad-CAM++ maps at the target layer's resolution."""
    shape = model.get_layer(networks.GRADCAM_LAYER).output.shape
    return tuple(shape[2:4]) if gradcam.is_channels_first(model) else tuple(shape[1:3])


def conv_shape(model):
    """(h, w, K) of the Grad-CAM layer's activations, channels last."""
    shape = tuple(model.get_layer(networks.GRADCAM_LAYER).output.shape[1:])
    return shape[1:] + shape[:1] if gradcam.is_channels_first(model) else shape


def benchmark(cfg, model, n_batches, repeats=2):
    """{variant: images per second} of the step alone (no input pipeline, no files) on random batches of
    cfg.batch_size: without maps, with the maps at layer resolution (the stacked layout) and resized to
    the input (the per-shot layout). The variants take turns so that a neighbour's load on the CPU hits
    them alike; the best of `repeats` rounds is reported."""
    images = tf.random.uniform([cfg.batch_size, cfg.target_height, cfg.target_width, cfg.target_depth],
                               0, 100 if cfg.use_log_act else 1)
    variants = {"without maps": None, "with maps (layer size)": "layer", "with maps (resized)": "resized"}
    steps = {name: make_step(cfg, model, maps) for name, maps in variants.items()}
    for step in steps.values():
        step(images)["probabilities"].numpy()  # trace and warm up
    rates = {name: 0.0 for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(n_batches):
                out = step(images)
            out["probabilities"].numpy()
            rates[name] = max(rates[name], n_batches * cfg.batch_size / (time.perf_counter() - start))
    return rates
