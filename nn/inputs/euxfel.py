"""European XFEL run directories (RAW-R*-*.h5, CORR-R*-*.h5) as predict data, read with EXtra-data.

Two kinds of image source, each giving float32 frames per train with their pulse IDs:
  * ModuleRun: a modular detector whose modules are one source each (AGIPD1M, LPD1M, DSSC1M, JUNGFRAU as
    the facility writes its CORR runs), found with EXtra-data's components. Each train's modules are
    gathered by module number (detectors.ModuleSources, which gathers live mode's bridge messages too)
    and assembled with EXtra-geom. Without --bridge_source the first such detector (by name) is
    taken; --bridge_source names another (or any one of its modules' sources).
  * SourceRun: otherwise one source, picked and assembled as in live mode (nn/inputs/detectors.py:
    --bridge_source, --bridge_key, --geometry), so a run replayed through `karabo-bridge-serve-files` and
    classified live gives the same results as this offline path.
--pulses picks the frames of each train. Each shot is identified by (train ID, pulse): "bunch_id" holds the
train ID.
"""
import dataclasses
import glob
import logging
import os
import warnings

import numpy as np
import tensorflow as tf

from nn.inputs import detectors
from nn.inputs.masks import MASKED_VALUE
from nn.config import AiryNetError, first_line

log = logging.getLogger("airynet")

RUN_FILE_PATTERNS = ("RAW-R*-*.h5", "CORR-R*-*.h5")
# Frames assembled at a time: all of an AGIPD train's 352 at once would take 2 GB.
FRAMES_PER_STEP = 32


def is_run_directory(directory):
    return any(glob.glob(os.path.join(directory, pattern)) for pattern in RUN_FILE_PATTERNS)


def open_run(cfg, directory):
    """The run's image source (ModuleRun or SourceRun), set up from its first train; sets cfg.ori_* to the
    assembled frame so that preprocessing crops and resizes it as in live mode."""
    import extra_data
    try:
        run = extra_data.RunDirectory(directory)
    except Exception as e:  # EXtra-data raises many kinds for files that are not a run
        raise AiryNetError(f"{directory}: not a readable European XFEL run ({type(e).__name__}: {e})") from e
    pulses = detectors.parse_pulses(cfg.pulses)
    component = _modular_detector(run, cfg, directory)
    if component is not None:
        opened = ModuleRun(component, _module_key(component, cfg, directory), pulses, cfg.geometry, directory)
    else:
        opened = SourceRun(run, cfg, pulses, directory)
    log.info("EuXFEL run %s: %s", directory, opened.describe())
    cfg.detector = opened.detector  # recorded in the prediction files (nn/outputs/provenance.py)
    set_frame_size(cfg, opened.detector)
    return opened


def _modular_detector(run, cfg, directory):
    """The EXtra-data component of the modular detector to classify, or None where the run has none (or
    --bridge_source names another source)."""
    from extra_data import components
    classes = [getattr(components, name) for name in detectors.MODULE_KINDS]
    found = sorted(components.identify_multimod_detectors(run, clses=classes), key=lambda f: f[0])
    if cfg.bridge_source:
        module = detectors.MODULE_SOURCE.match(cfg.bridge_source)
        wanted = module["detector"] if module else cfg.bridge_source
        found = [(name, cls) for name, cls in found if name == wanted]
    if not found:
        return None
    if len(found) > 1:
        log.info("%s: modular detectors %s; taking %s (choose with --bridge_source)", directory,
                 ", ".join(name for name, _ in found), found[0][0])
    name, cls = found[0]
    try:
        with warnings.catch_warnings():
            # Where a run holds RAW data only, EXtra-data falls back to it with a warning; ModuleSources
            # then refuses it, as it refuses RAW data from the bridge.
            warnings.simplefilter("ignore")
            return cls(run, detector_name=name)
    except Exception as e:  # EXtra-data's ValueError and SourceNameError for inconsistent modules
        raise AiryNetError(f"{directory}: {name}: {first_line(e)}") from e


def _module_key(component, cfg, directory):
    key = detectors.module_key(type(component).__name__, cfg.bridge_key)
    if key not in component:
        some = next(iter(component.source_to_modno))
        raise AiryNetError(f"{directory}: {component.detector_name}: its module sources have no key {key} "
                           f"(--bridge_key; {some} has {', '.join(sorted(component.data[some].keys()))})")
    return key


