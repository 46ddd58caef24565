"""EuXFEL detectors (nn/inputs/detectors.py) and run directories (nn/inputs/euxfel.py), on mock runs written with
EXtra-data's own test writer; no model involved."""
import os

import extra_geom
import h5py
import numpy as np
import pytest
from extra_data.tests.mockdata import write_file
from extra_data.tests.mockdata.base import DeviceBase

from conftest import make_cfg
from nn.inputs import data, detectors, euxfel, simulate
from nn.config import AiryNetError
from nn.recipe import PAPER

PNCCD = "SQS_NQS_PNCCD1MP/CAL/PNCCD_FMT-0"
AGIPD = "SPB_DET_AGIPD1M-1/CAL/APPEND_CORRECTED"


def write_pnccd_run(directory, images, first_train=10000):
    """A CORR run with one pnCCD-like source (key data.image, one frame per train) holding `images`."""

    class PnCCD(DeviceBase):
        output_channels = ("output/data",)
        instrument_keys = [("image", "f4", images.shape[1:])]

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "CORR-R0042-PNCCD01-S00000.h5")
    write_file(path, [PnCCD(PNCCD)], ntrains=len(images), firsttrain=first_train, chunksize=len(images))
    with h5py.File(path, "r+") as f:  # the writer leaves zeros: put the shots in
        f[f"INSTRUMENT/{PNCCD}:output/data/image"][:len(images)] = images
    return directory


def test_pick_source_prefers_the_named_then_the_first_image_key():
    train = {"A_XGM:output": {"data.intensity": 1}, "B:output": {"image.data": 2}, "C:output": {"data.image": 3}}
    assert detectors.pick_source(train) == ("B:output", "image.data")
    assert detectors.pick_source(train, source="C:output") == ("C:output", "data.image")
    assert detectors.pick_source(train, key="data.intensity") == ("A_XGM:output", "data.intensity")
    assert detectors.pick_source(train, "B:output", "data.image") is None


SMALL = {"pulses": None, "modules": 2, "ss": 3, "fs": 4, "rows": 6}  # a detector of two 3x4 modules


class Tiled:
    """A stand-in for an EXtra-geom geometry: the modules one below the other, no gaps."""

    def position_modules(self, data, out=None):
        tiled = data.reshape(len(data), -1, data.shape[-1])
        if out is None:
            return tiled.copy(), None
        out[...] = tiled
        return out, None


def test_layout_shape_tests():
    plain = detectors.axis_sizes()
    assert detectors.FILE.fits((5, 2, 3, 4), SMALL) and detectors.ONLINE.fits((2, 4, 3, 5), SMALL)
    assert not detectors.FILE.fits((5, 3, 3, 4), SMALL) and not detectors.ONLINE.fits((2, 3, 4, 5), SMALL)
    assert detectors.MODULES.fits((2, 3, 4), SMALL) and detectors.WHOLE.fits((6, 4), SMALL)
    assert not detectors.WHOLE.fits((6, 5), SMALL) and not detectors.MODULES.fits((3, 3, 4), SMALL)
    any_count = {**SMALL, "modules": None}  # JUNGFRAU: any number of modules, so no one image of them all
    del any_count["rows"]
    assert detectors.FILE.fits((5, 7, 3, 4), any_count) and not detectors.WHOLE.fits((6, 4), any_count)
    jungfrau = detectors.axis_sizes(extra_geom.JUNGFRAUGeometry)
    agipd = detectors.axis_sizes(extra_geom.AGIPD_1MGeometry)
    assert jungfrau["modules"] is None and "rows" not in jungfrau
    assert (agipd["modules"], agipd["rows"], agipd["ss"], agipd["fs"]) == (16, 16 * 512, 512, 128)
    assert detectors.FRAME.fits((7, 9), plain) and detectors.STACK.fits((2, 7, 9), plain)
    assert not any(layout.fits((2, 3, 4), plain) for layout in (detectors.MODULES, detectors.FRAME))
    assert not detectors.FRAME.fits((7, 9), SMALL)  # SMALL names no image taken as stored
    assert not detectors.STACK.fits((2, 7, 9, 1), plain)


