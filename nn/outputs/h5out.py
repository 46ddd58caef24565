"""Writing prediction outputs off the critical path: HDF5 compression settings, chunk shapes, and a
writer thread fed through a bounded queue.

Compression (--h5_compression), chosen by `scripts/benchmark.py h5` on predict outputs (figures in
docs/performance.md): the images as fed are bilinearly resized counts, float32 whose low mantissa bits are
noise, so no lossless filter shrinks them much and the filters differ mostly in speed.
  gzip  deflate level GZIP_LEVEL after a byte shuffle (the default): HDF5's standard filters, which every
        HDF5 reader decodes (h5py without hdf5plugin, HDFView, MATLAB, h5dump). Higher levels cost more
        time for little size: the noisy mantissas do not compress at any level.
  zstd  Blosc with Zstandard level 1 after a byte shuffle: about gzip's size, written and read several
        times faster. Readers need the filter: `import hdf5plugin` before opening the file in Python.
  lz4   Bitshuffle + LZ4: the fastest to write and read, files somewhat larger. Needs hdf5plugin too.
  none  no filter: the fastest, files of the full size.
"""
import queue
import threading

import hdf5plugin  # registers the plugin filters with HDF5, for writing and for reading the files back
import numpy as np

COMPRESSIONS = ("gzip", "zstd", "lz4", "none")
GZIP_LEVEL = 1
CHUNK_BYTES = 256 << 10  # target size of an HDF5 chunk of the small fields (uncompressed): many shots
                         # per chunk keeps the chunk index, which HDF5 caches in memory, small
SHOT_BYTES = 16 << 10    # rows this large (images) get chunks of one shot: reading one shot back
                         # then decompresses nothing else


def filter_options(compression):
    """h5py create_dataset keyword arguments for --h5_compression."""
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}
    if compression == "zstd":
        return dict(hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if compression == "lz4":
        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    if compression == "none":
        return {}
    raise ValueError(f"unknown compression {compression!r}")


def describe(compression):
    """The root attribute that tells a reader what it needs."""
    if compression == "gzip":
        return f"gzip level {GZIP_LEVEL} + shuffle (standard HDF5 filters)"
    if compression == "none":
        return "none"
    name = {"zstd": "Blosc zstd level 1 + byte shuffle", "lz4": "bitshuffle + LZ4"}[compression]
    return f"{name} (HDF5 plugin filter: in Python, `import hdf5plugin` before opening the file)"


def chunk_rows(dtype, shape):
    """Shots per chunk of a dataset with rows of `shape`: one for large rows, else about CHUNK_BYTES."""
    row = np.dtype(dtype).itemsize * int(np.prod(shape))
    if row >= SHOT_BYTES:
        return 1
    return int(np.clip(CHUNK_BYTES // row, 1, 4096))


class WriterThread:
    """Calls write(item) for every put(item), in order, on one background thread.

    At most `depth` items wait, so memory stays flat when writing is slower than computing; put() then
    blocks. An exception raised by write() is raised again, once, by the next put() or by close(), and
    every item after it is dropped, so that a file never holds rows written after a failed batch. Use as a
    context manager: leaving it waits for the writes queued so far, unless it is left by an exception,
    which stops the thread after the write in progress. `idle`, if given, is called on the thread after
    every `idle_seconds` without an item (errors as for write)."""

    _STOP, _IDLE = object(), object()

    def __init__(self, write, depth=2, idle=None, idle_seconds=1.0):
        self.write, self.idle, self.idle_seconds = write, idle, idle_seconds
        self.queue = queue.Queue(depth)
        self.error, self.reported = None, False
        self.abandoned = False  # set when the run stops early: what is still queued is dropped
        self.thread = threading.Thread(target=self._loop, name="airynet-writer", daemon=True)
        self.thread.start()

    def _loop(self):
        while (item := self._next()) is not self._STOP:
            if self.error is None and not self.abandoned:
                try:
                    self.idle() if item is self._IDLE else self.write(item)
                except BaseException as e:  # handed to the main thread, which reports it
                    self.error = e

    def _next(self):
        try:
            return self.queue.get(timeout=self.idle_seconds if self.idle else None)
        except queue.Empty:
            return self._IDLE

    def _raise(self):
        if self.error is not None and not self.reported:
            self.reported = True
            raise self.error

    def put(self, item):
        self._raise()
        self.queue.put(item)

    def close(self):
        """Wait until everything queued is written; raise the first write error."""
        if self.thread.is_alive():
            self.queue.put(self._STOP)
            self.thread.join()
        self._raise()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
            return False
        self.abandoned = True
        if self.thread.is_alive():
            self.queue.put(self._STOP)
            self.thread.join()
        return False