class ModuleRun:
    """A modular detector's module sources: EXtra-data's component finds them, their module numbers and
    the trains where at least one module has data (its `min_modules` convention); a module without data in
    a train is NaN there, as EXtra-data fills it, and 0 after assembly."""

    def __init__(self, component, key, pulses, geometry_file, directory):
        kind = type(component).__name__
        first_number = 1 if kind == "JUNGFRAU" else 0  # EXtra-data numbers JUNGFRAU modules from 1, EXtra-geom from 0
        positions = sorted(((source, number - first_number) for source, number in component.source_to_modno.items()),
                           key=lambda position: position[1])
        self.modules = detectors.ModuleSources(component.detector_name, kind, key, tuple(positions),
                                               component.n_modules, tuple(component.module_shape), pulses)
        data = component.data
        # CORR data's own mask (image.mask, data.mask; nonzero = bad), where every module has one.
        mask_key = key.rpartition(".")[0] + ".mask"
        self.masks = (dataclasses.replace(self.modules, key=mask_key)
                      if all(mask_key in data[source].keys() for source, _ in positions) else None)
        self.selection = data.select([(source, k) for source, _ in positions
                                      for k in (key, mask_key, *detectors.PULSE_KEYS) if k in data[source].keys()])
        if self.masks is not None:
            log.info("%s: applying the run's own mask (%s, nonzero = bad): those pixels read %s, as with --mask",
                     directory, mask_key, MASKED_VALUE)
        self.directory = directory
        found = sum((data[source, key].data_counts(labelled=True) > 0).astype(int) for source, _ in positions)
        self.trains_with_gaps, self.train_count = int((found < len(positions)).sum()), len(found)
        stacked, _ = self._stack(*next(iter(self.selection.trains(require_all=False, keep_dims=True))))
        self.detector = detectors.Detector(component.detector_name, key, stacked, geometry_file)

    def _stack(self, train_id, data):
        try:
            return self.modules.stack(data)
        except AiryNetError as e:
            raise AiryNetError(f"{self.directory}: train {train_id}: {e}") from e

    def describe(self):
        gaps = ""
        if self.trains_with_gaps or len(self.modules.positions) < self.modules.n_modules:
            lacking = f"{self.trains_with_gaps} lacking some modules" if self.trains_with_gaps else "all"
            gaps = f" ({lacking}: missing modules are 0 in the frames)"
        return (f"{self.modules.describe()}, {self.train_count} trains{gaps}; "
                f"{self.detector.describe_frames()}")

    def trains(self):
        """(train ID, frames [n, H, W], pulse IDs [n]), a train's frames FRAMES_PER_STEP at a time."""
        for train_id, data in self.selection.trains(require_all=False, keep_dims=True):
            stacked, ids = self._stack(train_id, data)
            if self.masks is not None:  # NaN: what assembly turns into MASKED_VALUE, as a missing module
                stacked[self.masks.stack(data)[0] != 0] = np.nan
            for first in range(0, len(stacked), FRAMES_PER_STEP):
                step = slice(first, first + FRAMES_PER_STEP)
                yield train_id, self.detector.frames(stacked[step]), ids[step]


class SourceRun:
    """One source holding a train's shots (pnCCD, cameras, a detector's modules stacked in one source),
    picked from the first train as live mode picks it; trains without it are skipped."""

    def __init__(self, run, cfg, pulses, directory):
        first = _first_train(run, directory)
        picked = detectors.pick_source(first, cfg.bridge_source, cfg.bridge_key)
        if picked is None:
            raise AiryNetError(f"{directory}: no source with an image key ({_wanted(cfg)}); sources: "
                               f"{', '.join(sorted(run.all_sources)) or 'none'}")
        source, key = picked
        self.detector = detectors.Detector(source, key, first[source][key], cfg.geometry)
        keys = [key] + [k for k in detectors.PULSE_KEYS if k in run[source].keys()]
        self.selection = run.select([(source, k) for k in keys], require_all=True)
        self.pulses, self.directory = pulses, directory

    def describe(self):
        return f"{self.detector.describe()}, {self.pulses}"

    def trains(self):
        """(train ID, frames [n, H, W], pulse IDs [n]) of each train."""
        detector = self.detector
        for train_id, data in self.selection.trains(require_all=True):
            values = data[detector.source]
            array = values[detector.key]
            problem = detector.problem(array)
            if problem:
                raise AiryNetError(f"{self.directory}: train {train_id}: {detector.source} {detector.key}: {problem}")
            chosen = self.pulses.pick(detector.count(array))
            yield train_id, detector.frames(array)[chosen], detector.pulse_ids(values, array)[chosen]


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
    opened = open_run(cfg, directory)
    height, width = opened.detector.frame_shape

    def shots():
        for train_id, frames, pulses in opened.trains():
            for frame, pulse in zip(frames, pulses):
                yield {"image": frame[..., None], "bunch_id": np.int64(train_id), "pulse": pulse}

    spec = {"image": tf.TensorSpec([height, width, 1], tf.float32),
            "bunch_id": tf.TensorSpec([], tf.int64), "pulse": tf.TensorSpec([], tf.int64)}
    return tf.data.Dataset.from_generator(shots, output_signature=spec)
