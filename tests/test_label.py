"""--mode=label: the label file (TFRecord and CXI), the API through a real server process (kill -9 and
restart), and the page in Chromium (Playwright)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf

import airynet
from nn.inputs import cxi, tfrecord
from nn.labelling import hierarchy
from nn.labelling.labelfile import RejectList, TFRecordLabels, open_label_file
from nn.config import HELIUM_CLASSES

from conftest import make_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUND = [1, 1] + [0] * 9                     # spherical_oblate + round
ELLIPTICAL_ALONE = [0, 0, 1] + [0] * 8       # refused: elliptical needs spherical_oblate
SMALL = ["--ori_width=40", "--ori_height=40", "--target_width=32", "--target_height=32", "--batch_size=4",
         "--num_worker=2"]


@pytest.fixture(scope="module")
def run_dir(tfrecord_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("runs")
    assert airynet.main(["--mode=train", f"--data_dir={tfrecord_dir}", f"--log_dir={log_dir}", "--out_dir_name=r",
                         "--train_steps=2", "--steps_per_eval=2", "--eval_steps=1", *SMALL]) == 0
    return str(log_dir / "helium_r")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`airynet.py --mode=label` in a process of its own, on a free loopback port."""

    def __init__(self, run, data_dir, labels, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "airynet.py"), "--mode=label", f"--load_dir={run}",
             f"--data_dir={data_dir}", f"--labels={labels}", f"--view_port={self.port}", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log = []
        for line in self.process.stdout:
            self.log.append(line)
            if "Serving http" in line:
                return
        raise AssertionError("the label server did not start:\n" + "".join(self.log))

    def call(self, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


def source_images(tfrecord_dir):
    cfg = make_cfg(f"--data_dir={tfrecord_dir}")
    serialized = next(iter(tf.data.TFRecordDataset(tfrecord_dir + "helium/shots_predict.tfrecord").batch(100)))
    images, extra = tfrecord.decode_records(serialized, cfg, "predict")
    return {f"shots_predict.tfrecord:{i}": image for i, image in enumerate(images.numpy())}, extra["bunch_id"].numpy()


def read_records(path):
    """(ids, labels, images) of a label file, read by TensorFlow's own TFRecord reader."""
    ids, labels, images = [], [], []
    for record in tf.data.TFRecordDataset(path):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        ids.append(feature["image/shot_id"].bytes_list.value[0].decode())
        labels.append(np.frombuffer(feature[tfrecord.LABEL_KEY].bytes_list.value[0], np.int16))
        images.append(np.frombuffer(feature["image/encoded"].bytes_list.value[0], np.uint16).reshape(40, 40, 1))
    return ids, labels, images


def test_api_five_labels_kill9_restart_and_the_file_trains(run_dir, tfrecord_dir, tmp_path):
    labels = str(tmp_path / "mine.tfrecord")
    server = Server(run_dir, tfrecord_dir, labels)
    try:
        status, first = server.call("/api/next")
        assert status == 200 and first["remaining"] == 8 and len(first["probabilities"]) == 11
        assert len(first["thresholds"]) == 11 and isinstance(first["id"], str)
        # training fitted the out-of-distribution score, so the page gets it with each shot
        assert os.path.exists(os.path.join(run_dir, "ood.npz"))
        assert isinstance(first["ood_score"], float) and first["unknown"] in (0, 1)
        saved = []
        for k in range(5):
            shot = server.call("/api/next")[1]
            vector = ROUND if k % 2 else [1, 0, 1] + [0] * 7 + [0]  # round, or elliptical
            assert server.call("/api/label", {"id": shot["id"], "classes": vector})[0] == 200
            saved.append((shot["id"], vector))
        assert server.call("/api/label", {"id": saved[0][0], "classes": ROUND})[0] == 409
        status, refused = server.call("/api/label", {"id": server.call("/api/next")[1]["id"],
                                                     "classes": ELLIPTICAL_ALONE})
        assert status == 422 and "spherical_oblate" in refused["error"]
        assert server.call("/api/label", {"id": "nope", "classes": ROUND})[0] == 404
        progress = server.call("/api/progress")[1]
        assert progress["labelled"] == 5 and progress["total"] == 8 and progress["classes"]["round"] == 2
    finally:
        server.kill()
    ids, vectors, images = read_records(labels)
    assert [(i, list(v)) for i, v in zip(ids, vectors)] == saved
    tfrecord.check(labels, make_cfg(), "train")  # the original schema's checker
    raw, _ = source_images(tfrecord_dir)
    for shot_id, image in zip(ids, images):
        np.testing.assert_array_equal(image, raw[shot_id])  # lossless
    server = Server(run_dir, tfrecord_dir, labels)
    try:
        shot = server.call("/api/next")[1]
        assert shot["id"] not in ids and shot["remaining"] == 3
        assert server.call("/api/progress")[1]["labelled"] == 5
    finally:
        server.kill()
    data_dir = tmp_path / "data"
    os.makedirs(data_dir / "mine")
    shutil.copy(labels, data_dir / "mine" / "mine_train.tfrecord")
    shutil.copy(labels, data_dir / "mine" / "mine_eval.tfrecord")
    assert airynet.main(["--mode=train", f"--data_dir={data_dir}/", "--dataset=mine", f"--log_dir={tmp_path}",
                         f"--init_from={run_dir}", "--train_steps=2", "--steps_per_eval=2", "--eval_steps=1",
                         "--ori_width=40", "--ori_height=40", "--batch_size=2", "--num_worker=2"]) == 0


def test_a_torn_last_record_is_cut_off_and_undo_truncates(tmp_path, caplog):
    path = str(tmp_path / "l.tfrecord")
    f = open_label_file(path, 11)
    for i in range(3):
        f.append({"id": f"s:{i}", "image": np.full((6, 6, 1), i, np.uint16), "bunch_id": i}, ROUND)
    size = os.path.getsize(path)
    with open(path, "ab") as out:  # a crash half-way through a fourth record
        out.write(open(path, "rb").read()[: size // 3 // 2])
    reopened = TFRecordLabels(path, 11)
    assert reopened.ids == ["s:0", "s:1", "s:2"] and os.path.getsize(path) == size
    assert "torn by a crash" in caplog.text
    assert reopened.remove_last() == "s:2"
    assert len(list(tf.data.TFRecordDataset(path))) == 2
    with pytest.raises(Exception, match="0..65535"):
        reopened.append({"id": "f", "image": np.full((6, 6, 1), 0.5, np.float32), "bunch_id": 0}, ROUND)
    rejects = RejectList(path)
    rejects.append({"id": "junk:1", "bunch_id": 7})
    with open(rejects.path, "a") as out:
        out.write('{"id": "tor')
    assert RejectList(path).ids == ["junk:1"]


def test_cxi_label_file_is_read_as_training_data(tmp_path):
    path = str(tmp_path / "lab_train.cxi")
    f = open_label_file(path, 11)
    images = np.random.default_rng(0).random((3, 40, 40, 1)).astype(np.float32) * 100
    for i in range(3):
        f.append({"id": f"cxi:{i}", "image": images[i], "bunch_id": 10 + i, "pulse": i}, ROUND)
    f.remove_last()
    reader = cxi.open_cxi(path, make_cfg(), needs_labels=True)
    got, got_labels, got_ids = reader.read(0, reader.count)
    assert reader.count == 2 and list(got_ids) == [10, 11]
    np.testing.assert_array_equal(got.reshape(2, 40, 40, 1), images[:2])
    np.testing.assert_array_equal(got_labels, [ROUND, ROUND])
    assert open_label_file(path, 11).ids == ["cxi:0", "cxi:1"]


def test_hierarchy_accepts_every_simulated_label_and_refuses_contradictions():
    from nn.inputs import simulate
    _, labels = simulate.simulate(300, seed=3, size=16)
    assert all(hierarchy.violation(v) is None for v in labels)
    C = {n: i for i, n in enumerate(HELIUM_CLASSES)}
    bad = [[], ["round"], ["spherical_oblate"], ["spherical_oblate", "round", "elliptical"], ["prolate", "round"],
           ["empty", "layered"], ["spherical_oblate", "round", "streak"], ["prolate", "streak", "bent"],
           ["spherical_oblate", "round", "layered", "double_rings"], ["prolate", "spherical_oblate"]]
    for names in bad:
        vector = np.zeros(11, int)
        vector[[C[n] for n in names]] = 1
        assert hierarchy.violation(vector), names


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        yield chromium
        chromium.close()


def test_browser_keys_label_a_shot_and_a_contradiction_is_refused(run_dir, tfrecord_dir, tmp_path, browser):
    labels = str(tmp_path / "page.tfrecord")
    server = Server(run_dir, tfrecord_dir, labels)
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=20000)
        first = page.get_attribute("body", "data-shot")
        assert page.locator("#classes tr.chosen").count() == 0  # the choice starts empty
        page.keyboard.press("1")
        page.keyboard.press("2")
        page.keyboard.press("Enter")
        page.wait_for_function(f"document.body.dataset.shot !== {json.dumps(first)}", timeout=20000)
        ids, vectors, _ = read_records(labels)
        assert ids == [first] and list(vectors[0]) == ROUND
        second = page.get_attribute("body", "data-shot")
        page.keyboard.press("3")   # elliptical alone
        page.keyboard.press("Enter")
        page.wait_for_function("document.getElementById('message').textContent.includes('Refused')", timeout=20000)
        assert "spherical_oblate" in page.text_content("#message")
        assert page.get_attribute("body", "data-shot") == second and len(read_records(labels)[0]) == 1
        page.keyboard.press("Backspace")  # takes back the first label
        page.wait_for_function("document.getElementById('message').textContent.includes('Took back')", timeout=20000)
        assert read_records(labels)[0] == []
    finally:
        server.kill()


def test_label_mode_flags_are_checked(tmp_path):
    from nn import config
    with pytest.raises(config.AiryNetError, match="--labels=: --mode=label needs a file ending in .tfrecord"):
        make_cfg("--mode=label", f"--load_dir={tmp_path}")
    with pytest.raises(config.AiryNetError, match="--labels=x.txt"):
        make_cfg("--mode=label", f"--load_dir={tmp_path}", "--labels=x.txt")
    with pytest.raises(config.AiryNetError, match="--load_dir: --mode=label needs"):
        make_cfg("--mode=label", "--labels=x.tfrecord")
    with pytest.raises(config.AiryNetError, match="--label_pool=0"):
        make_cfg("--label_pool=0")
    with pytest.raises(config.AiryNetError, match="--select"):
        make_cfg("--select=smart")
