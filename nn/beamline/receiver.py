"""--mode=live's input: a thread that reads a European XFEL Karabo bridge and keeps the newest trains.

It keeps at most one batch of frames (at least one train), so results stay recent and no backlog grows.
With REQ (the bridge's request-reply) it asks for trains only while the classifier waits for the next
batch, so the server's newest data is what arrives and no CPU goes into decoding trains that would be
dropped (as OnDA asks when it is ready); with SUB and PULL the server pushes, so it reads on and, when
the classifier falls behind, drops the oldest waiting trains whole and counts them. Gaps in the train
IDs (trains the source never sent us) are counted too. After the first train it pauses until the
classifier is set up for that frame size (resume()). A message without the source or key, with a
wrong shape or dtype, or without frames (a pulse stack of 0 pulses) is logged once per kind, counted and
skipped, so the classifier only ever gets trains with frames. A server that goes silent is connected to
anew until it is back; after a ZeroMQ error (the socket's, not a message's) the next try waits, twice as
long each time up to MAX_BACKOFF seconds, so that an error that persists does not spin a core.
"""
import collections
import logging
import threading
import time

import zmq

from nn.config import AiryNetError
from nn.inputs import detectors

log = logging.getLogger("airynet")

RECEIVE_TIMEOUT = 2.0  # seconds without data before the bridge connection is made anew
FILL_SECONDS = 0.2  # REQ: how long a batch may take to fill once its first train is in
MIN_BACKOFF, MAX_BACKOFF = 0.1, 5.0  # seconds between tries after ZeroMQ errors

Train = collections.namedtuple("Train", "train_id array pulses received")


