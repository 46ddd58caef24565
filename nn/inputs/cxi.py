"""CXI/HDF5 files: the community's format, read directly, in any of its three layouts.

  * stacked (Condor): `entry_1/data_1/data` N x H x W, with optional mask, labels and IDs beside it ->
    StackedCxi;
  * one group per shot (CXIDB entry 94): `/entry_N/instrument_1/detector_1/data`, `/entry_N/note_1/data`
    (labels), `/entry_N/experimental_identifier` -> PerShotCxi;
  * a European XFEL modular detector's virtual CXI file (`extra-data-make-virtual-cxi RUN -o FILE`):
    `entry_1/instrument_1/detector_1/data` N x modules x ss x fs with `entry_1/trainId` and `pulseId`
    -> ModularCxi, whose frames are assembled as those of the run directory (nn/inputs/euxfel.py).

The readers offer the same small interface: `count`, `has_labels`, `read(start, stop)` -> (images
float32 [n, H, W], labels float32 [n, C] or [n, 0], ids int64 [n]), `has_pulses` and `read_pulses(start,
stop)`, `close()`, and use as a context manager. `records` streams the shots of several files into tf.data.

Files are opened once per process (`open_cxi` keeps them) and closed by `close_all`, which airynet.py
calls when a run ends: a training run reads the same file for its train and eval splits.
"""
import logging
import os

import h5py
import numpy as np
import tensorflow as tf

from nn.config import AiryNetError
from nn.files import atomic_path
from nn.inputs import detectors, euxfel
from nn.inputs.masks import MASKED_VALUE

log = logging.getLogger("airynet")

MASK_BITS = 0x1 | 0x8 | 0x80 | 0x200  # invalid, dead, bad, missing (CXI pixel-mask bits)
SLAB_BYTES = 16 << 20  # shots are read from HDF5 in slabs of about this size

_open_files = {}  # (real path, inode, mtime, label path) -> reader
_failures = []  # errors of the background reader, for the message the user sees (describe_failure)


def open_cxi(path, cfg, needs_labels):
    """The reader of `path` in the layout the file has, checked against the flags (image size and
    depth, labels where `needs_labels`). Raises an AiryNetError naming the file."""
    try:
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_ino, stat.st_mtime_ns, cfg.cxi_labels, cfg.pulses, cfg.geometry)
        reader = _open_files.get(key)
        if reader is None:
            h5 = h5py.File(path, "r")
            try:
                reader = _reader(path, h5, cfg)
            except BaseException:
                h5.close()
                raise
            _open_files[key] = reader
    except AiryNetError:
        raise
    except OSError as e:
        raise AiryNetError(f"{path}: not a readable HDF5/CXI file ({e})") from e
    except Exception as e:  # h5py reports damaged metadata as KeyError, OSError, ValueError, ...
        raise AiryNetError(f"{path}: damaged or unreadable CXI/HDF5 file ({type(e).__name__}: {e})") from e
    reader.check(cfg, needs_labels)
    return reader


def _reader(path, h5, cfg):
    if ModularCxi.recognises(h5):
        return ModularCxi(path, h5, detectors.parse_pulses(cfg.pulses), cfg.geometry)
    stacked = next((p for p in StackedCxi.IMAGE_PATHS if p in h5 and h5[p].ndim == 3), None)
    return StackedCxi(path, h5, stacked, cfg.cxi_labels) if stacked else PerShotCxi(path, h5)


def close_all():
    """Close every file open_cxi opened (their h5py handles and raw descriptors)."""
    while _open_files:
        _open_files.popitem()[1].close()


def take_failure():
    """The last error of a background read (an AiryNetError naming file and shots), or None; forgets
    them all, so that a later run in this process does not report an earlier one's."""
    failure = _failures[-1] if _failures else None
    _failures.clear()
    return failure


def _is_real_number(dtype):
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == np.bool_


