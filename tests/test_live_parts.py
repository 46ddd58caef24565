"""The parts of --mode=live alone, without a bridge or a network: the receiver's choice of trains to keep
and its retries (nn/beamline/receiver.py), the split of a classified batch into trains, files and
statistics, and the status lines (nn/beamline/live.py). The whole mode runs against real bridge servers in
test_live.py."""
import collections
import logging
import threading
import time
import types

import karabo_bridge
import numpy as np
import pytest
import zmq

from nn.beamline import live
from nn.beamline.live import Results, Stats
from nn.beamline.receiver import Receiver, Train, Unpacker
from nn.config import AiryNetError
from nn.inputs import detectors

PNCCD = "SQS_NQS_PNCCD1MP/CAL/PNCCD_FMT-0:output"
CAMERA = "SQS_TEST_CAM/DATA:output"


def pnccd_train(train_id, shape=(16, 16)):
    return {PNCCD: {"data.image": np.ones(shape, np.float32)}}, {PNCCD: {"timestamp.tid": train_id}}


def test_receiver_keeps_the_newest_trains_and_counts_the_rest(caplog):
    receiver = Receiver("tcp://127.0.0.1:1", "SUB", capacity=2)
    for train_id in (1, 2, 3, 5):
        receiver._accept(*pnccd_train(train_id), received=time.monotonic())
    for _ in range(2):  # a wrong frame shape: skipped, logged once, counted each time
        receiver._accept(*pnccd_train(6, shape=(16, 17)), received=time.monotonic())
    trains = receiver.take(timeout=0)
    assert [t.train_id for t in trains] == [3, 5]  # the oldest waiting trains were dropped whole
    assert receiver.counts["trains"] == 4 and receiver.counts["dropped_trains"] == 2
    assert receiver.counts["unsent_trains"] == 1  # train 4 never came
    assert list(receiver.skipped.values()) == [2] and caplog.text.count("skipping messages") == 1
    receiver.discard(trains)
    assert receiver.counts["dropped_frames"] == 4 and receiver.take(timeout=0) == []


def test_results_go_train_by_train_to_the_stream_and_shot_by_shot_to_the_files():
    now = time.monotonic()
    trains = [Train(10, None, np.arange(2), now), Train(11, None, np.arange(3), now)]
    probs = np.linspace(0, 1, 15, dtype=np.float32).reshape(5, 3)
    with_maps = np.array([True, False, False, True, True])
    result = {"probabilities": probs, "classes": (probs > 0.5).astype(np.uint8),
              "gradcam": np.arange(3, dtype=np.float32)[:, None, None, None] * np.ones((3, 3, 1, 1), np.float32)}
    published, written = [], []
    stats = Stats(["a", "b", "c"])
    publisher = types.SimpleNamespace(publish=lambda *message: published.append(message))
    files = types.SimpleNamespace(write=written.append)
    Results(publisher, files, stats, save_images=False).add(trains, np.zeros((5, 4, 4, 1)), with_maps, result)

    assert [(train_id, list(pulses)) for train_id, pulses, _ in published] == [(10, [0, 1]), (11, [0, 1, 2])]
    first, second = published[0][2], published[1][2]
    np.testing.assert_array_equal(first["probabilities"], probs[:2])
    np.testing.assert_array_equal(second["classes"], result["classes"][2:])
    assert list(first["gradcam_index"]) == [0] and first["gradcam"][:, 0, 0, 0].tolist() == [0]
    assert list(second["gradcam_index"]) == [1, 2] and second["gradcam"][:, 0, 0, 0].tolist() == [1, 2]
    (rows,) = written
    assert list(rows["bids"]) == [10, 10, 11, 11, 11] and list(rows["pulses"]) == [0, 1, 0, 1, 2]
    assert "images" not in rows and rows["probs"] is probs
    assert stats.trains == 2 and stats.frames == 5 and len(stats.latencies) == 2


def test_trains_without_frames_are_skipped_before_the_classifier(caplog):
    receiver = Receiver("tcp://127.0.0.1:1", "SUB", capacity=4)
    for train_id, pulses in ((1, 2), (2, 0), (3, 0), (4, 1)):
        data = {CAMERA: {"data.image": np.ones((pulses, 16, 16), np.float32)}}
        receiver._accept(data, {CAMERA: {"timestamp.tid": train_id}}, received=time.monotonic())
    assert [t.train_id for t in receiver.take(timeout=0)] == [1, 4]
    assert receiver.skipped == {"no frames (0 pulses)": 2}
    assert caplog.text.count("skipping messages with no frames") == 1


