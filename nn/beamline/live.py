"""--mode=live: classify shots from a European XFEL Karabo bridge as they arrive.

    python airynet.py --mode=live --load_dir=RUN --bridge=tcp://host:4545 --publish=tcp://*:4600

Two threads and a writer:
  1. a receiver thread (nn/beamline/receiver.py) reads the bridge and keeps only the newest trains, at
     most one batch of frames; trains it drops and train IDs the source never sent are counted;
  2. the main thread (here) takes the waiting trains, assembles, preprocesses and classifies their frames
     (nn/beamline/classifier.py) and hands the results on:
  * to a Karabo bridge stream at --publish, one message per train (nn/beamline/publisher.py), sent by a
    thread of its own;
  * to two files in --predict_dir, the txt and stacked layouts of --mode=predict (Bunch_ID = train ID;
    the h5 adds `pulses`; images only with --save_images=true), appended batch by batch by a writer
    thread. They are named after the first train the run classifies, `live_<train ID>.txt` and
    `live_<train ID>.h5`: train IDs count on for as long as the facility runs, so every run gets names of
    its own, which also say where in the data it began (a replayed run repeats its train IDs: its
    files are refused, as any existing file is, unless --overwrite=true). --dataset=NAME on the command
    line names them NAME.txt and NAME.h5 instead, as it names --mode=predict's files. Until the run ends
    they are named `*.partial`; the h5 is written in SWMR mode and flushed within a second of each write,
    so h5py.File(path, "r", swmr=True) reads it while it grows;
  * to a status line every STATUS_SECONDS, of the interval since the last one, and a summary of the run.
Frames received = frames processed + frames dropped: trains still waiting when the run stops count as
dropped. SIGINT and SIGTERM end the run cleanly (files closed, exit status 0).

However the run ends, its files hold every shot it classified (a run that classified nothing leaves
none), are closed and get their final names; after a failed write they end at the last batch written
whole and the run stops with the error. The receiver, the files and the publisher are each closed even
when closing another fails.
"""
import collections
import contextlib
import logging
import os
import time

import numpy as np

from nn import checkpoints, config, ood
from nn.beamline.classifier import Classifier
from nn.beamline.publisher import Publisher
from nn.beamline.receiver import Receiver, Unpacker
from nn.config import AiryNetError, first_line
from nn.files import partial_name
from nn.inputs import detectors, euxfel
from nn.outputs import provenance, writers
from nn.outputs.h5out import WriterThread
from nn.signals import StopSignal

log = logging.getLogger("airynet")

STATUS_SECONDS = 5.0
FILE_STEM = "live"
BACKLOG_BATCHES = 2  # results that may wait for a client of the stream, in batches (of --batch_size trains
                     # at most): a client that keeps up takes one batch's trains while the next is classified


# ----------------------------------------------------------------------------------------------
# The run

def run(cfg, recipe, model):
    """Classify bridge trains until --live_trains, --live_seconds or a signal; returns 0."""
    names = config.class_names(cfg)
    files = Files(cfg, names)
    unpacker = Unpacker(cfg.bridge_source, cfg.bridge_key, cfg.geometry, detectors.parse_pulses(cfg.pulses))
    receiver = Receiver(cfg.bridge, cfg.bridge_socket, capacity=cfg.batch_size, unpacker=unpacker)
    stats = Stats(names)
    publisher = None
    try:
        with StopSignal() as stop, contextlib.ExitStack() as closing:
            closing.callback(files.close)  # the callbacks run in the reverse order, each whatever the others do
            if cfg.publish:
                publisher = Publisher(cfg.publish, cfg.publish_socket, names, BACKLOG_BATCHES * cfg.batch_size,
                                      _thresholds(cfg))
                closing.callback(publisher.close)
            closing.callback(receiver.stop)
            results = Results(publisher, files, stats, cfg.save_images, cfg.publish_images)
            _classify(cfg, recipe, model, receiver, results, stop)
    except BaseException:
        if receiver.counts["trains"]:  # what a run that got data did before it failed
            log.info("%s; %s", stats.summary(receiver, publisher), files.describe())
        raise
    if stop.received:
        log.info("Stopped by %s", stop.received)
    log.info("%s; %s", stats.summary(receiver, publisher), files.describe())
    return 0


