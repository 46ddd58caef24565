"""The end of a training run whose recipe holds out a calibration share (nn/recipe.py): each class's
decision threshold, chosen on the calibration split (training shots held out from training, never eval
shots; nn/inputs/data.py) to maximise its F1, written to RUN/thresholds.json for eval, predict and save."""
import logging

import numpy as np
import tensorflow as tf

from nn import checkpoints, config, metrics
from nn.inputs import data
from nn.models import networks

log = logging.getLogger("airynet")


def calibrate(cfg, recipe, model, run_dir, step):
    """-> the thresholds [C], also written to run_dir/thresholds.json."""
    @tf.function
    def forward(images):
        return networks.probabilities(model(images, training=False), cfg.single_label)

    scores, truths = [], []
    try:
        for images, labels in data.dataset(cfg, recipe, "calibrate"):
            scores.append(forward(images).numpy())
            truths.append(labels.numpy())
    except data.READ_ERRORS as e:
        raise data.describe_failure(cfg, "train", e) from e
    if not scores:
        log.warning("The calibration split holds no shots; no thresholds.json written (decisions stay at 0.5)")
        return None
    scores, truths = np.concatenate(scores), np.concatenate(truths)
    thresholds = metrics.best_f1_thresholds(scores, truths)
    names = config.class_names(cfg)
    checkpoints.save_thresholds(run_dir, thresholds, names, step, len(scores))
    log.info("Decision thresholds from %d calibration shots (written to %s): %s", len(scores),
             checkpoints.THRESHOLDS_FILE, ", ".join(f"{n} {t:.3f}" for n, t in zip(names, thresholds)))
    return thresholds
