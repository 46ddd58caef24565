"""--mode=live's input: a thread that reads a European XFEL Karabo bridge and keeps the newest trains.

It keeps at most one batch of frames (at least one train), so results stay recent and no backlog grows.
With REQ (the bridge's request-reply) it asks for trains only while the classifier waits for the next
batch, so the server's newest data is what arrives and no CPU goes into decoding trains that would be
dropped (as OnDA asks when it is ready); with SUB and PULL the server pushes, so it reads on and, when
the classifier falls behind, drops the oldest waiting trains whole and counts them. Gaps in the train
IDs (trains the source never sent us) are counted too. After the first train it pauses until the
classifier is set up for that frame size (resume()).

An Unpacker turns each message into a train: the detector's frames that --pulses chooses and their pulse
IDs. A message without the detector, with a wrong shape or dtype, or without frames (a pulse stack of 0
pulses) is logged once per kind, counted and skipped, so the classifier only ever gets trains with frames;
RAW data stops the run. A server that goes silent is connected to anew until it is back; after a ZeroMQ
error (the socket's, not a message's) the next try waits, twice as long each time up to MAX_BACKOFF
seconds, so that an error that persists does not spin a core.
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


class Skipped(Exception):
    """A message that gives no train; the exception's text is the kind of problem (logged once, counted)."""


class Unpacker:
    """Bridge messages -> Trains. The first message that holds the detector chooses it (`source`, `key`: its
    name and key, else the first found): a modular detector whose modules come as one source each (AGIPD1M,
    LPD1M, DSSC1M, JUNGFRAU, as a TrainMatcher or karabo-bridge-serve-files sends them; detectors.find_modules),
    else one source (detectors.pick_source). `geometry`: a CrystFEL file for modular detectors; `pulses`: the
    frames of each train to classify (detectors.Pulses).

    A modular detector's train is its modules gathered by module number (detectors.ModuleSources) into
    (pulses, modules, ss, fs), NaN (so 0 in the frames) where a module is missing in the message, which the
    Detector assembles; one source's train is its array less the frames not chosen. RAW data raises
    detectors.RawData, which stops the run: it is what the bridge sends, not one bad message, so skipping it
    would leave a run that never classifies a frame while it seems to work."""

    def __init__(self, source="", key="", geometry="", pulses=detectors.Pulses()):
        self.source, self.key, self.geometry, self.pulses = source, key, geometry, pulses
        self.detector = None  # detectors.Detector, from the first message that holds the detector
        self.modules = None  # detectors.ModuleSources where the detector's modules come as one source each

    def train(self, data, meta, received):
        """The Train of one message; raises Skipped for a message that gives none."""
        if self.detector is None:
            array, ids, source = self._choose(data)
        elif self.modules:
            array, ids, source = self._gather(self.modules.found_in(data), data)
        else:
            array, ids, source = self._pick(data)
        train_id = meta.get(source, {}).get("timestamp.tid", data[source].get("metadata", {}).get("timestamp.tid"))
        if train_id is None:
            raise Skipped("no train ID (timestamp.tid)")
        if not len(ids):
            chosen = self.pulses != detectors.Pulses()
            raise Skipped(f"no frames of {self.pulses}" if chosen else "no frames (0 pulses)")
        return Train(int(train_id), array, ids, received)

    def _choose(self, data):
        """Choose the detector from the first message that holds it; its (array, pulse IDs, source) as
        _gather or _pick give them."""
        modules = detectors.find_modules(data, self.source, self.key, self.pulses)
        if modules is not None:
            gathered = self._gather(modules, data)
            name, key, array = modules.detector, modules.key, gathered[0]
        else:
            picked = detectors.pick_source(data, self.source, self.key)
            if picked is None:
                raise Skipped(self._missing(data))
            (name, key), array = picked, data[picked[0]][picked[1]]
        try:
            self.detector = detectors.Detector(name, key, array, self.geometry)
        except AiryNetError as e:
            raise Skipped(str(e)) from e
        self.modules = modules
        described = (f"{modules.describe()}; {self.detector.describe_frames()}" if modules else
                     f"{self.detector.describe()}, {self.pulses}")
        log.info("Classifying %s%s", described, "" if self.source and self.key else
                 " (chosen automatically; see --bridge_source/--bridge_key)")
        return gathered if modules else self._pick(data)

    def _gather(self, modules, data):
        """(frames [pulses, modules, ss, fs], pulse IDs, a module's source) of the detector's modules in `data`."""
        if not modules.positions:
            raise Skipped(f"no module of {modules.detector}")
        try:
            stacked, ids = modules.stack(data)
        except detectors.RawData:
            raise  # the run stops (see the class docstring)
        except AiryNetError as e:  # a module of another shape or dtype, modules of different frame counts
            raise Skipped(str(e)) from e
        return stacked, ids, modules.positions[0][0]

    def _pick(self, data):
        """(array, pulse IDs, source) of the chosen frames of the detector's source in `data`."""
        detector = self.detector
        values = data.get(detector.source, {})
        if detector.key not in values:
            raise Skipped(self._missing(data))
        array = values[detector.key]
        problem = detector.problem(array)
        if problem is not None:
            raise Skipped(problem)
        chosen = self.pulses.pick(detector.count(array))
        return detector.take(array, chosen), detector.pulse_ids(values, array)[chosen], detector.source

    def _missing(self, data):
        if self.detector is not None:
            source, key = self.detector.source, self.detector.key
            return f"no source {source}" if source not in data else f"no key {key} in {source}"
        if self.source and self.source not in data:
            return f"no source {self.source}"
        return f"no image key ({self.key or ' or '.join(detectors.IMAGE_KEYS)})"


