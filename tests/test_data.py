"""The input pipeline: each reader, the preprocessing, the synthetic source and bad input."""
import logging
import os

import h5py
import numpy as np
import pytest
import tensorflow as tf

from conftest import SIZE, make_cfg
from nn import config
from nn.inputs import cxi, data, preprocess, tfrecord
from nn.config import AiryNetError
from nn.recipe import PAPER


def crops(images):
    """The centre 32x32 of 40x40 shots: what crop-to-power-of-two keeps (resize to 32 is then exact)."""
    return images[:, 4:36, 4:36].astype(np.float32)


def collect(ds):
    out = {}
    for batch in ds:
        items = batch.items() if isinstance(batch, dict) else zip(("image", "label"), batch)
        for k, v in items:
            out.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def test_crop_size():
    assert [config.crop_size(n) for n in (259, 1035, 256, 40, 7)] == [256, 1024, 256, 32, 4]


def test_tfrecord_eval_gives_cropped_counts_and_labels(tfrecord_dir, shots):
    cfg = make_cfg(f"--data_dir={tfrecord_dir}")
    got = collect(data.dataset(cfg, PAPER, "eval", one_pass=True))
    np.testing.assert_array_equal(got["image"][..., 0], crops(shots[0][16:]))
    np.testing.assert_array_equal(got["label"], shots[1][16:])


def test_tfrecord_predict_reads_bunch_ids_in_order(tfrecord_dir):
    cfg = make_cfg(f"--data_dir={tfrecord_dir}", "--mode=predict", "--load_dir=x")
    got = collect(data.dataset(cfg, PAPER, "predict"))
    assert got["bunch_id"].tolist() == list(range(1000, 1008))
    assert "label" not in got and got["image"].shape == (8, 32, 32, 1)


def test_cxidb_predict_uses_one_hot_argmax(tmp_path, shots):
    os.makedirs(tmp_path / "cxidb")
    one_hot = np.eye(11, dtype=np.int16)[[3, 0, 7]]
    tfrecord.write(str(tmp_path / "cxidb" / "a_predict.tfrecord"), shots[0][:3], one_hot)
    cfg = make_cfg(f"--data_dir={tmp_path}/", "--dataset=cxidb")
    got = collect(data.dataset(cfg, PAPER, "predict"))
    assert got["bunch_id"].tolist() == [3, 0, 7]
    np.testing.assert_array_equal(got["label"], one_hot)


def test_predict_shards_take_every_nth_record(tfrecord_dir):
    cfg = make_cfg(f"--data_dir={tfrecord_dir}")
    assert collect(data.dataset(cfg, PAPER, "predict", shard=(1, 3)))["bunch_id"].tolist() == [1001, 1004, 1007]


def test_cxi_per_shot_layout(cxi_dir, shots):
    cfg = make_cfg(f"--data_dir={cxi_dir}", "--dataset=shots")
    got = collect(data.dataset(cfg, PAPER, "eval", one_pass=True))
    np.testing.assert_array_equal(got["image"][..., 0], crops(shots[0][16:]))
    np.testing.assert_array_equal(got["label"], shots[1][16:])
    predicted = collect(data.dataset(cfg, PAPER, "predict"))
    assert predicted["bunch_id"].tolist() == list(range(516, 524))
    np.testing.assert_array_equal(predicted["label"], shots[1][16:])


def test_cxi_per_shot_reader_tolerates_layout_variants_and_names_a_bad_shot(tmp_path, shots):
    images, labels = shots[0][:4], shots[1][:4]
    path = str(tmp_path / "a.cxi")
    cxi.write_cxi_shots(path, images, labels, [70, 71, 72, 73])
    with h5py.File(path, "a") as h5:
        del h5["entry_2/experimental_identifier"]  # no ID: the shot's index stands in
        del h5["entry_3/instrument_1/detector_1/data"]
        h5["entry_3/instrument_1/detector_1/data"] = images[2][None]  # stored as 1 x H x W
    with cxi.open_cxi(path, make_cfg(), needs_labels=True) as reader:
        got_images, got_labels, ids = reader.read(0, 4)
    np.testing.assert_array_equal(got_images, images.astype(np.float32))
    np.testing.assert_array_equal(got_labels, labels)
    assert ids.tolist() == [70, 1, 72, 73]
    cxi.close_all()
    with h5py.File(path, "a") as h5:
        del h5["entry_4/instrument_1/detector_1/data"]
        h5["entry_4/instrument_1/detector_1/data"] = images[3][:30]
    with pytest.raises(OSError, match=r"a\.cxi: shots 0-3: .*entry_4/instrument_1/detector_1/data has 1200 values, "
                                      r"expected 1600"):
        cxi.open_cxi(path, make_cfg(), needs_labels=True).read(0, 4)


