"""The out-of-distribution score of every shot: higher = less like the shots the run was trained on; and
`unknown`, the score above a threshold that 95% of in-distribution shots training did not use stay under.

Candidates (docs/ood.md measures them; DEFAULT_METHOD is the best there):
  mahalanobis         squared Mahalanobis distance of the L2-normalised penultimate features (the input of
                      `final_dense`) from their training mean, under their training covariance, per dimension;
  mahalanobis_layers  the same summed over the global-average-pooled output of each ResNet group and the
                      penultimate features (a VGG has the penultimate features only);
  knn                 the distance of the normalised penultimate features to their K-th nearest training shot;
  energy              -sum_c log(1 + e^logit_c) (multi-label; --single_label: -logsumexp);
  max_logit           -max_c logit_c.

The fit (`fit_run`, at the end of training and in scripts/fit_ood.py): the statistics come from up to
FIT_SHOTS training shots, unaugmented; the threshold from the calibration split (--recipe=modern), or the
eval split where the run holds no calibration shots (--recipe=paper): shots that the statistics and the
training did not see, since the distances of fitted shots are smaller than those of new ones. Both go to
RUN/ood.npz beside thresholds.json. A run without the file gets no score (`load`).
"""
import logging
import os
import re

import keras
import numpy as np
import tensorflow as tf

from nn import config
from nn.files import atomic_path
from nn.inputs import data
from nn.models import gradcam

log = logging.getLogger("airynet")

OOD_FILE = "ood.npz"
METHODS = ("mahalanobis", "mahalanobis_layers", "knn", "energy", "max_logit")
DEFAULT_METHOD = "mahalanobis_layers"
FEATURE_METHODS = ("mahalanobis", "mahalanobis_layers", "knn")
IN_DISTRIBUTION_PASS = 0.95  # share of held-back in-distribution shots under the threshold
FIT_SHOTS = 2048
THRESHOLD_SHOTS = 2048
KNN_K = 10
# Ridge added to each covariance, relative to its mean variance: a few thousand shots estimate a
# 512-dimensional covariance poorly in its smallest directions, which would dominate the distance.
SHRINKAGE = 0.01
_GROUP_OUTPUT = re.compile(r"group(\d+)_block(\d+)_add$")


# ----------------------------------------------------------------------------------------------
# Features

def feature_tensors(model, method):
    """The symbolic tensors [B, K] of `model` that `method` scores (none for the logit methods)."""
    if method not in FEATURE_METHODS:
        return []
    penultimate = model.get_layer("final_dense").input
    if method != "mahalanobis_layers":
        return [penultimate]
    last = {}
    for layer in model.layers:  # the last block of each ResNet group
        match = _GROUP_OUTPUT.match(layer.name)
        if match:
            group, block = int(match[1]), int(match[2])
            if block >= last.get(group, (0, None))[0]:
                last[group] = (block, layer)
    df = "channels_first" if gradcam.is_channels_first(model) else "channels_last"
    pooled = [keras.layers.GlobalAveragePooling2D(data_format=df, name=f"ood_pool_group{g}")(
              tf_float(last[g][1].output)) for g in sorted(last)]
    return pooled + [penultimate]


def tf_float(x):
    return keras.ops.cast(x, "float32")


def feature_model(model, method):
    """images -> [logits, *features] in one forward pass."""
    return keras.Model(model.input, [model.output, *feature_tensors(model, method)])


def collect(cfg, recipe, model, mode, method, max_shots):
    """(logits [N, C], [features [N, K] per block]) of up to `max_shots` shots of `mode` data, read once
    in order and unaugmented; N may be 0."""
    net = feature_model(model, method)
    forward = tf.function(lambda images: net(images, training=False))
    logits, blocks, shots = [], [], 0
    try:
        for batch in data.dataset(cfg, recipe, mode, one_pass=True):
            images = batch["image"] if isinstance(batch, dict) else batch[0]
            out = [np.asarray(t, np.float32) for t in forward(images)]
            logits.append(out[0])
            blocks.append(out[1:])
            shots += len(out[0])
            if shots >= max_shots:
                break
    except data.READ_ERRORS as e:
        raise data.describe_failure(cfg, "train" if mode == "calibrate" else mode, e) from e
    if not logits:
        return np.zeros((0, cfg.num_classes), np.float32), []
    features = [np.concatenate(parts)[:max_shots] for parts in zip(*blocks)]
    return np.concatenate(logits)[:max_shots], features


# ----------------------------------------------------------------------------------------------
# Statistics and scores

