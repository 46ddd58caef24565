"""--recipe: the paper's recipe unchanged, the modern one's averaged weights, area downsampling and
augmentation, the calibration split, the decision thresholds and the calibration error, and the Recipe
that the flags resolve to."""
import dataclasses
import hashlib
import json
import os

import h5py
import numpy as np
import pytest
import tensorflow as tf

import airynet
from conftest import make_cfg
from nn import checkpoints, config, metrics, recipe
from nn.inputs import data, preprocess

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--dataset=helium", "--target_width=32", "--target_height=32", "--ori_width=40", "--ori_height=40",
        "--batch_size=4", "--num_worker=2", "--log_step=1", "--dataset_size=16"]


def train(data_dir, log_dir, name, *flags):
    assert airynet.main(["--mode=train", f"--data_dir={data_dir}", f"--log_dir={log_dir}", f"--out_dir_name={name}",
                         "--eval_steps=1", "--random_seed=5"] + TINY + list(flags)) == 0
    return os.path.join(str(log_dir), f"helium_{name}")


def restored(run_dir, *flags):
    cfg = config.parse_args([f"--load_dir={run_dir}", "--mode=eval"] + list(flags))
    config.merge_run_config(cfg, run_dir)
    cfg.use_nchw = False
    return cfg, checkpoints.restore_model(cfg, recipe.resolve(cfg))[0]


def cross_entropies(run_dir):
    values = {}
    for name in os.listdir(run_dir):
        if name.startswith("events.out.tfevents."):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(run_dir, name)):
                for v in event.summary.value:
                    if v.tag == "cross_entropy":
                        values[event.step] = float(tf.make_ndarray(v.tensor))
    return [values[k] for k in sorted(values)]


def test_paper_recipe_is_unchanged(tfrecord_dir, tmp_path):
    """The losses and every weight after 3 steps match what the code computed before --recipe existed
    (tests/data/paper_recipe_3_steps.json), to float32 rounding: CPU convolutions sum in an order that
    varies from run to run (with the machine's load), which moves losses and weights by about 1e-7 of
    their size; any change to the recipe moves them by far more."""
    with open(os.path.join(HERE, "data", "paper_recipe_3_steps.json")) as f:
        reference = json.load(f)
    run_dir = train(tfrecord_dir, tmp_path, "p", "--train_steps=3", "--steps_per_eval=3")
    np.testing.assert_allclose(cross_entropies(run_dir), reference["cross_entropy"], rtol=1e-5)
    cfg, model = restored(run_dir)
    squares = [float(np.sum(np.asarray(w.numpy(), np.float64) ** 2)) for w in model.weights]
    # Sums of squares near 1e-6 (weights the 3 steps barely moved) differ by float32 rounding, ~1e-11.
    np.testing.assert_allclose(squares, reference["sum_of_squares"], rtol=1e-5, atol=1e-9)
    assert not os.path.exists(os.path.join(run_dir, checkpoints.THRESHOLDS_FILE))
    assert checkpoints.decision_thresholds(cfg) is None and recipe.resolve(cfg).calibration_share == 0
    names = tf.train.load_checkpoint(tf.train.latest_checkpoint(run_dir)).get_variable_to_shape_map()
    assert not any(k.startswith("ema/") for k in names)


def test_best_f1_thresholds_on_hand_made_scores():
    scores = np.array([[0.9, 0.6, 0.2], [0.8, 0.6, 0.1], [0.7, 0.4, 0.3], [0.3, 0.4, 0.2], [0.2, 0.1, 0.1]])
    labels = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    # Class 0: calling the top 4 (down to 0.3) gives F1 6/7, the best; the threshold lies halfway to 0.2.
    # Class 1: tied scores are called together; down to 0.4: tp 3, fp 1 -> F1 6/7 (top 2 only: 2/5).
    # Class 2: no positives -> the default.
    np.testing.assert_allclose(metrics.best_f1_thresholds(scores, labels), [0.25, 0.25, 0.5])
    # The lowest score called positive: halfway to 0.
    np.testing.assert_allclose(metrics.best_f1_thresholds([[0.4], [0.2]], [[1], [1]]), [0.1])


def test_expected_calibration_error_by_hand():
    probs = np.array([[0.05, 0.5], [0.15, 0.5], [0.95, 0.5], [0.95, 0.5]])
    labels = np.array([[0, 1], [1, 0], [1, 1], [0, 0]])
    # Class 0: bins 0, 1 and 9 (two shots): (0.05 + 0.85 + 2 * 0.45) / 4; class 1: one bin, |0.5 - 0.5|.
    np.testing.assert_allclose(metrics.expected_calibration_error(probs, labels), [0.45, 0.0])


