"""The file that --mode=label writes (--labels): every label on disk before the page is told it is saved.

  * NAME.tfrecord: the training records' schema (nn/inputs/tfrecord.py): the image as raw uint16 under
    image/encoded (as the source holds it: a source whose pixels are not whole numbers in 0..65535 cannot
    be stored so and is refused, use .cxi), the int16 label flags under image/class/label, and extra
    features that training ignores: image/shot_id (the page's id), image/bunch_id, image/pulse and
    image/source. Records are appended, flushed and fsync'ed one by one; a record torn by a crash in the
    middle of a write is the file's last, and is cut off when the file is opened again (with a warning).
    Taking a label back truncates the file before its record.
  * NAME.cxi / NAME.h5: a stacked CXI file (images in the source's dtype at entry_1/data_1/data, labels at
    entry_1/data_1/labels, bunch IDs at entry_1/experiment_identifier, ids at entry_1/shot_id, pulses at
    entry_1/pulse), rewritten whole under a temporary name and renamed (nn/files.py) at every change:
    HDF5 cannot be appended to safely, and a labelling session's files are small.

Shots marked "not a droplet" are never training shots: they go to NAME.not_a_droplet.jsonl (one JSON
object a line: id, bunch_id, pulse), appended and fsync'ed the same way.
"""
import json
import logging
import os
import struct

import crc32c
import h5py
import numpy as np
import tensorflow as tf

from nn.config import AiryNetError
from nn.files import atomic_path
from nn.inputs.tfrecord import LABEL_KEY

log = logging.getLogger("airynet")

EXTRA = ("image/shot_id", "image/bunch_id", "image/pulse", "image/source")


def open_label_file(path, num_classes):
    """The label file at `path` (created when missing), by its extension."""
    if path.endswith(".tfrecord"):
        return TFRecordLabels(path, num_classes)
    return CxiLabels(path, num_classes)


def _fsync_append(path, data):
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def masked_crc(data):
    """TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data):
    """One TFRecord: length (uint64), its checksum, the data, its checksum; all little-endian."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


def scan(path):
    """-> (the records' payloads, their start offsets, the size of the intact part). A record that does not
    check out must be the last: a crash tears only the record being written. Anything else is an error."""
    with open(path, "rb") as f:
        blob = f.read()
    payloads, offsets, at = [], [], 0
    while at < len(blob):
        end = _record_end(blob, at)
        if end is None:
            break
        payloads.append(blob[at + 12:end - 4])
        offsets.append(at)
        at = end
    return payloads, offsets, at


def _record_end(blob, at):
    """The end of the intact record at `at`, or None where it is torn (which only the last may be)."""
    head = blob[at:at + 12]
    if len(head) < 12 or struct.unpack("<I", head[8:])[0] != masked_crc(head[:8]):
        return None
    length = struct.unpack("<Q", head[:8])[0]
    end = at + 12 + length + 4
    if end > len(blob):
        return None
    if struct.unpack("<I", blob[end - 4:end])[0] != masked_crc(blob[at + 12:end - 4]):
        if end < len(blob):
            raise AiryNetError(f"record at byte {at} is corrupt and not the last one; not a crash's torn record")
        return None
    return end


def _feature(example, name):
    return example.features.feature[name]


class TFRecordLabels:
    """Appends labelled shots to a TFRecord file; see the module docstring."""

    def __init__(self, path, num_classes):
        self.path, self.num_classes = path, num_classes
        self.ids, self.labels, self.offsets = [], [], []
        if os.path.exists(path):
            self._reopen()

    def _reopen(self):
        try:
            payloads, self.offsets, intact = scan(self.path)
        except AiryNetError as e:
            raise AiryNetError(f"--labels={self.path}: {e}") from None
        size = os.path.getsize(self.path)
        if intact < size:
            log.warning("--labels=%s: cut off a record torn by a crash (%d bytes at the end); %d records kept",
                        self.path, size - intact, len(payloads))
            _truncate(self.path, intact)
        for payload in payloads:
            example = tf.train.Example.FromString(payload)
            label = np.frombuffer(_feature(example, LABEL_KEY).bytes_list.value[0], np.int16)
            if label.shape != (self.num_classes,):
                raise AiryNetError(f"--labels={self.path}: a record holds {label.size} labels, not "
                                   f"{self.num_classes} (--num_classes)")
            self.ids.append(_feature(example, "image/shot_id").bytes_list.value[0].decode())
            self.labels.append(label)

    def append(self, shot, classes):
        """Write one labelled shot (a dict: id, image, bunch_id, pulse, source) and make it durable."""
        image = np.asarray(shot["image"])
        if not np.array_equal(image, np.clip(np.round(image), 0, 65535)):
            raise AiryNetError(f"--labels={self.path}: shot {shot['id']} has pixels that are not whole numbers in "
                               f"0..65535, which the TFRecord schema (uint16) cannot hold; label into a .cxi file")
        label = np.asarray(classes, np.int16)
        features = {"image/encoded": _bytes(image.astype(np.uint16).tobytes()), "image/format": _bytes(b"raw"),
                    LABEL_KEY: _bytes(label.tobytes()), "image/height": _int64(image.shape[0]),
                    "image/width": _int64(image.shape[1]), "image/shot_id": _bytes(shot["id"].encode()),
                    "image/bunch_id": _int64(shot["bunch_id"]), "image/pulse": _int64(shot.get("pulse", -1)),
                    "image/source": _bytes(shot.get("source", "").encode())}
        example = tf.train.Example(features=tf.train.Features(feature=features))
        self.offsets.append(os.path.getsize(self.path) if os.path.exists(self.path) else 0)
        _fsync_append(self.path, frame(example.SerializeToString()))
        self.ids.append(shot["id"])
        self.labels.append(label)

    def remove_last(self):
        """Take back the last record: the file is truncated before it."""
        _truncate(self.path, self.offsets.pop())
        self.labels.pop()
        return self.ids.pop()


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