def bridge_client(reply):
    """A stand-in for karabo_bridge.Client whose next() returns (or raises) what `reply()` does."""
    class Client:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def next(self):
            return reply()
    return Client


def test_a_persistent_zmq_error_is_retried_with_growing_waits(monkeypatch, caplog):
    """A socket that fails on every read: each try comes after a wait twice as long as the one before, up
    to 5 s, logged once; never a loop that spins a core."""
    reads, waits = [], []

    def fail():
        reads.append(1)
        if len(reads) > 1000:  # ends the test where nothing waits
            receiver.stopping.set()
        raise zmq.ZMQError(zmq.EFSM)

    class RecordedStop(threading.Event):
        def wait(self, timeout=None):
            waits.append(timeout)
            if len(waits) == 7:
                self.set()
            return self.is_set()

    monkeypatch.setattr(karabo_bridge, "Client", bridge_client(fail))
    receiver = Receiver("tcp://127.0.0.1:1", "SUB", capacity=1)
    receiver.stopping = RecordedStop()
    receiver.run()  # in this thread: it returns once stopped
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0])
    assert len(reads) == 7 and receiver.error is None
    assert caplog.text.count("connecting anew") == 1


def test_status_lines_cover_the_interval_since_the_last_and_one_comes_after_a_stall(monkeypatch, caplog):
    """A clock of our own: the first batch stalls for 12 s, the next five take 1 s each, and every batch
    drops a train. One line comes after the stall, the next 5 s later, each with that interval's figures."""
    caplog.set_level(logging.INFO, logger="airynet")
    now = [0.0]
    monkeypatch.setattr(live, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    seconds = iter([12, 1, 1, 1, 1, 1])

    class Source:
        counts, skipped = collections.Counter(), collections.Counter()

        def check(self):
            pass

        def discard(self, trains):
            assert not trains

        def take(self, timeout):
            self.counts.update(trains=2, frames=2, dropped_trains=1, dropped_frames=1)
            return [Train(int(self.counts["trains"]), None, np.zeros(1, np.int64), now[0])]

    class Network:
        def classify(self, trains):
            now[0] += next(seconds)
            result = {"probabilities": np.full((1, 2), 0.9, np.float32), "classes": np.ones((1, 2), np.uint8)}
            return np.zeros((1, 4, 4, 1)), np.zeros(1, bool), result

    results = Results(None, types.SimpleNamespace(write=lambda rows: None), Stats(["a", "b"]), save_images=False)
    live._loop(Source(), Network(), results, until=lambda: False, train_limit=6)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("live")]
    assert lines == ["live, last 12 s: in 0.2 frames/s, processed 0.1 frames/s, dropped 1 trains, missed 0 "
                     "(train ID gaps), latency p50 12.00 s p99 12.00 s | a 100%, b 100%",
                     "live, last 5 s: in 2.0 frames/s, processed 1.0 frames/s, dropped 5 trains, missed 0 "
                     "(train ID gaps), latency p50 1.00 s p99 1.00 s | a 100%, b 100%"]


AGIPD = "SPB_DET_AGIPD1M-1"


def agipd_message(train_id, modules, stage="CORR", pulses=3):
    """One train of AGIPD-1M as a TrainMatcher sends it, one source per module; module m's pixels hold
    m + 1 + the pulse's index, so every module and pulse differs. RAW (DET) modules interleave data and gain."""
    channel = "output" if stage == "CORR" else "xtdf"
    shape = (pulses, 512, 128) if stage == "CORR" else (pulses, 2, 512, 128)
    data, meta = {}, {}
    for m in modules:
        source = f"{AGIPD}/{stage}/{m}CH0:{channel}"
        values = (m + 1 + np.arange(pulses)).reshape(-1, *[1] * (len(shape) - 1)) * np.ones(shape)
        data[source] = {"image.data": values.astype(np.float32 if stage == "CORR" else np.uint16),
                        "image.pulseId": np.arange(pulses, dtype=np.uint64) * 8}
        meta[source] = {"timestamp.tid": train_id}
    return data, meta


