"""Checkpoints: `model.ckpt-STEP` in the run directory, TF2 object-based, independent of the data format
(a run trained on GPUs in NCHW predicts on a laptop in NHWC). Restoring a model needs nothing from the
training code, so predict, export, eval and live sorting import this module, never nn.train.
"""
import glob
import logging
import os
import shutil

import tensorflow as tf

from nn.config import AiryNetError, first_line
from nn.networks import build_model

log = logging.getLogger("airynet")

CHECKPOINT_NAME = "model.ckpt"
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


def restore_model(cfg):
    """-> (the network of the run in cfg.load_dir with its latest weights, their step)."""
    path = latest_checkpoint(cfg.load_dir)
    if path is None:
        raise AiryNetError(f"--load_dir={cfg.load_dir}: no checkpoint ({CHECKPOINT_NAME}-STEP) found there")
    model = build_model(cfg)
    restore(tf.train.Checkpoint(model=model), path, cfg, partial=True)
    log.info("Restored %s (step %d)", path, step_of(path))
    return model, step_of(path)


def make_manager(checkpoint, directory, keep=KEEP_CHECKPOINTS):
    """A CheckpointManager writing `model.ckpt-STEP` into `directory`, keeping the last `keep`.

    A run killed while saving leaves the save's temporary directory behind. That checkpoint never
    reached the `checkpoint` index file, which is written last, so the directory is garbage: removed."""
    for leftover in glob.glob(os.path.join(glob.escape(directory), f"{CHECKPOINT_NAME}-*_temp")):
        shutil.rmtree(leftover, ignore_errors=True)
    return tf.train.CheckpointManager(checkpoint, directory, checkpoint_name=CHECKPOINT_NAME, max_to_keep=keep)
