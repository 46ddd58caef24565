"""--mode=predict: the txt and both h5 layouts and their filters, shards and their merge, refusals, the lock
on the output name, failures, memory."""
import os
import socket
import subprocess
import sys

import h5py
import hdf5plugin
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import make_cfg
from nn import config, predict
from nn.models import gradcam, networks
from nn.outputs import writers
from nn.config import AiryNetError
from nn.recipe import PAPER

SIZE = 16
CLASSES = 3


def tiny_model(size=SIZE, seed=0):
    """conv (stride 2) -> last_block_before_fc -> BN + leaky ReLU -> GAP -> final_dense."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 1))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(keras.layers.Rescaling(0.05)(inputs))
    x = keras.layers.Identity(name="last_block_before_fc")(x)
    x = keras.layers.LeakyReLU(negative_slope=0.2)(keras.layers.BatchNormalization()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="final_dense")(x))


def cfg_for(tmp_path, *flags, size=SIZE):
    return config.parse_args([f"--target_height={size}", f"--target_width={size}", f"--num_classes={CLASSES}",
                              "--use_nchw=false", "--batch_size=4", f"--predict_dir={tmp_path / 'pred'}",
                              "--dataset=helium", *flags])


def shots(n, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    return rng.gamma(0.5, 40.0, (n, size, size, 1)).astype(np.float32), 1000 + 3 * np.arange(n)


def predict_dataset(images, bids, labels=None, shard=(0, 1), batch=4):
    """Batches in the format of nn.inputs.data.dataset(cfg, recipe, "predict"); shard as the data pipeline does it."""
    records = {"image": images, "bunch_id": bids.astype(np.int64)}
    if labels is not None:
        records["label"] = labels.astype(np.float32)
    return tf.data.Dataset.from_tensor_slices(records).shard(shard[1], shard[0]).batch(batch)


def read_txt(path):
    """The original's format: ID, flags and probabilities tab-separated, each list joined by ", "."""
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0] == "Bunch_ID:\tClasses:\tProbabilities:"
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == 3 and not any(c in line for c in "[]'") for r, line in zip(rows, lines[1:]))
    bids = [int(r[0]) for r in rows]
    flags = np.array([[int(v) for v in r[1].split(", ")] for r in rows])
    assert all(len(v) == 6 for r in rows for v in r[2].split(", "))  # 4 decimals
    probs = np.array([[float(v) for v in r[2].split(", ")] for r in rows])
    return bids, flags, probs


def test_txt_and_stacked_h5(tmp_path, caplog):
    model, (images, bids) = tiny_model(), shots(10)
    cfg = cfg_for(tmp_path)
    caplog.set_level("INFO", logger="airynet")
    predict.run(cfg, PAPER, model, predict_dataset(images, bids))
    assert "Predicted 10 shots in " in caplog.text
    assert sorted(os.listdir(tmp_path / "pred")) == ["helium.h5", "helium.txt"]
    probs = tf.sigmoid(model(images)).numpy()

    txt_bids, flags, txt_probs = read_txt(tmp_path / "pred" / "helium.txt")
    assert txt_bids == list(bids)
    np.testing.assert_allclose(txt_probs, probs, atol=5e-5 + 1e-6)
    np.testing.assert_array_equal(flags, np.round(probs))
    assert flags.shape == txt_probs.shape == (10, CLASSES)

    with h5py.File(tmp_path / "pred" / "helium.h5", "r") as f:
        assert f.attrs["layout"] == "stacked"
        assert list(f.attrs["class_names"]) == ["0", "1", "2"]
        np.testing.assert_array_equal(f["bids"][:], bids)
        np.testing.assert_allclose(f["probs"][:], probs, atol=1e-6)
        assert f["preds"].dtype == np.uint8
        np.testing.assert_array_equal(f["preds"][:], np.round(f["probs"][:]))
        np.testing.assert_array_equal(f["images"][:], images)
        cams = f["grad_cam"][:]
        assert cams.dtype == np.float16 and cams.shape == (10, CLASSES, 8, 8)
        assert cams.min() >= 0 and cams.max() <= 1
        np.testing.assert_allclose(cams, gradcam.gradcam_plus_plus(model, images, "last_block_before_fc"),
                                   atol=1e-3)
        assert "labels" not in f
        assert f.attrs["h5_compression"] == "gzip" and f.attrs["h5_filters"] == "gzip level 1 + shuffle (standard HDF5 filters)"
        assert all(f[name].compression == "gzip" and f[name].shuffle for name in ("bids", "probs", "images", "grad_cam"))
        assert f["grad_cam"].chunks[1:] == (CLASSES, 8, 8)
        assert list(f["grad_cam"].attrs["upsample_to"]) == [SIZE, SIZE]
        # The CXI view of the same data.
        assert f["cxi_version"][()] == 160
        np.testing.assert_array_equal(f["entry_1/result_1/score"][:], f["probs"][:])
        assert [h.decode() for h in f["entry_1/result_1/headings"][:]] == ["0", "1", "2"]
        assert f["entry_1/data_1/data"].shape == (10, SIZE, SIZE, 1)


