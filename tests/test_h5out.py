"""nn/outputs/h5out.py: the writer thread (order, bounded queue, errors, idle calls). Its filters and chunk
shapes are tested through the files that use them, in test_writers.py."""
import threading
import time

import pytest

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
