"""A live run's --publish stream as a view's source (nn/beamline/publisher.py's messages).

Two threads: the receiver takes messages off the socket as they come and puts them, still serialised, in
a bounded queue that drops its oldest when full (counted as dropped), so that a view slower than the run
drops, never queues; the decoder unpacks them into a Table that keeps the newest KEEP_SHOTS shots (the
counts per class cover all), the newest KEEP_IMAGES images and maps, and a record per train for the
rates. A malformed or foreign message is counted and skipped.

REQ asks the run for each message (its publisher's REP); a view should rather subscribe (SUB to a PUB
publisher), as a REQ view takes results away from other REQ clients."""
import collections
import logging
import threading
import time

import numpy as np
import zmq
from karabo_bridge import deserialize

from nn.web.table import Table

log = logging.getLogger("airynet")

SOURCE = "AIRYNET/CLASSIFIER"  # nn/beamline/publisher.py's source name
QUEUE = 256  # serialised messages waiting for the decoder (a train each)
KEEP_SHOTS = 200_000  # shots whose numbers the page can list
KEEP_IMAGES = 4096  # shots whose images (and maps) the page can show
RATE_SECONDS = 300  # the rates over time cover this much
RATE_TRAINS = 600  # ... and at most this many trains
WINDOW_SECONDS = 10  # throughput and latency are of the messages of this last while
POLL_MS = 100


class StreamSource:
    kind = "stream"

    def __init__(self, endpoint, socket_type):
        self.endpoint, self.socket_type = endpoint, socket_type
        self.table = None  # made with the first message, which names the classes
        self.thresholds = None
        self.images, self.maps = collections.OrderedDict(), collections.OrderedDict()
        self.queue = collections.deque()
        self.arrived = threading.Condition()
        self.counts = collections.Counter()  # messages: received, dropped, malformed, decoded
        self.trains = collections.deque(maxlen=RATE_TRAINS)  # (time, train ID, shots, counts per class)
        self.recent = collections.deque()  # (time received, shots, latency) of the last WINDOW_SECONDS
        self.images_seen = False
        self.stopping = threading.Event()
        self.context = zmq.Context()
        self.threads = [threading.Thread(target=self._receive, name="view-receiver", daemon=True),
                        threading.Thread(target=self._decode, name="view-decoder", daemon=True)]
        for thread in self.threads:
            thread.start()

    # -- receiving: the socket, the bounded queue ------------------------------------------------

    def _receive(self):
        sock = self.context.socket(getattr(zmq, self.socket_type))
        if self.socket_type == "SUB":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.endpoint)
        asked = False
        try:
            while not self.stopping.is_set():
                if self.socket_type == "REQ" and not asked:
                    sock.send(b"next")
                    asked = True
                if sock.poll(POLL_MS, zmq.POLLIN):
                    self._enqueue(sock.recv_multipart(copy=False))
                    asked = False
        finally:
            sock.close(linger=0)

    def _enqueue(self, frames):
        with self.arrived:
            self.counts["received"] += 1
            if len(self.queue) == QUEUE:
                self.queue.popleft()
                self.counts["dropped"] += 1
            self.queue.append((time.time(), frames))
            self.arrived.notify()

    # -- decoding: messages into the table --------------------------------------------------------

    def _decode(self):
        while not self.stopping.is_set():
            with self.arrived:
                if not self.arrived.wait_for(lambda: self.queue, POLL_MS / 1000):
                    continue
                received, frames = self.queue.popleft()
            try:
                data, meta = deserialize(frames)
                self._add(received, data[SOURCE], meta.get(SOURCE, {}))
                self.counts["decoded"] += 1
            except Exception as e:  # a foreign or damaged message: counted, skipped
                self.counts["malformed"] += 1
                log.debug("view: skipped a message (%s: %s)", type(e).__name__, e)

    def _add(self, received, values, meta):
        probs = np.asarray(values["probabilities"], np.float32)
        preds = np.asarray(values["classes"], np.uint8)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in values["class_names"]]
        train, n = int(values["trainId"]), len(probs)
        pulses = np.asarray(values.get("pulseId", np.arange(n)), np.int64).reshape(-1)
        if probs.ndim != 2 or probs.shape != preds.shape or probs.shape[1] != len(names) or len(pulses) != n:
            raise ValueError(f"shapes {probs.shape}, {preds.shape}, {len(names)} names, {len(pulses)} pulses")
        if self.table is None:
            self.table = Table(names, capacity=KEEP_SHOTS)
        elif names != self.table.class_names:
            raise ValueError("other classes than the first message's")
        if "thresholds" in values:
            self.thresholds = [round(float(t), 4) for t in values["thresholds"]]
        ids = [f"{train}-{i}" for i in range(n)]
        extra = {"pulses": pulses, **{k: np.asarray(values[k]).reshape(n) for k in ("ood_score", "unknown")
                                      if k in values}}
        self.table.append(ids, np.full(n, train, np.int64), probs, preds, extra)
        self._keep_pictures(ids, values)
        latency = received - float(meta["timestamp"]) if "timestamp" in meta else None
        with self.arrived:
            self.trains.append((received, train, n, (preds > 0).sum(axis=0)))
            self.recent.append((received, n, latency))

    def _keep_pictures(self, ids, values):
        if "images" in values:
            self.images_seen = True
            for shot, image in zip(ids, np.asarray(values["images"])):
                _keep(self.images, shot, image)
        if "gradcam" in values:
            for row, heat in zip(np.asarray(values["gradcam_index"]).reshape(-1), np.asarray(values["gradcam"])):
                _keep(self.maps, ids[int(row)], heat)

    # -- what the view asks -----------------------------------------------------------------------

    def refresh(self):
        """Nothing to do: the threads keep the table up to date."""

    def image(self, shot_id):
        return self.images.get(shot_id)

    def heat(self, shot_id, c):
        heat = self.maps.get(shot_id)
        return None if heat is None else heat[c]

    def status(self):
        now = time.time()
        with self.arrived:
            while self.recent and now - self.recent[0][0] > WINDOW_SECONDS:
                self.recent.popleft()
            shots = sum(n for _, n, _ in self.recent)
            latencies = [lat for _, _, lat in self.recent if lat is not None]
            trains = [t for t in self.trains if now - t[0] <= RATE_SECONDS]
            counts = dict(self.counts)
        return {"source": self.endpoint, "kind": self.kind, "socket": self.socket_type,
                "waiting": self.table is None, "thresholds": self.thresholds,
                "images": self.images_seen, "maps": bool(self.maps),
                "messages": counts.get("received", 0), "dropped": counts.get("dropped", 0),
                "malformed": counts.get("malformed", 0),
                "throughput": round(shots / WINDOW_SECONDS, 2),
                "latency": round(float(np.median(latencies)), 4) if latencies else None,
                "rates": {"seconds_ago": [round(now - t[0], 2) for t in trains], "train": [t[1] for t in trains],
                          "shots": [t[2] for t in trains], "counts": [t[3].tolist() for t in trains]}}

    def close(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join()
        self.context.term()


def _keep(store, key, value):
    """Add to a store of the newest KEEP_IMAGES entries (the decoder is its only writer)."""
    store[key] = value
    while len(store) > KEEP_IMAGES:
        store.popitem(last=False)
