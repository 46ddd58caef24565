"""--mode=live against the Karabo bridge library's own servers, on loopback addresses only.

Shots come from nn/inputs/simulate.py, shaped like pnCCD frames (64x64 here, so that the tests are fast), from
karabo_bridge.ServerInThread, from the simulated AGIPD server and from `karabo-bridge-serve-files`
replaying a mock run directory. Every loop is bounded (--live_seconds, timeouts), every server stopped.
Where a test needs an order of events (a client that comes late, a classifier slower than the source),
the test makes it with events, not with waits.
"""
import contextlib
import glob
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
import zmq
from karabo_bridge import Client, ServerInThread

import airynet
from nn.beamline import live as live_module
from nn.beamline.classifier import Classifier
from nn.beamline.publisher import Publisher
from nn.beamline.receiver import NewestTrains
from nn.inputs import simulate
from nn.outputs import h5out, writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNCCD = "SQS_NQS_PNCCD1MP/CAL/PNCCD_FMT-0:output"
OUT = "AIRYNET/CLASSIFIER"
SIZE = 64


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A ResNet-18 trained for two steps on synthetic shots of the live frames' size (64 px), fed at 96 px,
    so that its Grad-CAM++ maps are 3x3."""
    root = tmp_path_factory.mktemp("live_run")
    assert airynet.main(["--mode=train", "--dataset=synthetic", f"--data_dir={root}/none/", f"--log_dir={root}",
                         "--out_dir_name=r", "--train_steps=2", "--steps_per_eval=2", "--eval_steps=1",
                         "--target_width=96", "--target_height=96", f"--ori_width={SIZE}", f"--ori_height={SIZE}",
                         "--batch_size=4", "--dataset_size=16", "--use_nchw=false"]) == 0
    return str(root / "synthetic_r")


def pnccd_train(image, train_id):
    return {PNCCD: {"data.image": image.astype(np.float32)}}, {PNCCD: {"timestamp.tid": int(train_id)}}


class Feeder:
    """Feeds trains to a ServerInThread from a thread until stopped: `messages(i)` -> (data, meta)."""

    def __init__(self, endpoint, sock, messages, interval=0.0, limit=None):
        self.server = ServerInThread(endpoint, sock=sock, maxlen=2)
        self.messages, self.interval, self.limit = messages, interval, limit
        self.stopping = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stopping.is_set() and self.sent != self.limit:
            try:
                self.server.feed(*self.messages(self.sent), timeout=0.2)
            except Exception:  # queue full: the client is slower than us
                continue
            self.sent += 1
            time.sleep(self.interval)

    def __enter__(self):
        self.server.start()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join()
        self.server.stop()


def simulated(n=16, seed=3):
    images, _ = simulate.simulate(n, seed=seed, size=SIZE)
    return lambda i: pnccd_train(images[i % n], 1000 + i)


class Reader:
    """A plain karabo_bridge.Client reading the published stream in a thread."""

    def __init__(self, endpoint, sock="REQ"):
        self.endpoint, self.sock = endpoint, sock
        self.messages = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with Client(self.endpoint, sock=self.sock, timeout=0.5) as client:
            while not self.stopping.is_set():
                try:
                    self.messages.append(client.next())
                except TimeoutError:
                    pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join()


def live(run_dir, tmp_path, *flags):
    return airynet.main(["--mode=live", f"--load_dir={run_dir}", f"--predict_dir={tmp_path}", "--batch_size=4",
                         "--live_seconds=60", *flags])


def summary(text):
    """(received, processed, dropped) frames from the final summary line."""
    m = re.search(r"received (\d+) frames .*processed (\d+) .*dropped (\d+)", text)
    return tuple(int(v) for v in m.groups())


def only(directory, pattern):
    """The one file in `directory` matching `pattern`."""
    (path,) = glob.glob(os.path.join(directory, pattern))
    return path


def read_txt(path):
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0] == "Bunch_ID:\tClasses:\tProbabilities:"
    return [int(line.split("\t")[0]) for line in lines[1:]]


def test_req_files_and_a_client_that_keeps_up_gets_every_result(run_dir, tmp_path, caplog):
    bridge, publish = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    with Feeder(bridge, "REP", simulated(), interval=0.05), Reader(publish) as reader:
        assert live(run_dir, tmp_path, f"--bridge={bridge}", f"--publish={publish}", "--live_trains=12") == 0
    received, processed, dropped = summary(caplog.text)
    assert processed == 12 and received == processed + dropped
    assert f"Classifying {PNCCD} data.image" in caplog.text
    # The files are named after the run's first classified train.
    tids = read_txt(only(tmp_path, "*.txt"))
    assert sorted(os.listdir(tmp_path)) == [f"live_{tids[0]}.h5", f"live_{tids[0]}.txt"]
    with h5py.File(tmp_path / f"live_{tids[0]}.h5", "r") as f:
        np.testing.assert_array_equal(f["bids"][:], tids)
        np.testing.assert_array_equal(f["pulses"][:], 0)
        assert f["probs"].shape == (12, 11) and "images" not in f  # no images by default: see --save_images
        probs = dict(zip(f["bids"][:], f["probs"][:]))
        classes = dict(zip(f["bids"][:], f["preds"][:]))
    assert tids == sorted(tids) and len(set(tids)) == 12
    # A client that keeps up gets every result, in order, however the batches bunch them.
    assert [data[OUT]["trainId"] for data, _ in reader.messages] == tids
    assert "0 of 12 results not published" in caplog.text
    for data, meta in reader.messages:
        values = data[OUT]
        assert meta[OUT]["timestamp.tid"] == values["trainId"]
        assert values["class_names"][1] == "round" and list(values["pulseId"]) == [0]
        np.testing.assert_allclose(values["probabilities"], probs[values["trainId"]][None], rtol=1e-6)
        np.testing.assert_array_equal(values["classes"], classes[values["trainId"]][None])
        np.testing.assert_array_equal(values["classes"], values["probabilities"] > 0.5)
        assert "gradcam" not in values


class Subscriber(Reader):
    """A SUB client of a PUB stream that a test has made sure is subscribed (ZeroMQ subscriptions take a
    moment, and a PUB socket sends to nobody until then): `subscribed` is set when the first message
    comes, probes (train ID PROBE) included, which `results` leaves out."""

    PROBE = 0

    def __init__(self, endpoint):
        super().__init__(endpoint, "SUB")
        self.subscribed = threading.Event()

    def _run(self):
        with Client(self.endpoint, sock="SUB", timeout=0.5) as client:
            while not self.stopping.is_set():
                try:
                    self.messages.append(client.next())
                    self.subscribed.set()
                except TimeoutError:
                    pass

    def results(self):
        return [tid for data, _ in self.messages if (tid := data[OUT]["trainId"]) != self.PROBE]


def test_pub_subscriber_that_keeps_up_gets_every_result(run_dir, tmp_path, caplog, monkeypatch):
    """Batches of 8 trains from a fast source, published on PUB to a subscriber that reads all the time."""
    bridge, publish = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    publish_one = Publisher.publish

    def probe_first(self, train_id, pulses, result):
        # Before the first result: probes until the subscriber gets one, so that it is subscribed.
        while not subscriber.subscribed.is_set():
            publish_one(self, Subscriber.PROBE, pulses, result)
            subscriber.subscribed.wait(0.1)
        publish_one(self, train_id, pulses, result)

    monkeypatch.setattr(Publisher, "publish", probe_first)
    with Feeder(bridge, "REP", simulated()), Subscriber(publish) as subscriber:
        assert live(run_dir, tmp_path, f"--bridge={bridge}", f"--publish={publish}", "--publish_socket=PUB",
                    "--batch_size=8", "--live_trains=30") == 0
    received, processed, dropped = summary(caplog.text)
    assert processed == 30
    assert subscriber.results() == read_txt(only(tmp_path, "*.txt"))


def test_rep_late_client_gets_the_newest_results_and_the_rest_are_counted(run_dir, tmp_path, caplog, monkeypatch):
    """Nobody asks for the first 12 results; then a client comes and reads on. Its first result is the
    oldest of the backlog (two batches of --batch_size=4: the newest 8), and every result it did not get
    is counted as not published."""
    bridge, publish = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    backlog = 2 * 4  # results: live.py's BACKLOG_BATCHES batches of --batch_size
    published, got, waiting = [], [], []  # waiting: the results that wait when the client comes
    came, first_got, done = threading.Event(), threading.Event(), threading.Event()
    publish_one, add = Publisher.publish, live_module.Results.add

    def recording(self, train_id, pulses, result):
        published.append(train_id)
        publish_one(self, train_id, pulses, result)

    def add_then_let_the_client_come(self, *batch):
        add(self, *batch)
        if len(published) >= 12 and not came.is_set():
            waiting.extend(published[-backlog:])
            came.set()  # the run goes on once the client has its first result
            assert first_got.wait(30)

    def client():
        assert came.wait(60)
        with Client(publish, sock="REQ", timeout=0.5) as c:
            while True:
                try:
                    got.append(c.next()[0][OUT]["trainId"])
                    first_got.set()
                except TimeoutError:
                    if done.is_set():
                        return

    monkeypatch.setattr(Publisher, "publish", recording)
    monkeypatch.setattr(live_module.Results, "add", add_then_let_the_client_come)
    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        with Feeder(bridge, "REP", simulated(), interval=0.02):
            assert live(run_dir, tmp_path, f"--bridge={bridge}", f"--publish={publish}", "--live_trains=20") == 0
    finally:
        done.set()
        thread.join(30)
    assert got[0] == waiting[0]  # the oldest of the newest 8 when the client came
    assert got == sorted(got) and set(got) <= set(published)
    unpublished = int(re.search(r"(\d+) of 20 results not published", caplog.text).group(1))
    assert len(published) == 20 and unpublished == 20 - len(got)


def test_pull_skips_malformed_and_foreign_messages(run_dir, tmp_path, caplog):
    images, _ = simulate.simulate(4, seed=5, size=SIZE)
    bad = [({"SA3_XTD10_XGM/XGM/DOOCS:output": {"data.intensityTD": np.ones(10, np.float32)}},
            {"SA3_XTD10_XGM/XGM/DOOCS:output": {"timestamp.tid": 1}}),             # foreign source
           pnccd_train(np.ones((SIZE, SIZE + 1)), 2),                               # wrong shape
           ({PNCCD: {"data.image": np.ones((SIZE, SIZE), np.complex64)}}, {PNCCD: {"timestamp.tid": 3}}),
           ({PNCCD: {"data.other": np.ones(3)}}, {PNCCD: {"timestamp.tid": 4}})]   # key missing

    def messages(i):
        if i % 3 == 2:
            return bad[(i // 3) % len(bad)]
        return pnccd_train(images[i % 4], 2000 + i)

    bridge = f"tcp://127.0.0.1:{free_port()}"
    with Feeder(bridge, "PUSH", messages, interval=0.01):
        assert live(run_dir, tmp_path, f"--bridge={bridge}", "--bridge_socket=PULL", "--live_trains=8") == 0
    received, processed, dropped = summary(caplog.text)
    assert processed == 8 and received == processed + dropped
    for kind in ("no source", "shape (64, 65)", "dtype complex64", "no key data.image"):
        assert caplog.text.count(f"skipping messages with {kind}") == 1, kind
    assert all(tid >= 2000 for tid in read_txt(only(tmp_path, "*.txt")))


def test_sub_slow_consumer_drops_whole_trains(run_dir, tmp_path, caplog, monkeypatch):
    """One shot per batch, and each batch takes as long as three trains take to arrive: of the trains that
    came meanwhile only the newest is classified, the older ones are dropped whole."""
    arrived, kept = threading.Condition(), []
    keep, classify = NewestTrains.keep, Classifier.classify

    def counting_keep(self, train):
        keep(self, train)
        with arrived:
            kept.append(train.train_id)
            arrived.notify_all()

    def slow_classify(self, trains):
        with arrived:
            target = len(kept) + 3
            assert arrived.wait_for(lambda: len(kept) >= target, timeout=30)
        return classify(self, trains)

    monkeypatch.setattr(NewestTrains, "keep", counting_keep)
    monkeypatch.setattr(Classifier, "classify", slow_classify)
    bridge = f"tcp://127.0.0.1:{free_port()}"
    with Feeder(bridge, "PUB", simulated(), interval=0.005):
        assert live(run_dir, tmp_path, f"--bridge={bridge}", "--bridge_socket=SUB", "--batch_size=1",
                    "--live_trains=10") == 0
    received, processed, dropped = summary(caplog.text)
    assert processed == 10 and received == processed + dropped and dropped >= 2 * 9
    tids = read_txt(only(tmp_path, "*.txt"))
    assert all(later - earlier >= 3 for earlier, later in zip(tids, tids[1:]))  # trains were skipped, not queued


def classified(tmp_path):
    """Shots classified so far by the live run writing to tmp_path (lines of its partial txt)."""
    paths = glob.glob(os.path.join(tmp_path, "*.txt.partial"))
    return max(0, len(open(paths[0]).read().splitlines()) - 1) if paths else 0


def test_reconnects_to_a_restarted_server(run_dir, tmp_path, caplog):
    bridge = f"tcp://127.0.0.1:{free_port()}"
    images, _ = simulate.simulate(2, seed=1, size=SIZE)
    stop = threading.Event()
    seen_while_growing = []

    def restart():
        with Feeder(bridge, "REP", lambda i: pnccd_train(images[0], 100 + i), limit=3):
            deadline = time.time() + 30
            while classified(tmp_path) < 2 and time.time() < deadline and not stop.is_set():
                time.sleep(0.05)
        time.sleep(1.5)
        # A viewer reads the h5 while the run goes on, in HDF5's single-writer/multiple-reader mode.
        with h5py.File(only(tmp_path, "*.h5.partial"), "r", swmr=True) as f:
            seen_while_growing.extend(f["bids"][:])
        time.sleep(1.5)  # in all longer than the receive timeout: the client must reconnect
        with Feeder(bridge, "REP", lambda i: pnccd_train(images[1], 900 + i), interval=0.05):
            stop.wait(40)

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    try:
        assert live(run_dir, tmp_path, f"--bridge={bridge}", "--live_seconds=40", "--live_trains=5") == 0
    finally:
        stop.set()
        thread.join()
    assert "reconnecting until the server is back" in caplog.text and "data again after" in caplog.text
    tids = read_txt(only(tmp_path, "*.txt"))
    assert len(tids) == 5 and tids[0] < 900 <= tids[-1]
    assert len(seen_while_growing) >= 2 and list(seen_while_growing) == tids[:len(seen_while_growing)]


def test_sigterm_closes_the_files_and_exits_0(run_dir, tmp_path):
    bridge = f"tcp://127.0.0.1:{free_port()}"
    with Feeder(bridge, "REP", simulated(), interval=0.05):
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "airynet.py"), "--mode=live",
                                 f"--load_dir={run_dir}", f"--bridge={bridge}", f"--predict_dir={tmp_path}",
                                 "--live_seconds=60"], stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            deadline = time.time() + 60
            while classified(tmp_path) < 2:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert "Stopped by SIGTERM" in err
    received, processed, dropped = summary(err)
    assert received == processed + dropped and processed >= 1
    assert len(read_txt(only(tmp_path, "*.txt"))) == processed
    with h5py.File(only(tmp_path, "*.h5"), "r") as f:
        assert len(f["bids"]) == processed
    assert not any(p.endswith(".partial") for p in os.listdir(tmp_path))


def test_simulated_agipd_server_assembled(run_dir, tmp_path, caplog):
    """karabo-bridge-server-sim: AGIPD 1M, 64 pulses in the online order, assembled with EXtra-geom."""
    port = free_port()
    server = subprocess.Popen(["karabo-bridge-server-sim", str(port), "-d", "AGIPD", "-z", "PUB", "-g", "zeros"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert live(run_dir, tmp_path, f"--bridge=tcp://127.0.0.1:{port}", "--bridge_socket=SUB",
                    "--live_trains=1", "--batch_size=16") == 0
    finally:
        server.kill()
        server.wait()
    assert "SPB_DET_AGIPD1M-1/CAL/APPEND_CORRECTED image.data: online layout (16, 128, 512)" in caplog.text
    assert "assembled with EXtra-geom AGIPD_1MGeometry" in caplog.text
    with h5py.File(only(tmp_path, "*.h5"), "r") as f:
        np.testing.assert_array_equal(f["pulses"][:], np.arange(64))
        assert len(set(f["bids"][:])) == 1


def test_live_flags_are_checked():
    from nn import config
    for flags, message in ((["--bridge=localhost:4545"], "--bridge=localhost:4545: not a ZeroMQ endpoint"),
                           ([], "--bridge: --mode=live needs"),
                           (["--bridge=tcp://127.0.0.1:1", "--live_trains=-1"], "--live_trains=-1"),
                           (["--bridge=tcp://127.0.0.1:1", "--geometry=/no/such.geom"], "--geometry=/no/such.geom"),
                           (["--bridge=tcp://127.0.0.1:1", "--bridge_socket=DEALER"], "--bridge_socket"),
                           (["--bridge=tcp://127.0.0.1:1", "--gradcam_every=2"],
                            "--gradcam_every=2: the maps go only to the published stream")):
        with pytest.raises(Exception, match=re.escape(message)):
            config.parse_args(["--mode=live", "--load_dir=x", *flags])


def test_live_stores_no_images_unless_asked():
    """Images as fed cost 4 bytes a pixel a shot: gigabytes an hour at a beamline's rate."""
    from nn import config
    live_flags = ["--mode=live", "--load_dir=x", "--bridge=tcp://127.0.0.1:1"]
    assert config.parse_args(live_flags).save_images is False
    assert config.parse_args([*live_flags, "--save_images=true"]).save_images is True
    assert config.parse_args(["--mode=predict", "--load_dir=x"]).save_images is True


