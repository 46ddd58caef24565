"""nn/inference.py: the step with and without XLA (--jit_inference) gives the same results on full,
partial and single-shot batches; over a predict it is traced and compiled once. (The step's outputs are
also tested through --mode=predict's files in test_predict.py and through --mode=live in test_live.py.)"""
import logging

import h5py
import numpy as np
import tensorflow as tf
import pytest

from nn import checkpoints, config, inference, predict
from nn.models import gradcam, networks
from nn.recipe import PAPER
from test_predict import CLASSES, cfg_for, predict_dataset, shots, tiny_model

JITS = ("maps", "all")


def small_cfg(*flags):
    return config.parse_args(["--target_height=16", "--target_width=16", f"--num_classes={CLASSES}",
                              "--use_nchw=false", "--batch_size=2", *flags])


def test_step_outputs_equal_the_model_called_directly(tmp_path):
    model, (images, _) = tiny_model(), shots(6)
    logits = model(images).numpy()
    checkpoints.save_thresholds(str(tmp_path), [0.3, 0.5, 0.7], ["0", "1", "2"], step=1, shots=10)
    result = inference.make_step(small_cfg(f"--load_dir={tmp_path}"), model, maps="resized", conv=True)(images)
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose(result["probabilities"].numpy(), probs, atol=1e-5)
    np.testing.assert_array_equal(result["classes"].numpy(), result["probabilities"].numpy() >= [0.3, 0.5, 0.7])
    assert result["classes"].dtype == tf.uint8
    maps = gradcam.gradcam_plus_plus(model, images, "last_block_before_fc")
    np.testing.assert_allclose(result["grad_cam"].numpy(), gradcam.resize_maps(maps, (16, 16)).numpy(), atol=1e-5)
    acts = gradcam.activation_model(model, "last_block_before_fc")(images)[0].numpy()
    np.testing.assert_allclose(result["conv"].numpy(), acts, atol=1e-5)
    plain = inference.make_step(small_cfg("--thresholds=0.5"), model, maps=None)(images)
    assert set(plain) == {"probabilities", "classes"}
    np.testing.assert_array_equal(plain["classes"].numpy(), logits > 0)  # the original rule


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("maps", [None, "layer", "resized"])
def test_xla_step_equals_the_plain_step(tmp_path, model, maps):
    cfg = cfg_for(tmp_path)
    images, _ = shots(4, seed=1)
    plain = inference.make_step(cfg, model, maps, conv=True, jit="none")
    for jit in JITS:
        compiled = inference.make_step(cfg, model, maps, conv=True, jit=jit)
        for n in (4, 3, 1):  # a full batch, a partial one, a single shot
            expected, got = plain(images[:n]), compiled(images[:n])
            assert set(got) == set(expected)
            for name, value in expected.items():
                assert got[name].shape == value.shape, (jit, n, name)
                if name == "classes":
                    np.testing.assert_array_equal(got[name], value)
                else:
                    np.testing.assert_allclose(got[name], value, atol=1e-4, err_msg=f"{jit} {n} {name}")


def test_predict_with_xla_equals_plain_and_traces_once(tmp_path, model, monkeypatch, caplog):
    """9 shots in batches of 4: the last batch holds one shot. Every output row belongs to a shot (the
    padding is dropped), and the step is traced once over the run."""
    images, bids = shots(9, seed=2)
    traces, steps = [], []
    probabilities = networks.probabilities
    make_step = inference.make_step
    monkeypatch.setattr(networks, "probabilities", lambda *a: traces.append(1) or probabilities(*a))
    monkeypatch.setattr(inference, "make_step", lambda *a, **k: steps.append(make_step(*a, **k)) or steps[-1])
    files = {}
    for jit in ("none", *JITS):
        traces.clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="airynet"):
            predict.run(cfg_for(tmp_path / jit, f"--jit_inference={jit}"), PAPER, model,
                        predict_dataset(images, bids))
        assert len(traces) == 1 and steps[-1].experimental_get_tracing_count() == 1, jit
        assert caplog.text.count("XLA compile took") == (jit != "none"), jit
        with h5py.File(tmp_path / jit / "pred" / "helium.h5", "r") as f:
            files[jit] = {name: f[name][:] for name in ("bids", "probs", "preds", "grad_cam", "images")}
    for jit in JITS:
        for name, expected in files["none"].items():
            assert files[jit][name].shape == expected.shape and len(expected) == 9
            np.testing.assert_allclose(files[jit][name], expected, atol=1e-4, err_msg=f"{jit} {name}")


def test_a_batch_larger_than_the_compiled_one_runs_in_chunks(tmp_path, model):
    """Batches of 4 are compiled; 9 images run as three of them, the last padded."""
    images, _ = shots(9, seed=3)
    cfg = cfg_for(tmp_path)
    expected = inference.make_step(cfg, model, "layer", jit="none")(images)
    for jit in JITS:
        got = inference.make_step(cfg, model, "layer", jit=jit)(images)
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, atol=1e-4, err_msg=f"{jit} {name}")
