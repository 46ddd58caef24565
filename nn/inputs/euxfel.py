"""European XFEL run directories (RAW-R*-*.h5, CORR-R*-*.h5) as predict data, read with EXtra-data.

The images are picked and assembled as in live mode (nn/inputs/detectors.py: --bridge_source, --bridge_key,
--geometry), so a run replayed through `karabo-bridge-serve-files` and classified live gives the same
results as this offline path. Each shot is identified by (train ID, pulse): "bunch_id" holds the train ID.
"""
import glob
import logging
import os

import numpy as np
import tensorflow as tf

from nn.inputs import detectors
from nn.config import AiryNetError

log = logging.getLogger("airynet")

RUN_FILE_PATTERNS = ("RAW-R*-*.h5", "CORR-R*-*.h5")


def is_run_directory(directory):
    return any(glob.glob(os.path.join(directory, pattern)) for pattern in RUN_FILE_PATTERNS)


def open_run(cfg, directory):
    """(run selected down to the image source, Detector) for the run directory; sets cfg.ori_* to the
    assembled frame so that preprocessing crops and resizes it as in live mode."""
    import extra_data
    try:
        run = extra_data.RunDirectory(directory)
    except Exception as e:  # EXtra-data raises many kinds for files that are not a run
        raise AiryNetError(f"{directory}: not a readable European XFEL run ({type(e).__name__}: {e})") from e
    first = _first_train(run, directory)
    picked = detectors.pick_source(first, cfg.bridge_source, cfg.bridge_key)
    if picked is None:
        raise AiryNetError(f"{directory}: no source with an image key ({_wanted(cfg)}); sources: "
                           f"{', '.join(sorted(run.all_sources)) or 'none'}")
    source, key = picked
    detector = detectors.Detector(source, key, first[source][key], cfg.geometry)
    log.info("EuXFEL run %s: %s", directory, detector.describe())
    cfg.detector = detector  # recorded in the prediction files (nn/outputs/provenance.py)
    set_frame_size(cfg, detector)
    keys = [key] + [k for k in detectors.PULSE_KEYS if k in run[source].keys()]
    return run.select([(source, k) for k in keys], require_all=True), detector


def _first_train(run, directory):
    for _, data in run.trains(require_all=True):
        return data
    raise AiryNetError(f"{directory}: the run holds no trains with data")


def _wanted(cfg):
    source = cfg.bridge_source or "any source"
    key = cfg.bridge_key or " or ".join(detectors.IMAGE_KEYS)
    return f"--bridge_source={source}, --bridge_key={key}"


def set_frame_size(cfg, detector):
    """The run's ori_* come from the frame; the model only sees the target size after preprocessing."""
    height, width = detector.frame_shape
    if (cfg.ori_height, cfg.ori_width, cfg.ori_depth) != (height, width, 1):
        log.info("Frames are %dx%d: --ori_height=%d --ori_width=%d --ori_depth=1", height, width, height, width)
    cfg.ori_height, cfg.ori_width, cfg.ori_depth = height, width, 1


def records(cfg, directory):
    """Unbatched tf.data.Dataset of {"image": [H, W, 1] float32, "bunch_id": int64 train ID, "pulse": int64},
    in train order."""
    run, detector = open_run(cfg, directory)
    height, width = detector.frame_shape

    def shots():
        for train_id, data in run.trains(require_all=True):
            values = data[detector.source]
            array = values[detector.key]
            problem = detector.problem(array)
            if problem:
                raise AiryNetError(f"{directory}: train {train_id}: {detector.source} {detector.key}: {problem}")
            frames = detector.frames(array)
            for frame, pulse in zip(frames, detector.pulse_ids(values, array)):
                yield {"image": frame[..., None], "bunch_id": np.int64(train_id), "pulse": pulse}

    spec = {"image": tf.TensorSpec([height, width, 1], tf.float32),
            "bunch_id": tf.TensorSpec([], tf.int64), "pulse": tf.TensorSpec([], tf.int64)}
    return tf.data.Dataset.from_generator(shots, output_signature=spec)
