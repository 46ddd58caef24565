"""Paths through `airynet.main` that no other test takes: --single_label end to end, the original's
ccf/noise image keys and fraction files, --cxi_labels, --save_images=false, --target_depth=3, SIGINT,
the 10-checkpoint limit, the VGG, --dataset=synthetic, a successful --mode=save, --log_level DEBUG,
and the dataset and baseline scripts. Trained runs are shared per module to save CPU time."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import tensorflow as tf

import airynet
from conftest import SIZE
from nn import checkpoints, config, metrics, train
from nn.inputs import cxi, data, simulate, tfrecord
from nn.models import vgg
from nn.outputs import plots
from nn.recipe import PAPER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [f"--ori_width={SIZE}", f"--ori_height={SIZE}", "--target_width=32", "--target_height=32",
        "--batch_size=4", "--num_worker=2", "--dataset_size=16", "--log_step=1"]


def main(*flags):
    code = airynet.main(list(flags))
    assert code == 0, f"airynet.py {' '.join(flags)} exited with {code}"


def read_txt(path):
    """The original's txt: ID, then the flags and the probabilities, each joined by ', '."""
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f.readlines()[1:]]
    return ([int(r[0]) for r in rows], np.array([[int(v) for v in r[1].split(", ")] for r in rows]),
            np.array([[float(v) for v in r[2].split(", ")] for r in rows]))


def checkpoint_steps(run_dir):
    return sorted(checkpoints.step_of(p[:-len(".index")]) for p in glob.glob(os.path.join(run_dir, "model.ckpt-*.index")))


# ----------------------------------------------------------------------------------------------
# A ResNet run with a checkpoint after every step: the 10-checkpoint limit, predict and save

