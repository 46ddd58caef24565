"""--mode=view in a real browser (Playwright driving Debian's Chromium, one browser for the module) on
tiny prediction files and on a live run's stream; the JSON API against numpy on the same files.

VIEW_SCREENSHOT=docs/view.png makes the page test save its screenshot there (the one in README.md)."""
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import h5py
import numpy as np
import pytest
import zmq
from karabo_bridge import serialize

import airynet
from nn.config import HELIUM_CLASSES
from nn.inputs import simulate
from nn.outputs import writers
from nn.web import stream as stream_module
from nn.web import view
from nn.web.h5source import FileSource
from nn.web.stream import StreamSource
from test_live import Feeder, free_port, pnccd_train
from test_web import Running, _get, _non_loopback_address

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
SIZE = 32
SHOTS = 40
MAP = (4, 4)


def write_stacked(path, n=SHOTS, seed=0):
    """A stacked prediction file as --mode=predict writes it: pulses, 32 px images, maps, thresholds."""
    rng = np.random.default_rng(seed)
    fields = writers.stacked_fields(11, (SIZE, SIZE, 1), pulses=True)
    fields["grad_cam"] = ("float16", (11, *MAP), {})
    writer = writers.StackedWriter(path, fields, HELIUM_CLASSES, {"thresholds": np.full(11, 0.4, np.float32)})
    images, _ = simulate.simulate(n, seed=seed, size=SIZE)
    probs = rng.random((n, 11)).astype(np.float32)
    writer.write({"bids": 5000 + np.arange(n), "pulses": np.arange(n) % 8, "probs": probs,
                  "preds": (probs >= 0.4).astype(np.uint8), "images": images[..., None].astype(np.float32),
                  "grad_cam": rng.random((n, 11, *MAP)).astype(np.float16)})
    writer.close()
    os.replace(writer.tmp, path)
    return probs


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("view") / "shots.h5")
    write_stacked(path)
    return path


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def file_view(stacked):
    running = Running(view.build_app(FileSource(stacked)), "127.0.0.1")
    yield f"http://127.0.0.1:{running.port}"
    running.stop()


def api(url):
    status, _, body = _get(url)
    assert status == 200, body
    return json.loads(body)


def page_counts(page):
    """{class name: count} as the page's class table shows them."""
    rows = page.locator("#classes tbody tr")
    return {rows.nth(i).get_attribute("data-class"): int(rows.nth(i).locator(".count").inner_text())
            for i in range(rows.count())}


def test_page_counts_filter_image_and_overlay(browser, file_view, stacked):
    with h5py.File(stacked, "r") as f:
        expected = dict(zip(HELIUM_CLASSES, f["preds"][()].sum(axis=0).tolist()))
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(file_view + "/")
    page.wait_for_selector("#grid .shot img")
    assert page_counts(page) == expected
    assert f"{SHOTS} shots" in page.inner_text("#totals")

    name = "bent"  # clicking a class shows only its shots
    page.click(f"#classes tr[data-class={name}]")
    page.wait_for_function(f"document.querySelector('#page').textContent.endsWith('of {expected[name]}')")
    cards = page.locator("#grid .shot .predicted")
    assert cards.count() == min(24, expected[name])
    assert all(name in cards.nth(i).inner_text().split(", ") for i in range(cards.count()))

    first = page.locator("#grid .shot img").first
    plain = _pixels(first.screenshot())
    assert plain.std() > 5 and np.abs(plain[..., 0].astype(int) - plain[..., 2]).max() <= 2  # gray, not blank
    page.select_option("#map", "round")
    page.wait_for_function("document.querySelector('#grid .shot img').src.includes('map=round')")
    page.wait_for_function("document.querySelector('#grid .shot img').complete")
    overlay = _pixels(page.locator("#grid .shot img").first.screenshot())
    assert np.abs(overlay[..., 0].astype(int) - overlay[..., 2]).max() > 40  # coloured by the map

    page.locator("#grid .shot").first.click()  # the shot: its probabilities against the thresholds, its maps
    page.wait_for_selector("#detail-probs tbody tr")
    rows = page.locator("#detail-probs tbody tr")
    assert rows.count() == 11 and "/ 0.40" in rows.first.inner_text()
    assert page.locator("#detail-maps button").count() == 11
    if os.environ.get("VIEW_SCREENSHOT"):
        page.screenshot(path=os.environ["VIEW_SCREENSHOT"])
    page.close()


