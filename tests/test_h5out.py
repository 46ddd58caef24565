"""nn/outputs/h5out.py: the writer thread (order, bounded queue, errors) and plain-HDF5 output with gzip."""
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest

from nn import predict
from nn.outputs import h5out


def test_writer_thread_keeps_order_and_bounds_its_queue():
    written, gate = [], threading.Event()

    def slow_write(item):
        gate.wait()
        written.append(item)

    with h5out.WriterThread(slow_write, depth=2) as writer:
        writer.put(0)  # taken by the thread, which then waits at the gate
        time.sleep(0.2)
        writer.put(1)
        writer.put(2)
        blocked = threading.Thread(target=writer.put, args=(3,))
        blocked.start()
        blocked.join(0.3)
        assert blocked.is_alive()  # the queue is full: put() waits instead of piling up batches
        gate.set()
        blocked.join()
        for i in range(4, 50):
            writer.put(i)
    assert written == list(range(50))


def test_writer_error_is_raised_by_the_next_put_and_later_items_are_dropped():
    written = []

    def write(item):
        if item == 1:
            raise OSError(28, "No space left on device")
        written.append(item)

    writer = h5out.WriterThread(write)
    writer.put(0)
    writer.put(1)
    with pytest.raises(OSError, match="No space"):
        for i in range(2, 100):
            writer.put(i)
            time.sleep(0.01)
    writer.close()
    assert written == [0]


def test_idle_callback_runs_when_no_item_comes_and_its_error_surfaces():
    calls = []

    def idle():
        calls.append(time.monotonic())
        if len(calls) == 3:
            raise OSError("flush failed")

    writer = h5out.WriterThread(calls.append, idle=idle, idle_seconds=0.05)
    time.sleep(0.5)
    with pytest.raises(OSError, match="flush failed"):
        writer.put("item")
    writer.close()
    assert len(calls) == 3 and "item" not in calls  # the error stopped further calls


def test_swmr_reader_sees_the_rows_after_a_flush(tmp_path):
    path = str(tmp_path / "live.h5")
    fields = {"bids": ("int64", (), {}), "probs": ("float32", (2,), {})}
    w = predict.StackedWriter(path, fields, ["a", "b"], {}, "zstd", swmr=True)
    with h5py.File(w.tmp, "r", swmr=True) as f:
        for first in (0, 3):
            w.write({"bids": first + np.arange(3), "probs": np.zeros((3, 2), np.float32)})
            w.flush()
            f["bids"].refresh()
            np.testing.assert_array_equal(f["bids"][:], np.arange(first + 3))
    w.close()


def test_leaving_on_an_exception_drops_what_is_queued():
    written, gate = [], threading.Event()

    def write(item):
        gate.wait()
        written.append(item)

    with pytest.raises(KeyboardInterrupt):
        with h5out.WriterThread(write, depth=3) as writer:
            for i in range(4):
                writer.put(i)
            gate.set()
            raise KeyboardInterrupt
    assert len(written) <= 1


@pytest.mark.parametrize("compression", h5out.COMPRESSIONS)
def test_stacked_file_round_trips_with_one_shot_per_image_chunk(tmp_path, compression):
    rng = np.random.default_rng(0)
    images = (rng.gamma(0.5, 40.0, (7, 64, 64, 1)) * 8 / 7).astype(np.float32)
    fields = {"bids": ("int64", (), {}), "images": ("float32", (64, 64, 1), {})}
    writer = predict.StackedWriter(str(tmp_path / "p.h5"), fields, ["a"], {}, compression)
    writer.write({"bids": np.arange(4), "images": images[:4]})
    writer.write({"bids": np.arange(4, 7), "images": images[4:]})
    writer.close()
    with h5py.File(tmp_path / "p.h5.partial", "r") as f:
        assert f.attrs["h5_compression"] == compression
        assert f["images"].chunks == (1, 64, 64, 1) and f["bids"].chunks[0] > 7
        np.testing.assert_array_equal(f["images"][:], images)  # lossless
        np.testing.assert_array_equal(f["bids"][:], np.arange(7))


def test_gzip_files_need_no_plugin(tmp_path):
    fields = {"bids": ("int64", (), {}), "images": ("float32", (8, 8, 1), {})}
    writer = predict.StackedWriter(str(tmp_path / "p.h5"), fields, ["a"], {}, "gzip")
    writer.write({"bids": np.arange(3), "images": np.ones((3, 8, 8, 1), np.float32)})
    writer.close()
    # A fresh interpreter that never imports hdf5plugin reads every dataset.
    code = (f"import h5py; f = h5py.File({str(tmp_path / 'p.h5.partial')!r}, 'r'); "
            "print(f['images'][:].sum() + f['bids'][:].sum())")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "195.0"