@pytest.fixture(scope="module")
def helium_run(tfrecord_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    main("--mode=train", f"--data_dir={tfrecord_dir}", f"--log_dir={logs}", "--out_dir_name=r", "--train_steps=12",
         "--steps_per_eval=1", "--eval_steps=1", *TINY)
    return str(logs / "helium_r")


def test_only_the_last_ten_checkpoints_are_kept(helium_run):
    assert checkpoint_steps(helium_run) == list(range(3, 13))
    assert tf.train.latest_checkpoint(helium_run).endswith("model.ckpt-12")


def test_predict_without_images_and_a_successful_save(helium_run, shots, tmp_path):
    main("--mode=predict", f"--load_dir={helium_run}", f"--predict_dir={tmp_path / 'pred'}", "--save_images=false")
    with h5py.File(tmp_path / "pred" / "helium.h5", "r") as f:
        assert "images" not in f and "entry_1/data_1/data" not in f
        assert f["probs"].shape == (8, 11) and f["grad_cam"].shape[:2] == (8, 11)
        probs = f["probs"][:]
    main("--mode=save", f"--load_dir={helium_run}", f"--save_dir={tmp_path / 'model'}")
    serve = tf.saved_model.load(str(tmp_path / "model")).signatures["serving_default"]
    raw = shots[0][16:, :, :, None].astype(np.float32)  # the shots of shots_predict.tfrecord
    out = serve(images=tf.constant(raw))
    np.testing.assert_allclose(out["probabilities"].numpy(), probs, atol=1e-5)
    _, _, txt_probs = read_txt(tmp_path / "pred" / "helium.txt")
    np.testing.assert_allclose(txt_probs, probs, atol=5e-5 + 1e-6)


# ----------------------------------------------------------------------------------------------
# --single_label

@pytest.fixture(scope="module")
def single_label_run(shots, tmp_path_factory):
    """Three exclusive classes, trained, evaluated and predicted through the CLI."""
    images = shots[0]
    labels = np.eye(3, dtype=np.int16)[np.arange(24) % 3]
    root = tmp_path_factory.mktemp("single")
    os.makedirs(root / "helium")
    tfrecord.write(str(root / "helium" / "s_train.tfrecord"), images[:16], labels[:16])
    tfrecord.write(str(root / "helium" / "s_eval.tfrecord"), images[16:], labels[16:])
    tfrecord.write(str(root / "helium" / "s_predict.tfrecord"), images[16:], 70 + np.arange(8))
    flags = [f"--data_dir={root}/", "--single_label=true", "--num_classes=3"]
    main("--mode=train", *flags, f"--log_dir={root / 'logs'}", "--out_dir_name=s", "--train_steps=3",
         "--steps_per_eval=3", "--eval_steps=1", *TINY)
    run_dir = str(root / "logs" / "helium_s")
    main("--mode=eval", f"--load_dir={run_dir}")
    main("--mode=predict", f"--load_dir={run_dir}", f"--predict_dir={root / 'pred'}", "--gradcam=false")
    return run_dir, root / "pred"


def test_single_label_predicts_one_class_per_shot(single_label_run):
    run_dir, pred = single_label_run
    bids, flags, txt_probs = read_txt(pred / "helium.txt")
    assert bids == list(70 + np.arange(8))
    np.testing.assert_array_equal(flags.sum(axis=1), 1)  # the arg-max, whatever the probabilities
    np.testing.assert_allclose(txt_probs.sum(axis=1), 1, atol=3 * 5e-5)  # softmax
    with h5py.File(pred / "helium.h5", "r") as f:
        np.testing.assert_array_equal(f["preds"][:].argmax(axis=1), f["probs"][:].argmax(axis=1))
        np.testing.assert_array_equal(f["preds"][:].sum(axis=1), 1)
    result = json.load(open(os.path.join(run_dir, "eval", "metrics.json")))
    assert result["shots"] == 8
    assert result["true_positives"] + result["false_positives"] == 8  # one predicted class per shot


def test_eval_pictures_count_the_classes_eval_predicted(single_label_run):
    """The plots use eval's rule (the arg-max here), not p >= 0.5: every shot has one predicted class,
    and the counts are eval's own."""
    run_dir, _ = single_label_run
    scores = plots.read_scores(run_dir)
    probs, preds = scores.probs, scores.preds
    tp, fp, fn, tn = metrics.confusion_counts(scores.labels, preds).T
    assert (tp + fp).sum() == len(probs) == 8
    np.testing.assert_array_equal(preds, np.eye(3)[probs.argmax(axis=1)] > 0)
    result = json.load(open(os.path.join(run_dir, "eval", "metrics.json")))
    assert [c["support"] for c in result["per_class"]] == list(tp + fn)
    assert (result["true_positives"], result["false_positives"]) == (tp.sum(), fp.sum())


def test_eval_pictures_of_softmax_scores_below_one_half(tmp_path):
    """Arg-max predictions whose probabilities are all below 0.5 still count as predicted."""
    probs = np.array([[0.4, 0.35, 0.25], [0.2, 0.3, 0.5], [0.34, 0.33, 0.33]], np.float32)
    labels = np.eye(3, dtype=np.float32)[[0, 1, 1]]
    os.makedirs(tmp_path / "eval")
    np.savez(tmp_path / "eval" / "scores.npz", probabilities=probs, labels=labels,
             predictions=np.eye(3, dtype=np.uint8)[probs.argmax(axis=1)], class_names=np.array(["a", "b", "c"]))
    scores = plots.read_scores(str(tmp_path))
    tp, fp, fn, tn = metrics.confusion_counts(scores.labels, scores.preds).T
    assert (list(tp), list(fn), list(fp)) == ([1, 0, 0], [0, 2, 0], [1, 0, 1])
    assert len(plots.eval_plots(str(tmp_path))) == 2


def test_label_versus_prediction_image_shows_the_heads_probabilities(tmp_path):
    logits = tf.constant([[2.0, 1.0, -1.0], [0.0, 0.5, 3.0]])
    labels = tf.constant([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    images = tf.zeros([2, 8, 8, 1])
    for single in ("true", "false"):
        cfg = config.parse_args([f"--single_label={single}", "--num_classes=3"])
        logger = train.TrainingLog(cfg, str(tmp_path / single), is_chief=True, first_step=0, global_batch=2)
        logger.images(images, labels, logits, step=1)
        logger.close()
        image = None
        for path in glob.glob(str(tmp_path / single / "events.out.tfevents.*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                for v in event.summary.value:
                    if v.tag == "labels_vs_predictions":
                        image = tf.io.decode_png(tf.make_ndarray(v.tensor)[2]).numpy()[..., 0] / 255.0
        expected = tf.nn.softmax(logits) if single == "true" else tf.sigmoid(logits)
        np.testing.assert_allclose(image[:, :3], labels.numpy(), atol=1 / 255)  # stored as floor(255.5 x)
        np.testing.assert_allclose(image[:, 3:], expected.numpy(), atol=1 / 255)


# ----------------------------------------------------------------------------------------------
# The original's image keys and fraction files

@pytest.mark.parametrize("use_ccf,add_noise,key", [
    ("false", 0, "image/encoded"), ("false", 1, "image/encoded_noise_mean"),
    ("false", 2, "image/encoded_noise_mean_std"), ("false", 3, "image/encoded_noise_max"),
    ("true", 0, "image/ccf_noise_"), ("true", 1, "image/ccf_noise_mean"),
    ("true", 2, "image/ccf_noise_mean_std"), ("true", 3, "image/ccf_noise_max"),
])
def test_image_keys_are_the_originals(use_ccf, add_noise, key):
    assert tfrecord.image_key(config.parse_args([f"--use_ccf={use_ccf}", f"--add_noise={add_noise}"])) == key


def test_ccf_noise_keys_and_fraction_files_through_training(shots, tmp_path):
    """Train and predict read *{mode}*0_5.tfrecord, eval *eval.tfrecord, all under image/ccf_noise_max."""
    images, labels = shots
    d = tmp_path / "helium"
    os.makedirs(d)
    key = "image/ccf_noise_max"
    tfrecord.write(str(d / "a_train_0_5.tfrecord"), images[:8], labels[:8], key=key)
    tfrecord.write(str(d / "a_eval.tfrecord"), images[16:], labels[16:], key=key)
    tfrecord.write(str(d / "a_predict_0_5.tfrecord"), images[16:20], 40 + np.arange(4), key=key)
    # Decoys: the whole-data files and other fractions are never read with --fraction=0.5.
    tfrecord.write(str(d / "a_train.tfrecord"), images[8:16], labels[8:16], key=key)
    tfrecord.write(str(d / "a_train_0_25.tfrecord"), images[8:16], labels[8:16], key=key)
    tfrecord.write(str(d / "a_predict.tfrecord"), images[16:], 90 + np.arange(8), key=key)
    flags = [f"--data_dir={tmp_path}/", "--use_ccf=true", "--add_noise=3", "--fraction_mode=true", "--fraction=0.5"]
    cfg = config.parse_args(flags + TINY)
    assert data.find_files(cfg, "train")[1] == [str(d / "a_train_0_5.tfrecord")]
    assert data.find_files(cfg, "eval")[1] == [str(d / "a_eval.tfrecord")]
    assert data.find_files(cfg, "predict")[1] == [str(d / "a_predict_0_5.tfrecord")]
    # The pixels read are the stored ones: the same as the raw key of a file holding the same shots.
    plain = tmp_path / "plain"
    os.makedirs(plain / "helium")
    tfrecord.write(str(plain / "helium" / "p_predict.tfrecord"), images[16:20], 40 + np.arange(4))
    ccf = next(iter(data.dataset(cfg, PAPER, "predict")))
    raw = next(iter(data.dataset(config.parse_args([f"--data_dir={plain}/"] + TINY), PAPER, "predict")))
    np.testing.assert_array_equal(ccf["image"].numpy(), raw["image"].numpy())
    np.testing.assert_array_equal(ccf["bunch_id"].numpy(), 40 + np.arange(4))

    main("--mode=train", *flags, f"--log_dir={tmp_path / 'logs'}", "--out_dir_name=f", "--train_steps=2",
         "--steps_per_eval=2", "--eval_steps=1", *TINY)
    run_dir = str(tmp_path / "logs" / "helium_f")
    main("--mode=predict", f"--load_dir={run_dir}", f"--predict_dir={tmp_path / 'pred'}", "--gradcam=false")
    bids, _, _ = read_txt(tmp_path / "pred" / "helium.txt")
    assert bids == [40, 41, 42, 43]
    # Without fraction files for --fraction=0.75 the run stops with a one-line error naming the pattern.
    assert airynet.main(["--mode=train", *flags[:-1], "--fraction=0.75", f"--log_dir={tmp_path / 'logs'}",
                         *TINY]) == 2


# ----------------------------------------------------------------------------------------------
# CXI labels, RGB input, synthetic data, the VGG

def test_cxi_labels_reads_the_named_dataset(shots, tmp_path):
    images, labels = shots
    os.makedirs(tmp_path / "stacked")
    path = str(tmp_path / "stacked" / "all_eval.cxi")
    cxi.write_cxi_stacked(path, images[:8], 1 - labels[:8])  # a decoy at the default entry_1/data_1/labels
    with h5py.File(path, "a") as f:
        f["entry_1/result_1/classes"] = labels[:8].astype(np.int16)
    flags = [f"--data_dir={tmp_path}/", "--dataset=stacked"] + TINY
    read = lambda *extra: np.concatenate([y.numpy() for _, y in data.dataset(
        config.parse_args(flags + list(extra)), PAPER, "eval", one_pass=True)])
    np.testing.assert_array_equal(read("--cxi_labels=entry_1/result_1/classes"), labels[:8])
    np.testing.assert_array_equal(read(), 1 - labels[:8])
    with pytest.raises(config.AiryNetError, match=r"all_eval\.cxi: no labels \(--cxi_labels"):
        data.check_sources(config.parse_args(flags + ["--cxi_labels=entry_1/missing"]), "eval")


def test_rgb_training_and_prediction(tfrecord_dir, tmp_path):
    main("--mode=train", f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}", "--out_dir_name=rgb",
         "--target_depth=3", "--train_steps=2", "--steps_per_eval=2", "--eval_steps=1", *TINY)
    run_dir = str(tmp_path / "helium_rgb")
    main("--mode=predict", f"--load_dir={run_dir}", f"--predict_dir={tmp_path / 'pred'}", "--gradcam=false")
    with h5py.File(tmp_path / "pred" / "helium.h5", "r") as f:
        rgb = f["images"][:]
    assert rgb.shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])  # gray copied to the three channels
    assert json.load(open(os.path.join(run_dir, "config.json")))["target_depth"] == 3


def test_synthetic_dataset_through_the_cli(tmp_path):
    flags = [f"--data_dir={tmp_path}/", "--dataset=synthetic"] + TINY
    main("--mode=train", *flags, f"--log_dir={tmp_path / 'logs'}", "--out_dir_name=syn", "--train_steps=2",
         "--steps_per_eval=2", "--eval_steps=1")
    main("--mode=predict", f"--load_dir={tmp_path / 'logs' / 'synthetic_syn'}", f"--predict_dir={tmp_path / 'p'}",
         "--gradcam=false", "--batch_size=64")
    first, last = data.synthetic_range(config.parse_args(flags), "predict", PAPER.calibration_share)
    bids, flags_read, probs = read_txt(tmp_path / "p" / "synthetic.txt")
    assert bids == list(range(first, last))  # every held-out shot once, in order
    with h5py.File(tmp_path / "p" / "synthetic.h5", "r") as f:
        np.testing.assert_array_equal(f["labels"][:], simulate.simulate(last - first, 1612, SIZE, start=first)[1])
        np.testing.assert_allclose(probs, f["probs"][:], atol=5e-5 + 1e-6)


def test_vgg_trains_predicts_and_exports(tfrecord_dir, shots, tmp_path, monkeypatch):
    # fc6 and fc7 narrowed from 4096 to 64 filters: the same code path at a hundredth of the weights.
    monkeypatch.setattr(vgg, "FC_WIDTH", 64)
    main("--mode=train", "--airynet_type=vgg", f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}",
         "--out_dir_name=vgg", "--train_steps=1", "--steps_per_eval=1", "--eval_steps=1", *TINY)
    run_dir = str(tmp_path / "helium_vgg")
    assert checkpoint_steps(run_dir) == [1]
    main("--mode=predict", f"--load_dir={run_dir}", f"--predict_dir={tmp_path / 'pred'}")
    main("--mode=save", f"--load_dir={run_dir}", f"--save_dir={tmp_path / 'model'}")
    with h5py.File(tmp_path / "pred" / "helium.h5", "r") as f:
        probs, cams = f["probs"][:], f["grad_cam"][:]
        assert f.attrs["network"] == "vgg16"
    assert cams.shape == (8, 11, 2, 2) and 0 <= cams.min() and cams.max() <= 1
    serve = tf.saved_model.load(str(tmp_path / "model")).signatures["serving_default"]
    out = serve(images=tf.constant(shots[0][16:, :, :, None].astype(np.float32)))
    np.testing.assert_allclose(out["probabilities"].numpy(), probs, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Signals and tracebacks

def test_sigint_saves_and_exits_130(tfrecord_dir, tmp_path):
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "airynet.py"), "--mode=train",
                                 f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}", "--out_dir_name=int",
                                 "--train_steps=100000", "--steps_per_eval=100000", *TINY],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.time() + 120
        while not re.search(r"^step \d+:", log_path.read_text(), re.M):
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    step = int(re.search(r"Stopped \(SIGINT received\) at step (\d+)", text).group(1))
    assert step >= 1 and checkpoint_steps(str(tmp_path / "helium_int")) == [step]


