"""The record of what produced a prediction file: root attributes of both h5 layouts, from a restored run
with calibrated thresholds, from a European XFEL run, and as --mode=live and other flags describe them."""
import os

import h5py
import numpy as np
import pytest
import tensorflow as tf

from nn import checkpoints, config, predict
from nn.recipe import PAPER
from nn.models import networks
from test_euxfel import PNCCD, write_pnccd_run
from test_predict import CLASSES, cfg_for, tiny_model


def trained_run(run_dir, cfg, thresholds):
    """A run directory holding checkpoint 7 of the network `cfg` describes and its thresholds.json."""
    os.makedirs(run_dir)
    tf.train.CheckpointManager(tf.train.Checkpoint(model=networks.build_model(cfg)), run_dir,
                               checkpoint_name=checkpoints.CHECKPOINT_NAME, max_to_keep=1).save(7)
    checkpoints.save_thresholds(run_dir, thresholds, config.class_names(cfg), step=7, shots=30)


@pytest.mark.parametrize("layout", ["stacked", "per_shot"])
def test_files_record_the_model_its_thresholds_and_the_data(tfrecord_dir, tmp_path, layout):
    run_dir = str(tmp_path / "run")
    cfg = cfg_for(tmp_path, f"--data_dir={tfrecord_dir}", "--ori_height=40", "--ori_width=40", f"--load_dir={run_dir}",
                  "--gradcam=false", f"--h5_layout={layout}")
    trained_run(run_dir, cfg, [0.2, 0.4, 0.6])
    model, _ = checkpoints.restore_model(cfg, PAPER)
    predict.run(cfg, PAPER, model)
    with h5py.File(tmp_path / "pred" / "helium.h5", "r") as f:
        attrs = dict(f.attrs)
        probs = f["probs"][:] if layout == "stacked" else np.array([f[g]["probability"][:] for g in f])
        preds = f["preds"][:] if layout == "stacked" else np.array([f[g]["prediction"][:] for g in f])
    assert attrs["load_dir"] == os.path.abspath(run_dir) and attrs["network"] == "resnet18"
    assert attrs["checkpoint"] == os.path.join(os.path.abspath(run_dir), "model.ckpt-7")
    assert attrs["checkpoint_step"] == 7
    np.testing.assert_array_equal(attrs["thresholds"], np.float32([0.2, 0.4, 0.6]))
    assert attrs["decision_rule"] == ("probability >= the run's calibrated thresholds "
                                      f"({os.path.abspath(run_dir)}/thresholds.json)")
    np.testing.assert_array_equal(preds, probs >= np.float32([0.2, 0.4, 0.6]))  # the rule recorded is the one applied
    assert len(probs) == 8
    assert attrs["data_source"] == f"{os.path.abspath(tfrecord_dir + 'helium')} (TFRecord files)"
    assert attrs["dataset"] == "helium" and attrs["data_dir"] == tfrecord_dir
    assert not {"detector_source", "detector_key", "geometry"} & set(attrs)


def test_a_european_xfel_run_records_its_detector(tmp_path):
    rng = np.random.default_rng(0)
    write_pnccd_run(str(tmp_path / "runs" / "r0042"), rng.gamma(0.5, 40.0, (5, 40, 40)).astype(np.float32))
    cfg = cfg_for(tmp_path, f"--data_dir={tmp_path}/runs/", "--dataset=r0042", "--gradcam=false")
    predict.run(cfg, PAPER, tiny_model())
    with h5py.File(tmp_path / "pred" / "r0042.h5", "r") as f:
        attrs = dict(f.attrs)
        assert len(f["bids"]) == 5
    assert attrs["detector_source"] == f"{PNCCD}:output" and attrs["detector_key"] == "data.image"
    assert attrs["geometry"] == "none: the frames as stored"  # a 40x40 frame is no modular detector
    assert attrs["data_source"] == f"{tmp_path}/runs/r0042 (a European XFEL run)"
    assert attrs["decision_rule"] == "probability > 0.5, the original rule (the run has no thresholds.json)"
    np.testing.assert_array_equal(attrs["thresholds"], np.full(CLASSES, 0.5, np.float32))
    assert "load_dir" not in attrs and "checkpoint" not in attrs  # a model handed over, not restored


def test_live_records_its_bridge_and_what_the_flags_ask_for(tmp_path):
    from nn.outputs import provenance
    (tmp_path / "agipd.geom").write_text("")
    cfg = config.parse_args(["--mode=live", f"--load_dir={tmp_path}", "--bridge=tcp://host:4545",
                             f"--geometry={tmp_path}/agipd.geom", "--thresholds=0.3"])
    attrs = provenance.attributes(cfg)
    assert attrs["data_source"] == "Karabo bridge tcp://host:4545 (REQ socket)"
    assert attrs["detector_source"] == "the first source with an image key"
    assert attrs["detector_key"] == "data.image or image.data"
    assert attrs["geometry"] == f"{tmp_path}/agipd.geom"
    assert attrs["decision_rule"] == "probability >= 0.3 for every class (--thresholds=0.3)"
    np.testing.assert_array_equal(attrs["thresholds"], np.full(11, 0.3, np.float32))
    assert "dataset" not in attrs


def test_simulated_data_and_single_label_runs():
    from nn.outputs import provenance
    cfg = config.parse_args(["--dataset=synthetic", "--single_label=true", "--random_seed=5"])
    attrs = provenance.attributes(cfg, "synthetic")
    assert attrs["data_source"] == "simulated helium shots (nn/inputs/simulate.py version 2, --random_seed=5)"
    assert attrs["decision_rule"] == "arg-max of the probabilities (--single_label)" and "thresholds" not in attrs
    assert all(isinstance(v, (str, int, np.ndarray)) for v in attrs.values())  # what HDF5 attributes hold