def test_default_file_opens_in_any_hdf5_reader(tmp_path):
    """The default filters are HDF5's own: a fresh interpreter that never imports hdf5plugin (as HDFView,
    MATLAB and most users' scripts do not) reads every dataset of the default file."""
    model, (images, bids) = tiny_model(), shots(6)
    predict.run(cfg_for(tmp_path), PAPER, model, predict_dataset(images, bids))
    path = tmp_path / "pred" / "helium.h5"
    code = ("import sys, h5py, numpy as np\n"
            "with h5py.File(sys.argv[1], 'r') as f:\n"
            "    sums = [float(np.sum(f[n][:], dtype=np.float64)) for n in ('bids', 'probs', 'preds', 'images', 'grad_cam')]\n"
            "assert 'hdf5plugin' not in sys.modules\n"
            "print(*sums)")
    env = {k: v for k, v in os.environ.items() if k != "HDF5_PLUGIN_PATH"}
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    with h5py.File(path, "r") as f:
        expected = [float(np.sum(f[n][:], dtype=np.float64)) for n in ("bids", "probs", "preds", "images", "grad_cam")]
    assert [float(v) for v in done.stdout.split()] == pytest.approx(expected, rel=1e-12)
    assert expected[0] == bids.sum()


@pytest.mark.parametrize("compression", ["zstd", "lz4", "none"])
def test_other_filters_on_request(tmp_path, compression):
    model, (images, bids) = tiny_model(), shots(5)
    predict.run(cfg_for(tmp_path, f"--h5_compression={compression}"), PAPER, model, predict_dataset(images, bids))
    with h5py.File(tmp_path / "pred" / "helium.h5", "r") as f:
        assert f.attrs["h5_compression"] == compression
        filters = f["images"]._filters
        assert {"zstd": str(hdf5plugin.BLOSC_ID) in filters, "lz4": str(hdf5plugin.BSHUF_ID) in filters,
                "none": filters == {}}[compression]
        np.testing.assert_array_equal(f["images"][:], images)
        np.testing.assert_allclose(f["probs"][:], tf.sigmoid(model(images)).numpy(), atol=1e-6)


def test_per_shot_h5_named_by_bunch_id(tmp_path):
    model, (images, bids) = tiny_model(), shots(6)
    bids[4] = bids[1]  # a repeated bunch ID must not overwrite the earlier shot
    predict.run(cfg_for(tmp_path, "--h5_layout=per_shot"), PAPER, model, predict_dataset(images, bids))
    probs = tf.sigmoid(model(images)).numpy()
    expected = gradcam.resize_maps(
        gradcam.gradcam_plus_plus(model, images, "last_block_before_fc"), (SIZE, SIZE)).numpy()
    with h5py.File(tmp_path / "pred" / "helium.h5", "r") as f:
        assert f.attrs["layout"] == "per_shot"
        assert list(f.keys()) == [str(b) for b in bids[:4]] + [f"{bids[4]}_4", str(bids[5])]  # record order
        for i, name in enumerate(f):
            g = f[name]
            np.testing.assert_array_equal(g["img"][:], images[i, :, :, 0])  # gray as [H, W], as the original
            np.testing.assert_allclose(g["probability"][:], probs[i], atol=1e-6)
            assert g["prediction"].dtype == np.int32 and g["probability"].dtype == np.float32
            np.testing.assert_array_equal(g["prediction"][:], np.round(probs[i]))
            assert sorted(g.keys()) == ["0", "1", "2", "img", "prediction", "probability"]
            for c in range(CLASSES):
                cam = g[f"{c}/grad_cam"][:]
                assert cam.shape == (SIZE, SIZE) and cam.min() >= 0 and cam.max() <= 1
                np.testing.assert_allclose(cam, expected[i, c], atol=1e-6)