class _Reader:
    """What the layouts share: the checks against the flags, error naming, NaN clean-up, closing."""
    label_hint = ""
    has_pulses = False  # whether shots are (train ID, pulse ID) pairs: read_pulses gives the pulse IDs

    def __init__(self, path, h5):
        self.path, self.h5 = path, h5
        self.label_dtype, self.num_labels = None, 0

    @property
    def has_labels(self):
        return self.label_dtype is not None

    def check(self, cfg, needs_labels):
        path = self.path
        if self.image_shape != (cfg.ori_height, cfg.ori_width):
            raise AiryNetError(f"{path}: images are {self.image_shape[0]}x{self.image_shape[1]} but "
                               f"--ori_height/--ori_width say {cfg.ori_height}x{cfg.ori_width}")
        if cfg.ori_depth != 1:
            raise AiryNetError(f"{path}: CXI images are gray (H x W), but --ori_depth={cfg.ori_depth}")
        if not _is_real_number(self.image_dtype):
            raise AiryNetError(f"{path}: images have dtype {self.image_dtype}, expected integers or floats")
        if needs_labels and not self.has_labels:
            raise AiryNetError(f"{path}: no labels ({self.label_hint}), which training and eval need")
        if self.has_labels:
            if not _is_real_number(self.label_dtype):
                raise AiryNetError(f"{path}: labels have dtype {self.label_dtype}, expected 0/1 numbers")
            if self.num_labels != cfg.num_classes:
                raise AiryNetError(f"{path}: labels have {self.num_labels} entries per shot, expected "
                                   f"{cfg.num_classes} (--num_classes)")

    def read(self, start, stop):
        """Shots [start, stop) -> images float32 [n, H, W], labels float32 [n, C] ([n, 0] without
        labels), ids int64 [n]. Any failure (corrupt chunks, wrong dtypes or shapes) names the file and
        the shots."""
        try:
            images, labels, ids, stored_floats = self._read(start, stop)
        except Exception as e:
            raise OSError(f"{self.path}: shots {start}-{stop - 1}: {type(e).__name__}: {e}") from e
        if stored_floats:  # only floats can hold NaN or Inf, and the check costs a third of a per-shot read
            _zero_non_finite(images, ids, self.path, start)
        if labels is None:
            labels = np.zeros((len(images), 0), np.float32)
        return images, labels, ids

    def close(self):
        self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _zero_non_finite(images, ids, path, start):
    finite = np.isfinite(images)
    if finite.all():
        return
    for i in np.flatnonzero(~finite.reshape(len(images), -1).all(axis=1)):
        log.warning("%s: shot %d (ID %d): %d NaN/Inf pixels set to 0", path, start + i, ids[i],
                    int((~finite[i]).sum()))
    images[~finite] = 0.0


class StackedCxi(_Reader):
    """N x H x W detector data with optional mask (H x W or N x H x W), labels and IDs."""

    IMAGE_PATHS = ("entry_1/data_1/data", "entry_1/instrument_1/detector_1/data")
    MASK_PATHS = ("entry_1/data_1/mask", "entry_1/instrument_1/detector_1/mask")
    LABEL_PATHS = ("entry_1/data_1/labels", "entry_1/labels", "labels")
    ID_PATHS = ("entry_1/experiment_identifier", "entry_1/data_1/experiment_identifier",
                "entry_1/experimental_identifier")

    def __init__(self, path, h5, image_path, label_path=""):
        super().__init__(path, h5)
        self.images = h5[image_path]
        self.count, *self.image_shape = self.images.shape
        self.image_shape, self.image_dtype = tuple(self.image_shape), self.images.dtype
        self.label_hint = "--cxi_labels or " + ", ".join(self.LABEL_PATHS)
        found = lambda paths: next((h5[p] for p in paths if p in h5), None)
        self.labels = found((label_path,) if label_path else self.LABEL_PATHS)
        self.ids, self.mask = found(self.ID_PATHS), found(self.MASK_PATHS)
        if self.mask is not None:  # files are opened once per process (open_cxi): said once
            log.info("%s: applying the file's own mask %s (bits 0x%x: invalid, dead, bad, missing): those pixels "
                     "read %s, as with --mask", path, self.mask.name, MASK_BITS, MASKED_VALUE)
        if self.labels is not None:
            self.label_dtype = self.labels.dtype
            self.num_labels = int(np.prod(self.labels.shape[1:]))
            if self.labels.shape[0] != self.count:
                raise AiryNetError(f"{path}: {self.labels.shape[0]} labels for {self.count} shots")

    def _read(self, start, stop):
        images = self.images[start:stop]
        stored_floats = images.dtype.kind == "f"
        images = images.astype(np.float32)
        if self.mask is not None:
            bad = (self.mask[start:stop] if self.mask.ndim == 3 else self.mask[()]) & MASK_BITS
            images[np.broadcast_to(bad != 0, images.shape)] = MASKED_VALUE
        labels = (self.labels[start:stop].reshape(stop - start, -1).astype(np.float32)
                  if self.labels is not None else None)
        ids = (self.ids[start:stop].astype(np.int64) if self.ids is not None
               else np.arange(start, stop, dtype=np.int64))
        return images, labels, ids, stored_floats


