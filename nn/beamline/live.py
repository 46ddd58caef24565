"""--mode=live: classify shots from a European XFEL Karabo bridge as they arrive.

    python airynet.py --mode=live --load_dir=RUN --bridge=tcp://host:4545 --publish=tcp://*:4600

Two threads and a writer:
  1. a receiver thread reads the bridge (karabo_bridge.Client) and keeps only the newest trains, at most
     one batch of frames. With REQ (the bridge's request-reply) it asks for trains only while the main
     thread waits for the next batch, so the server's newest data is what arrives and no CPU goes into
     decoding trains that would be dropped (as OnDA asks when it is ready); with SUB and PULL the server
     pushes, so it reads on and, when the classifier falls behind, drops the oldest waiting trains whole
     and counts them. Either way results stay recent and no backlog grows. Gaps in the train IDs (trains
     the source never sent us) are counted too. After the first train it pauses until the classifier is
     set up for that frame size; that train counts as dropped;
  2. the main thread takes the waiting trains, assembles and preprocesses their frames as training does,
     classifies them and hands the results on. These steps run one after the other, not overlapped: on
     two cores, preparing the next batch beside the network slowed the network by more than the
     preparing cost (README, Live at the beamline);
  * a Karabo bridge stream (protocol 2.2, karabo_bridge's own server) at --publish, one message per
    train from source AIRYNET/CLASSIFIER: trainId, pulseId [N], probabilities [N, C], classes [N, C]
    (uint8, the run's decision rule), class_names and, for every --gradcam_every-th shot, gradcam
    [M, C, h, w] (Grad-CAM++ at the last block's resolution) with gradcam_index [M] (rows of the train);
  * `live.txt` and `live.h5` in --predict_dir, the txt and stacked layouts of --mode=predict (Bunch_ID =
    train ID; the h5 adds `pulses`), appended batch by batch. Until the run ends they are named
    `*.partial`; the h5 is written in SWMR mode and flushed within a second of each write, so
    h5py.File(path, "r", swmr=True) reads it while it grows;
  * a status line every STATUS_SECONDS.
Frames received = frames processed + frames dropped: trains still waiting when the run stops count as
dropped. A message without the source or key, or with a wrong shape or dtype, is logged once per kind,
counted and skipped. SIGINT and SIGTERM end the run cleanly (files closed, exit status 0).
"""
import collections
import logging
import os
import queue
import threading
import time

import numpy as np
import tensorflow as tf

from nn import config
from nn.inputs import detectors, euxfel
from nn.config import AiryNetError, first_line
# The inference API of --mode=predict, imported here only.
from nn.outputs.h5out import WriterThread
from nn.predict import SWMR_FLUSH_SECONDS, StackedWriter, TxtWriter, make_step, output_paths
from nn.inputs.preprocess import preprocess
from nn.signals import StopSignal

log = logging.getLogger("airynet")

SOURCE = "AIRYNET/CLASSIFIER"
STATUS_SECONDS = 5.0
RECEIVE_TIMEOUT = 2.0  # seconds without data before the bridge connection is made anew
# Batches are sized once, from a batch timed at set-up, so that preprocessing and classifying one takes
# at most this long and latency stays under a second on any machine: a requested (REQ) frame waits for its
# own batch to be fetched, assembled, preprocessed and classified; a pushed one (SUB, PULL) may also wait
# while the batch before it is classified. Fetching and assembling, which the set-up cannot time, take
# about a third more on top (1024x1024 pnCCD frames).
BATCH_SECONDS = {"REQ": 0.45, "SUB": 0.3, "PULL": 0.3}
FILL_SECONDS = 0.2  # REQ: how long a batch may take to fill once its first train is in
FILE_STEM = "live"

Train = collections.namedtuple("Train", "train_id array pulses received")


# ----------------------------------------------------------------------------------------------
# Receiving