def test_modules_missing_in_a_message_are_zero_and_each_message_brings_its_own(caplog):
    """Modules gathered by their number in the source names: one missing in a message is 0 in its frames
    (EXtra-geom's assembly with NaN there), a module missing in the first message is taken once it comes.
    Another channel of the same devices (the correction's preview) is not a module; --pulses picks frames."""
    import extra_geom
    caplog.set_level(logging.INFO, logger="airynet")
    unpacker = Unpacker(pulses=detectors.parse_pulses("1:"))
    receiver = Receiver("tcp://127.0.0.1:1", "SUB", capacity=100, unpacker=unpacker)
    first = agipd_message(7, [m for m in range(16) if m not in (3, 9)])
    first[0][f"{AGIPD}/CORR/3CH0:preview"] = {"image.data": np.full((512, 128), -1, np.float32)}
    receiver._accept(*first, received=time.monotonic())
    receiver._accept(*agipd_message(8, [m for m in range(16) if m != 9]), received=time.monotonic())
    trains = receiver.take(timeout=0)
    assert "Classifying AGIPD1M SPB_DET_AGIPD1M-1, 14 of 16 modules (image.data), pulses 1:; frames 1256x1092" \
           in caplog.text
    assert [t.train_id for t in trains] == [7, 8] and all(list(t.pulses) == [8, 16] for t in trains)
    geometry = extra_geom.AGIPD_1MGeometry.example()
    for train, missing in zip(trains, ([3, 9], [9])):
        assert train.array.shape == (2, 16, 512, 128)
        assert np.isnan(train.array[:, missing]).all() and not np.isnan(np.delete(train.array, missing, 1)).any()
        present = [m for m in range(16) if m not in missing]
        np.testing.assert_array_equal(train.array[:, present, 0, 0], 1 + np.add.outer([1, 2], present))
        assembled, _ = geometry.position_modules(train.array)
        np.testing.assert_array_equal(receiver.detector.frames(train.array), np.nan_to_num(assembled, nan=0.0))
    receiver._accept({"SA1_XTD2_XGM/XGM/DOOCS:output": {"data.intensityTD": np.ones(4)}}, {}, time.monotonic())
    assert receiver.skipped == {"no module of SPB_DET_AGIPD1M-1": 1}


def test_raw_modules_stop_the_run_with_one_line(monkeypatch):
    """RAW data is what the bridge sends, not one bad message: the reading thread stops, and the main thread
    raises the line offline raises, naming the bridge."""
    monkeypatch.setattr(karabo_bridge, "Client", bridge_client(lambda: agipd_message(7, range(16), stage="DET")))
    receiver = Receiver("tcp://127.0.0.1:1", "SUB", capacity=4)
    receiver.run()  # in this thread: it returns on the error
    with pytest.raises(AiryNetError) as error:
        receiver.wait_for_detector(until=lambda: False)
    assert str(error.value) == (
        "--bridge=tcp://127.0.0.1:1: SPB_DET_AGIPD1M-1/DET/0CH0:xtdf image.data: RAW data (shape (3, 2, 512, 128): "
        "data and gain interleaved); the run must be corrected first: classify its CORR files (the proposal's "
        "proc/ folder)")


def test_pulses_pick_the_frames_of_one_source(caplog):
    """--pulses for a detector in one source: a stack keeps the chosen frames and their pulse IDs; a train
    of one frame that --pulses leaves out is skipped."""
    stack = np.arange(4 * 16 * 16, dtype=np.float32).reshape(4, 16, 16)
    data = {CAMERA: {"data.image": stack, "data.pulseId": np.array([10, 20, 30, 40])}}
    receiver = Receiver("tcp://127.0.0.1:1", "SUB", capacity=8,
                        unpacker=Unpacker(pulses=detectors.parse_pulses("1,3")))
    receiver._accept(data, {CAMERA: {"timestamp.tid": 5}}, received=time.monotonic())
    (train,) = receiver.take(timeout=0)
    np.testing.assert_array_equal(train.array, stack[[1, 3]])
    assert list(train.pulses) == [20, 40] and receiver.detector.count(train.array) == 2
    receiver = Receiver("tcp://127.0.0.1:1", "SUB", capacity=8, unpacker=Unpacker(pulses=detectors.parse_pulses("1:")))
    for train_id in (1, 2):
        receiver._accept(*pnccd_train(train_id), received=time.monotonic())
    assert receiver.take(timeout=0) == [] and receiver.skipped == {"no frames of pulses 1:": 2}
