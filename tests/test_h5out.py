"""nn/outputs/h5out.py: the writer thread (order, bounded queue, errors, idle calls). Its filters and chunk
shapes are tested through the files that use them, in test_writers.py and test_predict.py.

No test sleeps for a guess of how long the thread needs: each waits for an event the thread sets, and the
timeouts only bound a hang."""
import threading
import time

import pytest

from nn.outputs import h5out

HANG = 30  # seconds: only a broken writer thread waits this long


def test_writer_thread_keeps_order_and_bounds_its_queue():
    written, taken, gate = [], threading.Event(), threading.Event()

    def slow_write(item):
        taken.set()
        assert gate.wait(HANG)
        written.append(item)

    with h5out.WriterThread(slow_write, depth=2) as writer:
        writer.put(0)
        assert taken.wait(HANG)  # the thread holds item 0 and waits at the gate
        writer.put(1)
        writer.put(2)
        assert writer.queue.full()  # two batches wait; a third put() waits instead of piling up batches
        blocked = threading.Thread(target=writer.put, args=(3,))
        blocked.start()
        gate.set()
        blocked.join(HANG)
        assert not blocked.is_alive()
        for i in range(4, 50):
            writer.put(i)
    assert written == list(range(50))


def test_writer_error_is_raised_by_the_next_put_and_later_items_are_dropped():
    written = []

    def write(item):
        if item == 1:
            raise OSError(28, "No space left on device")
        written.append(item)

    writer = h5out.WriterThread(write, depth=2)
    raised_at = None
    with pytest.raises(OSError, match="No space"):
        for i in range(100):
            raised_at = i
            writer.put(i)
    # put(4) returns only once item 2 is taken, which is after write(1) failed: put(5) raises at the latest.
    assert 2 <= raised_at <= 5
    writer.put("after the error")  # not written: the batch before it is missing from the file
    writer.close()  # the error was reported once
    assert written == [0]


def test_close_raises_the_write_error():
    writer = h5out.WriterThread(lambda item: 1 / 0)
    writer.put("item")
    with pytest.raises(ZeroDivisionError):
        writer.close()


def test_idle_callback_runs_when_no_item_comes_and_its_error_surfaces():
    calls, third = [], threading.Event()

    def idle():
        calls.append("idle")
        if len(calls) == 3:
            third.set()
            raise OSError("flush failed")

    writer = h5out.WriterThread(calls.append, idle=idle, idle_seconds=0.01)
    assert third.wait(HANG)
    with pytest.raises(OSError, match="flush failed"):
        writer.close()
    assert calls == ["idle"] * 3  # the error stopped further calls


def test_leaving_on_an_exception_drops_what_is_queued():
    written, taken, gate = [], threading.Event(), threading.Event()

    def write(item):
        taken.set()
        assert gate.wait(HANG)
        written.append(item)

    def open_gate_once_abandoned():
        deadline = time.monotonic() + HANG
        while not writer.abandoned and time.monotonic() < deadline:
            time.sleep(0.001)
        gate.set()

    with pytest.raises(KeyboardInterrupt):
        with h5out.WriterThread(write, depth=3) as writer:
            writer.put(0)
            assert taken.wait(HANG)  # item 0 is being written, 1..3 wait in the queue
            for i in range(1, 4):
                writer.put(i)
            threading.Thread(target=open_gate_once_abandoned).start()
            raise KeyboardInterrupt
    assert written == [0]  # the write in progress finishes; the queued ones are dropped