def fingerprints(cfg, mode):
    """{sha1 of each preprocessed image} of one pass over `mode` (no augmentation outside training)."""
    found = []
    for images, _ in data.dataset(cfg, recipe.resolve(cfg), mode, one_pass=True):
        found += [hashlib.sha1(image.tobytes()).hexdigest() for image in images.numpy()]
    assert len(found) == len(set(found))
    return set(found)


@pytest.mark.parametrize("source", ["tfrecord", "stacked"])
def test_calibration_split_is_disjoint_from_training_and_eval(tfrecord_dir, cxi_dir, source):
    flags = [f"--data_dir={tfrecord_dir}", "--dataset=helium"] if source == "tfrecord" else \
        [f"--data_dir={cxi_dir}", "--dataset=stacked", "--eval_every=10"]
    everything = fingerprints(make_cfg(*flags, "--calibration_fraction=0"), "train")
    cfg = make_cfg(*flags, "--recipe=modern", "--calibration_fraction=0.25")
    trained, calibration, evaluated = (fingerprints(cfg, mode) for mode in ("train", "calibrate", "eval"))
    assert not trained & calibration and not calibration & evaluated and not trained & evaluated
    assert trained | calibration == everything
    # Every 4th training shot: 16 TFRecord shots; 22 of the 24 stacked shots train (2 are eval).
    assert len(calibration) == len(everything) // 4 == (4 if source == "tfrecord" else 5)


def test_synthetic_calibration_shots_are_the_last_training_shots():
    cfg = make_cfg("--dataset=synthetic", "--dataset_size=100", "--recipe=modern")
    share = recipe.resolve(cfg).calibration_share
    assert share == 0.1
    assert [data.synthetic_range(cfg, m, share) for m in ("train", "calibrate", "eval")] == \
        [(0, 90), (90, 100), (100, 356)]
    paper = make_cfg("--dataset=synthetic", "--dataset_size=100")
    share = recipe.resolve(paper).calibration_share
    assert [data.synthetic_range(paper, m, share) for m in ("train", "eval")] == [(0, 100), (100, 356)]


def test_synthetic_training_and_calibration_read_every_shot_once():
    """What the pipeline reads, not only the ranges: under modern, training reads the first 90 of 100
    shots and calibration the last 10, each once (the ranges were once split a second time, every 10th
    shot, leaving training 81 shots and calibration 1)."""
    from nn.inputs import simulate
    cfg = make_cfg("--dataset=synthetic", "--dataset_size=100", "--recipe=modern", "--ori_width=32",
                   "--ori_height=32", "--target_width=32", "--target_height=32", "--batch_size=8")
    run_recipe = recipe.resolve(cfg)
    read = {mode: np.concatenate([labels.numpy() for _, labels in data.dataset(cfg, run_recipe, mode, one_pass=True)])
            for mode in ("train", "calibrate")}
    _, labels = simulate.simulate(100, cfg.random_seed, 32)
    np.testing.assert_array_equal(read["train"], labels[:90])
    np.testing.assert_array_equal(read["calibrate"], labels[90:])


