"""--mask (nn/inputs/masks.py): reading npy and HDF5 masks of either polarity, the one-line errors, masked
pixels at MASKED_VALUE in the batches of train, eval, predict and live, the data's own CXI mask, the record
in the outputs; the simulator's fixed detectors (nn/inputs/simulate.py) and their mask."""
import json
import logging
import os
import types

import h5py
import numpy as np
import pytest
import tensorflow as tf

import airynet
from conftest import SIZE, make_cfg
from nn.inputs import cxi, data, masks, simulate, tfrecord
from nn.inputs.preprocess import preprocess
from nn.outputs import provenance
from nn.recipe import PAPER, resolve
from nn.config import AiryNetError

# 32 px frames, no resize: the network's input is the frame itself (raw counts), pixel for pixel.
SAME = ["--ori_width=32", "--ori_height=32", "--target_width=32", "--target_height=32"]


def flip_symmetric_mask(size, rng):
    """Bad pixels [size, size] closed under left-right and up-down flips, so that training's random flips
    keep them where they are."""
    quarter = rng.random((size // 2, size // 2)) < 0.15
    half = np.concatenate([quarter, quarter[:, ::-1]], axis=1)
    return np.concatenate([half, half[::-1]], axis=0)


@pytest.fixture(scope="module")
def shots32():
    images, labels = simulate.simulate(12, seed=3, size=32)
    return images + np.uint16(7), labels  # no pixel reads 0 already: a masked one must have been set


def test_npy_and_h5_masks_of_both_polarities(tmp_path):
    bad = np.zeros((5, 7), bool)
    bad[1, 2] = bad[4, 6] = True
    np.save(tmp_path / "bad.npy", bad.astype(np.uint8) * 3)
    np.save(tmp_path / "good.npy", (~bad).astype(np.int32))
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["entry/bad"] = bad.astype(np.uint16)
        f["good"] = (~bad).astype(np.float32)[..., None]  # a trailing axis of one is accepted
    for spec, good in ((tmp_path / "bad.npy", False), (tmp_path / "good.npy", True),
                       (f"{tmp_path}/m.h5:/entry/bad", False), (f"{tmp_path}/m.h5:good", True)):
        loaded = masks.load(str(spec), good, (5, 7))
        np.testing.assert_array_equal(loaded, bad)
        assert not loaded.flags.writeable  # cached: nobody may change it for the next caller
    assert masks.load("", False, (5, 7)) is None
    np.testing.assert_array_equal(masks.load(str(tmp_path / "good.npy"), False, (5, 7)), ~bad)  # polarity matters
    assert masks.record(f"{tmp_path}/m.h5:/entry/bad", True) == {"mask": f"{tmp_path}/m.h5:/entry/bad",
                                                                   "mask_polarity": "nonzero = good"}


@pytest.mark.parametrize("content,spec,expected", [
    ("small", "m.npy", "the mask is 5x7, the frames are 32x32"),
    (None, "none.npy", "none.npy does not exist"),
    ("small", "m.h5:/nothing", "has no dataset /nothing"),
    ("cube", "c.npy", "expected a 2-D array of numbers"),
    ("text", "t.txt", "expected FILE.npy or FILE.h5:/path"),
])
def test_bad_masks_are_one_line_errors_naming_the_flag(tmp_path, capsys, content, spec, expected):
    np.save(tmp_path / "m.npy", np.zeros((5, 7)))
    np.save(tmp_path / "c.npy", np.zeros((2, 32, 32)))
    (tmp_path / "t.txt").write_text("0 1")
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["x"] = np.zeros((5, 7))
    with pytest.raises(AiryNetError) as e:
        masks.load(f"{tmp_path}/{spec}", False, (32, 32))
    assert str(e.value).startswith(f"--mask={tmp_path}/{spec}: ") and expected in str(e.value)


def test_wrong_size_through_the_command_line(tmp_path, tfrecord_dir, capsys):
    np.save(tmp_path / "m.npy", np.zeros((30, 41), np.uint8))
    code = airynet.main([f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}/logs", f"--mask={tmp_path}/m.npy",
                         "--train_steps=1", f"--ori_width={SIZE}", f"--ori_height={SIZE}", "--target_width=32",
                         "--target_height=32", "--batch_size=4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"the mask is 30x41, the frames are {SIZE}x{SIZE}" in err


def _batches(cfg, mode, n=2, one_pass=None):
    ds = data.dataset(cfg, PAPER, mode, one_pass=one_pass)
    return [b["image"] if mode == "predict" else b[0] for b in ds.take(n)]


def test_masked_pixels_read_the_fixed_value_in_train_eval_and_predict_batches(tmp_path, shots32):
    images, labels = shots32
    os.makedirs(tmp_path / "d")
    for mode in ("train", "eval"):
        tfrecord.write(str(tmp_path / "d" / f"s_{mode}.tfrecord"), images, labels)
    tfrecord.write(str(tmp_path / "d" / "s_predict.tfrecord"), images, np.arange(12, dtype=np.int32))
    bad = flip_symmetric_mask(32, np.random.default_rng(0))
    np.save(tmp_path / "m.npy", bad)
    flags = [f"--data_dir={tmp_path}/", "--dataset=d", *SAME, "--batch_size=4", "--num_worker=1"]
    for mode in ("train", "eval", "predict"):
        plain = _batches(make_cfg(*flags), mode)
        masked = _batches(make_cfg(*flags, f"--mask={tmp_path}/m.npy"), mode)
        for p, m in zip(plain, masked):
            p, m = p.numpy()[..., 0], m.numpy()[..., 0]
            assert (p[:, bad] > 0).all()
            np.testing.assert_array_equal(m[:, bad], masks.MASKED_VALUE)
            np.testing.assert_array_equal(m[:, ~bad], p[:, ~bad])
    # Independently: predict keeps the order, and 32 -> 32 px is no resize: the frames with numpy's zeros.
    np.testing.assert_array_equal(np.concatenate([m.numpy()[..., 0] for m in masked]), np.where(bad, 0, images[:8]))


def test_the_mask_comes_before_the_crop_and_resize(shots32):
    images, _ = shots32
    big = np.pad(images, ((0, 0), (4, 4), (4, 4)), mode="edge")   # 40 px frames, cropped to 32, resized to 16
    bad = np.zeros((40, 40), bool)
    bad[10:14, 3:30] = True
    cfg = make_cfg("--target_width=16", "--target_height=16")
    with_mask = preprocess(big[..., None], cfg, PAPER, mask=bad).numpy()
    by_hand = preprocess(np.where(bad, 0, big)[..., None].astype(np.float32), cfg, PAPER).numpy()
    np.testing.assert_allclose(with_mask, by_hand, rtol=1e-6)
    assert not np.allclose(with_mask, preprocess(big[..., None], cfg, PAPER).numpy())


def test_area_downsampling_leaves_masked_pixels_out(shots32):
    images, _ = shots32
    bad = np.zeros((32, 32), bool)
    bad[:, 9] = True               # a gap inside areas: left out
    bad[16:20, 16:20] = True       # one whole area: MASKED_VALUE
    bad[0, 0] = True
    cfg = make_cfg(*SAME[:2], "--target_width=8", "--target_height=8", "--recipe=modern")
    got = preprocess(images[..., None], cfg, resolve(cfg), mask=bad).numpy()[..., 0]
    blocks = images.astype(np.float64).reshape(-1, 8, 4, 8, 4).transpose(0, 1, 3, 2, 4)
    good = ~bad.reshape(8, 4, 8, 4).transpose(0, 2, 1, 3)
    sums, counts = (blocks * good).sum(axis=(3, 4)), good.sum(axis=(2, 3))
    expected = np.where(counts > 0, sums / np.maximum(counts, 1), masks.MASKED_VALUE)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert (got[:, 4, 4] == masks.MASKED_VALUE).all() and (got[:, :, 2] > 0).all()


def test_live_classifier_masks_its_frames_the_same_way(shots32):
    from nn.beamline.classifier import Classifier
    from nn.inputs import detectors
    from nn.models import networks
    images, _ = shots32
    bad = flip_symmetric_mask(32, np.random.default_rng(1))
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"live_mask_{os.getpid()}.npy")
    np.save(path, bad)
    try:
        cfg = make_cfg(*SAME, "--batch_size=4", f"--mask={path}", "--resnet_size=18")
        model = networks.build_model(cfg)
        detector = detectors.Detector("SQS_NQS_PNCCD1MP/CAL/PNCCD_FMT-0:output", "data.image",
                                      images[0].astype(np.float32))
        classifier = Classifier(cfg, PAPER, model, detector, "REQ")
        fed = classifier.prepare([types.SimpleNamespace(array=images[i].astype(np.float32)) for i in range(3)])
    finally:
        os.remove(path)
    expected = preprocess(tf.constant(np.where(bad, 0, images[:3])[..., None], tf.float32), make_cfg(*SAME), PAPER)
    np.testing.assert_array_equal(fed, expected.numpy())
    np.testing.assert_array_equal(fed[:, bad, 0], masks.MASKED_VALUE)


def test_cxi_files_own_mask_applies_its_bit_flags_and_says_so_once(tmp_path, shots32, caplog):
    images, labels = shots32
    flags = np.zeros((32, 32), np.uint32)
    flags[0, :4] = [0x1, 0x8, 0x80, 0x200]      # invalid, dead, bad, missing: masked
    flags[1, :3] = [0x2, 0x4, 0x1000]           # other CXI bits (e.g. saturated): read as recorded
    os.makedirs(tmp_path / "c")
    cxi.write_cxi_stacked(str(tmp_path / "c" / "run_eval.cxi"), images, labels, np.arange(12), mask=flags)
    cfg = make_cfg(f"--data_dir={tmp_path}/", "--dataset=c", *SAME, "--batch_size=12", "--num_worker=1")
    with caplog.at_level(logging.INFO, logger="airynet"):
        batch = _batches(cfg, "eval", 1, one_pass=True)[0].numpy()[..., 0]
        _batches(cfg, "eval", 1, one_pass=True)
    cxi.close_all()
    np.testing.assert_array_equal(batch[:, 0, :4], masks.MASKED_VALUE)
    np.testing.assert_array_equal(batch[:, 1, :3], images[:, 1, :3])
    np.testing.assert_array_equal(batch[:, 2:], images[:, 2:])
    said = [r.getMessage() for r in caplog.records if "applying the file's own mask" in r.getMessage()]
    assert len(said) == 1 and "run_eval.cxi" in said[0] and "0x289" in said[0]


def test_the_mask_is_recorded_in_eval_metrics_and_prediction_attributes(tmp_path, tfrecord_dir, caplog):
    np.save(tmp_path / "m.npy", np.eye(SIZE, dtype=np.uint8))
    small = [f"--data_dir={tfrecord_dir}", "--dataset=helium", f"--ori_width={SIZE}", f"--ori_height={SIZE}",
             "--target_width=32", "--target_height=32", "--batch_size=4", "--resnet_size=18"]
    assert airynet.main(["--mode=train", f"--log_dir={tmp_path}", "--out_dir_name=r", "--train_steps=1",
                         "--steps_per_eval=1", "--eval_steps=1", f"--mask={tmp_path}/m.npy", *small]) == 0
    run = str(tmp_path / "helium_r")
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["mask"] == f"{tmp_path}/m.npy"
    with caplog.at_level(logging.WARNING, logger="airynet"):
        assert airynet.main(["--mode=eval", f"--load_dir={run}"]) == 0   # not inherited: no mask now
    assert f"trained with --mask={tmp_path}/m.npy; this eval reads its data with no mask" in caplog.text
    with open(os.path.join(run, "eval", "metrics.json")) as f:
        assert "mask" not in json.load(f)
    np.save(tmp_path / "g.npy", np.ones((SIZE, SIZE)))
    assert airynet.main(["--mode=eval", f"--load_dir={run}", f"--mask={tmp_path}/g.npy", "--mask_good=true"]) == 0
    with open(os.path.join(run, "eval", "metrics.json")) as f:
        recorded = json.load(f)
    assert recorded["mask"] == f"{tmp_path}/g.npy" and recorded["mask_polarity"] == "nonzero = good"
    assert airynet.main(["--mode=predict", f"--load_dir={run}", f"--predict_dir={tmp_path}/p", "--gradcam=false",
                         f"--mask={tmp_path}/m.npy"]) == 0
    with h5py.File(tmp_path / "p" / "helium.h5", "r") as f:
        assert f.attrs["mask"] == f"{tmp_path}/m.npy" and f.attrs["mask_polarity"] == "nonzero = bad"
        images = f["images"][:]
    diagonal = np.arange(32)   # the mask's diagonal, cropped from 40 to 32 px: the diagonal of what was fed
    assert (images[:, diagonal, diagonal] == 0).all() and (images[:, diagonal[1:], diagonal[:-1]] > 0).any()
    assert "mask" not in provenance.attributes(make_cfg(), "tfrecord")


def test_fixed_detector_is_the_same_in_every_shot_and_its_mask_says_where():
    fixed = simulate.fixed_detector(5, 128, simulate.SHIFTED)   # many bad pixels
    images, _ = simulate.simulate(6, seed=5, size=128, fixed=fixed)
    bad = fixed.mask().astype(bool)
    assert (images[:, ~fixed.live] == 0).all()          # beam stop, holder, gaps, dead pixels
    hot = np.zeros(128 * 128, bool)
    hot[fixed.hot] = True
    hot = hot.reshape(128, 128) & fixed.live
    assert hot.any() and (images[:, hot] > 0).all()      # the same hot pixels in every shot
    assert bad.sum() == (~fixed.live | hot).sum()
    per_shot, _ = simulate.simulate(6, seed=5, size=128)  # a detector per shot: few pixels dark in all six
    assert (per_shot == 0).all(axis=0).sum() < (~fixed.live).sum() / 2
    again, _ = simulate.simulate(6, seed=5, size=128, fixed=simulate.fixed_detector(5, 128, simulate.SHIFTED))
    np.testing.assert_array_equal(images, again)
    other = simulate.fixed_detector(6, 128, simulate.SHIFTED)
    assert (other.mask() != fixed.mask()).any()


def test_euxfel_corr_runs_own_mask_is_applied_and_said_once(tmp_path, caplog):
    from test_modular import KINDS, extra_geom_frames, our_shots, write_xtdf_run
    run = write_xtdf_run(str(tmp_path / "r0042"), "AGIPD", trains=1, pulses=2)
    with h5py.File(os.path.join(run, "CORR-R0042-AGIPD03-S00000.h5"), "r+") as f:
        f["INSTRUMENT/SPB_DET_AGIPD1M-1/CORR/3CH0:output/image/mask"][:, 10:20, 5:50] = 4
    plain = extra_geom_frames(run, "AGIPD")[0]   # image.data alone: the mask left out
    with caplog.at_level(logging.INFO, logger="airynet"):
        ours = our_shots(run)[0]
    marked = np.zeros((16, 512, 128))
    marked[3, 10:20, 5:50] = 1
    where = KINDS["AGIPD"][4].position_modules(marked)[0] == 1   # the masked pixels, assembled by EXtra-geom
    assert where.sum() == 10 * 45 and (plain[:, where] != 0).all()
    np.testing.assert_array_equal(ours, np.where(where, masks.MASKED_VALUE, plain))
    said = [r.getMessage() for r in caplog.records if "applying the run's own mask" in r.getMessage()]
    assert len(said) == 1 and "image.mask" in said[0]


def test_saved_model_keeps_the_mask(tmp_path):
    from nn import export
    from nn.models import networks
    bad = np.zeros((SIZE, SIZE), bool)
    bad[5:9, :] = bad[:, 30] = True
    np.save(tmp_path / "m.npy", bad)
    cfg = make_cfg(f"--save_dir={tmp_path / 'model'}", "--use_nchw=false", f"--mask={tmp_path}/m.npy")
    model = networks.build_model(cfg)
    export.save(cfg, PAPER, model)
    serve = tf.saved_model.load(str(tmp_path / "model")).signatures["serving_default"]
    raw = np.random.default_rng(0).gamma(0.3, 300.0, (3, SIZE, SIZE, 1)).astype(np.float32) + 1
    zeroed = np.where(bad[None, :, :, None], 0, raw)   # by numpy, preprocessed without a mask
    expected = tf.sigmoid(model(preprocess(zeroed, make_cfg(), PAPER), training=False)).numpy()
    np.testing.assert_allclose(serve(images=tf.constant(raw))["probabilities"].numpy(), expected, atol=1e-5)
    unmasked = tf.sigmoid(model(preprocess(raw, make_cfg(), PAPER), training=False)).numpy()
    assert np.abs(unmasked - expected).max() > 1e-4