def test_cxi_per_shot_reads_every_storage_as_hdf5_does(tmp_path, shots, caplog):
    """Contiguous datasets are read by offset, the others by HDF5: the values must not depend on which."""
    images, labels = shots[0][:6], shots[1][:6]
    path = str(tmp_path / "a.cxi")
    cxi.write_cxi_shots(path, images, labels, [10, 11, 12, 13, 14, 15])
    floats = images[3].astype(">f4")  # big-endian floats, one NaN
    floats[5, 6] = np.nan
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other["image"] = images[4]
    with h5py.File(path, "a") as h5:
        for entry, value, options in (("entry_2", images[1], {"compression": "gzip", "chunks": (8, 8)}),
                                      ("entry_3", images[2].astype(np.int32), {"chunks": True}),
                                      ("entry_4", floats, {})):
            del h5[f"{entry}/instrument_1/detector_1/data"]
            h5.create_dataset(f"{entry}/instrument_1/detector_1/data", data=value, **options)
        del h5["entry_5/instrument_1/detector_1/data"]
        h5["entry_5/instrument_1/detector_1/data"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "image")
        del h5["entry_6/note_1/data"]
        h5.create_dataset("entry_6/note_1/data", data=labels[5].astype(np.float64), compression="gzip")
    reader = cxi.open_cxi(path, make_cfg(), needs_labels=True)
    offsets = [reader._place(f"entry_{n}/instrument_1/detector_1/data")[1] for n in range(1, 7)]
    assert [offset is not None for offset in offsets] == [True, False, False, True, False, True]
    expected = images.astype(np.float32)
    expected[3] = np.where(np.isnan(floats), 0, floats)
    for _ in range(2):  # the second pass reads from the offsets found in the first
        got_images, got_labels, ids = reader.read(0, 6)
        np.testing.assert_array_equal(got_images, expected)
        np.testing.assert_array_equal(got_labels, labels)
        assert ids.tolist() == [10, 11, 12, 13, 14, 15]
    assert "shot 3 (ID 13): 1 NaN/Inf pixels set to 0" in caplog.text
    with open(path, "r+b") as f:  # the file is cut while it is being read (HDF5 refuses to open a cut file)
        f.truncate(offsets[5] + 100)
    with pytest.raises(OSError, match=r"a\.cxi: shots 5-5: .*a\.cxi ends inside entry_6/instrument_1/detector_1/data"):
        reader.read(5, 6)


def test_single_stacked_file_is_split_deterministically(cxi_dir, shots):
    cfg = make_cfg(f"--data_dir={cxi_dir}", "--dataset=stacked")
    evaluated = collect(data.dataset(cfg, PAPER, "eval", one_pass=True))
    trained = collect(data.dataset(cfg, PAPER, "train", one_pass=True))
    predicted = collect(data.dataset(cfg, PAPER, "predict"))
    held_out = [9, 19]  # every 10th shot
    np.testing.assert_array_equal(evaluated["image"][..., 0], crops(shots[0][held_out]))
    kept = [i for i in range(24) if i not in held_out]
    np.testing.assert_array_equal(trained["image"][..., 0], crops(shots[0][kept]))
    assert predicted["bunch_id"].tolist() == list(range(900, 924))


def test_stacked_mask_bits_and_nan_pixels_become_zero(tmp_path, shots, caplog):
    images = shots[0][:4].astype(np.float32)
    images[2, 20, 21] = np.nan
    mask = np.zeros((SIZE, SIZE), np.uint32)
    mask[18, 18] = 0x8          # dead pixel: masked
    mask[19, 19] = 0x2          # a bit that does not mean invalid: kept
    os.makedirs(tmp_path / "d")
    cxi.write_cxi_stacked(str(tmp_path / "d" / "x_predict.cxi"), images, None, None, mask)
    cfg = make_cfg(f"--data_dir={tmp_path}/", "--dataset=d")
    with caplog.at_level(logging.WARNING, logger="airynet"):
        got = collect(data.dataset(cfg, PAPER, "predict"))
    assert got["bunch_id"].tolist() == [0, 1, 2, 3]  # no IDs stored: the index
    assert np.all(got["image"][:, 14, 14, 0] == 0) and got["image"][2, 16, 17, 0] == 0
    np.testing.assert_array_equal(got["image"][:, 15, 15, 0], images[:, 19, 19])
    assert np.isfinite(got["image"]).all()
    assert "shot 2" in caplog.text and "NaN/Inf" in caplog.text


