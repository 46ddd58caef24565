"""The out-of-distribution score (nn/ood.py): its numbers against direct numpy/scipy computations, the fit
at the end of training and by scripts/fit_ood.py, ood_score and unknown in both h5 layouts, a run without
a fit, AUROC and FPR at 95% TPR (nn/metrics.py, scripts/ood_auroc.py), the non-droplet shots."""
import json
import logging
import os
import shutil
import subprocess
import sys
import types

import h5py
import karabo_bridge
import keras
import numpy as np
import pytest
import tensorflow as tf
import zmq
from scipy.spatial import distance

import airynet
from conftest import SIZE
from nn import checkpoints, config, metrics, ood, recipe
from nn.beamline.live import Results, Stats
from nn.beamline.publisher import SOURCE, Publisher
from nn.beamline.receiver import Train
from nn.inputs import nondroplet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import fit_ood  # noqa: E402
import make_dataset  # noqa: E402

TRAIN_FLAGS = [f"--ori_width={SIZE}", f"--ori_height={SIZE}", "--target_width=32", "--target_height=32",
               "--batch_size=4", "--num_worker=2", "--dataset=synthetic", "--dataset_size=120", "--train_steps=3",
               "--steps_per_eval=3", "--eval_steps=1", "--recipe=modern", "--use_nchw=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny --recipe=modern run (3 steps), whose end of training fits the default score."""
    logs = tmp_path_factory.mktemp("ood_logs")
    assert airynet.main([*TRAIN_FLAGS, f"--log_dir={logs}", "--out_dir_name=tiny"]) == 0
    return str(logs / "synthetic_tiny")


def restored(run, *flags):
    cfg = config.parse_args(["--mode=predict", f"--load_dir={run}", "--use_nchw=false", *flags])
    config.merge_run_config(cfg, run)
    r = recipe.resolve(cfg)
    model, _ = checkpoints.restore_model(cfg, r)
    return cfg, r, model


def penultimate(model, images):
    features = keras.Model(model.input, model.get_layer("final_dense").input)(images, training=False)
    return np.asarray(features, np.float64)


def direct_blocks(model, images, method):
    """The features a method scores, straight from the ResNet's layers: each group's last block output
    averaged over the map (NHWC), then the penultimate features."""
    if method != "mahalanobis_layers":
        return [penultimate(model, images)]
    names = ["group1_block2_add", "group2_block2_add", "group3_block2_add", "group4_block2_add"]  # ResNet-18
    maps = keras.Model(model.input, [model.get_layer(n).output for n in names])(images, training=False)
    return [np.asarray(m, np.float64).mean(axis=(1, 2)) for m in maps] + [penultimate(model, images)]


def mahalanobis_numpy(blocks, saved):
    return sum(np.einsum("nk,kl,nl->n", unit_rows(f) - saved[f"mean{b}"], saved[f"precision{b}"],
                         unit_rows(f) - saved[f"mean{b}"]) / f.shape[1] for b, f in enumerate(blocks))


def unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# The scores' numbers

def test_scores_match_direct_computations():
    rng = np.random.default_rng(0)
    train = [rng.normal(size=(300, 6)), rng.gamma(2.0, size=(300, 8))]
    test = [rng.normal(size=(20, 6)), rng.gamma(2.0, size=(20, 8))]
    logits = rng.normal(size=(20, 5)) * 3

    stats = ood.fit_stats("mahalanobis_layers", train)
    expected = np.zeros(20)
    for b in range(2):
        z = unit_rows(train[b])
        cov = np.cov(z.T)
        cov += ood.SHRINKAGE * np.trace(cov) / len(cov) * np.eye(len(cov))
        np.testing.assert_allclose(stats[f"mean{b}"], z.mean(0), rtol=1e-5, atol=1e-6)
        vi = np.linalg.inv(cov)
        expected += [distance.mahalanobis(u, z.mean(0), vi) ** 2 / z.shape[1] for u in unit_rows(test[b])]
    got = ood.score("mahalanobis_layers", stats, logits, test).numpy()
    np.testing.assert_allclose(got, expected, rtol=2e-3)
    single = ood.score("mahalanobis", ood.fit_stats("mahalanobis", train[-1:]), logits, test[-1:]).numpy()
    assert single.shape == (20,) and not np.allclose(single, got)

    bank = unit_rows(train[-1])
    knn = ood.score("knn", ood.fit_stats("knn", train[-1:]), logits, test[-1:]).numpy()
    kth = np.sort(distance.cdist(unit_rows(test[-1]), bank), axis=1)[:, ood.KNN_K - 1]
    np.testing.assert_allclose(knn, kth, rtol=1e-3, atol=1e-4)

    np.testing.assert_allclose(ood.score("energy", {}, logits, []).numpy(), -np.log1p(np.exp(logits)).sum(1), rtol=1e-5)
    np.testing.assert_allclose(ood.score("energy", {}, logits, [], single_label=True).numpy(),
                               -np.log(np.exp(logits).sum(1)), rtol=1e-5)
    np.testing.assert_allclose(ood.score("max_logit", {}, logits, []).numpy(), -logits.max(1), rtol=1e-6)
    assert ood.threshold_of(np.arange(101.0)) == 95.0


# ----------------------------------------------------------------------------------------------
# The fit and the outputs

def test_training_fits_the_default_on_held_back_shots(run_dir):
    with np.load(os.path.join(run_dir, ood.OOD_FILE)) as f:
        assert str(f["method"]) == ood.DEFAULT_METHOD
        threshold, info = float(f["threshold"]), str(f["info"])
        saved = {k: f[k] for k in f.files}
    assert "calibration split" in info and "108 training shots" in info
    cfg, r, model = restored(run_dir)
    # The threshold passes 95% of the calibration shots' scores, computed here in numpy.
    cal = np.concatenate([images.numpy() for images, _ in ood.data.dataset(cfg, r, "calibrate")])
    assert len(cal) == 12
    scores = mahalanobis_numpy(direct_blocks(model, cal, ood.DEFAULT_METHOD), saved)
    assert threshold == pytest.approx(np.quantile(scores, 0.95), rel=1e-4)


@pytest.mark.parametrize("layout", ["stacked", "per_shot"])
def test_predict_writes_score_and_unknown(run_dir, tmp_path, tfrecord_dir, layout):
    pred = tmp_path / "pred"
    assert airynet.main(["--mode=predict", f"--load_dir={run_dir}", f"--predict_dir={pred}", f"--h5_layout={layout}",
                         "--gradcam=false", "--use_nchw=false", f"--data_dir={tfrecord_dir}", "--dataset=helium"]) == 0
    with np.load(os.path.join(run_dir, ood.OOD_FILE)) as f:
        threshold = float(f["threshold"])
    with h5py.File(pred / "helium.h5", "r") as f:
        assert f.attrs["ood_method"] == ood.DEFAULT_METHOD and f.attrs["ood_threshold"] == np.float32(threshold)
        if layout == "stacked":
            scores, unknown, images = f["ood_score"][:], f["unknown"][:], f["images"][:]
            assert f["ood_score"].dtype == np.float32 and f["unknown"].dtype == np.uint8
            assert len(scores) == len(f["probs"]) == 8
        else:
            groups = list(f.values())
            scores = np.array([g["ood_score"][()] for g in groups])
            unknown = np.array([g["unknown"][()] for g in groups])
            images = np.stack([g["img"][:] for g in groups])[..., None]
    np.testing.assert_array_equal(unknown, (scores > threshold).astype(np.uint8))
    assert set(np.unique(unknown)) <= {0, 1}
    # The score of each shot, from the image as fed, computed here with numpy.
    _, _, model = restored(run_dir)
    with np.load(os.path.join(run_dir, ood.OOD_FILE)) as f:
        expected = mahalanobis_numpy(direct_blocks(model, images, ood.DEFAULT_METHOD), f)
    np.testing.assert_allclose(scores, expected, rtol=2e-3)
    with open(pred / "helium.txt") as f:  # the original's format, untouched
        assert f.readline() == "Bunch_ID:\tClasses:\tProbabilities:\n"
        assert len(f.readline().split("\t")) == 3


def test_run_without_fit_predicts_with_a_note(run_dir, tmp_path, tfrecord_dir, caplog):
    old = tmp_path / "old_run"
    shutil.copytree(run_dir, old)
    os.remove(old / ood.OOD_FILE)
    with caplog.at_level(logging.INFO, logger="airynet"):
        assert airynet.main(["--mode=predict", f"--load_dir={old}", f"--predict_dir={tmp_path / 'pred'}",
                             "--gradcam=false", "--use_nchw=false", f"--data_dir={tfrecord_dir}",
                             "--dataset=helium"]) == 0
    notes = [r.getMessage() for r in caplog.records if ood.OOD_FILE in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0] and "no ood_score" in notes[0]
    with h5py.File(tmp_path / "pred" / "helium.h5", "r") as f:
        assert "ood_score" not in f and "unknown" not in f and "probs" in f
        assert str(f.attrs["ood_method"]).startswith("none")


def test_fit_script_fits_a_run_afterwards(run_dir, tmp_path, capsys):
    old = tmp_path / "old_run"
    shutil.copytree(run_dir, old)
    os.remove(old / ood.OOD_FILE)
    assert fit_ood.main([f"--load_dir={old}", "--method=knn", "--use_nchw=false"]) == 0
    with np.load(old / ood.OOD_FILE) as f:
        assert str(f["method"]) == "knn" and f["bank"].shape == (108, 512) and float(f["threshold"]) > 0
    capsys.readouterr()
    assert fit_ood.main([f"--load_dir={tmp_path / 'nothing'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing" in err


# ----------------------------------------------------------------------------------------------
# AUROC and FPR at 95% TPR

def test_auroc_and_fpr_against_pairwise_counts():
    rng = np.random.default_rng(1)
    inside, outside = np.round(rng.normal(size=400), 1), np.round(rng.normal(0.8, size=150), 1)  # with ties
    pairs = np.mean(outside[:, None] > inside[None, :]) + 0.5 * np.mean(outside[:, None] == inside[None, :])
    assert metrics.auroc(inside, outside) == pytest.approx(pairs, abs=1e-12)
    assert metrics.auroc(inside, inside + 100) == 1.0 and metrics.auroc(inside + 100, inside) == 0.0
    five = np.array([10.0, 94.0, 95.0, 96.0, 200.0])
    assert metrics.fpr_at_tpr(np.arange(100.0), five) == pytest.approx(0.4, abs=1e-12)
    # 95% of 0..99 stay at or under 94.05: of the five, 10 and 94 are taken for in-distribution.


def write_predictions(path, scores, layout):
    with h5py.File(path, "w") as f:
        f.attrs["layout"] = layout
        if layout == "stacked":
            f["ood_score"], f["unknown"] = scores.astype(np.float32), (scores > 1).astype(np.uint8)
        for i, s in enumerate(scores if layout == "per_shot" else []):
            f[f"{i}/ood_score"], f[f"{i}/unknown"] = np.float32(s), np.uint8(s > 1)


def test_auroc_script_reads_both_layouts(tmp_path):
    rng = np.random.default_rng(2)
    inside, outside = rng.normal(size=50), rng.normal(1.5, size=30)
    write_predictions(tmp_path / "in.h5", inside, "stacked")
    write_predictions(tmp_path / "out.h5", outside, "per_shot")
    script = os.path.join(ROOT, "scripts", "ood_auroc.py")
    done = subprocess.run([sys.executable, script, str(tmp_path / "in.h5"), str(tmp_path / "out.h5")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["auroc"] == pytest.approx(np.mean(outside[:, None] > inside[None, :]), abs=1e-4)
    assert result["unknown_out"] == pytest.approx(np.mean(outside > 1), abs=1e-4) and result["shots_in"] == 50
    with h5py.File(tmp_path / "none.h5", "w") as f:
        f.attrs["layout"] = "stacked"
        f["probs"] = np.zeros((3, 2))
    bad = subprocess.run([sys.executable, script, str(tmp_path / "in.h5"), str(tmp_path / "none.h5")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "none.h5: holds no ood_score" in bad.stderr and bad.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# The non-droplet shots

def test_nondroplet_shots():
    for kind in nondroplet.KINDS:
        images, labels = nondroplet.simulate(kind, 3, seed=5, size=48)
        assert images.shape == (3, 48, 48) and images.dtype == np.uint16 and images.max() > 0
        assert labels.shape == (3, 11) and not labels.any()
        again, _ = nondroplet.simulate(kind, 2, seed=5, size=48, start=1)  # shot i depends on i alone
        np.testing.assert_array_equal(again, images[1:])
    crystal, _ = nondroplet.simulate("crystal", 2, seed=5, size=48)
    ice, _ = nondroplet.simulate("ice", 2, seed=5, size=48)
    assert not np.array_equal(crystal, ice)
    with pytest.raises(config.AiryNetError, match="--kind=glass"):
        nondroplet.simulate("glass", 1, seed=0, size=32)


def tfrecord_shots(path):
    """(images uint16 [N, H, W], labels int16 [N, 11]) of a TFRecord file, parsed here with tf.io."""
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/class/label": tf.io.FixedLenFeature([], tf.string),
            "image/height": tf.io.FixedLenFeature([], tf.int64)}
    images, labels = [], []
    for record in tf.data.TFRecordDataset(path):
        ex = tf.io.parse_single_example(record, spec)
        h = int(ex["image/height"])
        images.append(np.frombuffer(ex["image/encoded"].numpy(), np.uint16).reshape(h, -1))
        labels.append(np.frombuffer(ex["image/class/label"].numpy(), np.int16))
    return np.stack(images), np.stack(labels)


def test_make_dataset_kind(tmp_path):
    make_dataset.main([f"--out={tmp_path / 'ice'}", "--kind=ice", "--size=32", "--eval_size=4"])
    assert sorted(os.listdir(tmp_path / "ice")) == ["part000_eval.tfrecord", "part000_predict.tfrecord"]
    images, labels = tfrecord_shots(str(tmp_path / "ice" / "part000_eval.tfrecord"))
    expected, _ = nondroplet.simulate("ice", 4, seed=1612, size=32, start=7264)  # the held-out shots' indices
    np.testing.assert_array_equal(images, expected)
    assert labels.shape == (4, 11) and not labels.any()
    with pytest.raises(SystemExit, match="--kind"):
        make_dataset.main([f"--out={tmp_path / 'x'}", "--kind=ice", "--modes=train"])


# ----------------------------------------------------------------------------------------------
# Live sorting publishes and writes both

def test_live_publishes_and_writes_score_and_unknown():
    probs = np.linspace(0, 1, 15, dtype=np.float32).reshape(5, 3)
    result = {"probabilities": probs, "classes": (probs > 0.5).astype(np.uint8),
              "ood_score": np.arange(5, dtype=np.float32), "unknown": np.array([0, 0, 1, 1, 1], np.uint8)}
    trains = [Train(10, None, np.arange(2), 0.0), Train(11, None, np.arange(3), 0.0)]
    written = []
    publisher = Publisher("tcp://127.0.0.1:*", "REP", ["a", "b", "c"], backlog=4)
    endpoint = publisher.socket.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        Results(publisher, types.SimpleNamespace(write=written.append), Stats(["a", "b", "c"]), save_images=False).add(
            trains, np.zeros((5, 4, 4, 1)), np.zeros(5, bool), result)
        client = karabo_bridge.Client(endpoint, "REQ", timeout=10)
        messages = [client.next()[0][SOURCE] for _ in range(2)]
    finally:
        publisher.close()
    np.testing.assert_array_equal(messages[0]["ood_score"], [0, 1])
    np.testing.assert_array_equal(messages[1]["unknown"], [1, 1, 1])
    (rows,) = written
    np.testing.assert_array_equal(rows["ood_score"], result["ood_score"])
    np.testing.assert_array_equal(rows["unknown"], result["unknown"])



def test_one_pass_training_shots_leave_the_calibration_shots_out(tmp_path):
    """The score's statistics come from training shots, its threshold from the calibration split: they must
    not share shots, also where training interleaves several TFRecord files."""
    from nn.inputs import tfrecord
    os.makedirs(tmp_path / "two")
    images = (np.arange(40)[:, None, None] * np.ones((1, SIZE, SIZE))).astype(np.uint16)  # shot i: all pixels i
    labels = np.zeros((40, 11), np.int16)
    for part in range(2):
        tfrecord.write(str(tmp_path / "two" / f"p{part}_train.tfrecord"), images[part::2], labels[part::2])
    cfg = config.parse_args([f"--ori_width={SIZE}", f"--ori_height={SIZE}", "--target_width=32", "--target_height=32",
                             "--batch_size=4", "--num_worker=2", f"--data_dir={tmp_path}/", "--dataset=two",
                             "--recipe=modern", "--use_log_act=true"])
    r = recipe.resolve(cfg)

    def shot_ids(mode):
        return {int(round(float(np.max(x)))) for batch, _ in ood.data.dataset(cfg, r, mode, one_pass=True)
                for x in batch.numpy()}
    train, held = shot_ids("train"), shot_ids("calibrate")
    assert len(held) == 4 and not train & held and train | held == set(range(40))