def test_layout_counts_frames_and_fixed_shape():
    stack = np.zeros((5, 7, 9))
    assert detectors.STACK.count(stack) == 5 and detectors.STACK.without_pulses(stack.shape) == (7, 9)
    assert detectors.ONLINE.count(np.zeros((2, 4, 3, 6))) == 6
    assert detectors.ONLINE.without_pulses((2, 4, 3, 6)) == (2, 4, 3)
    assert detectors.FRAME.count(np.zeros((7, 9))) == 1 and detectors.MODULES.count(np.zeros((2, 3, 4))) == 1
    assert detectors.FILE.has_pulses and not detectors.WHOLE.has_pulses
    assert detectors.FILE.modular and detectors.WHOLE.modular and not detectors.STACK.modular


def test_layout_arrays_to_frames():
    file_order = np.arange(3 * 2 * 3 * 4, dtype=np.uint16).reshape(3, 2, 3, 4)  # (pulses, modules, ss, fs)
    expected = file_order.reshape(3, 6, 4).astype(np.float32)
    online = file_order.transpose(1, 3, 2, 0)                                    # (modules, fs, ss, pulses)
    np.testing.assert_array_equal(detectors.FILE.frames(file_order, geometry=Tiled()), expected)
    np.testing.assert_array_equal(detectors.ONLINE.frames(online, geometry=Tiled()), expected)
    np.testing.assert_array_equal(detectors.MODULES.frames(file_order[1], geometry=Tiled()), expected[1:2])
    out = np.full((3, 6, 4), -1, np.float32)
    assert detectors.ONLINE.frames(online, out, Tiled()) is out
    np.testing.assert_array_equal(out, expected)
    frame = np.array([[1, np.nan], [3, 4]], np.float32)
    frames = detectors.FRAME.frames(frame)
    assert frames.dtype == np.float32 and frames.shape == (1, 2, 2)
    np.testing.assert_array_equal(frames[0], [[1, 0], [3, 4]])
    assert np.isnan(frame[0, 1])  # the caller's array is left as it was
    stack = np.arange(12).reshape(3, 2, 2)
    np.testing.assert_array_equal(detectors.STACK.frames(stack), stack.astype(np.float32))


def test_agipd_online_and_file_order_assemble_alike():
    rng = np.random.default_rng(0)
    file_order = rng.random((3, 16, 512, 128), np.float32)  # (pulses, modules, ss, fs)
    online = file_order.transpose(1, 3, 2, 0)                 # (modules, fs, ss, pulses)
    a, b = detectors.Detector(AGIPD, "image.data", file_order), detectors.Detector(AGIPD, "image.data", online)
    assert (a.layout, b.layout) == (detectors.FILE, detectors.ONLINE)
    frames = a.frames(file_order)
    assert frames.shape[0] == 3 and frames.shape[1] > 1024 and frames.shape[2] > 1024
    np.testing.assert_array_equal(frames, b.frames(online))
    assert np.isfinite(frames).all() and frames.sum() == pytest.approx(file_order.sum(), rel=1e-4)
    assert b.count(online[..., :2]) == 2 and b.problem(online[..., :2]) is None
    assert "shape (16, 128, 500, 3)" in b.problem(online[:, :, :500])


def test_gaps_and_masked_pixels_become_zero():
    """Assembled into zeros, NaN pixels set to 0: what EXtra-geom's NaN-filled image cleaned after gives."""
    rng = np.random.default_rng(1)
    frame = rng.random((1024, 1024), np.float32)
    frame[[3, 700], [5, 900]] = np.nan
    full = detectors.Detector(PNCCD + ":output", "data.image", frame)
    expected = np.nan_to_num(full.geometry.position_modules(frame[None])[0], nan=0.0)
    assembled = full.frames(frame)
    np.testing.assert_array_equal(assembled, expected)
    assert np.isfinite(assembled).all() and (assembled == 0).sum() == 2 + 54 * 1024  # two pixels, the gap
    small = detectors.Detector(PNCCD + ":output", "data.image", frame[:64, :64])
    np.testing.assert_array_equal(small.frames(frame[:64, :64])[0], np.nan_to_num(frame[:64, :64], nan=0.0))