def test_preprocessing_scaling_rgb_and_downsampling(tfrecord_dir, shots):
    cfg = make_cfg(f"--data_dir={tfrecord_dir}", "--use_log_act=false", "--target_depth=3",
                   "--target_width=16", "--target_height=16")
    got = collect(data.dataset(cfg, PAPER, "eval", one_pass=True))["image"]
    assert got.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(got[..., 0], got[..., 2])
    # A bilinear 2x reduction (half-pixel centres) is the mean of each 2x2 block.
    blocks = crops(shots[0][16:]).reshape(8, 16, 2, 16, 2).mean(axis=(2, 4)) / 65535.0
    np.testing.assert_allclose(got[..., 0], blocks, rtol=1e-5, atol=1e-7)


def exact_bilinear(images, height, width):
    """Half-pixel bilinear resize of [N, H, W, D] in float64, straight from the definition (edge pixels
    repeated where a sample falls outside, as TensorFlow does)."""
    for axis, size in ((1, height), (2, width)):
        n = images.shape[axis]
        position = (np.arange(size) + 0.5) * n / size - 0.5
        frac = (position - np.floor(position)).reshape([-1 if a == axis else 1 for a in range(4)])
        lower = np.clip(np.floor(position), 0, n - 1).astype(int)
        upper = np.clip(np.ceil(position), 0, n - 1).astype(int)
        images = np.take(images, lower, axis) * (1 - frac) + np.take(images, upper, axis) * frac
    return images


@pytest.mark.parametrize("shape, target", [((256, 256, 1), (224, 224)),  # the default: matrix products
                                           ((64, 64, 1), (48, 64)),  # one axis kept as it is
                                           ((1024, 1024, 1), (224, 224)),  # shrunk over 2x: tf.image
                                           ((32, 32, 1), (16, 20)), ((16, 24, 1), (40, 30)),  # enlarged
                                           ((40, 48, 3), (32, 40))])  # RGB
def test_resize_is_bilinear_with_half_pixel_centres(shape, target):
    raw = np.random.default_rng(3).integers(0, 65535, (2, *shape)).astype(np.uint16)
    got = preprocess.resize(tf.constant(raw), *target)
    assert got.dtype == tf.float32 and got.shape == (2, *target, shape[2])
    # The products use exact float64 weights; tf.image.resize computes its sample positions in float32,
    # which moves its values by up to about 1e-4 of the range on random pixels.
    np.testing.assert_allclose(got.numpy(), exact_bilinear(raw.astype(np.float64), *target), rtol=0, atol=7.0)
    np.testing.assert_allclose(got.numpy(), tf.image.resize(raw.astype(np.float32), target).numpy(), rtol=0, atol=7.0)


def test_the_default_resize_is_exact_to_float32_rounding():
    raw = np.random.default_rng(5).integers(0, 65535, (3, 256, 256, 1)).astype(np.uint16)
    expected = exact_bilinear(raw.astype(np.float64), 224, 224)
    np.testing.assert_allclose(preprocess.resize(tf.constant(raw), 224, 224).numpy(), expected, rtol=1e-6, atol=0.02)
    assert np.abs(tf.image.resize(raw.astype(np.float32), (224, 224)).numpy() - expected).max() > 0.5


@pytest.mark.parametrize("stored, target", [((37, 41), (16, 20)), ((259, 259), (224, 224)), ((20, 24), (40, 30))])
def test_preprocess_crops_the_centre_then_resizes(stored, target):
    cfg = make_cfg(f"--ori_height={stored[0]}", f"--ori_width={stored[1]}", f"--target_height={target[0]}",
                   f"--target_width={target[1]}", "--use_log_act=false")
    raw = np.random.default_rng(3).integers(0, 65535, (2, *stored, 1)).astype(np.uint16)
    crop = [config.crop_size(n) for n in stored]
    expected = exact_bilinear(tf.image.resize_with_crop_or_pad(raw, *crop).numpy().astype(np.float64), *target)
    np.testing.assert_allclose(preprocess.preprocess(raw, cfg, PAPER).numpy(), expected / 65535.0, rtol=0, atol=1e-4)