def test_area_downsampling_averages_blocks_only_under_modern():
    images = np.random.default_rng(0).uniform(0, 100, (2, 40, 40, 1)).astype(np.float32)
    crop = images[:, 4:36, 4:36]    # the 32 px centre crop of 40 px shots
    modern = make_cfg("--recipe=modern", "--target_width=8", "--target_height=8")
    blocks = crop.reshape(2, 8, 4, 8, 4, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(preprocess.preprocess(images, modern, recipe.resolve(modern)).numpy(), blocks, rtol=1e-5)
    paper = make_cfg("--target_width=8", "--target_height=8")
    assert not np.allclose(preprocess.preprocess(images, paper, recipe.resolve(paper)).numpy(), blocks, rtol=1e-3)
    # Down to half the crop or less, bilinear already uses every pixel: modern resizes as paper.
    half = make_cfg("--recipe=modern", "--target_width=16", "--target_height=16")
    assert not preprocess.area_downsampling(half, recipe.resolve(half))


def test_augmentation_rotates_about_the_centre_and_scales_intensity():
    size = 33
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    ring = np.exp(-((np.hypot(x, y) - 8) ** 2) / 4).astype(np.float32)  # a ring: symmetric under rotation
    images = np.repeat(ring[None, :, :, None], 64, axis=0)
    out = preprocess.augment(tf.constant(images), tf.constant([3, 4], tf.int64)).numpy()
    ratio = out.sum(axis=(1, 2, 3)) / ring.sum()
    assert ratio.min() >= 10 ** -0.5 * 0.9 and ratio.max() <= 10 ** 0.5 * 1.1
    assert ratio.max() / ratio.min() > 3       # the intensities spread over most of a decade
    # Normalised, each is the ring shifted by at most MAX_SHIFT of the side.
    shapes = out / ratio[:, None, None, None]
    centres = [(np.sum(s[..., 0] * x) / s.sum(), np.sum(s[..., 0] * y) / s.sum()) for s in shapes]
    assert np.max(np.abs(centres)) <= preprocess.MAX_SHIFT * size + 0.3
    # An off-centre spot lands at every angle: rotations by any angle, not only the flips' multiples of 90.
    spot = np.zeros((64, size, size, 1), np.float32)
    spot[:, 16, 28] = 1.0
    moved = preprocess.augment(tf.constant(spot), tf.constant([5, 6], tf.int64)).numpy()[..., 0]
    angles = [np.degrees(np.arctan2(np.sum(m * y), np.sum(m * x))) % 90 for m in moved]
    assert np.histogram(angles, bins=3, range=(0, 90))[0].min() > 5


def test_modern_restores_averaged_weights_and_resumes(tfrecord_dir, tmp_path):
    run_dir = train(tfrecord_dir, tmp_path, "m", "--recipe=modern", "--train_steps=3", "--steps_per_eval=3",
                    "--lr=0.5")
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(run_dir))
    assert reader.get_tensor("ema/updates/.ATTRIBUTES/VARIABLE_VALUE") == 1   # after steps 1 (and 5, 9, ...)
    _, model = restored(run_dir)
    averages = [reader.get_tensor(f"ema/averages/{i}/.ATTRIBUTES/VARIABLE_VALUE")
                for i in range(len(model.trainable_variables))]
    raw = [reader.get_tensor(f"optimizer/_trainable_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE")
           for i in range(len(model.trainable_variables))]
    for v, a in zip(model.trainable_variables, averages):
        np.testing.assert_array_equal(v.numpy(), a)
    assert any(not np.allclose(a, r) for a, r in zip(averages, raw))   # the average is not the last step
    # Resume: the step counter and the average's update count continue.
    assert airynet.main(["--mode=train", f"--load_dir={run_dir}", "--train_steps=6", "--steps_per_eval=6"]) == 0
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(run_dir))
    assert tf.train.latest_checkpoint(run_dir).endswith("model.ckpt-6")
    assert reader.get_tensor("ema/updates/.ATTRIBUTES/VARIABLE_VALUE") == 2   # steps 1 and 5


def read_txt_flags(path):
    with open(path) as f:
        lines = f.read().splitlines()[1:]
    return np.array([[int(v) for v in line.split("\t")[1].split(", ")] for line in lines])


def test_thresholds_are_written_and_decide_eval_and_predict(tfrecord_dir, tmp_path):
    run_dir = train(tfrecord_dir, tmp_path, "t", "--recipe=modern", "--calibration_fraction=0.25",
                    "--train_steps=2", "--steps_per_eval=2")
    with open(os.path.join(run_dir, checkpoints.THRESHOLDS_FILE)) as f:
        written = json.load(f)
    assert written["calibration_shots"] == 4 and list(written["thresholds"]) == config.HELIUM_CLASSES
    assert all(0 < t < 1 for t in written["thresholds"].values())
    # Thresholds chosen by hand, to see them decide: each class's at the median of its eval scores.
    assert airynet.main(["--mode=eval", f"--load_dir={run_dir}", "--thresholds=0.5"]) == 0
    probs = np.load(os.path.join(run_dir, "eval", "scores.npz"))["probabilities"]
    chosen = np.median(probs, axis=0)
    written["thresholds"] = dict(zip(config.HELIUM_CLASSES, chosen.tolist()))
    with open(os.path.join(run_dir, checkpoints.THRESHOLDS_FILE), "w") as f:
        json.dump(written, f)
    assert airynet.main(["--mode=eval", f"--load_dir={run_dir}"]) == 0
    with open(os.path.join(run_dir, "eval", "metrics.json")) as f:
        m = json.load(f)
    np.testing.assert_allclose([c["threshold"] for c in m["per_class"]], chosen, rtol=1e-6)
    assert all(c["ece"] >= 0 for c in m["per_class"])
    labels = np.load(os.path.join(run_dir, "eval", "scores.npz"))["labels"]
    expected = metrics.metrics_from_counts(metrics.confusion_counts(labels, probs >= chosen.astype(np.float32)),
                                           config.HELIUM_CLASSES)
    assert m["true_positives"] == expected["true_positives"] and m["false_positives"] == expected["false_positives"]
    for thresholds, rule in (("run", lambda p: p >= chosen.astype(np.float32)), ("0.5", lambda p: p > 0.5)):
        out = tmp_path / f"pred_{thresholds}"
        assert airynet.main(["--mode=predict", f"--load_dir={run_dir}", f"--predict_dir={out}", "--gradcam=false",
                             f"--thresholds={thresholds}"]) == 0
        with h5py.File(out / "helium.h5", "r") as h5:
            p, flags = h5["probs"][:], h5["preds"][:]
        np.testing.assert_array_equal(flags, rule(p))
        np.testing.assert_array_equal(read_txt_flags(out / "helium.txt"), flags)
    assert 0 < np.mean(flags != (p >= chosen)) # the two rules differ on these shots