class NewestTrains:
    """The newest trains kept, at most `capacity` frames (at least one train): a train that comes when they
    are full pushes the oldest out whole, counted as dropped. The reading thread keeps trains, the main thread
    takes them. With `fill` (REQ), take() waits a little for a full batch."""

    def __init__(self, capacity, fill):
        self.capacity, self.fill = capacity, fill
        self.waiting = collections.deque()
        self.changed = threading.Condition()
        self.counts = collections.Counter()  # trains/frames in and dropped; train IDs never sent
        self.last_train_id = None
        self.demand = False  # True while take() waits: a REQ receiver asks for trains then only

    def wanted(self):
        """True once a batch is wanted and the waiting trains leave room (REQ asks only then); False after
        0.1 s without."""
        with self.changed:
            return self.changed.wait_for(
                lambda: self.demand and (not self.waiting or self._frames() < self.capacity), 0.1)

    def _frames(self):
        return sum(len(t.pulses) for t in self.waiting)

    def keep(self, train):
        with self.changed:
            self.counts.update(trains=1, frames=len(train.pulses))
            if self.last_train_id is not None and train.train_id > self.last_train_id + 1:
                self.counts["unsent_trains"] += train.train_id - self.last_train_id - 1
            self.last_train_id = train.train_id
            self.waiting.append(train)
            while len(self.waiting) > 1 and self._frames() > self.capacity:
                self._drop(self.waiting.popleft())
            self.changed.notify_all()

    def _drop(self, train):
        self.counts.update(dropped_trains=1, dropped_frames=len(train.pulses))

    def take(self, timeout):
        """Every waiting train (oldest first), waiting up to `timeout` s for one; with `fill`, then up to
        FILL_SECONDS more for a full batch."""
        with self.changed:
            self.demand = True
            self.changed.notify_all()
            if self.changed.wait_for(lambda: self.waiting, timeout) and self.fill:
                self.changed.wait_for(lambda: self._frames() >= self.capacity, FILL_SECONDS)
            self.demand = False
            trains = list(self.waiting)
            self.waiting.clear()
            return trains

    def discard(self, trains):
        """Count trains taken but not classified as dropped."""
        with self.changed:
            for train in trains:
                self._drop(train)


class Receiver(threading.Thread):
    """Reads the bridge at `endpoint` through a `socket` (REQ, SUB, PULL) and keeps the newest trains, at
    most `capacity` frames (at least one train; NewestTrains), as the `unpacker` (an Unpacker) makes them of
    the messages."""

    def __init__(self, endpoint, socket, capacity, unpacker=None):
        super().__init__(name="bridge-receiver", daemon=True)
        self.endpoint, self.socket = endpoint, socket
        self.unpacker = unpacker or Unpacker()
        self.trains = NewestTrains(capacity, fill=socket == "REQ")
        self.stopping = threading.Event()
        self.ready = threading.Event()  # set once the classifier takes the frames: reading goes on
        self.skipped = collections.Counter()  # message problems by kind
        self.backoff = 0.0  # seconds waited after the last ZeroMQ error; 0 once data comes
        self.error = None

    @property
    def detector(self):
        """The detectors.Detector the first message chose, None before."""
        return self.unpacker.detector

    @property
    def counts(self):
        """Trains and frames received and dropped, and train IDs never sent (NewestTrains.counts)."""
        return self.trains.counts

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
            if self.socket == "REQ" and self.detector is not None and not self.trains.wanted():
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

    def _skip(self, kind):
        if not self.skipped[kind]:
            log.warning("--bridge=%s: skipping messages with %s (logged once; counted)", self.endpoint, kind)
        self.skipped[kind] += 1

    def _accept(self, data, meta, received):
        try:
            train = self.unpacker.train(data, meta, received)
        except Skipped as e:
            return self._skip(str(e))
        self.trains.keep(train)

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
        self.trains.capacity = capacity
        self.discard(self.take(timeout=0))
        self.ready.set()

    def check(self):
        """Raise the reading thread's error, if it stopped on one, as an AiryNetError naming the bridge."""
        if self.error is not None:
            error = self.error
            reason = error if isinstance(error, AiryNetError) else f"{type(error).__name__}: {error}"
            raise AiryNetError(f"--bridge={self.endpoint}: {reason}") from error

    def take(self, timeout):
        """Every waiting train, oldest first (NewestTrains.take)."""
        return self.trains.take(timeout)

    def discard(self, trains):
        """Count trains taken but not classified as dropped."""
        self.trains.discard(trains)

    def stop(self):
        """Stop reading; trains still waiting count as dropped."""
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=2 * RECEIVE_TIMEOUT + 1)
        self.discard(self.take(timeout=0))