@pytest.mark.parametrize("depth", [1, 3])
def test_random_flips_flip_each_image_its_own_way(depth):
    images = np.random.default_rng(4).random((64, 6, 5, depth)).astype(np.float32)
    seed = tf.constant([7, 8], tf.int64)
    got = preprocess.random_flips(tf.constant(images), seed).numpy()
    np.testing.assert_array_equal(got, preprocess.random_flips(tf.constant(images), seed).numpy())
    kinds = []
    for image, out in zip(images, got):
        variants = [image, image[:, ::-1], image[::-1], image[::-1, ::-1]]
        kinds.append(next(k for k, v in enumerate(variants) if np.array_equal(out, v)))
    assert np.bincount(kinds, minlength=4).min() >= 8  # each of the four outcomes about 16 times in 64


def test_training_flips_images_and_is_deterministic(tfrecord_dir, shots):
    cfg = make_cfg(f"--data_dir={tfrecord_dir}")
    first = [b[0].numpy() for b in data.dataset(cfg, PAPER, "train").take(4)]
    again = [b[0].numpy() for b in data.dataset(cfg, PAPER, "train").take(4)]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    sources = crops(shots[0][:16])
    variants = {"none": sources, "lr": sources[:, :, ::-1], "ud": sources[:, ::-1], "both": sources[:, ::-1, ::-1]}
    seen = set()
    for image in np.concatenate(first)[..., 0]:
        match = [k for k, v in variants.items() if any(np.array_equal(image, s) for s in v)]
        assert match, "a training image is not a flip of any stored shot"
        seen.update(match)
    assert len(seen) >= 3


def test_synthetic_source_needs_no_files(tmp_path):
    cfg = make_cfg(f"--data_dir={tmp_path}/", "--dataset=synthetic", "--dataset_size=40")
    a = collect(data.dataset(cfg, PAPER, "predict"))
    b = collect(data.dataset(cfg, PAPER, "predict"))
    first, last = data.synthetic_range(cfg, "predict", PAPER.calibration_share)
    assert a["bunch_id"].tolist() == list(range(first, last)) and first == 40
    assert a["image"].shape == (last - first, 32, 32, 1) and a["label"].shape == (last - first, 11)
    np.testing.assert_array_equal(a["image"], b["image"])


# ---------------------------------------------------------------------------------------------- bad input

def error_of(cfg, mode="train", read=False):
    with pytest.raises(AiryNetError) as e:
        ds = data.dataset(cfg, PAPER, mode)
        if read:
            try:
                for _ in ds.take(100):
                    pass
            except tf.errors.OpError as err:
                raise data.describe_failure(cfg, mode, err)
    return str(e.value)


def test_missing_directory(tmp_path):
    assert "does not exist" in error_of(make_cfg(f"--data_dir={tmp_path}/", "--dataset=nope"))


def test_directory_without_matching_files(tmp_path):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("x")
    message = error_of(make_cfg(f"--data_dir={tmp_path}/", "--dataset=empty"))
    assert "*train.tfrecord" in message and "empty/" in message


def test_zero_byte_tfrecord(tmp_path):
    os.makedirs(tmp_path / "z")
    (tmp_path / "z" / "a_train.tfrecord").write_bytes(b"")
    message = error_of(make_cfg(f"--data_dir={tmp_path}/", "--dataset=z"))
    assert "a_train.tfrecord" in message and "0 bytes" in message


def test_truncated_tfrecord_names_file_and_record(tmp_path, shots):
    os.makedirs(tmp_path / "t")
    path = tmp_path / "t" / "a_train.tfrecord"
    tfrecord.write(str(path), shots[0][:6], shots[1][:6])
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 700])  # cuts into the last record
    message = error_of(make_cfg(f"--data_dir={tmp_path}/", "--dataset=t"), read=True)
    assert "a_train.tfrecord: record 5: truncated" in message


