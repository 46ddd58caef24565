"""--init_from: a new run from another run's weights, its flags, its thresholds; --freeze_stem."""
import json
import os

import numpy as np
import pytest

import airynet
from nn import calibrate, checkpoints, config
from nn.recipe import resolve

from conftest import make_cfg

BASE = ["--ori_width=40", "--ori_height=40", "--batch_size=4", "--num_worker=2", "--steps_per_eval=4",
        "--eval_steps=1", "--log_step=2"]


@pytest.fixture(scope="module")
def source_run(tfrecord_dir, tmp_path_factory):
    """A tiny modern run (its averaged weights and calibrated thresholds) with non-default network flags."""
    log_dir = tmp_path_factory.mktemp("source")
    assert airynet.main(["--mode=train", f"--data_dir={tfrecord_dir}", f"--log_dir={log_dir}", "--out_dir_name=src",
                         "--recipe=modern", "--calibration_fraction=0.25", "--train_steps=4", "--relu_leakiness=0.1",
                         "--target_width=32", "--target_height=32", *BASE]) == 0
    return str(log_dir / "helium_src")


def fine_tune(source, log_dir, tfrecord_dir, *flags):
    return airynet.main(["--mode=train", f"--data_dir={tfrecord_dir}", f"--log_dir={log_dir}", "--out_dir_name=ft",
                         f"--init_from={source}", "--train_steps=4", *BASE, *flags])


def restored(run_dir):
    cfg = make_cfg(f"--load_dir={run_dir}", "--mode=predict")
    config.merge_run_config(cfg, run_dir)
    model, _ = checkpoints.restore_model(cfg, resolve(cfg))
    return cfg, model


def test_learner_starts_from_the_averaged_weights_with_a_fresh_optimizer(source_run):
    from nn import train
    cfg, expected = restored(source_run)
    cfg.init_from, cfg.freeze_stem = source_run, False
    learner = train.build_learner(cfg, resolve(cfg), init_from=source_run)
    assert int(learner.optimizer.iterations.numpy()) == 0
    for got, want in zip(learner.model.weights, expected.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_fine_tune_takes_the_flags_keeps_the_stem_and_the_thresholds(source_run, tfrecord_dir, tmp_path):
    # 8 steps: the average is updated at steps 1 (the learning rate still 0 in the warm-up) and 5.
    assert fine_tune(source_run, tmp_path, tfrecord_dir, "--freeze_stem=true", "--lr=0.5", "--train_steps=8") == 0
    run_dir = str(tmp_path / "helium_ft")
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    assert saved["init_from"] == source_run and saved["freeze_stem"] is True
    # Taken from the source run although not given: its network, input size and recipe.
    assert (saved["relu_leakiness"], saved["target_width"], saved["recipe"]) == (0.1, 32, "modern")
    # Steps at a high rate moved the head but not the frozen stem.
    _, before = restored(source_run)
    _, after = restored(run_dir)
    stem = before.get_layer("initial_conv").kernel.numpy()
    np.testing.assert_array_equal(after.get_layer("initial_conv").kernel.numpy(), stem)
    np.testing.assert_array_equal(after.get_layer("group1_block1_conv1").kernel.numpy(),
                                  before.get_layer("group1_block1_conv1").kernel.numpy())
    assert not np.allclose(after.get_layer("final_dense").kernel.numpy(), before.get_layer("final_dense").kernel.numpy())
    # 4 calibration shots: far fewer than MIN_CALIBRATION_SHOTS of any class, so every threshold is kept.
    with open(os.path.join(run_dir, "thresholds.json")) as f:
        thresholds = json.load(f)
    assert thresholds["kept_from_init"] == config.HELIUM_CLASSES
    np.testing.assert_array_equal(checkpoints.read_thresholds(run_dir, 11), checkpoints.read_thresholds(source_run, 11))


def test_a_contradicting_network_flag_is_one_line_naming_it(source_run, tfrecord_dir, tmp_path, capsys):
    assert fine_tune(source_run, tmp_path, tfrecord_dir, "--resnet_size=34") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--resnet_size=34" in err and "--resnet_size=18" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "helium_ft")


def test_a_checkpoint_of_another_network_is_one_line(source_run, tmp_path):
    cfg = make_cfg("--num_classes=5", "--recipe=modern", "--target_width=32", "--target_height=32")
    from nn.models import networks
    model = networks.build_model(cfg)
    with pytest.raises(config.AiryNetError) as e:
        checkpoints.load_weights(model, source_run, resolve(cfg), cfg, "--init_from")
    assert "does not match" in str(e.value) and "\n" not in str(e.value)


def test_init_from_without_a_run_and_freeze_stem_alone_are_refused(tmp_path, capsys):
    assert airynet.main(["--mode=train", f"--init_from={tmp_path}", f"--log_dir={tmp_path}"]) == 2
    assert "--init_from=" in capsys.readouterr().err
    with pytest.raises(config.AiryNetError, match="--freeze_stem: only with --init_from"):
        config.take_init_config(make_cfg("--freeze_stem=true"))


def test_thresholds_are_chosen_only_for_classes_with_enough_shots():
    n = calibrate.MIN_CALIBRATION_SHOTS
    names = ["a", "b", "c"]
    truths = np.zeros((3 * n, 3))
    truths[:n, 0] = 1          # a: n positives, 2n negatives: chosen
    truths[:n - 1, 1] = 1      # b: one positive too few: kept
    truths[: 2 * n + 1, 2] = 1  # c: one negative too few: kept
    chosen, inherited = np.array([0.1, 0.2, 0.3]), np.array([0.6, 0.7, 0.8])
    thresholds, kept = calibrate.choose_or_keep(chosen, truths, inherited, names)
    np.testing.assert_allclose(thresholds, [0.1, 0.7, 0.8])
    assert kept == ["b", "c"]
