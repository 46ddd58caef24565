#!/usr/bin/env python3
"""Figures of --mode=view (docs/view.md), each against a view running as `airynet.py --mode=view` in a
process of its own:

    python scripts/benchmark_view.py stream --trains_per_s=10 --shots=64 --seconds=30
        a PUB publisher sends --publish's messages (probabilities, classes, 8-bit images at --size px, maps of
        every --gradcam_every-th shot) at the given rate; the view subscribes. Reported: messages sent,
        received, dropped and malformed by the view, its CPU per shot, and how long a published train
        takes to be listed by the API (/api/shots polled every 20 ms, for every 10th train) or, with --browser,
        to be on the page in Chromium.
    python scripts/benchmark_view.py file --shots=100000 --size=64
        writes a stacked prediction file (gzip, images, maps) once, then times the view from start to its
        first /api/summary answer, and pages (/api/shots, 24 shots) at several offsets, filtered and sorted,
        with and without fetching the page's 24 images.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import zmq  # noqa: E402
from karabo_bridge import serialize  # noqa: E402

from nn.beamline.publisher import SOURCE, eight_bit  # noqa: E402
from nn.config import HELIUM_CLASSES  # noqa: E402
from nn.outputs import writers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_view(source, *flags):
    """The view process and its base URL (read from its one log line)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "airynet.py"), "--mode=view",
                             f"--view_source={source}", "--view_port=0", *flags], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    match = re.search(r"Serving (http://\S+)/", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"the view did not start: {line}{proc.stderr.read()}")
    return proc, match[1], started


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def message(train, shots, size, every, rng):
    probs = rng.random((shots, 11)).astype(np.float32)
    values = {"trainId": train, "pulseId": np.arange(shots), "probabilities": probs,
              "classes": (probs > 0.5).astype(np.uint8), "class_names": HELIUM_CLASSES,
              "thresholds": np.full(11, 0.5, np.float32),
              "images": eight_bit(rng.exponential(20, (shots, size, size, 1)).astype(np.float32))}
    if every:
        rows = np.arange(0, shots, every)
        values.update(gradcam=rng.random((len(rows), 11, 7, 7)).astype(np.float32), gradcam_index=rows)
    now = time.time()
    return serialize({SOURCE: values}, {SOURCE: {"timestamp": now, "timestamp.tid": train}})


def bench_stream(args):
    rng = np.random.default_rng(0)
    endpoint = "tcp://127.0.0.1:47311"
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.set_hwm(1000)
    pub.bind(endpoint)
    prepared = [message(0, args.shots, args.size, args.gradcam_every, rng) for _ in range(8)]
    proc, base, _ = start_view(endpoint, "--view_socket=SUB")
    view = psutil.Process(proc.pid)
    browser = _Browser(base) if args.browser else None
    shown_after = browser.shown_after if browser else (lambda train, sent_at: _listed_after(base, train, sent_at))
    try:
        time.sleep(1.0)  # the subscription reaches the publisher
        cpu0, sent, delays = view.cpu_times(), 0, []
        start = time.monotonic()
        while time.monotonic() - start < args.seconds:
            due = start + sent / args.trains_per_s
            time.sleep(max(0.0, due - time.monotonic()))
            train = 10 ** 6 + sent
            pub.send_multipart(serialize(*_retagged(prepared[sent % len(prepared)], train)))
            if sent % 10 == 0:
                delays.append(shown_after(train, time.monotonic()))
            sent += 1
        time.sleep(1.0)
        cpu1 = view.cpu_times()
        summary = json.loads(get(base + "/api/summary"))
    finally:
        if browser:
            browser.close()
        proc.terminate()
        proc.wait()
        pub.close(linger=0)
        context.term()
    cpu = cpu1.user + cpu1.system - cpu0.user - cpu0.system
    missed = sum(d is None for d in delays)  # not shown within 3 s
    delays = [d for d in delays if d is not None]
    print(f"stream: {sent} trains of {args.shots} shots ({args.trains_per_s}/s, {args.size} px images, maps every "
          f"{args.gradcam_every}) in {args.seconds:.0f} s; view received {summary['messages']}, dropped "
          f"{summary['dropped']}, malformed {summary['malformed']}, shots {summary['shots']}; view CPU "
          f"{cpu:.1f} s = {1e6 * cpu / max(1, summary['shots']):.0f} us a shot ({100 * cpu / args.seconds:.0f}% of a "
          f"core); published -> {'on the page in Chromium' if args.browser else 'listed by /api/shots'}: median {1000 * statistics.median(delays):.0f} ms, max "
          f"{1000 * max(delays):.0f} ms over {len(delays)} trains, {missed} not within 3 s")


