"""The input pipeline: original TFRecords, CXI/HDF5 files and the synthetic dataset, one tf.data path.

Sources (looked up in `data_dir + dataset + "/"`, as the original did):
  * `*{mode}.tfrecord`: the original schema (see README "Data formats");
  * `*{mode}.cxi` / `*{mode}.h5`: CXI files, either one group per shot (the layout of CXIDB entry 94)
    or stacked (`entry_1/data_1/data` of shape N x H x W, as Condor and EXtra-data write it);
  * a directory whose CXI/HDF5 files are not split by mode: every `--eval_every`-th shot (counting
    over the sorted files) is held out for eval, the others train, and predict reads them all;
  * `--dataset=synthetic` with no files: simulated helium-droplet shots (nn/simulate.py), generated
    deterministically from `--random_seed` and cached in memory on first use.

Every source yields the same tensors and goes through `preprocess`, the original's preprocessing:
raw counts (or [0, 1] scaled without the log activation), centre crop to the largest power of two
not above the stored size, bilinear resize to the target size, gray to RGB, random flips in training.

Batches: train/eval give `(images, labels)`; predict gives dicts with "image", "bunch_id" and, where
the source has labels, "label".
"""
import glob
import logging
import math
import os
import re

import h5py
import numpy as np
import tensorflow as tf

from nn import config, euxfel, simulate  # euxfel: EuXFEL run hook
from nn.config import AiryNetError

log = logging.getLogger("airynet")

LABEL_KEY = "image/class/label"
CXI_MASK_BITS = 0x1 | 0x8 | 0x80 | 0x200  # invalid, dead, bad, missing (CXI pixel-mask bits)
SLAB_BYTES = 16 << 20  # shots are read from HDF5 in slabs of about this size
AUTOTUNE = tf.data.AUTOTUNE


def image_key(cfg):
    """The image feature to read: raw, the cross-correlation (--use_ccf) or a noise variant."""
    if cfg.use_ccf:
        return "image/ccf/encoded"
    if cfg.add_noise:
        return f"image/noise{cfg.add_noise}/encoded"
    return "image/encoded"


def is_one_hot_predict(cfg):
    """The original's cxidb variant stores a one-hot label in predict records, not a bunch ID."""
    return cfg.dataset == "cxidb"


# ----------------------------------------------------------------------------------------------
# Preprocessing (shared with the exported SavedModel)

def crop_size(n):
    """Largest power of two not above n (259 -> 256, 1035 -> 1024)."""
    return 1 << (int(n).bit_length() - 1)


def random_flips(images, seed):
    """Flip each image left-right and up-down, each with probability 1/2, from a stateless seed.

    In effect tf.image.stateless_random_flip_left_right/_up_down, but about 3x faster on gray batches,
    where those took 40% of the input pipeline's time: on the CPU, tf.reverse along the width of
    [N, H, W, 1] is 7x slower than along the last axis of the same data seen as [N, H, W], and the
    up-down flip is a gather of whole rows instead of a reverse plus a select."""
    flip_ud, flip_lr = tf.unstack(tf.random.stateless_uniform([2, tf.shape(images)[0]], seed) < 0.5)
    gray = images.shape[-1] == 1
    if gray:
        images = images[..., 0]
    per_image = [-1] + [1] * (images.shape.rank - 1)
    images = tf.where(tf.reshape(flip_lr, per_image), tf.reverse(images, [2]), images)
    height = tf.shape(images)[1]
    rows = tf.range(height)
    rows = tf.where(flip_ud[:, None], height - 1 - rows, rows)  # [N, H]: each image's rows, in order
    images = tf.gather(images, rows, axis=1, batch_dims=1)
    return images[..., None] if gray else images


def bilinear_period(n_in, n_out):
    """Weights [p, q] of one period of a bilinear shrink from n_in to n_out <= n_in pixels.

    With half-pixel centres (tf.image.resize's convention), output pixel j samples the input at
    (j + 0.5) * n_in / n_out - 0.5. The pattern repeats every q = n_out / g outputs and p = n_in / g
    inputs (g = gcd), and when shrinking, the two inputs of each output lie in its own period: the resize
    of a whole axis is one [p] x [p, q] product per period."""
    g = math.gcd(n_in, n_out)
    p, q = n_in // g, n_out // g
    position = (np.arange(q) + 0.5) * p / q - 0.5
    lower = np.floor(position).astype(int)
    frac = position - lower
    weights = np.zeros((p, q))
    weights[lower, np.arange(q)] = 1 - frac
    weights[np.minimum(lower + 1, p - 1), np.arange(q)] += frac  # frac is 0 where lower is the last input
    return weights.astype(np.float32)