class PerShotCxi(_Reader):
    """One /entry_N group per shot.

    HDF5's per-dataset calls cost ten times the reading itself here (a CXIDB-94 shot is three small
    datasets), so each shot's datasets are located once (`_locate`) and, where stored contiguously in
    this file (h5py's default), read by offset with preadv into the batch arrays: a second pass asks
    HDF5 nothing. Chunked, compressed or externally linked datasets are read by HDF5 every time."""

    IMAGE, LABELS, ID = "instrument_1/detector_1/data", "note_1/data", "experimental_identifier"
    label_hint = "/entry_N/note_1/data"

    def __init__(self, path, h5):
        super().__init__(path, h5)
        self.entries = sorted((k for k in h5 if k.startswith("entry_") and k[6:].isdigit()
                               and self.IMAGE in h5[k]), key=lambda k: int(k[6:]))
        if not self.entries:
            raise AiryNetError(f"{path}: no shots found: expected a stacked "
                               f"{' or '.join(StackedCxi.IMAGE_PATHS)} (N x H x W) or per-shot "
                               f"/entry_N/{self.IMAGE} groups")
        self.count = len(self.entries)
        first = h5[self.entries[0]]
        self.image_shape, self.image_dtype = tuple(first[self.IMAGE].shape[-2:]), first[self.IMAGE].dtype
        if self.LABELS in first:
            self.label_dtype = first[self.LABELS].dtype
            self.num_labels = int(np.prod(first[self.LABELS].shape))
        self.raw = open(path, "rb", buffering=0)
        self._places, self._buffers = {}, {}

    def close(self):
        self.raw.close()
        super().close()

    def _read(self, start, stop):
        n = stop - start
        images = np.empty((n, *self.image_shape), np.float32)
        labels = np.empty((n, self.num_labels), np.float32) if self.has_labels else None
        ids = np.arange(start, stop, dtype=np.int64)  # the index where a shot has no ID
        bunch_id = np.empty(1, np.int64)
        stored_floats = False
        for i, entry in enumerate(self.entries[start:stop]):
            image, label, shot_id = self._locate(entry)
            if image is None or (labels is not None and label is None):
                raise KeyError(f"{entry} has no {'image' if image is None else 'labels'}")
            stored_floats = stored_floats or image[2].kind == "f"
            self._read_into(image, images[i])
            if labels is not None:
                self._read_into(label, labels[i])
            if shot_id is not None:
                self._read_into(shot_id, bunch_id)
                ids[i] = bunch_id[0]
        return images, labels, ids, stored_floats

    def _locate(self, entry):
        """Where each of a shot's image, labels (None where the file has none) and ID lies (see _place)."""
        places = self._places.get(entry)
        if places is None:
            fields = (self.IMAGE, self.LABELS if self.has_labels else None, self.ID)
            places = self._places[entry] = tuple(self._place(f"{entry}/{name}") if name else None
                                                 for name in fields)
        return places

    def _place(self, path):
        """(path, offset, dtype, count) of a dataset, or None if there is none. The offset is where its
        values lie as plain bytes, when it is stored contiguously in this file; it is None where HDF5 must
        read it (chunked or compressed storage, data in the object header or in another file)."""
        try:
            dataset = h5py.h5d.open(self.h5.id, path.encode())
        except KeyError:
            return None
        offset, dtype = dataset.get_offset(), dataset.dtype
        count = dataset.get_space().get_simple_extent_npoints()
        if (dtype.kind not in "biuf" or dataset.get_storage_size() != count * dtype.itemsize
                or h5py.h5f.get_name(dataset) != h5py.h5f.get_name(self.h5.id)):
            offset = None
        return path, offset, dtype, count

    def _read_into(self, place, out):
        """Read a dataset (a place from _place) holding out.size values into the array `out`."""
        path, offset, dtype, count = place
        if count != out.size:
            raise ValueError(f"{path} has {count} values, expected {out.size}")
        if offset is None:  # HDF5 reads it, converting the dtype on the way
            dataset = h5py.h5d.open(self.h5.id, path.encode())
            dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, out.reshape(dataset.shape))
            return
        # Into a buffer kept for the next shot (a new bytes object each time would cost the kernel fresh
        # zeroed pages), or straight into `out` where the stored dtype is out's.
        same = dtype == out.dtype and out.flags.c_contiguous
        values = out.reshape(-1) if same else self._buffers.setdefault((dtype, count), np.empty(count, dtype))
        if os.preadv(self.raw.fileno(), [values.view(np.uint8)], offset) != values.nbytes:
            raise ValueError(f"{self.path} ends inside {path}")
        if not same:
            out.reshape(-1)[:] = values