def _retagged(frames, train):
    """A prepared message with another train ID and a fresh timestamp."""
    from karabo_bridge import deserialize
    data, meta = deserialize(frames)
    data[SOURCE]["trainId"] = train
    meta[SOURCE].update(timestamp=time.time(), **{"timestamp.tid": train})
    return data, meta


def _listed_after(base, train, sent_at, timeout=3.0):
    """Seconds from sending `train` until /api/shots lists it first (None: not within `timeout`)."""
    while time.monotonic() - sent_at < timeout:
        shots = json.loads(get(base + "/api/shots?limit=1"))["shots"]
        if shots and shots[0]["bunch_id"] >= train:
            return time.monotonic() - sent_at
        time.sleep(0.02)
    return None


class _Browser:
    """The page in Chromium (Playwright), to time a train from its publication to its card on the page."""

    def __init__(self, base):
        from playwright.sync_api import sync_playwright
        self.playwright = sync_playwright().start()
        self.browser = self.playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        self.page = self.browser.new_page()
        self.page.goto(base + "/")

    def shown_after(self, train, sent_at, timeout=3.0):
        try:
            self.page.wait_for_function(f"[...document.querySelectorAll('#grid .shot')].some("
                                        f"e => e.textContent.includes('train {train},'))", timeout=1000 * timeout,
                                        polling=10)
        except Exception:  # not within the timeout
            return None
        return time.monotonic() - sent_at

    def close(self):
        self.browser.close()
        self.playwright.stop()


def write_file(path, shots, size):
    if os.path.exists(path):
        return
    rng = np.random.default_rng(1)
    fields = writers.stacked_fields(11, (size, size, 1), pulses=True)
    fields["grad_cam"] = ("float16", (11, 2, 2), {})
    writer = writers.StackedWriter(path + ".w", fields, HELIUM_CLASSES, {"thresholds": np.full(11, 0.5, np.float32)})
    pool = rng.exponential(20, (1000, size, size, 1)).astype(np.float32)  # images cycled: writing stays quick
    for start in range(0, shots, 1000):
        n = min(1000, shots - start)
        probs = rng.random((n, 11)).astype(np.float32)
        writer.write({"bids": 10 ** 6 + (start + np.arange(n)) // 64, "pulses": (start + np.arange(n)) % 64,
                      "probs": probs, "preds": (probs > 0.5).astype(np.uint8), "images": pool[:n],
                      "grad_cam": rng.random((n, 11, 2, 2)).astype(np.float16)})
    writer.close()
    os.replace(writer.tmp, path)


def bench_file(args):
    path = os.path.join(args.work, f"view_{args.shots}_{args.size}px.h5")
    os.makedirs(args.work, exist_ok=True)
    write_file(path, args.shots, args.size)
    opens, pages, with_images = [], [], []
    for _ in range(args.rounds):
        proc, base, started = start_view(path)
        try:
            get(base + "/api/summary")
            opens.append(time.monotonic() - started)
            for query in ("offset=0", "offset=50000", "cls=round&sort=bent&offset=1000",
                          "prob=streak&min=0.2&max=0.4&offset=500", "offset=99976"):
                t = time.monotonic()
                shots = json.loads(get(f"{base}/api/shots?limit=24&{query}"))["shots"]
                pages.append(time.monotonic() - t)
                for shot in shots:
                    get(f"{base}/api/shots/{shot['id']}/image.png?map=round")
                with_images.append(time.monotonic() - t)
        finally:
            proc.terminate()
            proc.wait()
    print(f"file: {args.shots} shots, {args.size} px, {os.path.getsize(path) / 2 ** 20:.0f} MiB; open (process start "
          f"to first summary): median {statistics.median(opens):.2f} s (max {max(opens):.2f}) over {args.rounds}; "
          f"page of 24: median {1000 * statistics.median(pages):.0f} ms (max {1000 * max(pages):.0f}); with its 24 "
          f"images and maps: median {1000 * statistics.median(with_images):.0f} ms (max "
          f"{1000 * max(with_images):.0f}), {len(pages)} pages")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("stream", "file"))
    p.add_argument("--trains_per_s", type=float, default=10)
    p.add_argument("--shots", type=int, default=None, help="stream: shots a train (64); file: shots (100000)")
    p.add_argument("--size", type=int, default=64, help="image side in px")
    p.add_argument("--gradcam_every", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--browser", action="store_true",
                   help="stream: time each train until its card is on the page in Chromium, not until the API lists it")
    p.add_argument("--work", default="/tmp/airynet-bench")
    args = p.parse_args()
    if args.shots is None:
        args.shots = 64 if args.what == "stream" else 100_000
    (bench_stream if args.what == "stream" else bench_file)(args)


if __name__ == "__main__":
    main()