def _pixels(png):
    import io

    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_api_against_numpy(file_view, stacked):
    with h5py.File(stacked, "r") as f:
        probs, preds, bids, pulses = f["probs"][()], f["preds"][()], f["bids"][()], f["pulses"][()]
    round_, bent = HELIUM_CLASSES.index("round"), HELIUM_CLASSES.index("bent")
    answer = api(file_view + "/api/shots?cls=bent&sort=round&min=0.5&limit=500")
    keep = np.flatnonzero((preds[:, bent] > 0) & (probs[:, bent] >= 0.5))
    order = keep[np.argsort(-probs[keep, round_], kind="stable")]
    assert answer["total"] == len(keep) and [s["id"] for s in answer["shots"]] == [str(r) for r in order]
    shot = answer["shots"][0]
    r = int(shot["id"])
    assert shot["bunch_id"] == bids[r] and shot["pulse"] == pulses[r]
    assert np.allclose(shot["probabilities"], probs[r], atol=1e-4)
    assert shot["classes"] == [n for n, d in zip(HELIUM_CLASSES, preds[r]) if d]
    newest = api(file_view + "/api/shots?offset=3&limit=2")
    assert newest["total"] == SHOTS and [s["id"] for s in newest["shots"]] == [str(SHOTS - 4), str(SHOTS - 5)]
    text = _get(file_view + "/api/ids.txt?prob=round&max=0.3")[2].decode().splitlines()
    low = np.flatnonzero(probs[:, round_] <= 0.3)[::-1]
    assert text[1:] == [f"{bids[i]}\t{pulses[i]}\t{i}" for i in low]
    summary = api(file_view + "/api/summary")
    hits = int(np.any(preds[:, :10] > 0, axis=1).sum())
    assert summary["shots"] == SHOTS and summary["hits"] == hits and summary["thresholds"] == [0.4] * 11
    for bad, status in (("/api/shots?cls=nope", 400), ("/api/shots?min=2", 400), ("/api/shots/999", 404),
                        ("/api/shots/..%2f..%2fetc%2fpasswd/image.png", 404), ("/api/shots/1/image.png?map=x", 400)):
        assert _get(file_view + bad)[0] == status, bad


def test_per_shot_file_and_shard_folder(tmp_path):
    rng = np.random.default_rng(4)
    per_shot = writers.PerShotWriter(str(tmp_path / "p.h5"), HELIUM_CLASSES, {})
    probs = rng.random((6, 11)).astype(np.float32)
    per_shot.write({"bids": np.array([7, 7, 8, 9, 10, 11]), "probs": probs, "preds": (probs > 0.5).astype(np.uint8),
                    "images": rng.random((6, SIZE, SIZE, 1)).astype(np.float32),
                    "grad_cam": rng.random((6, 11, *MAP)).astype(np.float32)})
    per_shot.close()
    source = FileSource(per_shot.tmp)
    assert view.summary(source)["classes"] == dict(zip(HELIUM_CLASSES, (probs > 0.5).sum(axis=0).tolist()))
    assert source.table.ids == ["7", "7_1", "8", "9", "10", "11"]
    assert np.allclose(source.image("7_1"), per_shot_image(per_shot.tmp, "7_1"))
    assert source.heat("9", 3).shape == MAP
    os.makedirs(tmp_path / "shards")
    for k in range(2):
        write_stacked(str(tmp_path / "shards" / f"s.shard{k}of2.h5"), n=5, seed=k)
    folder = FileSource(str(tmp_path / "shards"))
    assert folder.table.shots == 10 and folder.table.ids[:2] == ["0-0", "0-1"] and folder.image("1-4").shape == (SIZE, SIZE, 1)


def per_shot_image(path, name):
    with h5py.File(path, "r") as f:
        return f[name]["img"][()]


def test_a_growing_swmr_file_is_read_as_it_grows(tmp_path):
    path = str(tmp_path / "live.h5")
    writer = writers.StackedWriter(path, writers.stacked_fields(11, pulses=True), HELIUM_CLASSES, {}, swmr=True)
    row = {"bids": np.array([1]), "pulses": np.array([0]), "probs": np.full((1, 11), 0.7, np.float32),
           "preds": np.ones((1, 11), np.uint8)}
    writer.write(row)
    writer.flush()
    source = FileSource(writer.tmp)
    assert source.table.shots == 1
    writer.write({**row, "bids": np.array([2])})
    writer.flush()
    source.checked = 0
    source.refresh()
    assert source.table.shots == 2 and source.table.shot(1)["bunch_id"] == 2
    writer.close()


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file or folder"),
    (lambda p: open(p, "w").write("text"), "not an HDF5 file"),
    (lambda p: h5py.File(p, "w").create_dataset("x", data=[1]), "not a prediction file")])