class ModularCxi(_Reader):
    """EXtra-data's virtual CXI file of a modular detector: frames x modules x ss x fs, the detector named
    in detector_1's "name" attribute, entry_1/trainId and (AGIPD, LPD, DSSC) entry_1/pulseId per frame.
    Frames are assembled as those of the run directory: modules without data (NaN, EXtra-data's fill value)
    and masked pixels are 0, no mask is applied; the ID is the train ID, the pulse the pulse ID (JUNGFRAU:
    the frame's index in its train, as in the run). --pulses picks frames by their index in their train."""

    DATA, TRAIN_IDS, PULSE_IDS = "entry_1/instrument_1/detector_1/data", "entry_1/trainId", "entry_1/pulseId"
    has_pulses = True

    @classmethod
    def recognises(cls, h5):
        return cls.DATA in h5 and cls.TRAIN_IDS in h5 and h5[cls.DATA].ndim >= 4

    def __init__(self, path, h5, pulses, geometry_file=""):
        super().__init__(path, h5)
        self.images = h5[self.DATA]
        name = self.images.parent.attrs.get("name", "")
        _refuse_raw(path, name, self.images)
        train_ids = h5[self.TRAIN_IDS][:].astype(np.int64)
        starts = np.flatnonzero(np.r_[True, train_ids[1:] != train_ids[:-1]])  # each train's first frame
        in_train = np.arange(len(train_ids)) - np.repeat(starts, np.diff(np.r_[starts, len(train_ids)]))
        self.frames = np.flatnonzero(pulses.chosen(in_train))
        self.train_ids = train_ids[self.frames]
        self.pulse_ids = (h5[self.PULSE_IDS][:].astype(np.int64) if self.PULSE_IDS in h5 else in_train)[self.frames]
        self.count = len(self.frames)
        try:
            self.detector = detectors.Detector(name or self.DATA, "data", self.images[:1], geometry_file)
        except AiryNetError as e:
            raise AiryNetError(f"{path}: {e}") from e
        self.image_shape, self.image_dtype = self.detector.frame_shape, np.dtype(np.float32)

    def check(self, cfg, needs_labels):
        euxfel.set_frame_size(cfg, self.detector)
        super().check(cfg, needs_labels)

    def _read(self, start, stop):
        chosen = self.frames[start:stop]
        if len(chosen) and chosen[-1] - chosen[0] == len(chosen) - 1:  # consecutive frames: one slab
            stack = self.images[chosen[0]:chosen[-1] + 1]
        else:
            stack = self.images[chosen]
        # Assembly sets NaN to 0 already: there is nothing left for read() to clean.
        return self.detector.frames(stack), None, self.train_ids[start:stop], False

    def read_pulses(self, start, stop):
        return self.pulse_ids[start:stop]


def _refuse_raw(path, name, images):
    """The corrected data EXtra-data writes is floating point, without RAW AGIPD's data/gain axis (or the
    single axis of raw LPD and DSSC frames)."""
    if images.ndim == 5:
        axis = "data and gain interleaved" if images.shape[2] == 2 else "the extra axis of raw frames"
        why = f"shape {images.shape}: {axis}"
    elif np.issubdtype(images.dtype, np.integer):
        why = f"{images.dtype} ADC values"
    else:
        return
    raise AiryNetError(f"{path}: RAW {name} data ({why}); the run must be corrected first: make the virtual CXI "
                       f"file of its CORR run (the proposal's proc/ folder)")


