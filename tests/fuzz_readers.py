"""Fuzz driver for the TFRecord and CXI readers, run by test_fuzz.py in a subprocess with a time limit
(so that a hang fails the test instead of blocking it).

    python tests/fuzz_readers.py WORKDIR SEED CASES

Each case damages a copy of a tiny valid file (truncation, flipped bytes, wrong dtypes or shapes), reads
it through nn.data like the CLI does, and prints one JSON line: {"case", "outcome": "ok"|"error",
"detail": the number of shots read or the error message, "same_pixels": whether a read gave exactly
the network inputs of the undamaged file}. Any other exception escapes and makes the process fail.
"""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from nn import config  # noqa: E402
from nn.inputs import cxi, data, simulate, tfrecord
from nn.recipe import PAPER

SIZE = 24
FLAGS = [f"--ori_width={SIZE}", f"--ori_height={SIZE}", "--target_width=16", "--target_height=16",
         "--batch_size=2", "--num_worker=1"]


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def read_all(cfg, mode):
    """Read every record once, as eval and predict do; -> ('ok', network inputs [N, 16, 16, 1]) or
    ('error', message)."""
    try:
        batches = []
        try:
            for batch in data.dataset(cfg, PAPER, mode, one_pass=True):
                images = batch["image"] if isinstance(batch, dict) else batch[0]
                assert images.shape[1:] == (16, 16, 1) and np.isfinite(images.numpy()).all()
                batches.append(images.numpy())
        except data.READ_ERRORS as e:
            raise data.describe_failure(cfg, mode, e) from e
        return "ok", np.concatenate(batches) if batches else np.zeros((0, 16, 16, 1), np.float32)
    except config.AiryNetError as e:
        return "error", str(e)


def damage(raw, rng):
    kind = rng.choice(["truncate", "flip", "both", "zero_tail"])
    raw = bytearray(raw)
    if kind in ("flip", "both"):
        for i in rng.integers(0, len(raw), size=rng.integers(1, 8)):
            raw[i] ^= 1 << int(rng.integers(0, 8))
    if kind in ("truncate", "both"):
        raw = raw[: int(rng.integers(0, len(raw)))]
    if kind == "zero_tail":
        start = int(rng.integers(0, len(raw)))
        raw[start:] = bytes(len(raw) - start)
    return bytes(raw), kind


def wrong_type_files(directory, images, labels):
    """Valid containers holding the wrong things."""
    def raw_tfrecord(image_dtype, label_dtype):
        def write(p):
            with tf.io.TFRecordWriter(p) as w:
                for image, label in zip(images, labels):
                    w.write(tf.train.Example(features=tf.train.Features(feature={
                        "image/encoded": _bytes(image.astype(image_dtype).tobytes()),
                        tfrecord.LABEL_KEY: _bytes(label.astype(label_dtype).tobytes())})).SerializeToString())
        return write

    yield "tfrecord_uint8_images", "tfrecord", raw_tfrecord(np.uint8, np.int16)
    yield "tfrecord_float32_images", "tfrecord", raw_tfrecord(np.float32, np.int16)
    yield "tfrecord_int32_labels", "tfrecord", raw_tfrecord(np.uint16, np.int32)

    def cxi_2d(p):
        with h5py.File(p, "w") as f:
            f["entry_1/data_1/data"] = images[0]

    def cxi_string_labels(p):
        cxi.write_cxi_stacked(p, images, None, None)
        with h5py.File(p, "a") as f:
            f["entry_1/data_1/labels"] = np.array([b"round"] * len(images))

    def cxi_short_labels(p):
        cxi.write_cxi_stacked(p, images, labels[:, :5], None)

    def cxi_complex_images(p):
        cxi.write_cxi_stacked(p, images.astype(np.complex64), labels, None)

    yield "cxi_2d_data", "cxi", cxi_2d
    yield "cxi_string_labels", "cxi", cxi_string_labels
    yield "cxi_short_labels", "cxi", cxi_short_labels
    yield "cxi_complex_images", "cxi", cxi_complex_images


def main(workdir, seed, cases):
    rng = np.random.default_rng(seed)
    images, labels = simulate.simulate(6, seed, SIZE)
    sources = os.path.join(workdir, "sources")
    os.makedirs(sources, exist_ok=True)
    originals = {"tfrecord": os.path.join(sources, "x_eval.tfrecord"), "cxi": os.path.join(sources, "x_eval.cxi"),
                 "shots": os.path.join(sources, "y_eval.cxi")}
    tfrecord.write(originals["tfrecord"], images, labels)
    cxi.write_cxi_stacked(originals["cxi"], images, labels, np.arange(6))
    cxi.write_cxi_shots(originals["shots"], images, labels, np.arange(6))
    undamaged = {}
    for kind, path in originals.items():
        directory = os.path.join(workdir, f"undamaged_{kind}")
        os.makedirs(directory)
        shutil.copy(path, directory)
        outcome, undamaged[kind] = read_all(config.parse_args(FLAGS + [f"--data_dir={workdir}/",
                                                                       f"--dataset=undamaged_{kind}"]), "eval")
        assert outcome == "ok" and len(undamaged[kind]) == 6, (kind, outcome)
    for case in range(cases):
        kind = list(originals)[case % 3]
        directory = os.path.join(workdir, f"case{case}")
        os.makedirs(directory)
        raw, how = damage(open(originals[kind], "rb").read(), rng)
        with open(os.path.join(directory, os.path.basename(originals[kind])), "wb") as f:
            f.write(raw)
        cfg = config.parse_args(FLAGS + [f"--data_dir={workdir}/", f"--dataset=case{case}"])
        outcome, detail = read_all(cfg, "eval")
        same = outcome == "ok" and np.array_equal(detail, undamaged[kind])
        print(json.dumps({"case": f"{kind}/{how}", "outcome": outcome, "same_pixels": same,
                          "detail": len(detail) if outcome == "ok" else detail}), flush=True)
        shutil.rmtree(directory)
    for name, kind, write in wrong_type_files(workdir, images, labels):
        directory = os.path.join(workdir, name)
        os.makedirs(directory)
        write(os.path.join(directory, f"x_eval.{'tfrecord' if kind == 'tfrecord' else 'cxi'}"))
        cfg = config.parse_args(FLAGS + [f"--data_dir={workdir}/", f"--dataset={name}"])
        outcome, detail = read_all(cfg, "eval")
        print(json.dumps({"case": name, "outcome": outcome, "same_pixels": False,
                          "detail": len(detail) if outcome == "ok" else detail}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
