"""The original's TFRecord schema (README, Data formats): decoding, checking and writing records.

Each record is a tf.train.Example holding raw uint16 pixels under the image key and raw int16 label
flags (train/eval, and predict for the cxidb variant) or an int32 bunch ID (predict) under LABEL_KEY.
"""
import os

import numpy as np
import tensorflow as tf

from nn.config import AiryNetError, first_line
from nn.files import atomic_path

LABEL_KEY = "image/class/label"


NOISE_SUFFIXES = {1: "_noise_mean", 2: "_noise_mean_std", 3: "_noise_max"}


def image_key(cfg):
    """The image feature to read, named as the original did: image/encoded, image/encoded_noise_mean,
    ..., and with --use_ccf image/ccf_noise_ (add_noise=0), image/ccf_noise_mean, ..."""
    suffix = "_noise_" if cfg.add_noise == 0 and cfg.use_ccf else NOISE_SUFFIXES.get(cfg.add_noise, "")
    return "image/" + ("ccf" if cfg.use_ccf else "encoded") + suffix


def is_one_hot_predict(cfg):
    """The original's cxidb variant stores a one-hot label in predict records, not a bunch ID."""
    return cfg.dataset == "cxidb"


def decode_records(serialized, cfg, mode):
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


def check(path, cfg, mode, max_records=None):
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
        raise AiryNetError(f"{path}: record {index + 1}: truncated or corrupt TFRecord ({first_line(e)})") from e
    except Exception as e:
        if isinstance(e, AiryNetError):
            raise
        raise AiryNetError(f"{path}: record {index + 1}: not a valid tf.train.Example ({e})") from e


def records(files, cfg, one_pass):
    """Serialized records of `files`. Predict keeps the file and record order; training may interleave
    files for speed. One file has nothing to interleave: parallel reads of it only add their threads."""
    parallel = min(cfg.num_worker, len(files))
    return tf.data.TFRecordDataset(files, num_parallel_reads=None if one_pass or parallel == 1 else parallel)


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def write(path, images, labels, key="image/encoded"):
    """Original schema. labels: int16 [N, C] flags (train/eval, cxidb predict) or [N] bunch IDs (int32).
    key: the feature the images are stored under (see `image_key`)."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    label_dtype = np.int32 if labels.ndim == 1 else np.int16
    with atomic_path(path) as tmp, tf.io.TFRecordWriter(tmp) as writer:
        for image, label in zip(images, labels):
            example = tf.train.Example(features=tf.train.Features(feature={
                key: _bytes(np.ascontiguousarray(image, np.uint16).tobytes()),
                "image/format": _bytes(b"raw"),
                LABEL_KEY: _bytes(np.ascontiguousarray(label, label_dtype).tobytes()),
                "image/height": _int64(image.shape[0]),
                "image/width": _int64(image.shape[1]),
            }))
            writer.write(example.SerializeToString())