def normalised(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def fit_stats(method, features):
    """The arrays that `score` needs for `method`, from training features [N, K] per block."""
    stats = {}
    if method == "knn":
        stats["bank"] = normalised(features[-1]).astype(np.float32)
    elif method in FEATURE_METHODS:
        for b, f in enumerate(features):
            z = normalised(f.astype(np.float64))
            cov = np.cov(z, rowvar=False)
            cov += SHRINKAGE * np.trace(cov) / len(cov) * np.eye(len(cov))
            stats[f"mean{b}"] = z.mean(axis=0).astype(np.float32)
            stats[f"precision{b}"] = np.linalg.inv(cov).astype(np.float32)
    return stats


def score(method, stats, logits, features, single_label=False):
    """float32 scores [B] (TensorFlow ops; numpy arrays or tensors in)."""
    logits = tf.cast(logits, tf.float32)
    if method == "energy":
        return -(tf.reduce_logsumexp(logits, -1) if single_label else tf.reduce_sum(tf.nn.softplus(logits), -1))
    if method == "max_logit":
        return -tf.reduce_max(logits, -1)
    zs = [tf.math.l2_normalize(tf.cast(f, tf.float32), -1, epsilon=1e-24) for f in features]
    if method == "knn":
        similarity = tf.matmul(zs[-1], tf.constant(stats["bank"]), transpose_b=True)
        kth = -tf.math.top_k(-tf.sqrt(tf.maximum(2.0 - 2.0 * similarity, 0.0)), KNN_K).values[:, -1]
        return kth
    total = 0.0
    for b, z in enumerate(zs):
        d = z - tf.constant(stats[f"mean{b}"])
        total += tf.reduce_sum(tf.matmul(d, tf.constant(stats[f"precision{b}"])) * d, -1) / float(z.shape[-1])
    return total


def threshold_of(scores):
    """The score that IN_DISTRIBUTION_PASS of `scores` (held-back in-distribution shots) stay at or under."""
    return float(np.quantile(scores, IN_DISTRIBUTION_PASS))


# ----------------------------------------------------------------------------------------------
# The run's file

class Scorer:
    """A run's fitted score: `tensors(model)` are the features it needs from the network's forward pass;
    calling it on (logits, features) gives {"ood_score" float32 [B], "unknown" uint8 [B]}."""

    def __init__(self, method, stats, threshold, text, single_label=False):
        self.method, self.stats, self.threshold, self.text = method, stats, threshold, text
        self.single_label = single_label

    def tensors(self, model):
        return feature_tensors(model, self.method)

    def __call__(self, logits, features):
        s = score(self.method, self.stats, logits, features, self.single_label)
        return {"ood_score": s, "unknown": tf.cast(s > self.threshold, tf.uint8)}

    def attributes(self):
        """What the output files record about the score (nn/outputs/provenance.py)."""
        return {"ood_method": self.method, "ood_threshold": np.float32(self.threshold), "ood_fit": self.text}


def save(run_dir, method, stats, threshold, info):
    """RUN/ood.npz: the method, its statistics, the threshold and `info` (a line on what they came from)."""
    with atomic_path(os.path.join(run_dir, OOD_FILE)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, method=method, threshold=np.float64(threshold), info=info, **stats)


def load(cfg):
    """The Scorer of the run in cfg.load_dir; None (with a one-line note, once) where the run has none."""
    path = os.path.join(cfg.load_dir, OOD_FILE) if cfg.load_dir else ""
    if not path or not os.path.isfile(path):
        if path and not getattr(cfg, "ood_note_given", False):
            log.info("%s has no %s (a run trained before the out-of-distribution score): no ood_score or "
                     "unknown in the outputs; scripts/fit_ood.py --load_dir=RUN fits one", cfg.load_dir, OOD_FILE)
            cfg.ood_note_given = True
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        method, threshold, info = str(arrays.pop("method")), float(arrays.pop("threshold")), str(arrays.pop("info"))
    except (OSError, ValueError, KeyError) as e:
        raise config.AiryNetError(f"{path}: cannot read the out-of-distribution statistics "
                                  f"({config.first_line(e)})") from e
    if method not in METHODS:
        raise config.AiryNetError(f"{path}: unknown out-of-distribution method {method!r}")
    return Scorer(method, arrays, threshold, f"{info} ({os.path.abspath(path)})", cfg.single_label)


def fit_run(cfg, recipe, model, run_dir, step, method=DEFAULT_METHOD):
    """Fit `method` on the run's data and write RUN/ood.npz; -> the threshold, or None where a split is empty."""
    held_back = "calibrate" if recipe.calibration_share > 0 else "eval"
    _, train_features = collect(cfg, recipe, model, "train", method, FIT_SHOTS)
    logits, features = collect(cfg, recipe, model, held_back, method, THRESHOLD_SHOTS)
    if not len(logits) or (method in FEATURE_METHODS and not len(train_features[0])):
        log.warning("No %s shots to fit the out-of-distribution score on; no %s written",
                    "training" if len(logits) else held_back, OOD_FILE)
        return None
    stats = fit_stats(method, train_features)
    threshold = threshold_of(score(method, stats, logits, features, cfg.single_label).numpy())
    split = "calibration split" if held_back == "calibrate" else "eval split (the run has no calibration split)"
    fitted = f"{len(train_features[0])} training shots" if method in FEATURE_METHODS else "nothing"
    info = (f"{method} at step {step}: statistics from {fitted}, threshold {threshold:.6g} passing "
            f"{IN_DISTRIBUTION_PASS:.0%} of {len(logits)} shots of the {split}")
    save(run_dir, method, stats, threshold, info)
    log.info("Out-of-distribution score (written to %s): %s", OOD_FILE, info)
    return threshold
