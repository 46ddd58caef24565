"""--mode=live's results as a Karabo bridge stream (protocol 2.2) at --publish: one message per train
from source AIRYNET/CLASSIFIER with trainId, pulseId [N], probabilities [N, C], classes [N, C] (uint8,
the run's decision rule), class_names, thresholds [C] (float32, where the rule is one of thresholds: a class
is decided at or above its own), ood_score [N] (float32) and unknown [N] (uint8) where the run has an
out-of-distribution fit (nn/ood.py), with --publish_images (the default) images [N, H, W] (uint8: the network's
input, H x W = --target_height x --target_width, its first channel, log1p of the counts scaled so that each
shot's largest is 255; for --mode=view) and, for the shots that have maps, gradcam [M, C, h, w] (float32,
Grad-CAM++ at the last block's resolution) with gradcam_index [M] (their rows in the train).

The results wait in a backlog (two batches' worth of trains, as live.py sizes it) and go out oldest first
as clients take them, so a client that keeps up gets every result although a batch's trains come at once.
When the backlog is full the oldest waiting result is dropped: a client that falls behind, or comes late,
gets the newest ones next. Dropped results, and those still waiting when the run ends, are counted as
not published. Per socket (--publish_socket):
  REP   each request gets the oldest waiting result, or the next one to come;
  PUSH  a result goes out when a PULL client has room for it;
  PUB   every result goes out at once. ZeroMQ queues up to the backlog for each subscriber, and drops
        messages for a subscriber further behind without the publisher knowing (the subscriber sees gaps
        in trainId): the count of results not published cannot include those.
The socket is served here with karabo_bridge's serialisation. karabo_bridge's ServerInThread takes a
message from its queue before a request comes, so a late REP client first got results of long before,
and its queue of one could not hold a batch's trains.
"""
import collections
import threading
import time

import numpy as np
import zmq
from karabo_bridge import serialize

from nn.config import AiryNetError, first_line

SOURCE = "AIRYNET/CLASSIFIER"
POLL_MS = 100  # how long the sending thread waits for a client or a result before it looks for a stop
DRAIN_SECONDS = 2.0  # at the end, how long the waiting results may go unsent before they are given up
LINGER_MS = 1000  # at the end, how long messages already sent may take to leave the socket


class Publisher:
    """The results of a run, sent by a thread of their own so that a slow or absent client never slows
    the classifier. `backlog`: how many results may wait for a client."""

    def __init__(self, endpoint, socket, class_names, backlog, thresholds=None):
        self.endpoint, self.kind, self.backlog = endpoint, socket, backlog
        self.class_names = list(class_names)
        self.thresholds = None if thresholds is None else np.asarray(thresholds, np.float32)
        self.context = zmq.Context()
        self.socket = self.context.socket(getattr(zmq, socket))
        # PUB: ZeroMQ's queue per subscriber must hold a batch's burst. REP and PUSH send only when a
        # client is ready, so the backlog here, which drops the oldest, is the only queue.
        self.socket.set_hwm(backlog if socket == "PUB" else 1)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError as e:
            self.context.destroy(linger=0)
            raise AiryNetError(f"--publish={endpoint}: cannot bind ({e})") from e
        self.waiting = collections.deque()
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.asked = False  # REP: a request waits for its reply
        self.sent = self.unpublished = 0
        self.error = None
        self.thread = threading.Thread(target=self._run, name="airynet-publisher", daemon=True)
        self.thread.start()

    def publish(self, train_id, pulses, result):
        """One train's message: `result` holds its "probabilities" and "classes", where the run has an
        out-of-distribution fit its "ood_score" and "unknown", optionally its network input "images"
        [N, H, W, D] (float32; made 8-bit by the sending thread, off the classifier's) and, if some of its
        shots have maps, their "gradcam" and "gradcam_index". Raises the sending thread's error."""
        if self.error is not None:
            raise AiryNetError(f"--publish={self.endpoint}: {type(self.error).__name__}: {first_line(self.error)}")
        values = {"trainId": train_id, "pulseId": pulses, "probabilities": result["probabilities"],
                  "classes": result["classes"], "class_names": self.class_names}
        if self.thresholds is not None:
            values["thresholds"] = self.thresholds
        for key in ("ood_score", "unknown", "images", "gradcam", "gradcam_index"):
            if key in result:
                values[key] = result[key]
        now = time.time()
        meta = {"source": SOURCE, "timestamp": now, "timestamp.sec": str(int(now)),
                "timestamp.frac": f"{now % 1:.18f}"[2:], "timestamp.tid": train_id}
        with self.changed:
            if len(self.waiting) == self.backlog:
                self.waiting.popleft()
                self.unpublished += 1
            self.waiting.append(({SOURCE: values}, {SOURCE: meta}))
            self.changed.notify_all()

    def _run(self):
        try:
            while not self.stopping.is_set():
                if self._client_ready() and (message := self._oldest()) is not None:
                    values = message[0][SOURCE]
                    if "images" in values:
                        values["images"] = eight_bit(values["images"])
                    self.socket.send_multipart(serialize(*message), copy=False)
                    self.asked = False
                    with self.changed:
                        self.sent += 1
                        self.changed.notify_all()
        except Exception as e:  # raised in the main thread by the next publish()
            self.error = e

    def _client_ready(self):
        """Whether a result may go out now (waits up to POLL_MS): REP once a request came, PUSH when a
        client has room, PUB always."""
        if self.kind == "PUSH":
            return bool(self.socket.poll(POLL_MS, zmq.POLLOUT))
        if self.kind == "REP" and not self.asked and self.socket.poll(POLL_MS, zmq.POLLIN):
            self.socket.recv()  # b"next": karabo_bridge clients ask for nothing else
            self.asked = True
        return self.kind == "PUB" or self.asked

    def _oldest(self):
        """The oldest waiting result, taken from the backlog; None if none comes within POLL_MS."""
        with self.changed:
            if self.changed.wait_for(lambda: self.waiting, POLL_MS / 1000):
                return self.waiting.popleft()
        return None

    def close(self):
        """Send what waits while clients take it (until DRAIN_SECONDS pass without one taken), then stop;
        results left waiting count as not published."""
        with self.changed:
            sent = -1
            while self.waiting and self.error is None and sent != self.sent:
                sent = self.sent
                self.changed.wait_for(lambda: not self.waiting or self.sent != sent, DRAIN_SECONDS)
            self.unpublished += len(self.waiting)
            self.waiting.clear()
        self.stopping.set()
        self.thread.join()
        self.socket.close(linger=LINGER_MS)  # a reply already sent still reaches its client
        self.context.term()


def eight_bit(images):
    """Network inputs [N, H, W, D] as uint8 [N, H, W]: the first channel's log1p (negative counts as 0),
    scaled so that each shot's largest value is 255 (nn/web/render.py shows them as they are)."""
    logged = np.log1p(np.clip(np.asarray(images, np.float32)[..., 0], 0, None))
    top = logged.max(axis=(1, 2), keepdims=True)
    return np.round(logged * (255 / np.where(top > 0, top, 1))).astype(np.uint8)
