"""The prediction files: `{name}.txt`, `{name}.h5` in the stacked or the per-shot layout and `{name}.npy`,
described field by field in README.md, "Outputs". Written by --mode=predict (and the merge of its shards)
and by --mode=live.

Every writer writes to the partial name of its file (nn/files.py): write(batch) appends one batch of
rows, a dict of numpy arrays [B, ...] named as the stacked file names them ("bids", "probs", "preds",
"images", ...); close() completes the file. `Outputs` gives a set of files their final names only when
all of them are complete, and `claimed` keeps a second run from writing the same names meanwhile. The
HDF5 filters, chunk shapes and the writer thread are nn/outputs/h5out.py's; the root attributes that
record the run, nn/outputs/provenance.py's.
"""
import contextlib
import errno
import fcntl
import logging
import os
import socket
import time

import h5py
import numpy as np

from nn.config import AiryNetError, first_line
from nn.files import partial_name
from nn.outputs import h5out

log = logging.getLogger("airynet")

TXT_HEADER = "Bunch_ID:\tClasses:\tProbabilities:\n"
CXI_VERSION = 160


# ----------------------------------------------------------------------------------------------
# The set of files of one run

def output_paths(predict_dir, dataset_name, shard=(0, 1), save_npy=False):
    """{"txt", "h5"[, "npy"]} -> path; a shard of several inserts `.shard{i}of{n}` into the names."""
    index, count = shard
    stem = os.path.basename(os.path.normpath(dataset_name)) + (f".shard{index}of{count}" if count > 1 else "")
    kinds = ("txt", "h5", "npy") if save_npy else ("txt", "h5")
    return {kind: os.path.join(predict_dir, f"{stem}.{kind}") for kind in kinds}


def prepare(directory, paths, overwrite):
    """Create `directory` (--predict_dir) and refuse to replace any of `paths` unless told to."""
    _make_directory(directory)
    _refuse_existing(paths, overwrite)


@contextlib.contextmanager
def claimed(directory, paths, overwrite):
    """prepare() under the lock of the output name (`{name}.lock` beside the files: `paths` share one
    name), held until the block ends, so that a second run writing the same files refuses at start
    instead of both overwriting each other's partial files. The existing files are checked under the
    lock: a run that finished a moment ago has its files in place by then."""
    paths = list(paths)
    _make_directory(directory)
    with _locked(os.path.splitext(paths[0])[0] + ".lock"):
        _refuse_existing(paths, overwrite)
        yield


def _make_directory(directory):
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise AiryNetError(f"--predict_dir={directory}: cannot create it ({e.strerror})") from e


def _refuse_existing(paths, overwrite):
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise AiryNetError(f"{existing[0]}: exists; pass --overwrite=true to replace it or choose another "
                           f"--predict_dir")


# Errors of flock(2) on file systems that do not support it (some network file systems).
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@contextlib.contextmanager
def _locked(path):
    """An exclusive flock(2) on `path` (created if missing, removed at the end) for the block. The kernel
    releases it when its process dies however it dies, so a lock file left by a crash is taken over by
    the next run; a lock held by a live process is refused with its holder's host and pid."""
    fd = _lock(path)
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # while still locked, so that nobody takes over a file about to go
        os.close(fd)


def _lock(path):
    """The descriptor of `path`, locked; None where the file system has no locks."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise AiryNetError(f"{path}: cannot create the lock file ({e.strerror})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AiryNetError(f"{path}: another run (host and pid: {holder}) is writing these files; wait "
                               f"for it to finish or choose another --predict_dir") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_LOCKS:
                raise AiryNetError(f"{path}: cannot lock it ({e.strerror})") from e
            log.warning("%s: the file system does not support locks (%s); a second run writing the same files "
                        "would not be stopped", path, e.strerror)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # locked a file that its last holder removed meanwhile: lock the new one


def _same_file(fd, path):
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class Outputs:
    """Writers that write to `<path>.partial` and appear under their final names only on commit().

    Used as a context manager: leaving it without commit() (an error, Ctrl-C) removes the partial files
    and leaves every existing file as it was. OSErrors become AiryNetErrors naming the file."""

    def __init__(self, writers):
        self.writers = writers

    def __enter__(self):
        return self

    def write(self, batch):
        for w in self.writers:
            with writing(w.tmp):
                w.write(batch)

    def commit(self):
        for w in self.writers:
            with writing(w.tmp):
                w.close()
        for w in self.writers:
            with writing(w.path):
                os.replace(w.tmp, w.path)
        self.writers = []

    def __exit__(self, *exc):
        for w in self.writers:
            try:
                w.close()
            except Exception:  # the file is deleted anyway; the first error is the one to report
                pass
            if os.path.exists(w.tmp):
                os.remove(w.tmp)
        return False


@contextlib.contextmanager
def writing(path):
    """Turn an OSError (disk full, permissions) into an AiryNetError that names `path`."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or first_line(e)
        raise AiryNetError(f"{path}: writing failed ({reason}); the partial file is removed, files completed "
                           f"before are intact") from e