@pytest.mark.parametrize("form", [["--log_level=DEBUG"], ["--log_level", "DEBUG"]])
def test_debug_shows_the_traceback_in_either_form(form, tmp_path, capsys, caplog):
    argv = ["--mode=eval", f"--load_dir={tmp_path}/missing", f"--data_dir={tmp_path}/", *form]
    assert airynet.main(argv) == 2
    assert "airynet: error: --load_dir=" in capsys.readouterr().err
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and logged[0].exc_info[0] is config.AiryNetError
    caplog.clear()
    assert airynet.main(argv[:3]) == 2
    assert not any(r.exc_info for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# Scripts

def test_make_dataset_writes_the_synthetic_shots(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_dataset
    for fmt in ("tfrecord", "cxi_stacked", "cxi_shots"):
        out = tmp_path / fmt
        make_dataset.main([f"--out={out}", f"--format={fmt}", f"--size={SIZE}", "--dataset_size=10", "--per_file=4",
                           "--modes=train"])
        ext = "tfrecord" if fmt == "tfrecord" else "cxi"
        assert sorted(os.listdir(out)) == [f"part00{i}_train.{ext}" for i in range(3)]  # 4 + 4 + 2 shots
        cfg = config.parse_args([f"--data_dir={tmp_path}/", f"--dataset={fmt}", "--batch_size=10",
                                 f"--ori_width={SIZE}", f"--ori_height={SIZE}", f"--target_width={SIZE}",
                                 f"--target_height={SIZE}", "--use_log_act=true"])
        kind, files, _ = data.find_files(cfg, "train")
        assert len(files) == 3
        images, labels = simulate.simulate(10, 1612, SIZE)
        if fmt == "tfrecord":
            records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(files)]
            stored = np.array([np.frombuffer(r.features.feature["image/encoded"].bytes_list.value[0], np.uint16)
                               for r in records]).reshape(images.shape)
            stored_labels = np.array([np.frombuffer(r.features.feature[tfrecord.LABEL_KEY].bytes_list.value[0], np.int16)
                                      for r in records])
        else:
            readers = [cxi.open_cxi(f, cfg, needs_labels=True) for f in files]
            parts = [r.read(0, r.count) for r in readers]
            stored = np.concatenate([p[0] for p in parts])
            stored_labels = np.concatenate([p[1] for p in parts])
            np.testing.assert_array_equal(np.concatenate([p[2] for p in parts]), np.arange(10))
        np.testing.assert_array_equal(stored, images)
        np.testing.assert_array_equal(stored_labels, labels)
    with pytest.raises(SystemExit, match="already holds dataset files"):
        make_dataset.main([f"--out={tmp_path / 'tfrecord'}", "--modes=train"])
    assert len(os.listdir(tmp_path / "tfrecord")) == 3


def test_an_interrupted_make_dataset_leaves_no_dataset(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_dataset
    write_split = make_dataset.write_split

    def fail_after_train(out, fmt, mode, *args):
        if mode == "eval":
            raise KeyboardInterrupt
        write_split(out, fmt, mode, *args)
    monkeypatch.setattr(make_dataset, "write_split", fail_after_train)
    with pytest.raises(KeyboardInterrupt):
        make_dataset.main([f"--out={tmp_path / 'set'}", f"--size={SIZE}", "--dataset_size=4", "--modes=train,eval"])
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(make_dataset, "write_split", write_split)
    make_dataset.main([f"--out={tmp_path / 'set'}", f"--size={SIZE}", "--dataset_size=4", "--modes=train,eval",
                       "--eval_size=2"])
    assert sorted(os.listdir(tmp_path / "set")) == ["part000_eval.tfrecord", "part000_train.tfrecord"]


def test_make_dataset_moves_one_group_of_settings(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_dataset
    make_dataset.main([f"--out={tmp_path / 'masks'}", f"--size={SIZE}", "--modes=eval", "--eval_size=3",
                       "--random_seed=5", "--shift=masks"])
    first, _ = data.synthetic_range(config.parse_args(["--dataset_size=7264"]), "eval", PAPER.calibration_share)
    images, _ = simulate.simulate(3, 5, SIZE, start=first, settings=simulate.shifted_in("masks"))
    [path] = os.listdir(tmp_path / "masks")
    record = tf.train.Example.FromString(next(iter(tf.data.TFRecordDataset(str(tmp_path / "masks" / path)))).numpy())
    stored = np.frombuffer(record.features.feature["image/encoded"].bytes_list.value[0], np.uint16)
    np.testing.assert_array_equal(stored.reshape(images[0].shape), images[0])
    for flags, message in ((["--shift=masks", "--shifted"], "give one of them"),
                           (["--shift=masks", "--version=1"], "--shift: version 1")):
        with pytest.raises(SystemExit, match=message):
            make_dataset.main([f"--out={tmp_path / 'bad'}", "--modes=eval", *flags])


def test_baseline_logreg_runs_and_fits_a_separable_problem():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import baseline_logreg
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5)).astype(np.float32)
    x[:, :2] += 0.5 * np.sign(x[:, :2])  # a margin around both class boundaries
    y = np.stack([x[:, 0] > 0, x[:, 1] > 0], axis=1).astype(np.float32)
    w = baseline_logreg.fit(x, y, 1e-4, 300)
    np.testing.assert_array_equal(baseline_logreg.f1_scores(baseline_logreg.predict(w, x), y), [1.0, 1.0])
    image = np.arange(64 * 64, dtype=np.float32).reshape(1, 64, 64)
    f = baseline_logreg.features(image)
    assert f.shape == (1, 32 * 32) and f[0, 0] == pytest.approx(np.log1p(image[0, :2, :2]).mean())
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "baseline_logreg.py"), "--size=64",
                             "--train=120", "--test=60", "--steps=30"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert sum(line.startswith("l2=") for line in lines) == 4
    assert sum(" F1 " in line for line in lines) == len(config.HELIUM_CLASSES)
    score = float(re.search(r"held-out macro-F1 ([\d.]+)", result.stdout).group(1))
    assert 0 <= score <= 1