def test_frames_enter_tensorflow_in_place_where_aligned():
    """The assembly buffer is aligned for TensorFlow and read in place; an array TensorFlow cannot read in
    place (misaligned, strided) is copied, with the same values."""
    import tensorflow as tf
    from nn.beamline.classifier import TENSOR_ALIGNMENT, _aligned_zeros, _tensor
    buffer = _aligned_zeros((3, 5, 7, 1))
    assert buffer.shape == (3, 5, 7, 1) and buffer.dtype == np.float32 and not buffer.any()
    assert buffer.ctypes.data % TENSOR_ALIGNMENT == 0
    buffer[...] = np.arange(buffer.size, dtype=np.float32).reshape(buffer.shape)
    shared = _tensor(buffer[:2])
    buffer[0, 0, 0, 0] = -1.0  # written after: seen by the tensor, which reads the buffer itself
    assert shared.numpy()[0, 0, 0, 0] == -1.0
    np.testing.assert_array_equal(shared.numpy(), buffer[:2])
    for other in (buffer[1:], buffer[:, :, ::2]):  # 140 bytes in: misaligned; every other column: strided
        copied = _tensor(other)
        np.testing.assert_array_equal(copied.numpy(), other)
        # A kernel reads it (one reading a misaligned tensor in place would abort the process).
        assert float(tf.reduce_sum(copied)) == float(other.sum())


