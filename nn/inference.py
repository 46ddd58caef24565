"""The network applied to a batch of images, as one tf.function: probabilities, 0/1 classes by the run's
decision rule (--thresholds), the out-of-distribution score and `unknown` where the run has fitted one
(nn/ood.py) and, where asked for, the Grad-CAM++ maps and the activations they come from. Shared by
--mode=predict, --mode=live and scripts/benchmark.py.

--jit_inference chooses what XLA compiles: the Grad-CAM++ maps, from the target layer's activations on
("maps", the default), the whole step ("all") or nothing ("none"). On CPUs oneDNN's convolutions, which
TensorFlow's graph uses, beat the ones XLA emits, while XLA fuses the head's Jacobian and the maps into a
few loops (docs/performance.md, "XLA inference"). The compiled part always runs at --batch_size: a shorter
batch (predict's last one, a live batch) is padded with zeros and the padding dropped from every output,
so XLA compiles it once, when the step is made, and never in the middle of a run.
"""
import logging
import time

import keras
import tensorflow as tf

from nn import checkpoints, ood
from nn.models import gradcam, networks

log = logging.getLogger("airynet")


def make_step(cfg, model, maps="layer", conv=False, jit=None):
    """tf.function images [B, H, W, D] -> {"probabilities", "classes" (uint8) and, unless `maps` is None,
    "grad_cam" float32 [B, C, h, w]} at the target layer's resolution ("layer") or resized to the input
    size ("resized"); with `conv`, also the target layer's activations "conv" float32 [B, h, w, K]; where the
    run has an out-of-distribution fit, "ood_score" float32 [B] and "unknown" uint8 [B], from the same pass.
    `jit`: what XLA compiles (default: --jit_inference)."""
    jit = cfg.jit_inference if jit is None else jit
    shape = [cfg.target_height, cfg.target_width, cfg.target_depth]
    thresholds = checkpoints.decision_thresholds(cfg)
    channels_first = gradcam.is_channels_first(model)
    scorer = ood.load(cfg)
    # One forward pass gives the Grad-CAM layer's activations, the logits and the score's features.
    act_model = keras.Model(model.input, [model.get_layer(networks.GRADCAM_LAYER).output, model.output,
                                          *(scorer.tensors(model) if scorer else [])])
    head = gradcam.head_model(model, networks.GRADCAM_LAYER)

    def outputs(logits):
        return {"probabilities": networks.probabilities(logits, cfg.single_label),
                "classes": tf.cast(networks.predicted_classes(logits, cfg.single_label, thresholds), tf.uint8)}

    def with_maps(acts):  # the target layer's activations -> the outputs and the maps
        logits, cams = gradcam.head_maps(head, acts, channels_first)
        if maps == "resized":
            cams = gradcam.resize_maps(cams, (cfg.target_height, cfg.target_width))
        return {**outputs(logits), "grad_cam": cams}

    if maps is not None and jit == "maps":
        target = act_model.outputs[0]
        with_maps = _compiled(with_maps, tf.TensorSpec([cfg.batch_size, *target.shape[1:]], target.dtype))

    def network(images):
        if maps is None and not conv and scorer is None:
            return outputs(model(images, training=False))
        acts, logits, *features = act_model(images, training=False)
        result = outputs(logits) if maps is None else with_maps(acts)
        if scorer is not None:
            result.update(scorer(logits, features))
        if conv:
            result["conv"] = tf.cast(tf.transpose(acts, [0, 2, 3, 1]) if channels_first else acts, tf.float32)
        return result

    if jit == "all":
        network = _compiled(network, tf.TensorSpec([cfg.batch_size, *shape], tf.float32))
    return tf.function(network, input_signature=[tf.TensorSpec([None, *shape], tf.float32)])


def _compiled(fn, spec):
    """`fn` of one tensor, compiled by XLA now for batches of exactly spec's size (logged with the time
    it took), as a function of a batch of any size: it runs in chunks of that size, the last one padded
    with zeros, and the padding is dropped from every output."""
    compiled = tf.function(fn, input_signature=[spec], jit_compile=True)
    start = time.perf_counter()
    compiled(tf.zeros(spec.shape, spec.dtype))  # compiles it; the time includes this one run on zeros
    log.info("XLA compile took %.1f s", time.perf_counter() - start)
    outputs = compiled.get_concrete_function().structured_outputs
    size = spec.shape[0]

    def padded(x):
        n = tf.shape(x)[0]
        chunks = (n + size - 1) // size
        x = tf.pad(x, [[0, chunks * size - n]] + [[0, 0]] * (x.shape.rank - 1))
        result = tf.map_fn(compiled, tf.reshape(x, [chunks, *spec.shape]),
                           fn_output_signature={name: tf.TensorSpec.from_tensor(t) for name, t in outputs.items()})
        return {name: tf.reshape(value, [-1, *value.shape[2:]])[:n] for name, value in result.items()}

    return padded


def map_size(model):
    """(h, w) of the Grad-CAM++ maps at the target layer's resolution."""
    shape = model.get_layer(networks.GRADCAM_LAYER).output.shape
    return tuple(shape[2:4]) if gradcam.is_channels_first(model) else tuple(shape[1:3])


def conv_shape(model):
    """(h, w, K) of the Grad-CAM layer's activations, channels last."""
    shape = tuple(model.get_layer(networks.GRADCAM_LAYER).output.shape[1:])
    return shape[1:] + shape[:1] if gradcam.is_channels_first(model) else shape
