"""nn/outputs/writers.py: the txt line, the stacked file (SWMR, every --h5_compression filter, chunks of
one image) and plain-HDF5 output with gzip."""
import subprocess
import sys

import h5py
import numpy as np
import pytest

from nn.outputs import h5out, writers


def test_txt_line_is_the_originals():
    line = writers.format_txt_line(np.int64(1007), np.array([0, 1, 0], np.uint8), np.array([0.01234, 0.98712, 2e-4]))
    assert line == "1007\t0, 1, 0\t0.0123, 0.9871, 0.0002\n"


def test_swmr_reader_sees_the_rows_after_a_flush(tmp_path):
    path = str(tmp_path / "live.h5")
    fields = {"bids": ("int64", (), {}), "probs": ("float32", (2,), {})}
    w = writers.StackedWriter(path, fields, ["a", "b"], {}, "zstd", swmr=True)
    with h5py.File(w.tmp, "r", swmr=True) as f:
        for first in (0, 3):
            w.write({"bids": first + np.arange(3), "probs": np.zeros((3, 2), np.float32)})
            w.flush()
            f["bids"].refresh()
            np.testing.assert_array_equal(f["bids"][:], np.arange(first + 3))
    w.close()


@pytest.mark.parametrize("compression", h5out.COMPRESSIONS)
def test_stacked_file_round_trips_with_one_shot_per_image_chunk(tmp_path, compression):
    rng = np.random.default_rng(0)
    images = (rng.gamma(0.5, 40.0, (7, 64, 64, 1)) * 8 / 7).astype(np.float32)
    fields = {"bids": ("int64", (), {}), "images": ("float32", (64, 64, 1), {})}
    writer = writers.StackedWriter(str(tmp_path / "p.h5"), fields, ["a"], {}, compression)
    writer.write({"bids": np.arange(4), "images": images[:4]})
    writer.write({"bids": np.arange(4, 7), "images": images[4:]})
    writer.close()
    with h5py.File(tmp_path / "p.h5.partial", "r") as f:
        assert f.attrs["h5_compression"] == compression
        assert f["images"].chunks == (1, 64, 64, 1) and f["bids"].chunks[0] > 7
        np.testing.assert_array_equal(f["images"][:], images)  # lossless
        np.testing.assert_array_equal(f["bids"][:], np.arange(7))


def test_gzip_files_need_no_plugin(tmp_path):
    fields = {"bids": ("int64", (), {}), "images": ("float32", (8, 8, 1), {})}
    writer = writers.StackedWriter(str(tmp_path / "p.h5"), fields, ["a"], {}, "gzip")
    writer.write({"bids": np.arange(3), "images": np.ones((3, 8, 8, 1), np.float32)})
    writer.close()
    # A fresh interpreter that never imports hdf5plugin reads every dataset.
    code = (f"import h5py; f = h5py.File({str(tmp_path / 'p.h5.partial')!r}, 'r'); "
            "print(f['images'][:].sum() + f['bids'][:].sum())")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "195.0"