@contextlib.contextmanager
def serving(directory):
    """`karabo-bridge-serve-files` replaying the run `directory` (REP, one message per train): its endpoint."""
    port = free_port()
    server = subprocess.Popen(["karabo-bridge-serve-files", str(directory), f"tcp://127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # Started once it says so (it has bound its socket): no request times out while it starts.
        assert select.select([server.stdout], [], [], 60)[0] and "Streamer started" in server.stdout.readline()
        yield f"tcp://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def test_replay_of_a_run_gives_the_offline_probabilities(run_dir, tmp_path, caplog):
    """The same run directory, predicted offline and replayed through karabo-bridge-serve-files live.

    Exact counts: the first train waits for the set-up and is dropped; with REQ every later train is asked
    for when a batch is wanted, so the other 9 are all classified."""
    from test_euxfel import write_pnccd_run
    images, _ = simulate.simulate(10, seed=11, size=SIZE)
    write_pnccd_run(str(tmp_path / "data" / "r0042"), images.astype(np.float32), first_train=7000)
    assert airynet.main(["--mode=predict", f"--load_dir={run_dir}", f"--data_dir={tmp_path}/data/",
                         "--dataset=r0042", f"--predict_dir={tmp_path}/offline", "--gradcam=false"]) == 0
    with h5py.File(tmp_path / "offline" / "r0042.h5", "r") as f:
        np.testing.assert_array_equal(f["bids"][:], 7000 + np.arange(10))
        np.testing.assert_array_equal(f["pulses"][:], 0)
        offline = dict(zip(f["bids"][:], f["probs"][:]))
    with serving(tmp_path / "data" / "r0042") as bridge:
        assert live(run_dir, tmp_path / "live", f"--bridge={bridge}", "--live_trains=9", "--live_seconds=40") == 0
    assert summary(caplog.text) == (10, 9, 1)
    with h5py.File(only(tmp_path / "live", "*.h5"), "r") as f:
        live_probs = dict(zip(f["bids"][:], f["probs"][:]))
    assert sorted(live_probs) == list(range(7001, 7010))
    for train_id, probs in live_probs.items():
        np.testing.assert_allclose(probs, offline[train_id], atol=1e-5)


def network_on_frames(run_dir, frames):
    """(probabilities, classes) of the run's network on detector frames [N, H, W], preprocessed as predict
    does."""
    import tensorflow as tf
    from nn.inference import make_step
    from nn.inputs.preprocess import preprocess
    cfg, recipe, model = restored(run_dir)
    cfg.ori_height, cfg.ori_width, cfg.ori_depth = *frames.shape[1:], 1
    step = make_step(cfg, model, maps=None)
    outs = [step(preprocess(tf.constant(frames[i:i + 16, ..., None]), cfg, recipe)) for i in range(0, len(frames), 16)]
    return (np.concatenate([out["probabilities"].numpy() for out in outs]),
            np.concatenate([out["classes"].numpy() for out in outs]))


def restored(run_dir):
    """The run's config, recipe and model, as --mode=predict restores them."""
    from nn import checkpoints, config, recipe
    cfg = config.parse_args(["--mode=predict", f"--load_dir={run_dir}"])
    config.merge_run_config(cfg, run_dir)
    resolved = recipe.resolve(cfg)
    model, _ = checkpoints.restore_model(cfg, resolved)
    return cfg, resolved, model


@pytest.fixture(scope="module")
def agipd_run(tmp_path_factory):
    """An AGIPD-1M CORR run as the facility writes it, one source per module (tests/test_modular.py): 3 trains
    of 16 pulses, 10000-10002."""
    from test_modular import write_xtdf_run
    return write_xtdf_run(str(tmp_path_factory.mktemp("agipd") / "r0042"), "AGIPD", trains=3, pulses=16)


@pytest.fixture(scope="module")
def agipd_offline(run_dir, agipd_run, tmp_path_factory):
    """--mode=predict on the AGIPD run directory: {(train ID, pulse ID): (probabilities, classes)}."""
    out = tmp_path_factory.mktemp("agipd_offline")
    assert airynet.main(["--mode=predict", f"--load_dir={run_dir}", f"--data_dir={os.path.dirname(agipd_run)}/",
                         "--dataset=r0042", f"--predict_dir={out}", "--gradcam=false"]) == 0
    return rows_by_shot(out / "r0042.h5")


def rows_by_shot(h5_path):
    """{(train ID, pulse ID): (probabilities, classes)} of a prediction file."""
    with h5py.File(h5_path, "r") as f:
        return {(int(b), int(p)): (probs, classes)
                for b, p, probs, classes in zip(f["bids"][:], f["pulses"][:], f["probs"][:], f["preds"][:])}


def assert_same_results(got, expected):
    for shot, (probs, classes) in got.items():
        np.testing.assert_allclose(probs, expected[shot][0], atol=1e-4, err_msg=str(shot))
        np.testing.assert_array_equal(classes, expected[shot][1], err_msg=str(shot))


def test_replayed_modular_run_is_classified_as_extra_geom_assembles_it(run_dir, agipd_run, agipd_offline, tmp_path,
                                                                       caplog):
    """karabo-bridge-serve-files sends each train's 16 module sources in one message, as a TrainMatcher does:
    one shot per pulse, the frame EXtra-geom assembles from EXtra-data's array of the same run, fed through the
    same network; the same as --mode=predict on the run directory. The first train waits for the set-up."""
    from test_modular import extra_geom_frames
    with serving(agipd_run) as bridge:
        assert live(run_dir, tmp_path, f"--bridge={bridge}", "--live_trains=2", "--live_seconds=40") == 0
    assert summary(caplog.text) == (48, 32, 16)
    assert "Classifying AGIPD1M SPB_DET_AGIPD1M-1, 16 of 16 modules (image.data), all pulses; frames 1256x1092 " \
           "assembled with EXtra-geom AGIPD_1MGeometry" in caplog.text
    ours = rows_by_shot(only(tmp_path, "*.h5"))
    assert list(ours) == [(train_id, pulse) for train_id in (10001, 10002) for pulse in range(16)]
    frames, train_ids, pulse_ids = extra_geom_frames(agipd_run, "AGIPD")
    probs, classes = network_on_frames(run_dir, frames)
    expected = {(int(b), int(p)): row for b, p, *row in zip(train_ids, pulse_ids, probs, classes)}
    assert_same_results(ours, expected)
    assert_same_results(ours, agipd_offline)
    # The check can tell shots apart: the network's outputs differ from pulse to pulse.
    assert len({tuple(np.round(p, 3)) for p, _ in ours.values()}) > 1
    with h5py.File(only(tmp_path, "*.h5"), "r") as f:   # the file names the detector that was found
        assert (f.attrs["detector_source"], f.attrs["detector_key"]) == ("SPB_DET_AGIPD1M-1", "image.data")
        assert f.attrs["geometry"] == "EXtra-geom's example geometry (AGIPD_1MGeometry)"


def test_pulses_are_selected_live_as_offline(run_dir, agipd_run, agipd_offline, tmp_path):
    """Four frames a train, a whole batch of --batch_size=4: with REQ, a train smaller than a batch would
    have the next one requested to fill it, and that one would push it out as the newer."""
    with serving(agipd_run) as bridge:
        assert live(run_dir, tmp_path, f"--bridge={bridge}", "--live_trains=2", "--pulses=1:16:4",
                    "--live_seconds=40") == 0
    ours = rows_by_shot(only(tmp_path, "*.h5"))
    assert list(ours) == [(train_id, pulse) for train_id in (10001, 10002) for pulse in (1, 5, 9, 13)]
    assert_same_results(ours, agipd_offline)


CAMERA = "SQS_TEST_CAM/DATA:output"  # no known detector: its (pulses, H, W) arrays are stacks of frames


def offline_outputs(run_dir, images):
    """The run's network on `images` (as fed), offline: probabilities and maps at layer resolution."""
    from nn.inference import make_step
    cfg, _, model = restored(run_dir)
    out = make_step(cfg, model, maps="layer")(images)
    return out["probabilities"].numpy(), out["grad_cam"].numpy()


def test_published_maps_belong_to_their_shots(run_dir, tmp_path):
    """Trains of 3 pulses, maps of every 2nd shot of the run: each published train's maps are, row by row
    of gradcam_index, the offline maps of those shots' images (the images the h5 stores as fed)."""
    images, _ = simulate.simulate(12, seed=7, size=SIZE)

    def messages(i):
        stack = images[[(3 * i + k) % 12 for k in range(3)]].astype(np.float32)
        return ({CAMERA: {"data.image": stack, "data.pulseId": np.array([4, 8, 12])}},
                {CAMERA: {"timestamp.tid": 500 + i}})

    bridge, publish = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    with Feeder(bridge, "REP", messages, interval=0.02), Reader(publish) as reader:
        assert live(run_dir, tmp_path, f"--bridge={bridge}", f"--publish={publish}", "--live_trains=6",
                    "--gradcam_every=2", "--save_images=true") == 0
    with h5py.File(only(tmp_path, "*.h5"), "r") as f:
        bids, pulses, fed, probs = f["bids"][:], f["pulses"][:], f["images"][:], f["probs"][:]
    assert fed.shape == (18, 96, 96, 1)
    offline_probs, offline_maps = offline_outputs(run_dir, fed)
    np.testing.assert_allclose(probs, offline_probs, atol=1e-5)
    assert offline_maps.shape == (18, 11, 3, 3)
    # The check can tell shots apart: maps of different shots differ.
    assert not np.allclose(offline_maps[0], offline_maps[1], atol=1e-2)
    with_maps = np.arange(len(bids)) % 2 == 0  # every 2nd shot of the run, from its first
    assert len(reader.messages) == 6
    for data, _ in reader.messages:
        values = data[OUT]
        rows = np.flatnonzero(bids == values["trainId"])
        np.testing.assert_array_equal(values["pulseId"], pulses[rows])
        np.testing.assert_array_equal(values["pulseId"], [4, 8, 12])
        np.testing.assert_array_equal(values["gradcam_index"], np.flatnonzero(with_maps[rows]))
        np.testing.assert_allclose(values["gradcam"], offline_maps[rows[values["gradcam_index"]]], atol=1e-3)
    assert {tuple(d[OUT]["gradcam_index"]) for d, _ in reader.messages} == {(0, 2), (1,)}
    maps = np.concatenate([d[OUT]["gradcam"] for d, _ in reader.messages])
    # Normalised map by map to [0, 1], with values between.
    assert maps.min() == 0 and maps.max() == 1 and ((maps > 0) & (maps < 1)).any()
    assert np.all((maps.max(axis=(2, 3)) == 1) | (maps.max(axis=(2, 3)) == 0))


def test_each_run_gets_files_of_its_own(run_dir, tmp_path):
    """Two runs into one --predict_dir: each names its files after its first classified train (the first
    train received waits for the set-up and is dropped); --dataset names them as the user says."""
    images, _ = simulate.simulate(2, seed=4, size=SIZE)
    for first, flags in ((1000, []), (5000, []), (9000, ["--dataset=r0042"])):
        bridge = f"tcp://127.0.0.1:{free_port()}"
        with Feeder(bridge, "REP", lambda i, first=first: pnccd_train(images[i % 2], first + i)):
            assert live(run_dir, tmp_path, f"--bridge={bridge}", "--live_trains=2", *flags) == 0
    assert sorted(os.listdir(tmp_path)) == ["live_1001.h5", "live_1001.txt", "live_5001.h5", "live_5001.txt",
                                            "r0042.h5", "r0042.txt"]
    assert read_txt(tmp_path / "live_5001.txt") == [5001, 5002]
    assert read_txt(tmp_path / "r0042.txt") == [9001, 9002]


def test_failed_runs_leave_no_empty_files(run_dir, tmp_path, capsys):
    nowhere = "--bridge=tcp://127.0.0.1:1"  # no server: the runs end before any data
    publish = f"tcp://127.0.0.1:{free_port()}"
    with zmq.Context() as context, context.socket(zmq.REP) as taken:
        taken.bind(publish)
        assert live(run_dir, tmp_path / "port_in_use", nowhere, f"--publish={publish}") == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"airynet: error: --publish={publish}: cannot bind (Address "
                                                   f"already in use") and "Traceback" not in err
    assert os.listdir(tmp_path / "port_in_use") == []
    # Ended before any data came (by --live_seconds here, as by a signal): nothing classified, no files.
    assert live(run_dir, tmp_path / "no_data", nowhere, "--live_seconds=0.5") == 0
    assert os.listdir(tmp_path / "no_data") == []


def test_the_publisher_is_closed_when_closing_the_files_fails(run_dir, tmp_path, monkeypatch):
    publish = f"tcp://127.0.0.1:{free_port()}"

    def failing_close(self):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(live_module.Files, "close", failing_close)
    assert live(run_dir, tmp_path, "--bridge=tcp://127.0.0.1:1", f"--publish={publish}", "--live_seconds=0.5") == 1
    with zmq.Context() as context, context.socket(zmq.REP) as again:
        again.bind(publish)  # free: the publisher was closed all the same


def test_a_failed_write_ends_the_files_at_the_last_whole_batch(run_dir, tmp_path, capsys, monkeypatch):
    """The h5 write of the second batch fails once the third batch waits in the writer's queue: the run
    stops with one line naming the file, and both files, under their final names, hold the first batch
    and nothing after it."""
    queued, batches = threading.Event(), []
    put, write = h5out.WriterThread.put, writers.StackedWriter.write

    def counting_put(self, item):
        batches.append(list(item["bids"]))
        put(self, item)
        if len(batches) == 3:
            queued.set()

    def failing_write(self, batch):
        if len(batches) > 1 and list(batch["bids"]) == batches[1]:
            assert queued.wait(30)
            raise OSError(28, "No space left on device")
        write(self, batch)

    monkeypatch.setattr(h5out.WriterThread, "put", counting_put)
    monkeypatch.setattr(writers.StackedWriter, "write", failing_write)
    bridge = f"tcp://127.0.0.1:{free_port()}"
    with Feeder(bridge, "REP", simulated(), interval=0.02):
        assert live(run_dir, tmp_path, f"--bridge={bridge}", "--live_trains=20") == 2
    h5_path = tmp_path / f"live_{batches[0][0]}.h5"
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"airynet: error: {h5_path}: writing failed (No space left on device); the run stops, and its files "
        f"keep the {len(batches[0])} shots written before") and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == [h5_path.name, f"live_{batches[0][0]}.txt"]
    assert read_txt(tmp_path / f"live_{batches[0][0]}.txt") == batches[0]
    with h5py.File(h5_path, "r") as f:
        assert {len(f[name]) for name in ("bids", "pulses", "probs", "preds")} == {len(batches[0])}
        assert list(f["bids"][:]) == batches[0]