class Receiver(threading.Thread):
    """Reads the bridge at `endpoint` through a `socket` (REQ, SUB, PULL) and keeps the newest trains, at
    most `capacity` frames (at least one train). `source`, `key`: the detector's, else the first that
    looks like one (detectors.pick_source); `geometry`: a CrystFEL file for modular detectors."""

    def __init__(self, endpoint, socket, capacity, source="", key="", geometry=""):
        super().__init__(name="bridge-receiver", daemon=True)
        self.endpoint, self.socket = endpoint, socket
        self.source, self.key, self.geometry = source, key, geometry
        self.capacity = capacity
        self.detector = None
        self.waiting = collections.deque()
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.ready = threading.Event()  # set once the classifier takes the frames: reading goes on
        self.counts = collections.Counter()  # trains/frames in and dropped; train IDs never sent
        self.last_train_id = None
        self.demand = False  # True while take() waits: a REQ receiver asks for trains then only
        self.skipped = collections.Counter()  # message problems by kind
        self.backoff = 0.0  # seconds waited after the last ZeroMQ error; 0 once data comes
        self.error = None

    # ------------------------------------------------------------------------------------------
    # The reading thread

    def run(self):
        import karabo_bridge
        silent_since = None
        try:
            while not self.stopping.is_set():
                # A REQ socket whose server went away waits forever for the reply to its request: a new
                # client (and socket) on every silence also serves servers that come back.
                with karabo_bridge.Client(self.endpoint, sock=self.socket, timeout=RECEIVE_TIMEOUT) as client:
                    silent_since = self._receive(client, silent_since)
        except Exception as e:  # surfaces in the main thread, which ends the run cleanly
            self.error = e

    def _receive(self, client, silent_since):
        """Read until a silence or a stop; returns when the silence began (None if not silent)."""
        while not self.stopping.is_set():
            if self.detector is not None and not self.ready.is_set():
                self.ready.wait(0.1)  # the classifier is being set up for the first train's frames
                continue
            if self.socket == "REQ" and self.detector is not None and not self._wanted():
                continue
            try:
                message = client.next()
            except TimeoutError:
                if silent_since is None and self.counts["trains"]:
                    log.warning("--bridge=%s: no data for %.0f s; reconnecting until the server is back",
                                self.endpoint, RECEIVE_TIMEOUT)
                return silent_since or time.monotonic()
            except zmq.ZMQError as e:
                self._back_off(e)
                return silent_since  # a new client (and socket) for the next try
            except Exception as e:  # not the bridge protocol (msgpack or framing errors)
                self._skip(f"undecodable message ({type(e).__name__})")
                continue
            if silent_since is not None and self.counts["trains"]:
                log.warning("--bridge=%s: data again after %.0f s", self.endpoint, time.monotonic() - silent_since)
            silent_since, self.backoff = None, 0.0
            self._accept(*message, time.monotonic())
        return silent_since

    def _back_off(self, error):
        """Wait before the next try after a ZeroMQ error: MIN_BACKOFF, then twice as long each time, up to
        MAX_BACKOFF (a stop ends the wait). Logged once until data comes again."""
        if not self.backoff:
            log.warning("--bridge=%s: %s: %s; connecting anew, waiting up to %.0f s between tries",
                        self.endpoint, type(error).__name__, error, MAX_BACKOFF)
        self.backoff = min(max(2 * self.backoff, MIN_BACKOFF), MAX_BACKOFF)
        self.stopping.wait(self.backoff)

    def _wanted(self):
        """True once a batch is wanted and the waiting trains leave room (REQ asks only then); False after
        0.1 s without."""
        with self.changed:
            return self.changed.wait_for(
                lambda: self.demand and (not self.waiting or self._waiting_frames() < self.capacity), 0.1)

    def _waiting_frames(self):
        return sum(self.detector.count(t.array) for t in self.waiting)

    def _skip(self, kind):
        if not self.skipped[kind]:
            log.warning("--bridge=%s: skipping messages with %s (logged once; counted)", self.endpoint, kind)
        self.skipped[kind] += 1

    def _accept(self, data, meta, received):
        picked = detectors.pick_source(data, self.source, self.key) if self.detector is None else (
            (self.detector.source, self.detector.key) if self.detector.key in data.get(self.detector.source, {})
            else None)
        if picked is None:
            return self._skip(self._missing(data))
        source, key = picked
        array = data[source][key]
        if self.detector is None:
            try:
                self.detector = detectors.Detector(source, key, array, self.geometry)
            except AiryNetError as e:
                return self._skip(str(e))
            log.info("Classifying %s%s", self.detector.describe(),
                     "" if self.source and self.key else " (chosen automatically; see --bridge_source/--bridge_key)")
        problem = self.detector.problem(array)
        train_id = meta.get(source, {}).get("timestamp.tid", data[source].get("metadata", {}).get("timestamp.tid"))
        if problem is None and train_id is None:
            problem = "no train ID (timestamp.tid)"
        if problem is None and not self.detector.count(array):
            problem = "no frames (0 pulses)"
        if problem is not None:
            return self._skip(problem)
        self._keep(Train(int(train_id), array, self.detector.pulse_ids(data[source], array), received))

    def _missing(self, data):
        if self.detector is not None:
            source, key = self.detector.source, self.detector.key
            return f"no source {source}" if source not in data else f"no key {key} in {source}"
        if self.source and self.source not in data:
            return f"no source {self.source}"
        return f"no image key ({self.key or ' or '.join(detectors.IMAGE_KEYS)})"

    def _keep(self, train):
        n = self.detector.count(train.array)
        with self.changed:
            self.counts.update(trains=1, frames=n)
            if self.last_train_id is not None and train.train_id > self.last_train_id + 1:
                self.counts["unsent_trains"] += train.train_id - self.last_train_id - 1
            self.last_train_id = train.train_id
            self.waiting.append(train)
            while len(self.waiting) > 1 and self._waiting_frames() > self.capacity:
                self._drop(self.waiting.popleft())
            self.changed.notify_all()

    def _drop(self, train):
        self.counts.update(dropped_trains=1, dropped_frames=self.detector.count(train.array))

    # ------------------------------------------------------------------------------------------
    # Called by the main thread

    def wait_for_detector(self, until):
        """Wait for the first train that names the detector; False if `until()` came first. Raises the
        thread's error, if it stopped on one."""
        while self.detector is None:
            if until() or self.error:
                self.check()
                return False
            time.sleep(0.05)
        return True

    def resume(self, capacity):
        """Read on, keeping up to `capacity` frames, now that the classifier is set up. The train that
        waited for the set-up counts as dropped, not as latency."""
        self.capacity = capacity
        self.discard(self.take(timeout=0))
        self.ready.set()

    def check(self):
        """Raise the reading thread's error, if it stopped on one, as an AiryNetError naming the bridge."""
        if self.error is not None:
            raise AiryNetError(f"--bridge={self.endpoint}: {type(self.error).__name__}: {self.error}")

    def take(self, timeout):
        """Every waiting train (oldest first), waiting up to `timeout` s for one; with REQ, then up to
        FILL_SECONDS more for a full batch."""
        with self.changed:
            self.demand = True
            self.changed.notify_all()
            if self.changed.wait_for(lambda: self.waiting, timeout) and self.socket == "REQ":
                self.changed.wait_for(lambda: self._waiting_frames() >= self.capacity, FILL_SECONDS)
            self.demand = False
            trains = list(self.waiting)
            self.waiting.clear()
            return trains

    def discard(self, trains):
        """Count trains taken but not classified as dropped."""
        with self.changed:
            for train in trains:
                self._drop(train)

    def stop(self):
        """Stop reading; trains still waiting count as dropped."""
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=2 * RECEIVE_TIMEOUT + 1)
        self.discard(self.take(timeout=0))