# ----------------------------------------------------------------------------------------------
# The txt file

class TxtWriter:
    def __init__(self, path):
        self.path, self.tmp = path, partial_name(path)
        self.file = open(self.tmp, "w")
        self.file.write(TXT_HEADER)

    def write(self, batch):
        self.file.writelines(format_txt_line(bid, flags, probs)
                             for bid, flags, probs in zip(batch["bids"], batch["preds"], batch["probs"]))

    def close(self):
        self.file.close()


def format_txt_line(bid, flags, probs):
    """The original's line: its Python lists' text without quotes and brackets."""
    return f"{bid}\t{', '.join(str(int(f)) for f in flags)}\t{', '.join(f'{p:.4f}' for p in probs)}\n"


# ----------------------------------------------------------------------------------------------
# The h5 file, stacked: one row per shot in datasets that grow batch by batch

# A flush writes the file's metadata and evicts the chunk cache, so that appending the next batch reads
# and recompresses the last chunks again: at live's small batches, once a second (and when writing pauses)
# is what a viewer needs.
SWMR_FLUSH_SECONDS = 1.0


def stacked_fields(num_classes, image_shape=None, labels=False, pulses=False, ood=False):
    """The stacked datasets of every run's results: bunch IDs, probabilities, 0/1 classes; with
    `image_shape` ([H, W, D]) the images as fed, with `labels` the labels, with `pulses` the pulse IDs,
    with `ood` the out-of-distribution score and the 0/1 `unknown` flag (nn/ood.py).
    name -> (dtype, shape per shot, attributes), as StackedWriter takes them; whoever computes maps or
    activations adds their fields."""
    c = num_classes
    fields = {"bids": ("int64", (), {}), "probs": ("float32", (c,), {}), "preds": ("uint8", (c,), {})}
    if ood:
        fields["ood_score"] = ("float32", (), {"meaning": "higher = less like the training shots"})
        fields["unknown"] = ("uint8", (), {"meaning": "1 where ood_score is above the root attribute ood_threshold"})
    if pulses:
        fields["pulses"] = ("int64", (), {})
    if image_shape is not None:
        fields["images"] = ("float32", tuple(image_shape), {})
    if labels:
        fields["labels"] = ("float32", (c,), {})
    return fields