def _thresholds(cfg):
    """Each class's decision threshold, for the stream (None under --single_label's arg-max)."""
    if cfg.single_label:
        return None
    thresholds = checkpoints.decision_thresholds(cfg)
    return np.full(cfg.num_classes, 0.5, np.float32) if thresholds is None else thresholds


def _classify(cfg, recipe, model, receiver, results, stop):
    """Wait for the first train, set up for its detector and classify until done."""
    start = time.monotonic()
    until = (lambda: stop.received or (cfg.live_seconds and time.monotonic() - start >= cfg.live_seconds))
    receiver.start()
    log.info("Waiting for data from %s (%s)", cfg.bridge, cfg.bridge_socket)
    if receiver.wait_for_detector(until):
        classifier = _set_up(cfg, recipe, model, receiver)
        results.stats.restart()  # the clock starts with the first train
        _loop(receiver, classifier, results, until, cfg.live_trains)


def _set_up(cfg, recipe, model, receiver):
    """The classifier for the frames of the detector the first train named; then the receiver reads on."""
    height, width = receiver.detector.frame_shape
    if (height, width) != (cfg.ori_height, cfg.ori_width):
        log.warning("Frames are %dx%d, the model was trained on %dx%d: each is centre-cropped to %dx%d and "
                    "resized to %dx%d, so the patterns reach the network at another scale than in training",
                    height, width, cfg.ori_height, cfg.ori_width, config.crop_size(height),
                    config.crop_size(width), cfg.target_height, cfg.target_width)
    euxfel.set_frame_size(cfg, receiver.detector)
    cfg.detector = receiver.detector  # the files, created with the first batch, record it (provenance)
    classifier = Classifier(cfg, recipe, model, receiver.detector, cfg.bridge_socket)
    log.info("Batches of up to %d frames", classifier.batch_frames)
    receiver.resume(capacity=classifier.batch_frames)
    return classifier


def _loop(receiver, classifier, results, until, train_limit):
    """Classify the waiting trains batch by batch until `until()` or `train_limit` trains (0: no limit)."""
    stats = results.stats
    while not until() and not (train_limit and stats.trains >= train_limit):
        receiver.check()
        trains = receiver.take(timeout=0.2)
        if trains and train_limit:  # exactly N trains are classified; any beyond count as dropped
            keep = train_limit - stats.trains
            receiver.discard(trains[keep:])
            trains = trains[:keep]
        if trains:
            results.add(trains, *classifier.classify(trains))
        if stats.status_due():
            log.info(stats.status(receiver, results.publisher))


class Results:
    """Where a classified batch goes: train by train to the publisher (if any), shot by shot to the files,
    and into the statistics."""

    def __init__(self, publisher, files, stats, save_images, publish_images=False):
        self.publisher, self.files, self.stats = publisher, files, stats
        self.save_images, self.publish_images = save_images, publish_images

    def add(self, trains, images, with_maps, result):
        """`trains` and their shots as Classifier.classify returns them."""
        latencies, first = [], 0
        map_rows = np.cumsum(with_maps) - 1  # row in result["gradcam"] of each shot with a map
        for t in trains:
            n = len(t.pulses)
            rows = slice(first, first + n)
            part = {k: result[k][rows] for k in ("probabilities", "classes", "ood_score", "unknown") if k in result}
            if self.publish_images:
                part["images"] = images[rows]
            chosen = np.flatnonzero(with_maps[rows])
            if len(chosen):
                part.update(gradcam=result["gradcam"][map_rows[first + chosen]], gradcam_index=chosen)
            if self.publisher:
                self.publisher.publish(t.train_id, t.pulses, part)
            latencies.append(time.monotonic() - t.received)
            first += n
        rows = {"bids": np.concatenate([np.full(len(t.pulses), t.train_id, np.int64) for t in trains]),
                "pulses": np.concatenate([t.pulses for t in trains]),
                "probs": result["probabilities"], "preds": result["classes"]}
        rows.update({k: result[k] for k in ("ood_score", "unknown") if k in result})
        if self.save_images:
            rows["images"] = images
        self.files.write(rows)
        self.stats.add(len(images), result["classes"], latencies)


# ----------------------------------------------------------------------------------------------
# Files

