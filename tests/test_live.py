"""--mode=live against the Karabo bridge library's own servers, on loopback addresses only.

Shots come from nn/inputs/simulate.py, shaped like pnCCD frames (64x64 here, so that the tests are fast), from
karabo_bridge.ServerInThread, from the simulated AGIPD server and from `karabo-bridge-serve-files`
replaying a mock run directory. Every loop is bounded (--live_seconds, timeouts), every server stopped.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
from karabo_bridge import Client, ServerInThread

import airynet
from nn.inputs import simulate

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
    """A ResNet-18 trained for two steps on 32 px synthetic shots."""
    root = tmp_path_factory.mktemp("live_run")
    assert airynet.main(["--mode=train", "--dataset=synthetic", f"--data_dir={root}/none/", f"--log_dir={root}",
                         "--out_dir_name=r", "--train_steps=2", "--steps_per_eval=2", "--eval_steps=1",
                         "--target_width=32", "--target_height=32", "--ori_width=40", "--ori_height=40",
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


def read_txt(path):
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0] == "Bunch_ID:\tClasses:\tProbabilities:"
    return [int(line.split("\t")[0]) for line in lines[1:]]


def test_req_files_and_published_stream(run_dir, tmp_path, caplog):
    bridge, publish = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    with Feeder(bridge, "REP", simulated(), interval=0.02), Reader(publish) as reader:
        assert live(run_dir, tmp_path, f"--bridge={bridge}", f"--publish={publish}", "--live_trains=12",
                    "--gradcam_every=3") == 0
    received, processed, dropped = summary(caplog.text)
    assert processed == 12 and received == processed + dropped
    assert f"Classifying {PNCCD} data.image" in caplog.text
    tids = read_txt(tmp_path / "live.txt")
    with h5py.File(tmp_path / "live.h5", "r") as f:
        np.testing.assert_array_equal(f["bids"][:], tids)
        np.testing.assert_array_equal(f["pulses"][:], 0)
        assert f["probs"].shape == (12, 11) and f["images"].shape == (12, 32, 32, 1)
        probs = dict(zip(f["bids"][:], f["probs"][:]))
        classes = dict(zip(f["bids"][:], f["preds"][:]))
    assert tids == sorted(tids) and len(set(tids)) == 12
    assert reader.messages, "nothing was published"
    for data, meta in reader.messages:
        values = data[OUT]
        assert meta[OUT]["timestamp.tid"] == values["trainId"]
        assert values["class_names"][1] == "round" and list(values["pulseId"]) == [0]
        np.testing.assert_allclose(values["probabilities"], probs[values["trainId"]][None], rtol=1e-6)
        np.testing.assert_array_equal(values["classes"], classes[values["trainId"]][None])
        np.testing.assert_array_equal(values["classes"], values["probabilities"] > 0.5)
    maps = [d[OUT]["gradcam"] for d, _ in reader.messages if "gradcam" in d[OUT]]
    assert maps and all(m.shape == (1, 11, 1, 1) and 0 <= m.min() and m.max() <= 1 for m in maps)


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
    assert all(tid >= 2000 for tid in read_txt(tmp_path / "live.txt"))


def test_sub_slow_consumer_drops_whole_trains(run_dir, tmp_path, caplog):
    """One shot per batch against a fast publisher: old trains are dropped, the newest classified."""
    bridge = f"tcp://127.0.0.1:{free_port()}"
    with Feeder(bridge, "PUB", simulated(), interval=0.002) as feeder:
        assert live(run_dir, tmp_path, f"--bridge={bridge}", "--bridge_socket=SUB", "--batch_size=1",
                    "--live_trains=10", "--save_images=false") == 0
        sent = feeder.sent
    received, processed, dropped = summary(caplog.text)
    assert processed == 10 and dropped > 0 and received == processed + dropped
    tids = read_txt(tmp_path / "live.txt")
    assert tids == sorted(tids) and tids[-1] - tids[0] > 10  # trains were skipped, not queued
    assert 1000 + sent - tids[-1] < sent / 2  # the last classified train is a recent one


def classified(tmp_path):
    """Shots classified so far by the live run writing to tmp_path (lines of live.txt.partial)."""
    path = tmp_path / "live.txt.partial"
    return max(0, len(open(path).read().splitlines()) - 1) if os.path.exists(path) else 0


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
        with h5py.File(tmp_path / "live.h5.partial", "r", swmr=True) as f:
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
    tids = read_txt(tmp_path / "live.txt")
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
    assert len(read_txt(tmp_path / "live.txt")) == processed
    with h5py.File(tmp_path / "live.h5", "r") as f:
        assert len(f["bids"]) == processed
    assert not any(p.endswith(".partial") for p in os.listdir(tmp_path))


def test_simulated_agipd_server_assembled(run_dir, tmp_path, caplog):
    """karabo-bridge-server-sim: AGIPD 1M, 64 pulses in the online order, assembled with EXtra-geom."""
    port = free_port()
    server = subprocess.Popen(["karabo-bridge-server-sim", str(port), "-d", "AGIPD", "-z", "PUB", "-g", "zeros"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert live(run_dir, tmp_path, f"--bridge=tcp://127.0.0.1:{port}", "--bridge_socket=SUB",
                    "--live_trains=1", "--save_images=false", "--batch_size=16") == 0
    finally:
        server.kill()
        server.wait()
    assert "SPB_DET_AGIPD1M-1/CAL/APPEND_CORRECTED image.data: online layout (16, 128, 512)" in caplog.text
    assert "assembled with EXtra-geom AGIPD_1MGeometry" in caplog.text
    with h5py.File(tmp_path / "live.h5", "r") as f:
        np.testing.assert_array_equal(f["pulses"][:], np.arange(64))
        assert len(set(f["bids"][:])) == 1


def test_live_flags_are_checked():
    for flags, message in ((["--bridge=localhost:4545"], "--bridge=localhost:4545: not a ZeroMQ endpoint"),
                           ([], "--bridge: --mode=live needs"),
                           (["--bridge=tcp://127.0.0.1:1", "--live_trains=-1"], "--live_trains=-1"),
                           (["--bridge=tcp://127.0.0.1:1", "--geometry=/no/such.geom"], "--geometry=/no/such.geom"),
                           (["--bridge=tcp://127.0.0.1:1", "--bridge_socket=DEALER"], "--bridge_socket")):
        with pytest.raises(Exception, match=re.escape(message)):
            from nn import config
            config.parse_args(["--mode=live", "--load_dir=x", *flags])


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


def test_replay_of_a_run_gives_the_offline_probabilities(run_dir, tmp_path, caplog):
    """The same run directory, predicted offline and replayed through karabo-bridge-serve-files live."""
    from test_euxfel import write_pnccd_run
    images, _ = simulate.simulate(10, seed=11, size=SIZE)
    write_pnccd_run(str(tmp_path / "data" / "r0042"), images.astype(np.float32), first_train=7000)
    assert airynet.main(["--mode=predict", f"--load_dir={run_dir}", f"--data_dir={tmp_path}/data/",
                         "--dataset=r0042", f"--predict_dir={tmp_path}/offline", "--gradcam=false"]) == 0
    with h5py.File(tmp_path / "offline" / "r0042.h5", "r") as f:
        np.testing.assert_array_equal(f["bids"][:], 7000 + np.arange(10))
        np.testing.assert_array_equal(f["pulses"][:], 0)
        offline = dict(zip(f["bids"][:], f["probs"][:]))
    port = free_port()
    server = subprocess.Popen(["karabo-bridge-serve-files", str(tmp_path / "data" / "r0042"),
                               f"tcp://127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert live(run_dir, tmp_path / "live", f"--bridge=tcp://127.0.0.1:{port}", "--live_trains=9",
                    "--live_seconds=40") == 0
    finally:
        server.kill()
        server.wait()
    received, processed, dropped = summary(caplog.text)
    assert received == processed + dropped and processed >= 5
    with h5py.File(tmp_path / "live" / "live.h5", "r") as f:
        live_probs = dict(zip(f["bids"][:], f["probs"][:]))
    assert len(live_probs) == processed
    for train_id, probs in live_probs.items():
        np.testing.assert_allclose(probs, offline[train_id], atol=1e-5)


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
    with h5py.File(tmp_path / "live" / "live.h5", "r") as f:
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