class Receiver(threading.Thread):
    """Reads the bridge and keeps the newest trains, at most `capacity` frames (at least one train)."""

    def __init__(self, cfg, capacity):
        super().__init__(name="bridge-receiver", daemon=True)
        self.endpoint, self.socket = cfg.bridge, cfg.bridge_socket
        self.source, self.key, self.geometry = cfg.bridge_source, cfg.bridge_key, cfg.geometry
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
        self.error = None

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
            except Exception as e:  # not the bridge protocol (msgpack or framing errors)
                self._skip(f"undecodable message ({type(e).__name__})")
                continue
            if silent_since is not None and self.counts["trains"]:
                log.warning("--bridge=%s: data again after %.0f s", self.endpoint, time.monotonic() - silent_since)
            silent_since = None
            self._accept(*message, time.monotonic())
        return silent_since

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


# ----------------------------------------------------------------------------------------------
# Classifying

class Classifier:
    """Trains -> the network's input (`prepare`) -> probabilities, classes and optional maps (`__call__`).

    Frames are assembled into one buffer kept for the whole run: a new 4 MB image per frame cost page
    faults (assembling took 2.4x longer live); the buffer enters TensorFlow without a copy (`_tensor`).
    The network sees few batch shapes: a batch is padded to the next of 1, 2, 4, ... frames, `batch_frames`
    or --batch_size, because oneDNN builds its kernels per input shape and keeps a bounded number (cycling
    through 24 batch sizes ran at a quarter of the speed of one fixed size)."""

    def __init__(self, cfg, recipe, model, detector, socket):
        self.detector, self.batch_size = detector, cfg.batch_size
        self.buffer = _aligned_zeros((cfg.batch_size, *detector.frame_shape))
        spec = tf.TensorSpec([None, *detector.frame_shape, 1], tf.float32)
        self._prepare = tf.function(lambda raw: preprocess(raw, cfg, recipe, training=False), input_signature=[spec])
        self.step = make_step(cfg, model, maps=None)
        self.maps_step = make_step(cfg, model, maps="layer") if cfg.gradcam_every else None
        self.shapes = [cfg.batch_size]
        try:  # trace now, so that the first train waits for no tracing; and fail early on a mismatch
            full = self._prepared_buffer(self.batch_size)
            self(full[:1], np.ones(1, bool))
            # A timed full batch sizes the batches (timed the second time: the first builds its kernels).
            self(full, np.zeros(self.batch_size, bool))
            started = time.monotonic()
            self(full, np.zeros(self.batch_size, bool))
            seconds_per_frame = (time.monotonic() - started) / self.batch_size
        except Exception as e:
            raise AiryNetError(f"--load_dir={cfg.load_dir}: the run's model cannot take frames of "
                               f"{detector.frame_shape[0]}x{detector.frame_shape[1]} ({type(e).__name__}: "
                               f"{first_line(e)})") from e
        self.batch_frames = int(np.clip(BATCH_SECONDS[socket] / seconds_per_frame, 1, self.batch_size))
        self.shapes = sorted({2 ** k for k in range(self.batch_frames.bit_length())}
                             | {self.batch_frames, self.batch_size})
        self(full[:self.batch_frames], np.zeros(self.batch_frames, bool))  # its kernels

    def prepare(self, trains):
        """The frames of `trains`, assembled and preprocessed: the network's input [N, h, w, d]."""
        n = sum(self.detector.count(t.array) for t in trains)
        if n > len(self.buffer):  # a train of many pulses
            self.buffer = _aligned_zeros((n, *self.buffer.shape[1:]))
        first = 0
        for t in trains:
            count = self.detector.count(t.array)
            self.detector.frames(t.array, out=self.buffer[first:first + count])
            first += count
        return self._prepared_buffer(n)

    def _prepared_buffer(self, n):
        frames = self.buffer[:n, ..., None]
        # Each part is preprocessed before the buffer is written again: the tensor shares its memory.
        return np.concatenate([self._prepare(_tensor(frames[start:start + self.batch_size])).numpy()
                               for start in range(0, n, self.batch_size)])

    def __call__(self, images, with_maps):
        """-> {"probabilities", "classes"[, "gradcam" [M, ...] for the rows where with_maps]}."""
        parts = collections.defaultdict(list)
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            n = len(batch)
            padded = next(size for size in self.shapes if size >= n)
            out = self.step(np.concatenate([batch, np.zeros((padded - n, *batch.shape[1:]), batch.dtype)])
                            if padded > n else batch)
            parts["probabilities"].append(out["probabilities"].numpy()[:n])
            parts["classes"].append(out["classes"].numpy()[:n])
            chosen = np.flatnonzero(with_maps[start:start + self.batch_size])
            if self.maps_step is not None and len(chosen):
                parts["gradcam"].append(self.maps_step(batch[chosen])["grad_cam"].numpy())
        return {name: np.concatenate(values) for name, values in parts.items()}