def test_cxidb_per_shot_groups_are_the_originals(tmp_path):
    """--dataset=cxidb: groups named by a running counter from 0, `ground_truth` the class index of the
    one-hot label (float), `pred` the arg-max of the probabilities (int); the ID is the label's arg-max."""
    model, (images, _) = tiny_model(), shots(5)
    labels = np.eye(CLASSES)[[2, 0, 1, 1, 2]]
    bids = labels.argmax(axis=1)
    predict.run(cfg_for(tmp_path, "--h5_layout=per_shot", "--gradcam=false", "--dataset=cxidb"), PAPER, model,
                predict_dataset(images, bids, labels))
    probs = tf.sigmoid(model(images)).numpy()
    assert not np.array_equal(probs.argmax(axis=1), bids)  # pred and ground_truth must be told apart
    with h5py.File(tmp_path / "pred" / "cxidb.h5", "r") as f:
        assert list(f.keys()) == ["0", "1", "2", "3", "4"]
        for i in range(5):
            g = f[str(i)]
            assert sorted(g.keys()) == ["ground_truth", "img", "pred", "prediction", "probability"]
            assert g["ground_truth"].shape == () and g["ground_truth"].dtype == np.float32
            assert g["ground_truth"][()] == bids[i]
            assert g["pred"].shape == () and g["pred"].dtype == np.int32 and g["pred"][()] == probs[i].argmax()
            np.testing.assert_allclose(g["probability"][:], probs[i], atol=1e-6)
    _, flags, txt_probs = read_txt(tmp_path / "pred" / "cxidb.txt")
    np.testing.assert_allclose(txt_probs, probs, atol=5e-5 + 1e-6)
    np.testing.assert_array_equal(flags, np.round(probs))


def test_other_labelled_data_and_gradcam_off(tmp_path):
    """Labelled predict data of other datasets: named by bunch ID, the label vector as `label` (the
    original's ground_truth/pred are cxidb's alone)."""
    model, (images, bids) = tiny_model(), shots(5)
    labels = np.eye(CLASSES)[np.arange(5) % CLASSES]
    predict.run(cfg_for(tmp_path, "--h5_layout=per_shot", "--gradcam=false"), PAPER, model,
                predict_dataset(images, bids, labels))
    with h5py.File(tmp_path / "pred" / "helium.h5", "r") as f:
        assert list(f.keys()) == [str(b) for b in bids]
        for i, name in enumerate(f):
            assert sorted(f[name].keys()) == ["img", "label", "prediction", "probability"]
            np.testing.assert_array_equal(f[name]["label"][:], labels[i])
    predict.run(cfg_for(tmp_path, "--gradcam=false", "--overwrite=true"), PAPER, model,
                predict_dataset(images, bids, labels))
    with h5py.File(tmp_path / "pred" / "helium.h5", "r") as f:
        assert "grad_cam" not in f and "conv" not in f
        np.testing.assert_array_equal(f["labels"][:], labels)


@pytest.mark.parametrize("layout", ["stacked", "per_shot"])
@pytest.mark.parametrize("maps", ["true", "false"])
def test_save_conv_stores_the_gradcam_layer_activations(tmp_path, layout, maps):
    model, (images, bids) = tiny_model(), shots(6)
    predict.run(cfg_for(tmp_path, f"--h5_layout={layout}", f"--gradcam={maps}", "--save_conv=true"), PAPER, model,
                predict_dataset(images, bids))
    acts = gradcam.activation_model(model, "last_block_before_fc")(images)[0].numpy()
    assert acts.shape == (6, 8, 8, 4)
    with h5py.File(tmp_path / "pred" / "helium.h5", "r") as f:
        conv = f["conv"][:] if layout == "stacked" else np.array([f[str(b)]["conv"][:] for b in bids])
        np.testing.assert_allclose(conv, acts, rtol=1e-5, atol=1e-5)
        if layout == "stacked":
            assert f["conv"].attrs["layer"] == "last_block_before_fc"