def test_bad_sources_are_one_line_errors(tmp_path, capsys, make, message):
    path = str(tmp_path / "x.h5")
    make(path)
    assert airynet.main(["--mode=view", f"--view_source={path}", "--view_port=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"airynet: error: --view_source={path}: {message}")


def test_without_the_token_a_non_loopback_view_answers_403(browser, stacked):
    host = _non_loopback_address()
    if host is None:
        pytest.skip("this machine has no address but loopback")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "airynet.py"), "--mode=view",
                             f"--view_source={stacked}", f"--view_host={host}", "--view_port=0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        match = re.search(r"Serving (http://\S+:(\d+)/)\?token=(\S+)$", line.strip())
        assert match, line
        page = browser.new_page()
        assert page.goto(match[1]).status == 403
        assert page.goto(match[1] + "api/summary").status == 403
        assert page.goto(f"{match[1]}?token={match[3]}").status == 200
        page.wait_for_selector("#classes tbody tr")  # the page's own requests carry the cookie
        assert sum(page_counts(page).values()) > 0
        page.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_stream_drops_oldest_and_skips_malformed(monkeypatch):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.bind(endpoint)
    slow = threading.Event()
    real = stream_module.deserialize

    def slow_deserialize(frames):
        slow.wait(5)  # the decoder stalls until the burst is in
        return real(frames)
    monkeypatch.setattr(stream_module, "deserialize", slow_deserialize)
    monkeypatch.setattr(stream_module, "QUEUE", 4)
    source = StreamSource(endpoint, "SUB")
    try:
        assert view.summary(source)["waiting"]
        time.sleep(0.5)  # the subscription reaches the publisher
        good = {"trainId": 1, "pulseId": np.arange(2), "probabilities": np.full((2, 3), 0.9, np.float32),
                "classes": np.ones((2, 3), np.uint8), "class_names": ["a", "b", "empty"]}
        messages = [serialize({"OTHER/SOURCE": {"x": 1}}, {"OTHER/SOURCE": {}}), [b"not msgpack", b"at all"]]
        messages += [serialize({stream_module.SOURCE: {**good, "trainId": 10 + i}},
                               {stream_module.SOURCE: {"timestamp": time.time()}}) for i in range(12)]
        for frames in messages:
            pub.send_multipart(frames)
        deadline = time.monotonic() + 5
        while source.counts["received"] < len(messages) and time.monotonic() < deadline:
            time.sleep(0.02)
        slow.set()
        while source.counts["decoded"] + source.counts["malformed"] + source.counts["dropped"] < len(messages) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        s = view.summary(source)
        decoded = source.counts["decoded"]
        # The decoder holds at most one message when it stalls: the rest beyond the queue's 4 are dropped,
        # oldest first, so the 4 newest trains arrive (and the foreign message if it was the one held).
        assert s["messages"] == 14 and s["dropped"] in (9, 10) and decoded == 4 and s["malformed"] == 10 - s["dropped"]
        assert s["shots"] == 8 and s["classes"] == {"a": 8, "b": 8, "empty": 8} and s["hit_share"] == 1.0
        assert source.table.ids == [f"{t}-{i}" for t in range(18, 22) for i in range(2)]
        assert 0 <= s["latency"] < 10 and s["rates"]["train"] == [18, 19, 20, 21]
    finally:
        slow.set()
        source.close()
        pub.close(linger=0)
        context.term()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A ResNet-18 trained for two steps on 32 px synthetic shots."""
    root = tmp_path_factory.mktemp("view_run")
    assert airynet.main(["--mode=train", "--dataset=synthetic", f"--data_dir={root}/none/", f"--log_dir={root}",
                         "--out_dir_name=r", "--train_steps=2", "--steps_per_eval=2", "--eval_steps=1",
                         f"--target_width={SIZE}", f"--target_height={SIZE}", f"--ori_width={SIZE}",
                         f"--ori_height={SIZE}", "--batch_size=4", "--dataset_size=16", "--use_nchw=false"]) == 0
    return str(root / "synthetic_r")


def shots_on_page(page):
    return int(page.inner_text("#totals").split(" shots")[0])


def test_live_run_publishing_counts_rise(browser, tiny_run, tmp_path):
    images, _ = simulate.simulate(8, seed=2, size=SIZE)
    bridge, publish = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    source = StreamSource(publish, "SUB")
    running = Running(view.build_app(source), "127.0.0.1")
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{running.port}/")
        page.wait_for_function("document.querySelector('#state').textContent.startsWith('waiting for data from')")
        with Feeder(bridge, "REP", lambda i: pnccd_train(images[i % 8], 100 + i), interval=0.05):
            live = threading.Thread(target=airynet.main, args=([
                "--mode=live", f"--load_dir={tiny_run}", f"--bridge={bridge}", f"--publish={publish}",
                "--publish_socket=PUB", "--gradcam_every=2", "--live_trains=24", "--live_seconds=60", "--jit_inference=none",
                f"--predict_dir={tmp_path}", "--batch_size=4"],), daemon=True)
            live.start()
            page.wait_for_function("parseInt(document.querySelector('#totals').textContent) > 0", timeout=60000)
            first = shots_on_page(page)
            page.wait_for_function(f"parseInt(document.querySelector('#totals').textContent) > {first}",
                                   timeout=30000)
            live.join(60)
        assert not live.is_alive()
        page.wait_for_function("parseInt(document.querySelector('#totals').textContent) == 24", timeout=10000)
        assert sum(page_counts(page).values()) == int(source.table.counts.sum()) > 0
        page.wait_for_selector("#grid .shot img")
        assert _pixels(page.locator("#grid .shot img").first.screenshot()).std() > 5
        assert "dropped by the view 0, malformed 0" in page.inner_text("#stream")
        assert len(source.maps) == 12 and source.thresholds == [0.5] * 11
    finally:
        page.close()
        running.stop()
        source.close()
