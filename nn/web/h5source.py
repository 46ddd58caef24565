"""Prediction files as a view's source: one h5 file of --mode=predict or --mode=live (stacked or per-shot
layout) or a folder of them (the shard files of a sharded predict run). The shots' numbers are read into a
Table at start; images and maps are read per request, one row at a time.

A stacked file is opened in HDF5's SWMR mode where it was written so (--mode=live's file), and refresh()
reads the rows its writer has flushed since, without ever blocking the writer. Shot IDs: the row of a
stacked file or the group name of a per-shot one, prefixed with the file's position (`2-117`) in a
folder. Only IDs the Table holds are ever looked up in a file."""
import glob
import logging
import os
import time

import h5py
import numpy as np

from nn.config import AiryNetError
from nn.web.table import Table

log = logging.getLogger("airynet")

REFRESH_SECONDS = 0.5  # a growing file is looked at no more often than this
CHUNK_CACHE = 32 * 2 ** 20  # bytes of decompressed chunks kept per dataset
OPTIONAL = ("pulses", "ood_score", "unknown")  # per-shot columns that some prediction files have


def _prediction_paths(path):
    if os.path.isdir(path):
        paths = sorted(glob.glob(os.path.join(path, "*.h5")))
        if not paths:
            raise AiryNetError(f"--view_source={path}: the folder holds no .h5 prediction files")
        return paths
    if not os.path.isfile(path):
        raise AiryNetError(f"--view_source={path}: no such file or folder")
    return [path]


def _open(path):
    """The h5 file, in SWMR mode where it was written so. A chunk cache of CHUNK_CACHE: a stacked file's
    maps come thousands of shots to a chunk, and a page shows neighbouring shots, so a page's maps cost
    one chunk's decompression instead of one per shot (20x faster with 64 px shots)."""
    try:
        return h5py.File(path, "r", swmr=True, rdcc_nbytes=CHUNK_CACHE)
    except OSError:
        pass
    try:
        return h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE)
    except OSError as e:
        raise AiryNetError(f"--view_source={path}: not an HDF5 file ({e})") from e


def _names(values):
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class StackedFile:
    """A stacked prediction file: rows of bids, probs, preds (and pulses, ood_score, unknown, images,
    grad_cam where written)."""

    def __init__(self, f):
        self.file, self.rows = f, 0

    def new_rows(self):
        """{column: values} of the rows flushed since the last call (row keys under "keys")."""
        columns = ["bids", "probs", "preds"] + [n for n in OPTIONAL if n in self.file]
        if self.file.swmr_mode:
            for name in columns:
                self.file[name].refresh()
        end = min(self.file[name].shape[0] for name in columns)  # a column the writer has not flushed yet
        new = {name: self.file[name][self.rows:end] for name in columns}
        new["keys"] = [str(r) for r in range(self.rows, end)]
        self.rows = end
        return new

    def image(self, key):
        return self.file["images"][int(key)] if "images" in self.file else None

    def heat(self, key, c):
        return self.file["grad_cam"][int(key), c] if "grad_cam" in self.file else None


class PerShotFile:
    """A per-shot prediction file (the original's layout): a group per shot with probability, prediction,
    img and {class}/grad_cam. Read whole at start: nothing appends to it."""

    def __init__(self, f):
        self.file, self.done = f, False

    def new_rows(self):
        if self.done:
            return {"keys": []}
        self.done = True
        keys = [k for k, g in self.file.items() if isinstance(g, h5py.Group) and "probability" in g]
        new = {"keys": keys, "probs": np.array([self.file[k]["probability"][()] for k in keys], np.float32),
               "preds": np.array([self.file[k]["prediction"][()] for k in keys], np.uint8),
               "bids": np.array([_bunch_id(k, i) for i, k in enumerate(keys)], np.int64)}
        for name in OPTIONAL[1:]:
            if keys and name in self.file[keys[0]]:
                new[name] = np.array([self.file[k][name][()] for k in keys])
        return new

    def image(self, key):
        return self.file[key]["img"][()] if "img" in self.file[key] else None

    def heat(self, key, c):
        name = f"{c}/grad_cam"
        return self.file[key][name][()] if name in self.file[key] else None


