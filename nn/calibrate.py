"""The end of a training run whose recipe holds out a calibration share (nn/recipe.py): each class's
decision threshold, chosen on the calibration split (training shots held out from training, never eval
shots; nn/inputs/data.py) to maximise its F1, written to RUN/thresholds.json for eval, predict and save.

A run started with --init_from keeps that run's threshold of a class unless the calibration split holds at
least MIN_CALIBRATION_SHOTS positives and as many negatives of it: a best-F1 threshold chosen among fewer
shots follows one or two shots (with 5 positives, one shot moves the recall by 0.2), while the inherited
one was chosen on hundreds."""
import logging

import numpy as np
import tensorflow as tf

from nn import checkpoints, config, metrics
from nn.inputs import data
from nn.models import networks

log = logging.getLogger("airynet")

MIN_CALIBRATION_SHOTS = 10


def calibrate(cfg, recipe, model, run_dir, step, inherited=None):
    """-> the thresholds [C], also written to run_dir/thresholds.json. `inherited`: --init_from's
    thresholds [C], kept for the classes the calibration split holds too few shots of."""
    scores, truths = calibration_scores(cfg, recipe, model)
    names = config.class_names(cfg)
    if not len(scores) and inherited is None:
        log.warning("The calibration split holds no shots; no thresholds.json written (decisions stay at 0.5)")
        return None
    if len(scores):
        thresholds = metrics.best_f1_thresholds(scores, truths)
    kept = None
    if inherited is not None:
        thresholds, kept = choose_or_keep(thresholds if len(scores) else inherited, truths, inherited, names)
    checkpoints.save_thresholds(run_dir, thresholds, names, step, len(scores), kept)
    log.info("Decision thresholds from %d calibration shots (written to %s): %s%s", len(scores),
             checkpoints.THRESHOLDS_FILE, ", ".join(f"{n} {t:.3f}" for n, t in zip(names, thresholds)),
             f"; kept from --init_from: {', '.join(kept) or 'none'}" if kept is not None else "")
    return thresholds


def choose_or_keep(chosen, truths, inherited, names):
    """-> (thresholds, names of the classes whose inherited threshold was kept): a class keeps its
    inherited threshold unless `truths` [N, C] hold MIN_CALIBRATION_SHOTS positives and negatives of it."""
    truths = np.asarray(truths).reshape(-1, len(names)) > 0.5
    positives = truths.sum(axis=0)
    enough = (positives >= MIN_CALIBRATION_SHOTS) & (len(truths) - positives >= MIN_CALIBRATION_SHOTS)
    thresholds = np.where(enough, chosen, inherited).astype(np.float32)
    return thresholds, [n for n, e in zip(names, enough) if not e]


def calibration_scores(cfg, recipe, model):
    """-> (probabilities [N, C], labels [N, C]) of the calibration split."""
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
        return np.zeros((0, cfg.num_classes), np.float32), np.zeros((0, cfg.num_classes), np.float32)
    return np.concatenate(scores), np.concatenate(truths)