TENSOR_ALIGNMENT = 64  # bytes: TensorFlow's CPU kernels need this alignment of the memory they read


def _aligned_zeros(shape):
    """float32 zeros starting at a TENSOR_ALIGNMENT boundary (numpy only promises 16 bytes)."""
    size = int(np.prod(shape)) * 4
    raw = np.zeros(size + TENSOR_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % TENSOR_ALIGNMENT
    return raw[start:start + size].view(np.float32).reshape(shape)


def _tensor(frames):
    """`frames` as a tensor that shares their memory (DLPack) where TensorFlow can use it in place: a
    C-ordered, aligned array. Copying assembled 1078x1024 frames into TensorFlow took 1.7 ms a frame, more
    than preprocessing them (1.2 ms)."""
    if frames.flags.c_contiguous and frames.ctypes.data % TENSOR_ALIGNMENT == 0:
        return tf.experimental.dlpack.from_dlpack(frames.__dlpack__())
    return tf.convert_to_tensor(frames)


# ----------------------------------------------------------------------------------------------
# Outputs

class Publisher:
    """The results as a Karabo bridge stream (protocol 2.2) through karabo_bridge's own server.

    At most one message waits for a client: with nobody asking (REP) further results are not published
    (counted), so that a slow or absent client never slows the classifier."""

    def __init__(self, endpoint, socket, class_names):
        import karabo_bridge
        import zmq
        try:
            self.server = karabo_bridge.ServerInThread(endpoint, sock=socket, maxlen=1)
        except zmq.ZMQError as e:
            raise AiryNetError(f"--publish={endpoint}: cannot bind ({e})") from e
        self.server.start()
        self.class_names = list(class_names)
        self.unpublished = 0

    def publish(self, train_id, pulses, result):
        values = {"trainId": train_id, "pulseId": pulses, "probabilities": result["probabilities"],
                  "classes": result["classes"], "class_names": self.class_names}
        if "gradcam" in result:
            values.update(gradcam=result["gradcam"], gradcam_index=result["gradcam_index"])
        now = time.time()
        meta = {"source": SOURCE, "timestamp": now, "timestamp.sec": str(int(now)),
                "timestamp.frac": f"{now % 1:.18f}"[2:], "timestamp.tid": train_id}
        try:
            self.server.feed({SOURCE: values}, {SOURCE: meta}, block=False)
        except queue.Full:
            self.unpublished += 1

    def close(self):
        self.server.stop()


class Files:
    """live.txt and live.h5 (stacked, SWMR) in --predict_dir, written by one background thread
    (nn/outputs/h5out.py's WriterThread, as --mode=predict writes)."""

    def __init__(self, cfg):
        paths = output_paths(cfg.predict_dir, FILE_STEM)
        try:
            os.makedirs(cfg.predict_dir, exist_ok=True)
        except OSError as e:
            raise AiryNetError(f"--predict_dir={cfg.predict_dir}: cannot create it ({e.strerror})") from e
        for path in paths.values():
            for name in (path, path + ".partial"):
                if os.path.exists(name) and not cfg.overwrite:
                    raise AiryNetError(f"{name}: exists; pass --overwrite=true to replace it or choose another "
                                       f"--predict_dir")
        c = cfg.num_classes
        fields = {"bids": ("int64", (), {"meaning": "train ID"}), "pulses": ("int64", (), {}),
                  "probs": ("float32", (c,), {}), "preds": ("uint8", (c,), {})}
        if cfg.save_images:
            fields["images"] = ("float32", (cfg.target_height, cfg.target_width, cfg.target_depth), {})
        attrs = {"source": "live", "bridge": cfg.bridge, "load_dir": cfg.load_dir}
        self.txt = TxtWriter(paths["txt"])
        self.h5 = StackedWriter(paths["h5"], fields, config.class_names(cfg), attrs, cfg.h5_compression, swmr=True)
        # Rows become visible to SWMR readers at most a second after they are written, pauses included.
        self.writer = WriterThread(self._write, idle=self.h5.flush, idle_seconds=SWMR_FLUSH_SECONDS)

    def write(self, rows):
        """Queue one batch (a bounded queue, so memory stays flat). A write error surfaces here."""
        self.writer.put(rows)

    def _write(self, rows):
        self.txt.write(rows)
        self.txt.file.flush()
        self.h5.write(rows)

    def close(self):
        """Finish the writes and give the files their final names (they hold every classified shot)."""
        try:
            self.writer.close()
        finally:
            for w in (self.txt, self.h5):
                w.close()
                os.replace(w.tmp, w.path)
        return [self.txt.path, self.h5.path]


# ----------------------------------------------------------------------------------------------
# Status

class Stats:
    """Counts of the processed shots and latencies, for the status lines and the summary."""

    def __init__(self, class_names):
        self.class_names = class_names
        self.start = self.last = self.last_result = time.monotonic()
        self.trains = self.frames = 0
        self.latencies = collections.deque(maxlen=100_000)  # receive -> publish, seconds
        self.window = {"frames": 0, "in": 0, "latencies": [], "classes": np.zeros(len(class_names))}

    def add(self, n_frames, classes, latencies):
        self.last_result = time.monotonic()
        self.trains += len(latencies)
        self.frames += n_frames
        self.latencies.extend(latencies)
        self.window["frames"] += n_frames
        self.window["latencies"] += latencies
        self.window["classes"] += classes.sum(axis=0)

    def status(self, receiver):
        """The status line of the last interval (then a new interval starts)."""
        now = time.monotonic()
        seconds, w = max(now - self.last, 1e-9), self.window
        frames_in = receiver.counts["frames"] - w["in"]
        p50, p99 = _percentiles(w["latencies"])
        fractions = w["classes"] / max(w["frames"], 1)
        order = np.argsort(-fractions)
        classes = ", ".join(f"{self.class_names[i]} {fractions[i]:.0%}" for i in order if fractions[i] > 0) or "-"
        line = (f"live: in {frames_in / seconds:.1f} frames/s, processed {w['frames'] / seconds:.1f} frames/s, "
                f"dropped {receiver.counts['dropped_trains']} trains (missed {receiver.counts['unsent_trains']}: "
                f"train ID gaps), latency p50 {p50:.2f} s p99 {p99:.2f} s | "
                f"{classes}")
        self.last = now
        self.window = {"frames": 0, "in": receiver.counts["frames"], "latencies": [],
                       "classes": np.zeros(len(self.class_names))}
        return line

    def summary(self, receiver, publisher):
        """The run's counts; its seconds run from the first train to the last result (closing the files
        at the end is not in them)."""
        c = receiver.counts
        p50, p99 = _percentiles(self.latencies)
        skipped = ", ".join(f"{n} with {kind}" for kind, n in receiver.skipped.items()) or "none"
        unpublished = f", {publisher.unpublished} results not published (no client waiting)" if publisher else ""
        return (f"live: received {c['frames']} frames ({c['trains']} trains), processed {self.frames} "
                f"({self.trains} trains), dropped {c['dropped_frames']} ({c['dropped_trains']} trains) in "
                f"{self.last_result - self.start:.1f} s; missed {c['unsent_trains']} trains (train ID gaps); "
                f"latency p50 {p50:.3f} s p99 {p99:.3f} s; skipped messages: {skipped}{unpublished}")


def _percentiles(values):
    return tuple(np.percentile(values, [50, 99])) if len(values) else (float("nan"),) * 2


# ----------------------------------------------------------------------------------------------
# The run

def run(cfg, recipe, model):
    """Classify bridge trains until --live_trains, --live_seconds or a signal; returns 0."""
    names = config.class_names(cfg)
    receiver = Receiver(cfg, capacity=cfg.batch_size)
    files = Files(cfg)
    publisher = None
    with StopSignal() as stop:
        try:
            publisher = Publisher(cfg.publish, cfg.publish_socket, names) if cfg.publish else None
            receiver.start()
            log.info("Waiting for data from %s (%s)", cfg.bridge, cfg.bridge_socket)
            start = time.monotonic()
            until = (lambda: stop.received or (cfg.live_seconds and time.monotonic() - start >= cfg.live_seconds))
            stats = Stats(names)
            if _wait_for_detector(receiver, until):
                euxfel.set_frame_size(cfg, receiver.detector)
                classifier = Classifier(cfg, recipe, model, receiver.detector, cfg.bridge_socket)
                receiver.capacity = classifier.batch_frames
                log.info("Batches of up to %d frames", classifier.batch_frames)
                # The first train waited for the set-up (tracing); it counts as dropped, not as latency.
                receiver.discard(receiver.take(timeout=0))
                receiver.ready.set()
                stats = Stats(names)  # the clock starts with the first train
                _loop(cfg, receiver, classifier, publisher, files, stats, until)
        finally:
            receiver.stop()
            paths = files.close()
            if publisher:
                publisher.close()
    if stop.received:
        log.info("Stopped by %s", stop.received)
    log.info("%s; wrote %s", stats.summary(receiver, publisher), ", ".join(paths))
    return 0


def _wait_for_detector(receiver, until):
    while receiver.detector is None:
        if until() or receiver.error:
            _raise_receiver_error(receiver)
            return False
        time.sleep(0.05)
    return True


def _raise_receiver_error(receiver):
    if receiver.error is not None:
        raise AiryNetError(f"--bridge={receiver.endpoint}: {type(receiver.error).__name__}: {receiver.error}")


def _loop(cfg, receiver, classifier, publisher, files, stats, until):
    shots = 0  # shots classified so far, for --gradcam_every
    next_status = time.monotonic() + STATUS_SECONDS
    while not until() and not (cfg.live_trains and stats.trains >= cfg.live_trains):
        _raise_receiver_error(receiver)
        trains = receiver.take(timeout=0.2)
        if trains and cfg.live_trains:  # exactly N trains are classified; any beyond count as dropped
            keep = cfg.live_trains - stats.trains
            receiver.discard(trains[keep:])
            trains = trains[:keep]
        if trains:
            shots = _classify(cfg, trains, classifier, publisher, files, stats, shots)
        if time.monotonic() >= next_status:
            log.info(stats.status(receiver))
            next_status += STATUS_SECONDS


def _classify(cfg, trains, classifier, publisher, files, stats, shots):
    """Prepare, classify, publish and write the shots of `trains`; returns the new shot count."""
    images = classifier.prepare(trains)
    with_maps = (shots + np.arange(len(images))) % cfg.gradcam_every == 0 if cfg.gradcam_every else \
        np.zeros(len(images), bool)
    result = classifier(images, with_maps)
    latencies, first = [], 0
    map_rows = np.cumsum(with_maps) - 1  # row in result["gradcam"] of each shot with a map
    for t in trains:
        n = len(t.pulses)
        rows = slice(first, first + n)
        part = {k: result[k][rows] for k in ("probabilities", "classes")}
        chosen = np.flatnonzero(with_maps[rows])
        if len(chosen):
            part.update(gradcam=result["gradcam"][map_rows[first + chosen]], gradcam_index=chosen)
        if publisher:
            publisher.publish(t.train_id, t.pulses, part)
        latencies.append(time.monotonic() - t.received)
        first += n
    rows = {"bids": np.concatenate([np.full(len(t.pulses), t.train_id, np.int64) for t in trains]),
            "pulses": np.concatenate([t.pulses for t in trains]),
            "probs": result["probabilities"], "preds": result["classes"]}
    if cfg.save_images:
        rows["images"] = images
    files.write(rows)
    stats.add(len(images), result["classes"], latencies)
    return shots + len(images)
