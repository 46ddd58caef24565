"""The shots --mode=label offers: the first --label_pool shots of the predict source (TFRecords, CXI files,
a European XFEL run, the simulator), raw as the source holds them, each with an id that is unique within
the source and stable across restarts (nn/inputs/data.py finds the source as --mode=predict does):

  * TFRecords: FILE_NAME:RECORD_INDEX;   * CXI/HDF5: cxi:SHOT_INDEX (over the sorted files);
  * EuXFEL runs: TRAIN_ID:PULSE;         * the simulator: synthetic:SHOT_INDEX.
"""
import dataclasses
import os

import numpy as np
import tensorflow as tf

from nn.inputs import cxi, data, euxfel, tfrecord

READ_BATCH = 64


@dataclasses.dataclass
class Pool:
    ids: list            # str [N]
    images: np.ndarray   # [N, H, W, D], the source's pixels (uint16 for TFRecords, float32 otherwise)
    bunch_ids: np.ndarray  # int64 [N]
    pulses: np.ndarray     # int64 [N], -1 where the source has none
    source: str            # where the shots come from, for the label file's records

    def shot(self, index):
        return {"id": self.ids[index], "image": self.images[index], "bunch_id": int(self.bunch_ids[index]),
                "pulse": int(self.pulses[index]), "source": self.source}


def load_pool(cfg, limit):
    kind, files, _ = data.check_sources(cfg, "predict")
    if kind == "tfrecord":
        batches = _tfrecord_batches(cfg, files)
    else:
        if kind == "cxi":
            records, name = cxi.records(files, cfg, None, True), lambda s: f"cxi:{int(s['index'])}"
        elif kind == "euxfel":
            records, name = euxfel.records(cfg, files[0]), lambda s: f"{int(s['bunch_id'])}:{int(s['pulse'])}"
        else:
            records = data._synthetic_records(cfg, "predict", 0.0)
            name = lambda s: f"synthetic:{int(s['bunch_id'])}"
        batches = (_named(batch, name) for batch in records.take(limit).batch(READ_BATCH).as_numpy_iterator())
    ids, images, bunch_ids, pulses = [], [], [], []
    for names, image, bunch_id, pulse in batches:
        room = limit - len(ids)
        ids += names[:room]
        images.append(image[:room])
        bunch_ids.append(bunch_id[:room])
        pulses.append(pulse[:room])
        if len(ids) >= limit:
            break
    shape = (0, cfg.ori_height, cfg.ori_width, cfg.ori_depth)
    return Pool(ids, np.concatenate(images) if images else np.zeros(shape, np.float32),
                np.concatenate(bunch_ids) if bunch_ids else np.zeros(0, np.int64),
                np.concatenate(pulses) if pulses else np.zeros(0, np.int64), data.dataset_dir(cfg))


def _named(batch, name):
    n = len(batch["image"])
    shots = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    pulses = batch["pulse"] if "pulse" in batch else np.full(n, -1, np.int64)
    return [name(s) for s in shots], batch["image"], batch["bunch_id"].astype(np.int64), pulses.astype(np.int64)


def _tfrecord_batches(cfg, files):
    """Batches of (ids, uint16 images, bunch IDs, pulses) of each file in turn, records in file order."""
    for path in files:
        first = 0
        for serialized in tf.data.TFRecordDataset(path).batch(READ_BATCH):
            images, extra = tfrecord.decode_records(serialized, cfg, "predict")
            n = int(images.shape[0])
            ids = [f"{os.path.basename(path)}:{first + i}" for i in range(n)]
            first += n
            yield ids, images.numpy(), extra["bunch_id"].numpy(), np.full(n, -1, np.int64)
