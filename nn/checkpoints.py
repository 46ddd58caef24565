"""Checkpoints: `model.ckpt-STEP` in the run directory, TF2 object-based, independent of the data format
(a run trained on GPUs in NCHW predicts on a laptop in NHWC). Restoring a model needs nothing from the
training code, so predict, export, eval and live sorting import this module, never nn.train.
"""
import glob
import json
import logging
import os
import shutil
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from nn.config import AiryNetError, first_line
from nn.files import atomic_file
from nn.models.networks import build_model, freeze_stem
from nn.recipe import weight_average

log = logging.getLogger("airynet")

CHECKPOINT_NAME = "model.ckpt"
THRESHOLDS_FILE = "thresholds.json"
KEEP_CHECKPOINTS = 10


def latest_checkpoint(run_dir):
    return tf.train.latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None


def step_of(path):
    return int(path.rsplit("-", 1)[1])


def restore(checkpoint, path, cfg, partial=False):
    """Restore `path` into a tf.train.Checkpoint, turning a mismatch with the network the flags
    describe into an AiryNetError naming the checkpoint. `partial`: the checkpoint may hold more
    (an optimizer) than `checkpoint` asks for."""
    try:
        status = checkpoint.restore(path)
        if partial:
            status.expect_partial()
        status.assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
        arch = (f"--airynet_type={cfg.airynet_type} --resnet_size={cfg.resnet_size} "
                f"--vgg_size={cfg.vgg_size} --num_classes={cfg.num_classes}")
        raise AiryNetError(f"{path}: checkpoint does not match the network the flags describe ({arch}): "
                           f"{first_line(e)}") from e


def restore_model(cfg, recipe):
    """-> (the network of the run in cfg.load_dir with its latest weights, their step). A run whose
    recipe averages the weights gives the average, which is what it evaluated and calibrated."""
    model = build_model(cfg, recipe.bn_momentum)
    path = load_weights(model, cfg.load_dir, recipe, cfg, "--load_dir", cfg.freeze_stem)
    cfg.restored_checkpoint = path  # for the output files' record of what produced them (nn/outputs/provenance.py)
    return model, step_of(path)


def load_weights(model, run_dir, recipe, cfg, flag, frozen_stem=False):
    """Give `model` the latest weights of the run in `run_dir` (named by `flag` in errors): the averaged
    ones where `recipe` averages them. `frozen_stem`: that run trained with --freeze_stem, so its average
    holds the weights outside the stem only (the model is left with its stem frozen). -> the checkpoint's
    path."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise AiryNetError(f"{flag}={run_dir}: no checkpoint ({CHECKPOINT_NAME}-STEP) found there")
    if frozen_stem:
        freeze_stem(model)
    average = weight_average(recipe, model)
    if average is None:
        restore(tf.train.Checkpoint(model=model), path, cfg, partial=True)
    else:
        restore(tf.train.Checkpoint(model=model, ema=average), path, cfg, partial=True)
        average.copy_to(model)
    log.info("Restored %s (step %d%s)", path, step_of(path), ", averaged weights" if average else "")
    return path


def save_thresholds(run_dir, thresholds, names, step, shots, kept=None):
    """`kept`: where --init_from's thresholds were kept, the names of those classes (saved as
    "kept_from_init")."""
    values = {"step": step, "calibration_shots": shots,
              "thresholds": {name: float(t) for name, t in zip(names, thresholds)}}
    if kept is not None:
        values["kept_from_init"] = list(kept)
    with atomic_file(os.path.join(run_dir, THRESHOLDS_FILE)) as f:
        json.dump(values, f, indent=2)


class DecisionRule(NamedTuple):
    """How 0/1 classes follow from the probabilities: `thresholds` [C] (float32) for `probability >=
    threshold`, or None for the original rule (logit > 0, i.e. probability above 0.5) and for the
    arg-max of --single_label; `text` says which rule and where its thresholds come from, for people."""
    thresholds: np.ndarray | None
    text: str


def decision_rule(cfg):
    """The DecisionRule that --thresholds selects for the run in cfg.load_dir."""
    if cfg.single_label:
        return DecisionRule(None, "arg-max of the probabilities (--single_label)")
    if cfg.thresholds != "run":
        value = float(cfg.thresholds)
        if value == 0.5:
            return DecisionRule(None, "probability > 0.5, the original rule (--thresholds=0.5)")
        return DecisionRule(np.full(cfg.num_classes, value, np.float32),
                            f"probability >= {value:g} for every class (--thresholds={cfg.thresholds})")
    thresholds = read_thresholds(cfg.load_dir, cfg.num_classes) if cfg.load_dir else None
    if thresholds is None:
        return DecisionRule(None, "probability > 0.5, the original rule (the run has no thresholds.json)")
    path = os.path.join(cfg.load_dir, THRESHOLDS_FILE)
    return DecisionRule(thresholds, f"probability >= the run's calibrated thresholds ({os.path.abspath(path)})")


def read_thresholds(run_dir, num_classes):
    """The run's calibrated thresholds [C] (float32), or None where it has no thresholds.json."""
    path = os.path.join(run_dir, THRESHOLDS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            thresholds = np.array(list(json.load(f)["thresholds"].values()), np.float32)
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise AiryNetError(f"{path}: cannot read the decision thresholds ({first_line(e)})") from e
    if thresholds.shape != (num_classes,) or not np.all((thresholds > 0) & (thresholds < 1)):
        raise AiryNetError(f"{path}: expected {num_classes} thresholds in (0, 1)")
    return thresholds


def decision_thresholds(cfg):
    """decision_rule(cfg).thresholds: what the network's 0/1 classes are computed with."""
    return decision_rule(cfg).thresholds


def make_manager(checkpoint, directory, keep=KEEP_CHECKPOINTS):
    """A CheckpointManager writing `model.ckpt-STEP` into `directory`, keeping the last `keep`.

    A run killed while saving leaves the save's temporary directory behind. That checkpoint never
    reached the `checkpoint` index file, which is written last, so the directory is garbage: removed."""
    for leftover in glob.glob(os.path.join(glob.escape(directory), f"{CHECKPOINT_NAME}-*_temp")):
        shutil.rmtree(leftover, ignore_errors=True)
    return tf.train.CheckpointManager(checkpoint, directory, checkpoint_name=CHECKPOINT_NAME, max_to_keep=keep)