def resize(images, height, width):
    """Bilinear resize (half-pixel centres, as tf.image.resize) of [N, H, W, D] to float32 [N, height,
    width, D].

    A gray image shrunk by less than 2x in both directions (the default 256 -> 224) uses every input
    pixel, and is resized by two small matrix products per period (bilinear_period): rows, then columns,
    where the period is at most 16 input pixels (longer ones make the products large and mostly zeros).
    On a CPU that is about 2x faster than tf.image.resize, whose per-pixel kernel took half the input
    pipeline's time. Larger shrinks (1024 -> 224) read a fraction of the pixels, and tf.image.resize, fed
    the stored integers directly, is the faster way there; so also for RGB and enlarging."""
    n_in = images.shape[1:3]
    periods = [bilinear_period(a, b) for a, b in zip(n_in, (height, width)) if b <= a < 2 * b]
    if images.shape[-1] != 1 or len(periods) < 2 or max(w.shape[0] for w in periods) > 16:
        return tf.image.resize(images, (height, width), method="bilinear")
    rows, cols = periods
    x = tf.cast(images[..., 0], tf.float32)
    if rows.shape != (1, 1):  # [q, p] @ [N, H/p, p, W] -> [N, H/p, q, W]
        x = tf.matmul(rows.T, tf.reshape(x, [-1, n_in[0] // rows.shape[0], rows.shape[0], n_in[1]]))
    if cols.shape != (1, 1):  # [N * height * W/p, p] @ [p, q]
        x = tf.matmul(tf.reshape(x, [-1, cols.shape[0]]), cols)
    return tf.reshape(x, [-1, height, width, 1])


def preprocess(images, cfg, training=False, seed=None):
    """Raw counts [N, ori_h, ori_w, ori_d] (any real dtype) -> network input [N, target_h, target_w,
    target_d] float32."""
    crop_h, crop_w = crop_size(cfg.ori_height), crop_size(cfg.ori_width)
    top, left = (cfg.ori_height - crop_h) // 2, (cfg.ori_width - crop_w) // 2  # as resize_with_crop_or_pad
    images = resize(images[:, top:top + crop_h, left:left + crop_w], cfg.target_height, cfg.target_width)
    if not cfg.use_log_act:
        images = images / 65535.0  # the uint16 range, as the original's image-dtype conversion did
    if training:
        images = random_flips(images, seed)
    if cfg.target_depth == 3 and cfg.ori_depth == 1:
        images = tf.image.grayscale_to_rgb(images)
    elif cfg.target_depth == 1 and cfg.ori_depth == 3:
        images = tf.image.rgb_to_grayscale(images)
    return images


# ----------------------------------------------------------------------------------------------
# Finding files

def dataset_dir(cfg):
    return cfg.data_dir + cfg.dataset + "/"


def find_files(cfg, mode):
    """-> (kind, files, split) with kind 'tfrecord' | 'cxi' | 'synthetic'; split: None or the mode
    whose share of an unsplit CXI directory to read."""
    directory = dataset_dir(cfg)
    if not os.path.isdir(directory):
        if cfg.dataset == "synthetic":
            return "synthetic", [], None
        raise AiryNetError(f"{directory}: dataset directory does not exist (--data_dir + --dataset)")
    if euxfel.is_run_directory(directory):  # EuXFEL run hook: RAW-/CORR-R*-*.h5 files (nn/euxfel.py)
        return "euxfel", [directory], None
    stem = f"train_{cfg.fraction:g}" if (mode == "train" and cfg.fraction_mode) else mode
    for kind, extensions in (("tfrecord", ("tfrecord",)), ("cxi", ("cxi", "h5"))):
        files = sorted(f for ext in extensions for f in glob.glob(os.path.join(directory, f"*{stem}.{ext}")))
        if files:
            return kind, files, None
    unsplit = sorted(glob.glob(os.path.join(directory, "*.cxi")) + glob.glob(os.path.join(directory, "*.h5")))
    if unsplit:
        return "cxi", unsplit, mode
    if cfg.dataset == "synthetic":
        return "synthetic", [], None
    raise AiryNetError(f"{directory}: no *{stem}.tfrecord, *{stem}.cxi or *{stem}.h5 files "
                       f"(nor unsplit *.cxi/*.h5) for --mode={mode}")


# ----------------------------------------------------------------------------------------------
# TFRecord

def _decode_records(serialized, cfg, mode):
    """A batch of serialized tf.train.Examples -> (images uint16 [B,H,W,D], label tensors)."""
    key = image_key(cfg)
    features = tf.io.parse_example(serialized, {key: tf.io.FixedLenFeature([], tf.string),
                                                LABEL_KEY: tf.io.FixedLenFeature([], tf.string)})
    # Explicit batch sizes: a wrong byte count must fail the reshape, not change the number of shots.
    n = tf.shape(serialized)[0]
    images = tf.io.decode_raw(features[key], tf.uint16)
    images = tf.reshape(images, [n, cfg.ori_height, cfg.ori_width, cfg.ori_depth])
    if mode == "predict" and not is_one_hot_predict(cfg):
        bunch_id = tf.reshape(tf.io.decode_raw(features[LABEL_KEY], tf.int32), [n])
        return images, {"bunch_id": tf.cast(bunch_id, tf.int64)}
    labels = tf.reshape(tf.io.decode_raw(features[LABEL_KEY], tf.int16), [n, cfg.num_classes])
    labels = tf.cast(labels, tf.float32)
    if mode == "predict":  # cxidb variant: the ID is the one-hot label's argmax
        return images, {"bunch_id": tf.argmax(labels, axis=1), "label": labels}
    return images, {"label": labels}


def check_tfrecord(path, cfg, mode, max_records=None):
    """Read records one by one and raise an AiryNetError naming the file and record that is bad."""
    if os.path.getsize(path) == 0:
        raise AiryNetError(f"{path}: empty file (0 bytes), not a TFRecord")
    key = image_key(cfg)
    expected_image = cfg.ori_height * cfg.ori_width * cfg.ori_depth * 2
    if mode == "predict" and not is_one_hot_predict(cfg):
        expected_label, label_text = 4, "an int32 bunch ID (4 bytes)"
    else:
        expected_label = cfg.num_classes * 2
        label_text = f"{cfg.num_classes} int16 label flags ({expected_label} bytes; --num_classes)"
    index = -1
    try:
        for index, record in enumerate(tf.data.TFRecordDataset(path)):
            if max_records is not None and index >= max_records:
                break
            example = tf.train.Example.FromString(record.numpy())
            feature = example.features.feature
            for name in (key, LABEL_KEY):
                if name not in feature or not feature[name].bytes_list.value:
                    raise AiryNetError(f"{path}: record {index}: missing bytes feature '{name}'")
            n_image = len(feature[key].bytes_list.value[0])
            if n_image != expected_image:
                raise AiryNetError(
                    f"{path}: record {index}: image has {n_image} bytes, expected "
                    f"{cfg.ori_height}x{cfg.ori_width}x{cfg.ori_depth} uint16 = {expected_image} "
                    f"(--ori_height/--ori_width/--ori_depth)")
            n_label = len(feature[LABEL_KEY].bytes_list.value[0])
            if n_label != expected_label:
                raise AiryNetError(f"{path}: record {index}: label has {n_label} bytes, expected {label_text}")
    except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as e:
        raise AiryNetError(f"{path}: record {index + 1}: truncated or corrupt TFRecord ({tf_message(e)})") from e
    except Exception as e:
        if isinstance(e, AiryNetError):
            raise
        raise AiryNetError(f"{path}: record {index + 1}: not a valid tf.train.Example ({e})") from e


def _tfrecord_records(files, cfg, mode, one_pass):
    # Predict keeps the file and record order; training may interleave files for speed. One file has
    # nothing to interleave: parallel reads of it only add their threads (about 10% slower).
    parallel = min(cfg.num_worker, len(files))
    return tf.data.TFRecordDataset(files, num_parallel_reads=None if one_pass or parallel == 1 else parallel)


# ----------------------------------------------------------------------------------------------
# CXI / HDF5

def _is_real_number(dtype):
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == np.bool_


class CxiFile:
    """Layout of one CXI/HDF5 file, read from its metadata only (the shots are read in slabs)."""

    IMAGE_PATHS = ("entry_1/data_1/data", "entry_1/instrument_1/detector_1/data")
    MASK_PATHS = ("entry_1/data_1/mask", "entry_1/instrument_1/detector_1/mask")
    LABEL_PATHS = ("entry_1/data_1/labels", "entry_1/labels", "labels")
    ID_PATHS = ("entry_1/experiment_identifier", "entry_1/data_1/experiment_identifier",
                "entry_1/experimental_identifier")

    def __init__(self, path, cfg, needs_labels):
        self.path = path
        try:
            self.h5 = h5py.File(path, "r")
        except OSError as e:
            raise AiryNetError(f"{path}: not a readable HDF5/CXI file ({e})") from e
        try:
            self._inspect(cfg, needs_labels)
        except AiryNetError:
            raise
        except Exception as e:  # h5py reports damaged metadata as KeyError, OSError, ValueError, ...
            raise AiryNetError(f"{path}: damaged or unreadable CXI/HDF5 file ({type(e).__name__}: {e})") from e

    def _inspect(self, cfg, needs_labels):
        h5, path = self.h5, self.path
        stacked = next((p for p in self.IMAGE_PATHS if p in h5 and h5[p].ndim == 3), None)
        if stacked:
            self.layout = "stacked"
            data = h5[stacked]
            self.image_path = stacked
            self.count, height, width = data.shape
            label_paths = (cfg.cxi_labels,) if cfg.cxi_labels else self.LABEL_PATHS
            self.label_path = next((p for p in label_paths if p in h5), None)
            self.id_path = next((p for p in self.ID_PATHS if p in h5), None)
            self.mask_path = next((p for p in self.MASK_PATHS if p in h5), None)
        else:
            entries = sorted((k for k in h5 if k.startswith("entry_") and k[6:].isdigit()
                              and "instrument_1/detector_1/data" in h5[k]), key=lambda k: int(k[6:]))
            if not entries:
                raise AiryNetError(f"{path}: no shots found: expected a stacked "
                                   f"{' or '.join(self.IMAGE_PATHS)} (N x H x W) or per-shot "
                                   f"/entry_N/instrument_1/detector_1/data groups")
            self.layout = "per_shot"
            self.entries = entries
            self.raw, self._places, self._buffers = open(path, "rb", buffering=0), {}, {}
            self.count = len(entries)
            height, width = h5[entries[0]]["instrument_1/detector_1/data"].shape[-2:]
            self.image_shape = (height, width)
            self.label_path = "note_1/data" if "note_1/data" in h5[entries[0]] else None
            self.mask_path = None
        if (height, width) != (cfg.ori_height, cfg.ori_width):
            raise AiryNetError(f"{path}: images are {height}x{width} but --ori_height/--ori_width say "
                               f"{cfg.ori_height}x{cfg.ori_width}")
        if needs_labels and self.label_path is None:
            where = "--cxi_labels or " + ", ".join(self.LABEL_PATHS) if self.layout == "stacked" \
                else "/entry_N/note_1/data"
            raise AiryNetError(f"{path}: no labels ({where}), which training and eval need")
        image_dtype = (h5[self.image_path] if self.layout == "stacked"
                       else h5[self.entries[0]]["instrument_1/detector_1/data"]).dtype
        if not _is_real_number(image_dtype):
            raise AiryNetError(f"{path}: images have dtype {image_dtype}, expected integers or floats")
        if self.label_path is not None:
            labels = h5[self.label_path] if self.layout == "stacked" else h5[self.entries[0]][self.label_path]
            if not _is_real_number(labels.dtype):
                raise AiryNetError(f"{path}: labels have dtype {labels.dtype}, expected 0/1 numbers")
            if self.layout == "stacked" and labels.shape[0] != self.count:
                raise AiryNetError(f"{path}: {labels.shape[0]} labels for {self.count} shots")
            self.num_labels = int(np.prod(labels.shape[1:] if self.layout == "stacked" else labels.shape))
            if self.num_labels != cfg.num_classes:
                raise AiryNetError(f"{path}: labels have {self.num_labels} entries per shot, expected "
                                   f"{cfg.num_classes} (--num_classes)")

    def _locate(self, entry):
        """Where each of a shot's image, labels (None where the file has none) and ID lies (see _place),
        found once per shot: the second pass over a file reads without asking HDF5 anything."""
        places = self._places.get(entry)
        if places is None:
            fields = ("instrument_1/detector_1/data", self.label_path, "experimental_identifier")
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
        # Into a buffer kept for the next shot (a new 100 kB bytes object each time would cost the kernel
        # fresh zeroed pages), or straight into `out` where the stored dtype is out's.
        same = dtype == out.dtype and out.flags.c_contiguous
        values = out.reshape(-1) if same else self._buffers.setdefault((dtype, count), np.empty(count, dtype))
        if os.preadv(self.raw.fileno(), [values.view(np.uint8)], offset) != values.nbytes:
            raise ValueError(f"{self.path} ends inside {path}")
        if not same:
            out.reshape(-1)[:] = values

    def read(self, start, stop):
        """Shots [start, stop) -> images float32 [n,H,W], labels float32 [n,C] (zeros if none), ids int64 [n]."""
        try:
            return self._read(start, stop)
        except Exception as e:  # corrupt chunks, wrong dtypes or shapes: name the file and the shots
            raise OSError(f"{self.path}: shots {start}-{stop - 1}: {type(e).__name__}: {e}") from e

    def _read(self, start, stop):
        h5 = self.h5
        if self.layout == "stacked":
            images = h5[self.image_path][start:stop]
            stored_floats = images.dtype.kind == "f"
            images = images.astype(np.float32)
            if self.mask_path is not None:
                mask = h5[self.mask_path]
                bad = (mask[start:stop] if mask.ndim == 3 else mask[()]) & CXI_MASK_BITS
                images[np.broadcast_to(bad != 0, images.shape)] = 0.0
            labels = (h5[self.label_path][start:stop].reshape(stop - start, -1).astype(np.float32)
                      if self.label_path else None)
            ids = (h5[self.id_path][start:stop].astype(np.int64) if self.id_path
                   else np.arange(start, stop, dtype=np.int64))
        else:
            # Read straight into the batch arrays, by offset where the file allows it: HDF5's per-dataset
            # calls cost ten times the reading itself here (a CXIDB-94 shot is three small datasets).
            n = stop - start
            images = np.empty((n, *self.image_shape), np.float32)
            labels = np.empty((n, self.num_labels), np.float32) if self.label_path else None
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
        if stored_floats:  # only floats can hold NaN or Inf; the check costs a third of a per-shot read
            finite = np.isfinite(images)
            if not finite.all():
                for i in np.flatnonzero(~finite.reshape(len(images), -1).all(axis=1)):
                    log.warning("%s: shot %d (ID %d): %d NaN/Inf pixels set to 0", self.path, start + i,
                                ids[i], int((~finite[i]).sum()))
                images[~finite] = 0.0
        if labels is None:
            labels = np.zeros((len(images), 0), np.float32)  # no labels: an empty column block
        return images, labels, ids


def _cxi_records(readers, cfg, split, one_pass):
    """Shots of CXI files, read in slabs by a background thread, as dicts: image, bunch_id, index
    (over all files) and, where every file has them, label."""
    shot_bytes = cfg.ori_height * cfg.ori_width * cfg.ori_depth * 4
    per_slab = int(np.clip(SLAB_BYTES // shot_bytes, 1, 64))
    slabs, offset = [], 0
    for i, r in enumerate(readers):
        slabs += [(i, s, min(s + per_slab, r.count), offset + s) for s in range(0, r.count, per_slab)]
        offset += r.count
    has_labels = all(r.label_path is not None for r in readers)
    num_labels = cfg.num_classes if has_labels else 0

    def read_slab(slab):
        file_index, start, stop, first = (int(v) for v in slab)
        images, labels, ids = readers[file_index].read(start, stop)
        return images, labels[:, :num_labels], ids, np.arange(first, first + stop - start, dtype=np.int64)

    def read(slab):
        images, labels, ids, index = tf.numpy_function(read_slab, [slab], [tf.float32, tf.float32, tf.int64,
                                                                           tf.int64])
        shots = {"image": tf.reshape(images, [-1, cfg.ori_height, cfg.ori_width, cfg.ori_depth]),
                 "bunch_id": tf.reshape(ids, [-1]), "index": tf.reshape(index, [-1])}
        if has_labels:
            shots["label"] = tf.reshape(labels, [-1, num_labels])
        return shots

    ds = tf.data.Dataset.from_tensor_slices(np.array(slabs, np.int64).reshape(-1, 4))
    if not one_pass:
        ds = ds.shuffle(len(slabs), seed=cfg.random_seed)
    # One reader thread, ahead of the consumer: h5py serialises every HDF5 call under one lock, so
    # more slabs in flight only fight over that lock and the GIL (per-shot CXI, 259 px: 1,860 img/s
    # with one reader, 1,430 with four).
    ds = ds.map(read, num_parallel_calls=1, deterministic=True).unbatch()
    if split is not None:  # one file set for all modes: hold out every eval_every-th shot
        held_out = lambda shot: tf.equal(shot["index"] % cfg.eval_every, cfg.eval_every - 1)
        if split == "train":
            ds = ds.filter(lambda shot: tf.logical_not(held_out(shot)))
        elif split == "eval":
            ds = ds.filter(held_out)
    return ds


# ----------------------------------------------------------------------------------------------
# Synthetic

def synthetic_range(cfg, mode):
    """Shot indices of each split: train 0..dataset_size-1, eval and predict the held-out shots after."""
    n_eval = max(256, cfg.dataset_size // 8)
    if mode == "train":
        return 0, cfg.dataset_size
    return cfg.dataset_size, cfg.dataset_size + n_eval


def _synthetic_records(cfg, mode):
    first, last = synthetic_range(cfg, mode)
    chunk = 32
    starts = np.arange(first, last, chunk, dtype=np.int64)

    def make(start):
        count = int(min(chunk, last - start))
        images, labels = simulate.simulate(count, cfg.random_seed, cfg.ori_height, start=int(start))
        return images.astype(np.float32), labels.astype(np.float32), np.arange(start, start + count)

    def generate(start):
        images, labels, ids = tf.numpy_function(make, [start], [tf.float32, tf.float32, tf.int64])
        return {"image": tf.reshape(images, [-1, cfg.ori_height, cfg.ori_width, 1]),
                "label": tf.reshape(labels, [-1, cfg.num_classes]), "bunch_id": tf.reshape(ids, [-1])}

    ds = tf.data.Dataset.from_tensor_slices(starts)
    ds = ds.map(generate, num_parallel_calls=cfg.num_worker, deterministic=True).unbatch()
    return ds.cache()  # simulated once per process; the uint16 shots are small next to a GPU's input


# ----------------------------------------------------------------------------------------------
# The pipeline

def check_sources(cfg, mode):
    """find_files plus cheap checks (each TFRecord's first record, each CXI file's layout, the synthetic
    sizes), so that mistakes show before a run creates anything. -> (kind, files, split); for CXI the
    files come as opened CxiFile readers."""
    kind, files, split = find_files(cfg, mode)
    if kind == "tfrecord":
        for f in files:
            check_tfrecord(f, cfg, mode, max_records=1)
    elif kind == "cxi":
        files = [CxiFile(f, cfg, needs_labels=mode in ("train", "eval")) for f in files]
    elif kind == "euxfel":  # EuXFEL run hook
        if mode != "predict":
            raise AiryNetError(f"{files[0]}: a European XFEL run carries no labels; use it with --mode=predict")
    elif cfg.ori_height != cfg.ori_width or cfg.ori_depth != 1:
        raise AiryNetError(f"--ori_height/--ori_width/--ori_depth: the synthetic dataset is square and "
                           f"gray, got {cfg.ori_height}x{cfg.ori_width}x{cfg.ori_depth}")
    elif cfg.num_classes != len(config.HELIUM_CLASSES):
        raise AiryNetError(f"--num_classes={cfg.num_classes}: the synthetic dataset has "
                           f"{len(config.HELIUM_CLASSES)} classes")
    return kind, files, split


def shuffle_buffer(batch_size):
    """Shots held by the train/eval shuffle: the original's 5000 + 3 batches."""
    return 5000 + 3 * batch_size


def dataset(cfg, mode, *, shard=(0, 1), one_pass=None, input_context=None):
    """Batches of `mode` data ready for the network; see the module docstring for their structure.

    one_pass: read every record once in order (default for predict) instead of shuffled forever.
    shard: (index, count): keep records j with j % count == index (prediction on a cluster).
    input_context: a tf.distribute.InputContext; each input pipeline then reads its own share.
    """
    if one_pass is None:
        one_pass = mode == "predict"
    kind, files, split = check_sources(cfg, mode)
    if kind == "tfrecord":
        records = _tfrecord_records(files, cfg, mode, one_pass)
    elif kind == "cxi":
        records = _cxi_records(files, cfg, split, one_pass)
    elif kind == "euxfel":  # EuXFEL run hook
        records = euxfel.records(cfg, files[0])
    else:
        records = _synthetic_records(cfg, mode)
    shard_index, shard_count = shard
    if input_context is not None:
        shard_count *= input_context.num_input_pipelines
        shard_index = shard_index * input_context.num_input_pipelines + input_context.input_pipeline_id
    if shard_count > 1:
        records = records.shard(shard_count, shard_index)
    if not one_pass:
        records = records.shuffle(shuffle_buffer(cfg.batch_size), seed=cfg.random_seed).repeat()
    records = records.batch(cfg.batch_size, drop_remainder=not one_pass)

    training = mode == "train" and not one_pass
    seeds = tf.data.Dataset.counter().map(lambda i: tf.stack([tf.cast(cfg.random_seed, tf.int64), i]))

    def finish(batch, seed):
        if kind == "tfrecord":
            images, extra = _decode_records(batch, cfg, mode)
        else:
            images = batch["image"]
            extra = {k: batch[k] for k in ("bunch_id", "label", "pulse") if k in batch}  # pulse: EuXFEL hook
        images = preprocess(images, cfg, training=training, seed=seed)
        if mode == "predict":
            return dict(extra, image=images)
        return images, extra["label"]

    ds = tf.data.Dataset.zip(records, seeds).map(finish, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def tf_message(error):
    """The first line of a TensorFlow error without its graph-node prefix and op suffix."""
    text = (getattr(error, "message", None) or str(error)).strip().splitlines()[0]
    text = re.sub(r"^\{\{[^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)


# What TensorFlow raises when a record cannot be decoded (InvalidArgument), a TFRecord is corrupt
# (DataLoss) or a Python reader fails inside tf.numpy_function (Unknown).
READ_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.DataLossError, tf.errors.UnknownError)


def describe_failure(cfg, mode, error):
    """Turn a TensorFlow error raised while reading `mode` data into an AiryNetError naming the culprit."""
    kind, files, _ = find_files(cfg, mode)
    if kind == "tfrecord":
        for f in files:  # a full scan finds the file and record, and raises
            check_tfrecord(f, cfg, mode)
    first_line = tf_message(error)
    python_error = re.search(r"\b\w+Error: (.*)$", first_line)  # a CXI reader's error names its file
    if python_error:
        return AiryNetError(python_error.group(1))
    return AiryNetError(f"{dataset_dir(cfg)}: reading {mode} data failed: {first_line}")


# ----------------------------------------------------------------------------------------------
# Writers (the simulator script and the tests use them)

def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def write_tfrecord(path, images, labels):
    """Original schema. labels: int16 [N, C] flags (train/eval, cxidb predict) or [N] bunch IDs (int32)."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    label_dtype = np.int32 if labels.ndim == 1 else np.int16
    tmp = path + ".tmp"
    with tf.io.TFRecordWriter(tmp) as writer:
        for image, label in zip(images, labels):
            example = tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": _bytes(np.ascontiguousarray(image, np.uint16).tobytes()),
                "image/format": _bytes(b"raw"),
                LABEL_KEY: _bytes(np.ascontiguousarray(label, label_dtype).tobytes()),
                "image/height": _int64(image.shape[0]),
                "image/width": _int64(image.shape[1]),
            }))
            writer.write(example.SerializeToString())
    os.replace(tmp, path)


def write_cxi_shots(path, images, labels, bunch_ids, photon_energy_J=4.0e-18):
    """CXIDB-94 layout: one /entry_N group per shot (N from 1). 4e-18 J is about 25 eV (XUV)."""
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as h5:
        h5["cxi_version"] = 150
        for n, (image, label, bid) in enumerate(zip(images, labels, bunch_ids), start=1):
            entry = h5.create_group(f"entry_{n}")
            entry["instrument_1/detector_1/data"] = image
            entry["instrument_1/source_1/energy"] = photon_energy_J
            entry["note_1/data"] = np.asarray(label, np.int16)
            entry["experimental_identifier"] = np.int64(bid)
    os.replace(tmp, path)


def write_cxi_stacked(path, images, labels=None, bunch_ids=None, mask=None):
    """Stacked CXI: detector data N x H x W, linked from entry_1/data_1 (as Condor writes it)."""
    images = np.asarray(images)
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as h5:
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
    os.replace(tmp, path)
