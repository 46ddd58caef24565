"""nn/inference.py: the step's outputs against direct calls of the model, and the arithmetic of its
benchmark (the step is also tested through --mode=predict's files in test_predict.py and through
--mode=live in test_live.py)."""
import numpy as np
import tensorflow as tf

from nn import checkpoints, config, inference
from nn.models import gradcam
from test_predict import CLASSES, shots, tiny_model


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


def test_benchmark_rates_are_shots_over_seconds(monkeypatch):
    """With a clock that advances one second per reading, every variant's rate is its shots per round."""
    clock = iter(range(1000))
    monkeypatch.setattr(inference.time, "perf_counter", lambda: float(next(clock)))
    calls = {}
    make_step = inference.make_step

    def counting_step(cfg, model, maps="layer", conv=False):
        step = make_step(cfg, model, maps, conv)
        calls[maps] = 0

        def counted(images):
            calls[maps] += 1
            return step(images)
        return counted

    monkeypatch.setattr(inference, "make_step", counting_step)
    rates = inference.benchmark(small_cfg(), tiny_model(), 3, repeats=2)
    assert rates == {"without maps": 6.0, "with maps (layer size)": 6.0, "with maps (resized)": 6.0}  # 3 x 2 shots
    assert calls == {None: 7, "layer": 7, "resized": 7}  # a warm-up, then 3 batches a round
