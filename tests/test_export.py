"""--mode=save: the SavedModel reproduces predict's probabilities from raw detector images."""
import os

import h5py
import numpy as np
import pytest
import tensorflow as tf

from conftest import SIZE, make_cfg
from nn import export, predict
from nn.inputs import preprocess
from nn.models import networks
from nn.config import AiryNetError
from nn.recipe import PAPER


@pytest.mark.parametrize("flags", [[], ["--use_log_act=false", "--target_depth=3"]])
def test_saved_model_matches_the_network_on_preprocessed_images(tmp_path, flags):
    cfg = make_cfg(f"--save_dir={tmp_path / 'model'}", "--use_nchw=false", *flags)
    model = networks.build_model(cfg)
    raw = np.random.default_rng(0).gamma(0.3, 300.0, (3, SIZE, SIZE, 1)).astype(np.float32)
    export.save(cfg, PAPER, model)
    assert os.listdir(tmp_path) == ["model"]  # no temporary directory left beside it
    serve = tf.saved_model.load(str(tmp_path / "model")).signatures["serving_default"]
    out = serve(images=tf.constant(raw))
    expected = tf.sigmoid(model(preprocess.preprocess(raw, cfg, PAPER, training=False), training=False)).numpy()
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(out["classes"].numpy(), (expected > 0.5).astype(np.int32))
    assert serve.structured_input_signature[1]["images"].shape.as_list() == [None, SIZE, SIZE, 1]


def test_refuses_a_non_empty_save_dir(tmp_path):
    cfg = make_cfg(f"--save_dir={tmp_path}", "--use_nchw=false", "--target_height=16", "--target_width=16")
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(AiryNetError, match="--save_dir=.*not an empty directory"):
        export.save(cfg, PAPER, networks.build_model(cfg))
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_saved_model_reproduces_predict_mode(tfrecord_dir, shots, tmp_path):
    """The raw predict shots through the SavedModel give the probabilities --mode=predict wrote."""
    cfg = make_cfg(f"--data_dir={tfrecord_dir}", f"--predict_dir={tmp_path / 'pred'}",
                   f"--save_dir={tmp_path / 'model'}", "--use_nchw=false", "--gradcam=false")
    model = networks.build_model(cfg)
    predict.run(cfg, PAPER, model)
    export.save(cfg, PAPER, model)
    raw = shots[0][16:, :, :, None].astype(np.float32)  # the records of shots_predict.tfrecord
    out = tf.saved_model.load(str(tmp_path / "model")).signatures["serving_default"](images=tf.constant(raw))
    with h5py.File(tmp_path / "pred" / "helium.h5", "r") as f:
        np.testing.assert_allclose(out["probabilities"].numpy(), f["probs"][:], atol=1e-5)
        np.testing.assert_array_equal(out["classes"].numpy(), f["preds"][:])