@pytest.mark.parametrize("layout", ["stacked", "per_shot"])
def test_shards_merge_into_the_unsharded_files(tmp_path, layout):
    model, (images, bids) = tiny_model(), shots(11)
    flags = [f"--h5_layout={layout}", "--save_npy=true"]
    predict.run(cfg_for(tmp_path / "whole", *flags), PAPER, model, predict_dataset(images, bids))
    for i in range(3):
        predict.run(cfg_for(tmp_path, *flags, "--num_shards=3", f"--shard_index={i}"), PAPER, model,
                    predict_dataset(images, bids, shard=(i, 3)))
    assert "helium.shard2of3.h5" in os.listdir(tmp_path / "pred")
    written = predict.merge(str(tmp_path / "pred"), "helium", 3)
    assert sorted(os.path.basename(p) for p in written) == ["helium.h5", "helium.npy", "helium.txt"]
    whole, merged = tmp_path / "whole" / "pred", tmp_path / "pred"
    assert (whole / "helium.txt").read_bytes() == (merged / "helium.txt").read_bytes()
    with h5py.File(whole / "helium.h5", "r") as a, h5py.File(merged / "helium.h5", "r") as b:
        assert_same_h5(a, b)
    if layout == "stacked":  # the merge itself copies every value exactly
        with h5py.File(merged / "helium.h5", "r") as m:
            for i in range(3):
                with h5py.File(merged / f"helium.shard{i}of3.h5", "r") as shard:
                    for name in ("bids", "probs", "preds", "grad_cam", "images"):
                        np.testing.assert_array_equal(m[name][i::3], shard[name][:])
    a, b = (np.load(d / "helium.npy", allow_pickle=True).item() for d in (whole, merged))
    assert list(a) == list(b) == [f"shot_{i:05d}" for i in range(1, 12)]
    for key in a:
        assert a[key][0] == b[key][0]
        np.testing.assert_array_equal(a[key][1], b[key][1])
        np.testing.assert_allclose(a[key][2], b[key][2], rtol=1e-6)
    with pytest.raises(AiryNetError, match="--overwrite=true"):
        predict.merge(str(tmp_path / "pred"), "helium", 3)


def assert_same_h5(a, b):
    assert dict(a.attrs).keys() == dict(b.attrs).keys()
    for key in a.attrs:
        np.testing.assert_array_equal(a.attrs[key], b.attrs[key])
    assert list(a.keys()) == list(b.keys())
    for name in a:
        if isinstance(a[name], h5py.Group):
            assert_same_h5(a[name], b[name])
        else:
            assert a[name].dtype == b[name].dtype
            if a[name].dtype.kind == "f":  # batches of other shots: oneDNN's sums may differ in the last bit
                np.testing.assert_allclose(a[name][()], b[name][()], rtol=1e-6, atol=1e-6)
            else:
                np.testing.assert_array_equal(a[name][()], b[name][()])


def test_refuses_to_replace_existing_files(tmp_path):
    model, (images, bids) = tiny_model(), shots(4)
    os.makedirs(tmp_path / "pred")
    (tmp_path / "pred" / "helium.h5").write_text("earlier results")
    with pytest.raises(AiryNetError, match=r"helium\.h5: exists; pass --overwrite=true .* --predict_dir"):
        predict.run(cfg_for(tmp_path), PAPER, model, predict_dataset(images, bids))
    assert (tmp_path / "pred" / "helium.h5").read_text() == "earlier results"
    assert os.listdir(tmp_path / "pred") == ["helium.h5"]
    predict.run(cfg_for(tmp_path, "--overwrite=true"), PAPER, model, predict_dataset(images, bids))
    assert h5py.is_hdf5(tmp_path / "pred" / "helium.h5")


class SecondRunMidway:
    """A predict dataset that starts `second()`, another run, after its first batch and keeps its error."""

    def __init__(self, dataset, second):
        self.dataset, self.element_spec, self.second, self.error = dataset, dataset.element_spec, second, None

    def __iter__(self):
        for i, batch in enumerate(self.dataset):
            if i == 1:
                with pytest.raises(AiryNetError) as caught:
                    self.second()
                self.error = str(caught.value)
            yield batch