class StackedWriter:
    """The stacked layout. `fields`: name -> (dtype, shape per shot, attributes); rows are appended with
    write({name: array [B, ...]}). `compression`: one of h5out.COMPRESSIONS."""

    def __init__(self, path, fields, class_names, attrs, compression="gzip", swmr=False):
        """swmr: write in HDF5's single-writer/multiple-reader mode, flushed after a batch at most every
        SWMR_FLUSH_SECONDS (and by flush()), so that a viewer can read the file while it grows (--mode=live)."""
        self.path, self.tmp = path, partial_name(path)
        self.swmr = swmr
        self.flushed, self.flushed_rows = time.monotonic(), 0
        filters = h5out.filter_options(compression)
        self.file = h5py.File(self.tmp, "w", libver="latest" if swmr else "earliest")
        self.rows = 0
        f = self.file
        f.attrs.update({"layout": "stacked", "class_names": class_names, **attrs, "h5_compression": compression,
                        "h5_filters": h5out.describe(compression)})
        for name, (dtype, shape, attrs) in fields.items():
            shape = tuple(shape)
            f.create_dataset(name, shape=(0,) + shape, maxshape=(None,) + shape, dtype=dtype,
                             chunks=(h5out.chunk_rows(dtype, shape),) + shape, **filters).attrs.update(attrs)
        f["cxi_version"] = CXI_VERSION
        f["entry_1/result_1/score"] = h5py.SoftLink("/probs")
        f["entry_1/result_1/headings"] = np.array(class_names, dtype=h5py.string_dtype())
        if "images" in fields:
            f["entry_1/data_1/data"] = h5py.SoftLink("/images")
        if swmr:
            f.swmr_mode = True

    def write(self, batch):
        n = len(batch["bids"])
        for name, values in batch.items():
            if name in self.file:
                ds = self.file[name]
                ds.resize(self.rows + n, axis=0)
                # A chunk per call: h5py holds its process-wide lock for the whole call, compression
                # included, and an HDF5 input reader waits for it; per chunk it waits for one at most.
                step = ds.chunks[0]
                for i in range(0, n, step):
                    ds[self.rows + i:self.rows + i + step] = values[i:i + step]
        self.rows += n
        if self.swmr and time.monotonic() - self.flushed >= SWMR_FLUSH_SECONDS:
            self.flush()

    def flush(self):
        """Make the rows written so far visible to readers."""
        if self.rows != self.flushed_rows:
            self.file.flush()
        self.flushed, self.flushed_rows = time.monotonic(), self.rows

    def close(self):
        self.file.close()


# ----------------------------------------------------------------------------------------------
# The h5 file, per shot, and the npy file: the original's formats

class PerShotWriter:
    """The original's layout: one group per shot, named by its bunch ID (a repeated ID gets the record
    index appended)."""

    def __init__(self, path, class_names, attrs, shard=(0, 1), counter_names=False):
        self.path, self.tmp = path, partial_name(path)
        self.file = h5py.File(self.tmp, "w", track_order=True)
        self.file.attrs.update({"layout": "per_shot", "class_names": class_names, **attrs})
        self.shard = shard
        self.counter_names = counter_names  # --dataset=cxidb: groups named by the record index
        self.rows = 0  # records written by this shard

    def write(self, batch):
        index, count = self.shard
        for i, bid in enumerate(batch["bids"]):
            record = (self.rows + i) * count + index  # the shot's index in the unsharded record stream
            if self.counter_names:
                name = str(record)
            else:
                name = str(bid) if str(bid) not in self.file else f"{bid}_{record}"
            g = self.file.create_group(name)
            if self.counter_names:  # the original's cxidb fields: class indices as scalars
                if "labels" in batch:
                    g.create_dataset("ground_truth", data=np.argmax(batch["labels"][i]), dtype="float32")
                g.create_dataset("pred", data=np.argmax(batch["probs"][i]), dtype="int32")
            elif "labels" in batch:
                g["label"] = batch["labels"][i]
            image = batch["images"][i]
            g["img"] = image[..., 0] if image.shape[-1] == 1 else image  # gray as [H, W], as the original
            g.create_dataset("prediction", data=batch["preds"][i], dtype="int32")
            g["probability"] = batch["probs"][i]
            if "ood_score" in batch:
                g["ood_score"] = batch["ood_score"][i]
                g["unknown"] = batch["unknown"][i]
            if "conv" in batch:
                g["conv"] = batch["conv"][i]
            if "grad_cam" in batch:
                for c, cam in enumerate(batch["grad_cam"][i]):
                    g[f"{c}/grad_cam"] = cam
        self.rows += len(batch["bids"])

    def close(self):
        self.file.close()


class NpyWriter:
    """The original's pickled dict (only with --save_npy=true), written at the end."""

    def __init__(self, path, shard=(0, 1)):
        self.path, self.tmp = path, partial_name(path)
        self.shard = shard
        self.shots = {}
        open(self.tmp, "wb").close()  # fail early if the file cannot be created

    def write(self, batch):
        index, count = self.shard
        for bid, flags, probs in zip(batch["bids"], batch["preds"], batch["probs"]):
            record = len(self.shots) * count + index
            self.shots[f"shot_{record + 1:05d}"] = [int(bid), flags.copy(), probs.copy()]

    def close(self):
        if self.shots is not None:
            with open(self.tmp, "wb") as f:
                np.save(f, self.shots, allow_pickle=True)
            self.shots = None