def test_frames_of_another_size_than_trained_warn_once(run_dir, tmp_path, caplog):
    images, _ = simulate.simulate(2, seed=2, size=80)
    bridge = f"tcp://127.0.0.1:{free_port()}"
    with Feeder(bridge, "REP", lambda i: pnccd_train(images[i % 2], 300 + i)):
        assert live(run_dir, tmp_path, f"--bridge={bridge}", "--live_trains=3") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "trained on" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("Frames are 80x80, the model was trained on 64x64: each is centre-cropped to "
                                  "64x64 and resized to 96x96")


def test_live_with_xla_gives_the_offline_results(run_dir, tmp_path, caplog):
    """Live sorting with the whole step XLA-compiled (--jit_inference=all), maps for every shot, against
    offline predict without XLA of the same frames as a run: the same probabilities, classes and maps.
    At 128 px, so that the maps (4x4) are not trivially zero; live batches of up to 4 frames are padded."""
    from test_euxfel import write_pnccd_run
    images, _ = simulate.simulate(6, seed=13, size=SIZE)
    size = ["--target_width=128", "--target_height=128"]
    write_pnccd_run(str(tmp_path / "data" / "r0043"), images.astype(np.float32), first_train=8000)
    assert airynet.main(["--mode=predict", f"--load_dir={run_dir}", f"--data_dir={tmp_path}/data/",
                         "--dataset=r0043", f"--predict_dir={tmp_path}/offline", "--jit_inference=none", *size]) == 0
    with h5py.File(tmp_path / "offline" / "r0043.h5", "r") as f:
        offline = {bid: (p, c, m) for bid, p, c, m in zip(f["bids"][:], f["probs"][:], f["preds"][:], f["grad_cam"][:])}
    bridge, publish = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    with Feeder(bridge, "REP", lambda i: pnccd_train(images[i % 6], 8000 + i % 6), interval=0.05), \
            Reader(publish) as reader:
        assert live(run_dir, tmp_path / "live", f"--bridge={bridge}", f"--publish={publish}", "--live_trains=8",
                    "--gradcam_every=1", "--jit_inference=all", *size) == 0
    assert caplog.text.count("XLA compile took") == 2  # the step and the maps' step, each once
    with h5py.File(only(tmp_path / "live", "*.h5"), "r") as f:
        assert len(f["bids"]) == 8
        for bid, probs, classes in zip(f["bids"][:], f["probs"][:], f["preds"][:]):
            np.testing.assert_allclose(probs, offline[bid][0], atol=1e-4)
            np.testing.assert_array_equal(classes, offline[bid][1])
    assert reader.messages, "nothing was published"  # a result waits for a request, so not every one is
    for data, _ in reader.messages:
        values = data[OUT]
        maps = offline[values["trainId"]][2]
        assert values["gradcam"].shape == (1, 11, 4, 4) and maps.max() > 0
        np.testing.assert_allclose(values["gradcam"][0], maps, atol=1e-3)  # offline stored as float16