def test_a_second_run_into_the_same_files_refuses_and_the_first_finishes(tmp_path):
    model, (images, bids) = tiny_model(), shots(12)
    second = SecondRunMidway(predict_dataset(images, bids), lambda: predict.run(
        cfg_for(tmp_path, "--overwrite=true", "--h5_layout=per_shot"), PAPER, model, predict_dataset(images, bids)))
    predict.run(cfg_for(tmp_path), PAPER, model, second)
    lock = tmp_path / "pred" / "helium.lock"
    assert second.error.startswith(f"{lock}: another run (host and pid: {socket.gethostname()} {os.getpid()}) "
                                   f"is writing these files; wait for it to finish or choose another --predict_dir")
    assert sorted(os.listdir(tmp_path / "pred")) == ["helium.h5", "helium.txt"]  # the lock is gone too
    assert read_txt(tmp_path / "pred" / "helium.txt")[0] == list(bids)
    with h5py.File(tmp_path / "pred" / "helium.h5", "r") as f:
        np.testing.assert_array_equal(f["bids"][:], bids)
        np.testing.assert_allclose(f["probs"][:], tf.sigmoid(model(images)).numpy(), atol=1e-6)
    # The merge of shards writes the same names, under the same lock.
    for i in range(2):
        (tmp_path / "pred" / f"helium.shard{i}of2.txt").write_text(writers.TXT_HEADER)
    with writers.claimed(str(tmp_path / "pred"), [str(tmp_path / "pred" / "helium.txt")], True):
        with pytest.raises(AiryNetError, match=r"helium\.lock: another run"):
            predict.merge(str(tmp_path / "pred"), "helium", 2)


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    model, (images, bids) = tiny_model(), shots(4)
    holder = ("import sys; from nn.outputs import writers\n"
              "with writers.claimed(sys.argv[1], [sys.argv[1] + '/helium.txt'], False):\n"
              "    print('locked', flush=True); sys.stdin.read()")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "pred")], cwd=root, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == "locked\n"
        with pytest.raises(AiryNetError, match=f"another run \\(host and pid: {socket.gethostname()} {child.pid}\\)"):
            predict.run(cfg_for(tmp_path), PAPER, model, predict_dataset(images, bids))
    finally:
        child.kill()  # as a crash would: no cleanup in the holder
        child.wait(timeout=60)
    assert os.listdir(tmp_path / "pred") == ["helium.lock"]  # left behind, but no longer locked
    predict.run(cfg_for(tmp_path), PAPER, model, predict_dataset(images, bids))
    assert sorted(os.listdir(tmp_path / "pred")) == ["helium.h5", "helium.txt"]


def test_crash_mid_run_leaves_no_finished_looking_file(tmp_path):
    model, (images, bids) = tiny_model(), shots(20)
    predict.run(cfg_for(tmp_path), PAPER, model, predict_dataset(images[:4], bids[:4]))
    before = {name: (tmp_path / "pred" / name).read_bytes() for name in os.listdir(tmp_path / "pred")}
    # The third batch fails to read, as a corrupt record would.
    failing = predict_dataset(images, bids).enumerate().map(lambda i, b: _fail_at(i, b, 2))
    with pytest.raises(tf.errors.InvalidArgumentError, match="corrupt record"):
        predict.run(cfg_for(tmp_path, "--overwrite=true", "--h5_layout=per_shot"), PAPER, model, failing)
    assert {name: (tmp_path / "pred" / name).read_bytes() for name in os.listdir(tmp_path / "pred")} == before
    with pytest.raises(tf.errors.InvalidArgumentError):
        predict.run(cfg_for(tmp_path / "fresh"), PAPER, model, predict_dataset(images, bids).enumerate().map(
            lambda i, b: _fail_at(i, b, 1)))
    assert os.listdir(tmp_path / "fresh" / "pred") == []


def _fail_at(index, batch, bad):
    with tf.control_dependencies([tf.debugging.assert_none_equal(index, tf.constant(bad, tf.int64),
                                                                 message="corrupt record")]):
        return {k: tf.identity(v) for k, v in batch.items()}


