"""Shared fixtures: tiny datasets written by the simulator, and a config builder."""
import os
import sys

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from nn import config  # noqa: E402
from nn.inputs import cxi, simulate, tfrecord

SIZE = 40  # stored size of the test shots: crop to 32, then resize to the target


def make_cfg(*flags):
    """A config as the CLI would build it, with small defaults suited to tests."""
    base = [f"--ori_width={SIZE}", f"--ori_height={SIZE}", "--target_width=32", "--target_height=32",
            "--batch_size=4", "--num_worker=2"]
    return config.parse_args(base + list(flags))


@pytest.fixture(scope="session")
def shots():
    images, labels = simulate.simulate(24, seed=7, size=SIZE)
    return images, labels


@pytest.fixture(scope="session")
def tfrecord_dir(tmp_path_factory, shots):
    """Original-schema TFRecords: data_dir/helium/{train,eval,predict} (predict holds bunch IDs)."""
    images, labels = shots
    root = tmp_path_factory.mktemp("tfr")
    os.makedirs(root / "helium")
    tfrecord.write(str(root / "helium" / "shots_train.tfrecord"), images[:16], labels[:16])
    tfrecord.write(str(root / "helium" / "shots_eval.tfrecord"), images[16:], labels[16:])
    tfrecord.write(str(root / "helium" / "shots_predict.tfrecord"), images[16:], 1000 + np.arange(8))
    return str(root) + "/"


@pytest.fixture(scope="session")
def cxi_dir(tmp_path_factory, shots):
    """CXI files in both layouts: data_dir/shots/*{mode}.cxi (per shot) and data_dir/stacked/one.cxi."""
    images, labels = shots
    root = tmp_path_factory.mktemp("cxi")
    os.makedirs(root / "shots")
    for mode, part in (("train", slice(0, 16)), ("eval", slice(16, 24)), ("predict", slice(16, 24))):
        cxi.write_cxi_shots(str(root / "shots" / f"run_{mode}.cxi"), images[part], labels[part],
                             500 + np.arange(24)[part])
    os.makedirs(root / "stacked")
    cxi.write_cxi_stacked(str(root / "stacked" / "all.cxi"), images, labels, 900 + np.arange(24))
    return str(root) + "/"