class Files:
    """The run's txt and stacked h5 (SWMR) in --predict_dir, created with the first classified batch and
    written by one background thread (nn/outputs/h5out.py's WriterThread, as --mode=predict writes).

    A failed write is noted on the writer thread and nothing after it is written, so that the files never
    miss a batch in the middle; write() or close() raises it. close() then cuts the files back to the last
    batch written whole and gives them their final names, or removes them if no batch was written whole;
    files that cannot be closed keep their partial names."""

    def __init__(self, cfg, class_names):
        self.cfg, self.class_names = cfg, class_names
        self.name = cfg.dataset if "dataset" in cfg.explicit else None
        writers.prepare(cfg.predict_dir, [], cfg.overwrite)  # the folder, before anything connects
        if self.name:
            self._refuse_existing(self.name)
        self.txt = self.h5 = self.writer = None
        self.fields = {}
        self.written = (0, 0)  # (txt bytes, h5 rows) after the last batch written whole
        self.failure = None  # (path, exception) of the failed write
        self.reported = False  # whether the failure was raised
        self.paths = []  # the final names, once complete

    def _refuse_existing(self, name):
        """The paths of files named `name`; refused if they, or their partial names (another live run may
        still be writing them), exist."""
        paths = writers.output_paths(self.cfg.predict_dir, name)
        writers.prepare(self.cfg.predict_dir, [p for path in paths.values() for p in (path, partial_name(path))],
                        self.cfg.overwrite)
        return paths

    def _open(self, name):
        cfg = self.cfg
        paths = self._refuse_existing(name)
        image_shape = (cfg.target_height, cfg.target_width, cfg.target_depth) if cfg.save_images else None
        self.fields = writers.stacked_fields(cfg.num_classes, image_shape, pulses=True, ood=ood.load(cfg) is not None)
        self.fields["bids"] = ("int64", (), {"meaning": "train ID"})
        attrs = {"source": "live", "bridge": cfg.bridge, **provenance.attributes(cfg)}
        try:
            self.txt = writers.TxtWriter(paths["txt"])
            self.h5 = writers.StackedWriter(paths["h5"], self.fields, self.class_names, attrs, cfg.h5_compression,
                                            swmr=True)
        except OSError as e:
            for path in paths.values():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(partial_name(path))
            raise AiryNetError(f"--predict_dir={cfg.predict_dir}: cannot create {name}.txt and {name}.h5 "
                               f"({e.strerror or first_line(e)})") from e
        # Rows become visible to SWMR readers at most a second after they are written, pauses included.
        self.writer = WriterThread(self._write, idle=self._flush, idle_seconds=writers.SWMR_FLUSH_SECONDS)

    def write(self, rows):
        """Queue one batch (a bounded queue, so memory stays flat); the first creates the files. Raises a
        failed write."""
        self._raise_failure()
        if self.writer is None:
            self._open(self.name or f"{FILE_STEM}_{rows['bids'][0]}")
        self.writer.put(rows)

    def _write(self, rows):  # on the writer thread
        if self.failure is None:
            path = self.txt.path
            try:
                self.txt.write(rows)
                self.txt.file.flush()
                path = self.h5.path
                self.h5.write(rows)
            except Exception as e:  # raised by the main thread; the files end before this batch
                self.failure = (path, e)
                return
            self.written = (self.txt.file.tell(), self.h5.rows)

    def _flush(self):  # on the writer thread
        if self.failure is None:
            try:
                self.h5.flush()
            except Exception as e:
                self.failure = (self.h5.path, e)

    def _raise_failure(self):
        if self.failure is not None and not self.reported:
            self.reported = True
            path, e = self.failure
            reason = (e.strerror if isinstance(e, OSError) else None) or first_line(e)
            kept = (f"its files keep the {self.written[1]} shots written before" if self.written[1] else
                    "no files are left")
            raise AiryNetError(f"{path}: writing failed ({reason}); the run stops, and {kept}") from e

    def close(self):
        """Finish the writes and complete the files; raises a failed write that write() did not."""
        if self.writer is None:
            return
        self.writer.close()  # _write and _flush raise nothing: a failure is in self.failure
        closing = self.txt.path
        try:
            if self.failure is not None:
                self._cut()
            self.txt.close()
            closing = self.h5.path
            self.h5.close()
        except Exception as e:
            raise AiryNetError(f"{closing}: closing failed ({first_line(e)}); the files are left as "
                               f"{self.txt.tmp} and {self.h5.tmp}") from e
        for w in (self.txt, self.h5):
            if self.written[1]:
                os.replace(w.tmp, w.path)
            else:  # the first write failed: no empty files
                os.remove(w.tmp)
        self.paths = [self.txt.path, self.h5.path] if self.written[1] else []
        self._raise_failure()

    def _cut(self):
        """Back to the last batch written whole: a failed write may have left part of one."""
        size, rows = self.written
        with contextlib.suppress(OSError):  # writing out the failed batch's buffered lines fails again
            self.txt.close()
        os.truncate(self.txt.tmp, size)
        for name in self.fields:
            self.h5.file[name].resize(rows, axis=0)

    def describe(self):
        """What the summary says of the files."""
        if self.paths:
            return f"wrote {self.written[1]} shots to {', '.join(self.paths)}"
        return "wrote no files"