class CxiLabels:
    """Labelled shots in a stacked CXI file, rewritten whole at each change; see the module docstring."""

    def __init__(self, path, num_classes):
        self.path, self.num_classes = path, num_classes
        self.ids, self.labels, self.images, self.bunch_ids, self.pulses = [], [], [], [], []
        if os.path.exists(path):
            try:
                with h5py.File(path, "r") as h5:
                    self.images = list(h5["entry_1/data_1/data"][()])
                    self.labels = list(h5["entry_1/data_1/labels"][()].astype(np.int16))
                    self.bunch_ids = list(h5["entry_1/experiment_identifier"][()])
                    self.pulses = list(h5["entry_1/pulse"][()])
                    self.ids = [i.decode() for i in h5["entry_1/shot_id"][()]]
            except (OSError, KeyError) as e:
                raise AiryNetError(f"--labels={path}: not a label file written by --mode=label ({e})") from None

    def append(self, shot, classes):
        image = np.asarray(shot["image"])
        self.images.append(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)  # CXI: N x H x W
        self.labels.append(np.asarray(classes, np.int16))
        self.bunch_ids.append(int(shot["bunch_id"]))
        self.pulses.append(int(shot.get("pulse", -1)))
        self.ids.append(shot["id"])
        self._write()

    def remove_last(self):
        for values in (self.images, self.labels, self.bunch_ids, self.pulses):
            values.pop()
        shot_id = self.ids.pop()
        self._write()
        return shot_id

    def _write(self):
        with atomic_path(self.path) as tmp:
            with h5py.File(tmp, "w") as h5:
                h5["cxi_version"] = 150
                h5["entry_1/data_1/data"] = np.stack(self.images) if self.images else np.zeros((0, 0, 0), np.uint16)
                h5["entry_1/data_1/labels"] = np.asarray(self.labels, np.int16).reshape(-1, self.num_classes)
                h5["entry_1/experiment_identifier"] = np.asarray(self.bunch_ids, np.int64)
                h5["entry_1/pulse"] = np.asarray(self.pulses, np.int64)
                h5["entry_1/shot_id"] = np.asarray([i.encode() for i in self.ids], dtype=h5py.string_dtype())
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())


class RejectList:
    """Shots marked "not a droplet": PATH.not_a_droplet.jsonl, a line each, appended and fsync'ed; a torn
    last line (no newline) is cut off on opening, with a warning."""

    def __init__(self, label_path):
        self.path = os.path.splitext(label_path)[0] + ".not_a_droplet.jsonl"
        self.ids, self.offsets = [], []
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                blob = f.read()
            intact = blob.rfind(b"\n") + 1
            if intact < len(blob):
                log.warning("%s: cut off a line torn by a crash (%d bytes)", self.path, len(blob) - intact)
                _truncate(self.path, intact)
            at = 0
            for line in blob[:intact].splitlines(keepends=True):
                self.ids.append(json.loads(line)["id"])
                self.offsets.append(at)
                at += len(line)

    def append(self, shot):
        self.offsets.append(os.path.getsize(self.path) if os.path.exists(self.path) else 0)
        line = json.dumps({"id": shot["id"], "bunch_id": int(shot["bunch_id"]), "pulse": int(shot.get("pulse", -1))})
        _fsync_append(self.path, (line + "\n").encode())
        self.ids.append(shot["id"])

    def remove_last(self):
        _truncate(self.path, self.offsets.pop())
        return self.ids.pop()