def records(readers, cfg, split, one_pass):
    """Shots of CXI files, read in slabs by a background thread, as dicts: image, bunch_id, index
    (over all files) and, where every file has them, label."""
    shot_bytes = cfg.ori_height * cfg.ori_width * cfg.ori_depth * 4
    per_slab = int(np.clip(SLAB_BYTES // shot_bytes, 1, 64))
    slabs, offset = [], 0
    for i, r in enumerate(readers):
        slabs += [(i, s, min(s + per_slab, r.count), offset + s) for s in range(0, r.count, per_slab)]
        offset += r.count
    has_labels = all(r.has_labels for r in readers)
    num_labels = cfg.num_classes if has_labels else 0
    has_pulses = all(r.has_pulses for r in readers)

    def read_slab(slab):
        file_index, start, stop, first = (int(v) for v in slab)
        reader = readers[file_index]
        try:
            images, labels, ids = reader.read(start, stop)
        except OSError as e:  # kept for the user: TensorFlow only passes on its own text of it
            _failures.append(AiryNetError(str(e)))
            raise
        pulses = reader.read_pulses(start, stop) if has_pulses else np.zeros(0, np.int64)
        return images, labels[:, :num_labels], ids, np.arange(first, first + stop - start, dtype=np.int64), pulses

    def read(slab):
        images, labels, ids, index, pulses = tf.numpy_function(
            read_slab, [slab], [tf.float32, tf.float32, tf.int64, tf.int64, tf.int64])
        shots = {"image": tf.reshape(images, [-1, cfg.ori_height, cfg.ori_width, cfg.ori_depth]),
                 "bunch_id": tf.reshape(ids, [-1]), "index": tf.reshape(index, [-1])}
        if has_labels:
            shots["label"] = tf.reshape(labels, [-1, num_labels])
        if has_pulses:
            shots["pulse"] = tf.reshape(pulses, [-1])
        return shots

    ds = tf.data.Dataset.from_tensor_slices(np.array(slabs, np.int64).reshape(-1, 4))
    if not one_pass:
        ds = ds.shuffle(len(slabs), seed=cfg.random_seed)
    # One reader thread, ahead of the consumer: h5py serialises every HDF5 call under one lock, so
    # more slabs in flight only fight over that lock and the GIL (docs/performance.md).
    ds = ds.map(read, num_parallel_calls=1, deterministic=True).unbatch()
    if split is not None:  # one file set for all modes: hold out every eval_every-th shot
        held_out = lambda shot: tf.equal(shot["index"] % cfg.eval_every, cfg.eval_every - 1)
        if split == "train":
            ds = ds.filter(lambda shot: tf.logical_not(held_out(shot)))
        elif split == "eval":
            ds = ds.filter(held_out)
    return ds


# ----------------------------------------------------------------------------------------------
# Writers (the dataset script and the tests use them)

def write_cxi_shots(path, images, labels, bunch_ids, photon_energy_J=4.0e-18):
    """CXIDB-94 layout: one /entry_N group per shot (N from 1). 4e-18 J is about 25 eV (XUV)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5["cxi_version"] = 150
        for n, (image, label, bid) in enumerate(zip(images, labels, bunch_ids), start=1):
            entry = h5.create_group(f"entry_{n}")
            entry["instrument_1/detector_1/data"] = image
            entry["instrument_1/source_1/energy"] = photon_energy_J
            entry["note_1/data"] = np.asarray(label, np.int16)
            entry["experimental_identifier"] = np.int64(bid)


def write_cxi_stacked(path, images, labels=None, bunch_ids=None, mask=None):
    """Stacked CXI: detector data N x H x W, linked from entry_1/data_1 (as Condor writes it)."""
    images = np.asarray(images)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5["cxi_version"] = 150
        det = h5.create_group("entry_1/instrument_1/detector_1")
        det.create_dataset("data", data=images, chunks=(1,) + images.shape[1:])
        h5["entry_1/data_1/data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
        if mask is not None:
            det["mask"] = np.asarray(mask, np.uint32)
            h5["entry_1/data_1/mask"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/mask")
        if labels is not None:
            h5["entry_1/data_1/labels"] = np.asarray(labels, np.int16)
        if bunch_ids is not None:
            h5["entry_1/experiment_identifier"] = np.asarray(bunch_ids, np.int64)