# ----------------------------------------------------------------------------------------------
# Status

class Stats:
    """Counts of the processed shots and latencies, for the status lines and the summary."""

    def __init__(self, class_names):
        self.class_names = class_names
        self.restart()

    def restart(self):
        self.start = self.last = self.last_result = time.monotonic()
        self.trains = self.frames = 0
        self.latencies = collections.deque(maxlen=100_000)  # receive -> publish, seconds
        self.window = {"frames": 0, "latencies": [], "classes": np.zeros(len(self.class_names))}
        self.marks = collections.Counter()  # the receiver's and publisher's counts when the interval began

    def add(self, n_frames, classes, latencies):
        self.last_result = time.monotonic()
        self.trains += len(latencies)
        self.frames += n_frames
        self.latencies.extend(latencies)
        self.window["frames"] += n_frames
        self.window["latencies"] += latencies
        self.window["classes"] += classes.sum(axis=0)

    def status_due(self):
        """Whether STATUS_SECONDS have passed since the last status line (after a stall, one line comes,
        not one for every interval missed)."""
        return time.monotonic() - self.last >= STATUS_SECONDS

    def status(self, receiver, publisher):
        """The status line of the interval since the last one (then a new interval starts): every figure
        is of that interval."""
        now = time.monotonic()
        seconds, w = max(now - self.last, 1e-9), self.window
        counts = _counts(receiver, publisher)
        new = counts - self.marks  # Counter subtraction keeps the positive figures
        p50, p99 = _percentiles(w["latencies"])
        fractions = w["classes"] / max(w["frames"], 1)
        order = np.argsort(-fractions)
        classes = ", ".join(f"{self.class_names[i]} {fractions[i]:.0%}" for i in order if fractions[i] > 0) or "-"
        unpublished = f", not published {new['unpublished']} results" if publisher else ""
        line = (f"live, last {seconds:.0f} s: in {new['frames'] / seconds:.1f} frames/s, processed "
                f"{w['frames'] / seconds:.1f} frames/s, dropped {new['dropped_trains']} trains, missed "
                f"{new['unsent_trains']} (train ID gaps){unpublished}, latency p50 {p50:.2f} s p99 {p99:.2f} s"
                f" | {classes}")
        self.last, self.marks = now, counts
        self.window = {"frames": 0, "latencies": [], "classes": np.zeros(len(self.class_names))}
        return line

    def summary(self, receiver, publisher):
        """The run's counts; its seconds run from the first train to the last result (closing the files
        at the end is not in them)."""
        c = receiver.counts
        p50, p99 = _percentiles(self.latencies)
        skipped = ", ".join(f"{n} with {kind}" for kind, n in receiver.skipped.items()) or "none"
        unpublished = (f", {publisher.unpublished} of {self.trains} results not published (no client took "
                       f"them in time)" if publisher else "")
        return (f"live: received {c['frames']} frames ({c['trains']} trains), processed {self.frames} "
                f"({self.trains} trains), dropped {c['dropped_frames']} ({c['dropped_trains']} trains) in "
                f"{self.last_result - self.start:.1f} s; missed {c['unsent_trains']} trains (train ID gaps); "
                f"latency p50 {p50:.3f} s p99 {p99:.3f} s; skipped messages: {skipped}{unpublished}")


def _counts(receiver, publisher):
    c = receiver.counts
    return collections.Counter(frames=c["frames"], dropped_trains=c["dropped_trains"],
                               unsent_trains=c["unsent_trains"],
                               unpublished=publisher.unpublished if publisher else 0)


def _percentiles(values):
    return tuple(np.percentile(values, [50, 99])) if len(values) else (float("nan"),) * 2