def test_label_vector_of_wrong_length(tfrecord_dir):
    message = error_of(make_cfg(f"--data_dir={tfrecord_dir}", "--num_classes=10"))
    assert "shots_train.tfrecord: record 0: label has 22 bytes" in message and "--num_classes" in message


def test_image_of_wrong_size(tfrecord_dir):
    message = error_of(make_cfg(f"--data_dir={tfrecord_dir}", "--ori_width=50", "--ori_height=50"))
    assert "record 0: image has 3200 bytes" in message and "--ori_height" in message


def test_cxi_without_labels_cannot_train(tmp_path, shots):
    os.makedirs(tmp_path / "u")
    cxi.write_cxi_stacked(str(tmp_path / "u" / "x_train.cxi"), shots[0][:4])
    message = error_of(make_cfg(f"--data_dir={tmp_path}/", "--dataset=u"))
    assert "x_train.cxi: no labels" in message


def test_cxi_of_wrong_image_size(cxi_dir):
    message = error_of(make_cfg(f"--data_dir={cxi_dir}", "--dataset=shots", "--ori_width=64", "--ori_height=64"))
    assert "run_train.cxi: images are 40x40" in message


def test_hdf5_file_that_is_not_cxi(tmp_path):
    os.makedirs(tmp_path / "h")
    with h5py.File(tmp_path / "h" / "x_train.h5", "w") as f:
        f["something"] = np.zeros(3)
    assert "x_train.h5: no shots found" in error_of(make_cfg(f"--data_dir={tmp_path}/", "--dataset=h"))


def test_cxi_depth_is_checked_before_any_reading(cxi_dir):
    """CXI images are gray: --ori_depth=3 is refused when the sources are checked, naming the file."""
    message = error_of(make_cfg(f"--data_dir={cxi_dir}", "--dataset=stacked", "--ori_depth=3"))
    assert "all.cxi: CXI images are gray" in message and "--ori_depth=3" in message


def test_cxi_files_are_opened_once_and_closed_at_the_end(cxi_dir):
    cfg = make_cfg(f"--data_dir={cxi_dir}", "--dataset=stacked")
    data.dataset(cfg, PAPER, "train")
    data.dataset(cfg, PAPER, "eval")  # the same unsplit file: the same reader
    first = cxi.open_cxi(os.path.join(cxi_dir, "stacked", "all.cxi"), cfg, needs_labels=True)
    assert first is cxi.open_cxi(os.path.join(cxi_dir, "stacked", "all.cxi"), cfg, needs_labels=False)
    shots = cxi.open_cxi(os.path.join(cxi_dir, "shots", "run_eval.cxi"), cfg, needs_labels=True)
    assert first.h5.id.valid and not shots.raw.closed
    cxi.close_all()
    assert not first.h5.id.valid and not shots.h5.id.valid and shots.raw.closed
    assert cxi.open_cxi(os.path.join(cxi_dir, "stacked", "all.cxi"), cfg, needs_labels=True) is not first
    cxi.close_all()


def test_a_failed_cxi_read_reports_the_readers_own_error(tmp_path, shots):
    """The error the user sees is the one the reader raised (file, shots, cause), not a parse of
    TensorFlow's wrapping of it."""
    os.makedirs(tmp_path / "cut")
    path = str(tmp_path / "cut" / "a_eval.cxi")
    images = shots[0][:6]
    cxi.write_cxi_shots(path, images, shots[1][:6], np.arange(6))
    with h5py.File(path, "a") as h5:  # shot 4's image is short: found only when that shot is read
        del h5["entry_4/instrument_1/detector_1/data"]
        h5["entry_4/instrument_1/detector_1/data"] = images[3][:30]
    cfg = make_cfg(f"--data_dir={tmp_path}/", "--dataset=cut")
    with pytest.raises(OSError) as direct:
        cxi.open_cxi(path, cfg, needs_labels=True).read(0, 6)
    cxi.take_failure()
    ds = data.dataset(cfg, PAPER, "eval", one_pass=True)
    with pytest.raises(data.READ_ERRORS) as wrapped:
        collect(ds)
    reported = data.describe_failure(cfg, "eval", wrapped.value)
    assert str(reported) == str(direct.value) and "a_eval.cxi: shots 0-5:" in str(reported)
    assert cxi.take_failure() is None  # taken once, forgotten
    cxi.close_all()