def test_thresholds_flag_is_checked():
    with pytest.raises(config.AiryNetError, match="--thresholds=1.5"):
        make_cfg("--thresholds=1.5")
    with pytest.raises(config.AiryNetError, match="--recipe_without"):
        make_cfg("--recipe_without=ema,nonsense")


def test_exported_model_decides_by_the_run_thresholds(tfrecord_dir, tmp_path):
    run_dir = train(tfrecord_dir, tmp_path, "x", "--recipe=modern", "--train_steps=1", "--steps_per_eval=1")
    chosen = np.linspace(0.05, 0.95, 11)
    with open(os.path.join(run_dir, checkpoints.THRESHOLDS_FILE), "w") as f:
        json.dump({"thresholds": dict(zip(config.HELIUM_CLASSES, chosen.tolist()))}, f)
    assert airynet.main(["--mode=save", f"--load_dir={run_dir}", f"--save_dir={tmp_path / 'export'}"]) == 0
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    images = np.random.default_rng(1).uniform(0, 500, (6, 40, 40, 1)).astype(np.float32)
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    probs = out["probabilities"].numpy()
    np.testing.assert_array_equal(out["classes"].numpy(), probs >= chosen.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# The Recipe: resolved once from the flags

def test_recipes_resolve_from_the_flags():
    assert recipe.resolve(make_cfg()) == recipe.PAPER == recipe.Recipe()
    assert recipe.resolve(make_cfg("--recipe=modern")) == recipe.MODERN
    # --recipe_without names pieces of modern: the paper's recipe has none to leave out.
    assert recipe.resolve(make_cfg("--recipe_without=ema,area")) == recipe.PAPER
    assert (recipe.PAPER.bn_momentum, recipe.MODERN.bn_momentum) == (0.997, recipe.BN_MOMENTUM)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.PAPER.augment = True


def test_each_left_out_piece_takes_the_papers_value():
    assert set(recipe.PIECES) == set(config.MODERN_PIECES)
    for piece, field in recipe.PIECES.items():
        resolved = recipe.resolve(make_cfg("--recipe=modern", f"--recipe_without={piece}"))
        assert resolved == dataclasses.replace(recipe.MODERN, **{field: getattr(recipe.PAPER, field)})
        assert getattr(recipe.MODERN, field) != getattr(recipe.PAPER, field)
    everything = recipe.resolve(make_cfg("--recipe=modern", "--recipe_without=" + ",".join(config.MODERN_PIECES)))
    assert everything == dataclasses.replace(recipe.PAPER, calibration_share=recipe.CALIBRATION_SHARE)


def test_calibration_share_is_the_flags_else_the_recipes():
    assert recipe.resolve(make_cfg()).calibration_share == 0.0
    assert recipe.resolve(make_cfg("--recipe=modern")).calibration_share == 0.1
    assert recipe.resolve(make_cfg("--recipe=modern", "--calibration_fraction=0")).calibration_share == 0.0
    assert recipe.resolve(make_cfg("--calibration_fraction=0.25")).calibration_share == 0.25
    with pytest.raises(config.AiryNetError, match="--calibration_fraction=0.6"):
        make_cfg("--calibration_fraction=0.6")


def test_a_load_dir_run_gets_the_recipe_of_its_saved_config(tmp_path, monkeypatch):
    """airynet.py resolves the recipe after merging the run's config.json, once, and hands it to the mode."""
    with open(tmp_path / config.CONFIG_FILE, "w") as f:
        json.dump({"recipe": "modern", "recipe_without": "ema"}, f)
    handed = []
    monkeypatch.setattr(airynet, "dispatch", lambda cfg, run_recipe: handed.append(run_recipe) or 0)
    assert airynet.main(["--mode=eval", f"--load_dir={tmp_path}", "--use_nchw=false"]) == 0
    assert handed == [dataclasses.replace(recipe.MODERN, average_weights=False)]