def _bunch_id(name, record):
    """A per-shot group is named by its bunch ID (with `_record` appended to a repeated one)."""
    head = name.split("_")[0]
    return int(head) if head.lstrip("-").isdigit() else record


class FileSource:
    """The view's source for prediction files (see the module's docstring)."""
    kind = "file"

    def __init__(self, path):
        self.path = path
        self.files, names, self.thresholds = [], None, None
        for p in _prediction_paths(path):
            f = _open(p)
            layout = f.attrs.get("layout", "stacked" if "probs" in f else "per_shot")
            reader = StackedFile(f) if layout == "stacked" else PerShotFile(f)
            if layout == "stacked" and not all(n in f for n in ("bids", "probs", "preds")):
                raise AiryNetError(f"--view_source={p}: not a prediction file (no bids, probs and preds datasets)")
            file_names = _names(f.attrs["class_names"]) if "class_names" in f.attrs else None
            if names is not None and file_names != names:
                raise AiryNetError(f"--view_source={p}: its classes differ from those of {self.files[0][0]}")
            names = file_names
            if "thresholds" in f.attrs and self.thresholds is None:
                self.thresholds = [round(float(t), 4) for t in f.attrs["thresholds"]]
            self.files.append((p, reader))
        first = self.files[0][1].new_rows()
        if names is None:
            names = [str(i) for i in range(np.shape(first.get("probs", np.zeros((0, 0))))[-1])]
        if not names:
            raise AiryNetError(f"--view_source={self.files[0][0]}: not a prediction file (no classes, no shots)")
        self.table = Table(names)
        self.checked = 0.0
        self._add(0, first)
        for k in range(1, len(self.files)):
            self._add(k, self.files[k][1].new_rows())

    def _add(self, k, new):
        if not len(new["keys"]):
            return
        prefix = f"{k}-" if len(self.files) > 1 else ""
        ids = [prefix + key for key in new["keys"]]
        self.table.append(ids, new["bids"], new["probs"], new["preds"], {n: new.get(n) for n in OPTIONAL})

    def refresh(self):
        """Read the rows written since the last look (at most every REFRESH_SECONDS)."""
        if time.monotonic() - self.checked < REFRESH_SECONDS:
            return
        self.checked = time.monotonic()
        for k, (_, reader) in enumerate(self.files):
            self._add(k, reader.new_rows())

    def _locate(self, shot_id):
        if self.table.row(shot_id) is None:
            return None, None
        if len(self.files) == 1:
            return self.files[0][1], shot_id
        k, key = shot_id.split("-", 1)
        return self.files[int(k)][1], key

    def image(self, shot_id):
        """The shot's image as stored (float32 [H, W(, D)]), or None."""
        reader, key = self._locate(shot_id)
        return None if reader is None else reader.image(key)

    def heat(self, shot_id, c):
        """The shot's Grad-CAM++ map of class index `c`, or None; an all-zero map (a shot written without
        one) counts as none."""
        reader, key = self._locate(shot_id)
        heat = None if reader is None else reader.heat(key, c)
        return heat if heat is not None and np.any(heat) else None

    def status(self):
        return {"source": self.path, "kind": self.kind, "waiting": False, "thresholds": self.thresholds,
                "images": any(_has(r, "images", "img") for _, r in self.files),
                "maps": any(_has(r, "grad_cam", "0/grad_cam") for _, r in self.files)}


def _has(reader, stacked_name, group_name):
    f = reader.file
    if isinstance(reader, StackedFile):
        return stacked_name in f
    first = next(iter(f.values()), None)
    return isinstance(first, h5py.Group) and group_name in first
