"""SIGTERM and SIGINT as a flag that a long loop checks between steps, so that it can stop cleanly: training
saves a checkpoint at the step it reached (SLURM's warning before a time limit or preemption), live sorting
closes its files. A second signal is not caught: it goes to the handler that was there before (Ctrl-C
raises KeyboardInterrupt, SIGTERM ends the process), so that a stop that hangs can still be interrupted."""
import signal
import threading


class StopSignal:
    """Context manager: `received` becomes "SIGTERM" or "SIGINT" when one arrives; the previous handlers
    come back on exit. Python delivers signals to the main thread only, so elsewhere it installs nothing."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
            return
        self._restore()
        signal.raise_signal(signum)

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        self._restore()
        return False
