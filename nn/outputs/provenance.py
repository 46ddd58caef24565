"""What produced a prediction file, recorded as root attributes of the h5 files of --mode=predict and
--mode=live (README, Outputs), so that a file found on disk months later still says which model,
decision rule and data made it.

    attrs = provenance.attributes(cfg, data_kind)   # then StackedWriter(..., attrs) or PerShotWriter(..., attrs)

Every value is a string, a number or an array of numbers; entries that do not apply are left out.
"""
import os

import numpy as np

from nn import checkpoints, ood
from nn.inputs import data, detectors, masks

DATA_KINDS = {"tfrecord": "TFRecord files", "cxi": "CXI/HDF5 files", "euxfel": "a European XFEL run"}


def attributes(cfg, data_kind=None):
    """The root attributes describing the run of `cfg`: its network, model, decision rule and data.
    `data_kind`: what nn.inputs.data.find_files found for the predict data ("tfrecord", "cxi", "euxfel",
    "synthetic"), None where the data did not come from --data_dir/--dataset; --mode=live records its bridge."""
    network = f"resnet{cfg.resnet_size}" if cfg.airynet_type == "resnet" else f"vgg{cfg.vgg_size}"
    attrs = {"network": network, **_model(cfg), **_decisions(cfg), **_ood(cfg),
             **masks.record(cfg.mask, cfg.mask_good)}
    if cfg.mode == "live":
        attrs.update(data_source=f"Karabo bridge {cfg.bridge} ({cfg.bridge_socket} socket)", **_detector(cfg))
    else:
        attrs.update(_data(cfg, data_kind))
    return attrs


def _model(cfg):
    """The run directory and the checkpoint restored from it (nn.checkpoints.restore_model records it)."""
    attrs = {"load_dir": os.path.abspath(cfg.load_dir)} if cfg.load_dir else {}
    restored = getattr(cfg, "restored_checkpoint", None)
    if restored:
        attrs.update(checkpoint=os.path.abspath(restored), checkpoint_step=checkpoints.step_of(restored))
    return attrs


def _decisions(cfg):
    """The rule behind `preds` and, where classes are decided by thresholds, each class's threshold
    (0.5 for the original rule, which calls a class above it)."""
    rule = checkpoints.decision_rule(cfg)
    attrs = {"decision_rule": rule.text}
    if not cfg.single_label:
        thresholds = rule.thresholds if rule.thresholds is not None else np.full(cfg.num_classes, 0.5)
        attrs["thresholds"] = np.asarray(thresholds, np.float32)
    return attrs


def _ood(cfg):
    """The out-of-distribution score's method, threshold and fit; a line saying there is none."""
    scorer = ood.load(cfg)
    return scorer.attributes() if scorer else {"ood_method": f"none: the run has no {ood.OOD_FILE}"}


def _data(cfg, kind):
    attrs = {"dataset": cfg.dataset, "data_dir": cfg.data_dir}
    if kind == "synthetic":
        attrs["data_source"] = (f"simulated helium shots (nn/inputs/simulate.py version {cfg.sim_version}, "
                                f"--random_seed={cfg.random_seed})")
    elif kind is not None:
        attrs["data_source"] = f"{os.path.abspath(data.dataset_dir(cfg))} ({DATA_KINDS[kind]})"
    if kind == "euxfel":
        attrs.update(_detector(cfg))
    return attrs


def _detector(cfg):
    """Where the images came from in a EuXFEL source and how they were assembled: the detector that
    nn.inputs.euxfel found (cfg.detector), else (live, whose receiver finds it later) what the flags ask."""
    found = getattr(cfg, "detector", None)
    if found is None:
        return {"detector_source": cfg.bridge_source or "the first source with an image key",
                "detector_key": cfg.bridge_key or " or ".join(detectors.IMAGE_KEYS),
                "geometry": os.path.abspath(cfg.geometry) if cfg.geometry else
                "EXtra-geom's example geometry where the detector is modular"}
    if found.geometry is None:
        geometry = "none: the frames as stored"
    elif cfg.geometry:
        geometry = os.path.abspath(cfg.geometry)
    else:
        geometry = f"EXtra-geom's example geometry ({type(found.geometry).__name__})"
    return {"detector_source": found.source, "detector_key": found.key, "geometry": geometry}