def test_write_error_names_the_file_and_keeps_earlier_files(tmp_path, monkeypatch):
    model, (images, bids) = tiny_model(), shots(12)
    predict.run(cfg_for(tmp_path), PAPER, model, predict_dataset(images, bids))
    before = (tmp_path / "pred" / "helium.h5").read_bytes()
    calls = []

    def full_disk(self, batch):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        original(self, batch)

    original = writers.StackedWriter.write
    monkeypatch.setattr(writers.StackedWriter, "write", full_disk)
    with pytest.raises(AiryNetError, match=r"helium\.h5\.partial: writing failed \(No space left on device\)"):
        predict.run(cfg_for(tmp_path, "--overwrite=true"), PAPER, model, predict_dataset(images, bids))
    assert sorted(os.listdir(tmp_path / "pred")) == ["helium.h5", "helium.txt"]
    assert (tmp_path / "pred" / "helium.h5").read_bytes() == before


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssProbe:
    """A predict dataset that samples the process's resident memory as it is consumed."""

    def __init__(self, dataset):
        self.dataset, self.element_spec, self.samples = dataset, dataset.element_spec, []

    def __iter__(self):
        for batch in self.dataset:
            self.samples.append(rss_bytes())
            yield batch


def test_memory_stays_flat_over_thousands_of_shots(tmp_path):
    n, size, batch = 1800, 128, 50
    model = tiny_model(size)
    records = tf.data.Dataset.range(n).map(lambda i: {
        "image": 40.0 * tf.random.stateless_gamma([size, size, 1], tf.stack([tf.constant(7, tf.int64), i]), 0.5),
        "bunch_id": i})
    probe = RssProbe(records.batch(batch))
    predict.run(cfg_for(tmp_path, size=size), PAPER, model, probe)
    with h5py.File(tmp_path / "pred" / "helium.h5", "r") as f:
        assert f["images"].shape == (n, size, size, 1) and f["grad_cam"].shape == (n, CLASSES, 64, 64)
        per_shot = sum(f[k].dtype.itemsize * np.prod(f[k].shape[1:]) for k in ("images", "grad_cam", "probs"))
    # Results kept in memory instead of streamed to disk would make the process grow by per_shot (90 kB)
    # a shot: 95 MB over the last thousand-odd shots. The allocator and TensorFlow's caches move the
    # resident size by a few MB either way (up to 6 MB seen in CI), so the signal is made large and the bar
    # is a third of it; three samples at each end keep one transient spike from deciding.
    samples = np.array(probe.samples, dtype=np.float64)
    start = len(samples) // 3
    growth = np.median(samples[-3:]) - np.median(samples[start:start + 3])
    kept = per_shot * batch * (len(samples) - 3 - start)
    assert kept > 90e6
    assert growth < kept / 3, f"memory grew by {growth / 1e6:.1f} MB over {kept / per_shot:.0f} shots"


def test_shard_of_reads_the_flags_or_slurm(monkeypatch):
    for var in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(var, raising=False)
    assert predict.shard_of(config.parse_args([])) == (0, 1)
    assert predict.shard_of(config.parse_args(["--num_shards=4", "--shard_index=3"])) == (3, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    assert predict.shard_of(config.parse_args([])) == (2, 4)
    with pytest.raises(AiryNetError, match="--shard_index=4"):
        predict.shard_of(config.parse_args(["--num_shards=4", "--shard_index=4"]))
    assert writers.output_paths("p", "helium", (2, 4))["h5"] == os.path.join("p", "helium.shard2of4.h5")


def test_resnet_through_the_data_pipeline(tfrecord_dir, tmp_path):
    """End to end on the real pieces: TFRecord predict data, ResNet-18 (NCHW), stacked h5."""
    cfg = make_cfg(f"--data_dir={tfrecord_dir}", f"--predict_dir={tmp_path}", "--target_height=64",
                   "--target_width=64", "--use_nchw=true", "--save_conv=true")
    model = networks.build_model(cfg)
    predict.run(cfg, PAPER, model)
    with h5py.File(tmp_path / "helium.h5", "r") as f:
        np.testing.assert_array_equal(f["bids"][:], 1000 + np.arange(8))
        assert f["grad_cam"].shape == (8, 11, 2, 2) and f["images"].shape == (8, 64, 64, 1)
        np.testing.assert_allclose(f["probs"][:], tf.sigmoid(model(f["images"][:])).numpy(), atol=1e-5)
        # The NCHW activations are stored channels last.
        acts = gradcam.activation_model(model, "last_block_before_fc")(f["images"][:])[0].numpy()
        assert acts.shape == (8, 512, 2, 2) and f["conv"].shape == (8, 2, 2, 512)
        np.testing.assert_allclose(f["conv"][:], acts.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
        assert [h.decode() for h in f["entry_1/result_1/headings"][:]] == config.HELIUM_CLASSES