def test_frames_into_a_reused_buffer_equal_fresh_frames():
    """The live classifier assembles every batch into one buffer: the same frames as a fresh image, the
    gap left 0 from before, masked pixels cleaned in place, the bridge's read-only array untouched."""
    rng = np.random.default_rng(2)
    first, second = rng.random((2, 1024, 1024), np.float32)
    second[[10, 600], [20, 800]] = np.nan
    second.flags.writeable = False
    pnccd = detectors.Detector(PNCCD + ":output", "data.image", first)
    buffer = np.zeros((3, *pnccd.frame_shape), np.float32)
    pnccd.frames(first, out=buffer[0:1])
    into = pnccd.frames(second, out=buffer[0:1])
    assert np.shares_memory(into, buffer)
    np.testing.assert_array_equal(buffer[0], pnccd.frames(second)[0])
    assert np.isnan(second).sum() == 2 and (buffer[0] == 0).sum() == 2 + 54 * 1024
    stack = rng.random((2, 64, 64), np.float32)
    stack[1, 5, 5] = np.nan
    plain = detectors.Detector("CAM:output", "data.image", stack)
    np.testing.assert_array_equal(plain.frames(stack, out=buffer[1:3, :64, :64]), plain.frames(stack))
    assert buffer[2, 5, 5] == 0 and np.isnan(stack[1, 5, 5])


def test_pnccd_full_frame_is_assembled_small_frames_taken_as_stored():
    full = detectors.Detector(PNCCD + ":output", "data.image", np.ones((1024, 1024), np.float32))
    assert type(full.geometry).__name__ == "PNCCDGeometry" and full.frame_shape[1] == 1024
    assert full.frame_shape[0] > 1024  # the gap between the two halves
    small = detectors.Detector(PNCCD + ":output", "data.image", np.ones((64, 64), np.uint16))
    assert small.geometry is None and small.frame_shape == (64, 64)
    assert small.problem(np.ones((64, 64), np.complex64)) == "dtype complex64"
    with pytest.raises(AiryNetError, match="neither frames"):
        detectors.Detector("X/Y:out", "data.image", np.ones((2, 3, 4, 5, 6)))


def test_run_directory_records_and_hook(tmp_path):
    images, _ = simulate.simulate(5, seed=2, size=48)
    root = tmp_path / "runs"
    write_pnccd_run(str(root / "r0042"), images.astype(np.float32))
    cfg = make_cfg(f"--data_dir={root}/", "--dataset=r0042", "--target_height=32", "--target_width=32")
    assert euxfel.is_run_directory(data.dataset_dir(cfg)) and not euxfel.is_run_directory(str(tmp_path))
    shots = list(euxfel.records(cfg, data.dataset_dir(cfg)).as_numpy_iterator())
    assert (cfg.ori_height, cfg.ori_width) == (48, 48)
    assert [s["bunch_id"] for s in shots] == list(range(10000, 10005)) and all(s["pulse"] == 0 for s in shots)
    np.testing.assert_array_equal(np.stack([s["image"][..., 0] for s in shots]), images)
    batches = list(data.dataset(cfg, PAPER, "predict"))
    assert batches[0]["image"].shape == (4, 32, 32, 1) and list(batches[1]["pulse"].numpy()) == [0]
    with pytest.raises(AiryNetError, match="carries no labels"):
        data.dataset(cfg, PAPER, "train")
    with pytest.raises(AiryNetError, match="no source with an image key"):
        euxfel.open_run(make_cfg("--bridge_key=image.nothing"), data.dataset_dir(cfg))
