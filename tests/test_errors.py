"""Bad input through the real command line: one line naming the culprit, exit status 2, no traceback,
and nothing that existed before is modified."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

import airynet
from nn.inputs import cxi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--ori_width=40", "--ori_height=40", "--target_width=32", "--target_height=32", "--batch_size=4",
         "--num_worker=1", "--train_steps=2", "--steps_per_eval=2", "--eval_steps=1"]


def snapshot(*roots):
    """Every file under the roots with its size and content hash."""
    state = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    state[path] = hashlib.sha256(f.read()).hexdigest()
    return state


def fails(argv, capsys, *watched):
    before = snapshot(*watched)
    code = airynet.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert snapshot(*watched) == before
    return err


@pytest.mark.parametrize("argv,culprit", [
    (["--resnet-size=18"], "unrecognized arguments: --resnet-size=18"),
    (["--mode=serve"], "--mode"),
    (["--resnet_size=20"], "--resnet_size"),
])
def test_flag_errors_in_a_real_process(argv, culprit):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "airynet.py"), *argv], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and culprit in result.stderr and "Traceback" not in result.stderr


def test_missing_data_dir(tmp_path, capsys):
    err = fails(["--dataset=helium", f"--data_dir={tmp_path}/nowhere/", f"--log_dir={tmp_path}/logs"] + SMALL,
                capsys, tmp_path)
    assert "nowhere/helium/: dataset directory does not exist" in err


def test_dataset_directory_without_matching_files(tmp_path, capsys):
    os.makedirs(tmp_path / "helium")
    (tmp_path / "helium" / "readme.txt").write_text("no data here")
    err = fails([f"--data_dir={tmp_path}/", f"--log_dir={tmp_path}/logs"] + SMALL, capsys, tmp_path / "helium")
    assert "helium/: no *train.tfrecord" in err


def corrupt_copy(src_dir, dst, how):
    os.makedirs(dst / "helium")
    for name in os.listdir(os.path.join(src_dir, "helium")):
        raw = open(os.path.join(src_dir, "helium", name), "rb").read()
        if name.endswith("train.tfrecord"):
            raw = how(raw)
        (dst / "helium" / name).write_bytes(raw)
    return f"{dst}/"


@pytest.mark.parametrize("how,expected", [
    (lambda raw: raw[:-500], "shots_train.tfrecord: record 15: truncated"),
    (lambda raw: b"", "shots_train.tfrecord: empty file (0 bytes)"),
])
def test_corrupt_tfrecords(tfrecord_dir, tmp_path, capsys, how, expected):
    data_dir = corrupt_copy(tfrecord_dir, tmp_path / "d", how)
    err = fails([f"--data_dir={data_dir}", f"--log_dir={tmp_path}/logs", "--train_steps=8", "--log_step=8"] + SMALL,
                capsys, tmp_path / "d")
    assert expected in err


def test_label_vector_of_wrong_length(tfrecord_dir, tmp_path, capsys):
    err = fails([f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}", "--num_classes=12"] + SMALL, capsys,
                tfrecord_dir)
    assert "record 0: label has 22 bytes, expected 12 int16 label flags" in err


def test_images_of_the_wrong_size(tfrecord_dir, tmp_path, capsys):
    err = fails([f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}"] + SMALL + ["--ori_width=41"], capsys,
                tfrecord_dir)
    assert "record 0: image has 3200 bytes, expected 40x41x1" in err


def test_cxi_without_labels_for_training(tmp_path, shots, capsys):
    os.makedirs(tmp_path / "nolabels")
    cxi.write_cxi_stacked(str(tmp_path / "nolabels" / "run_train.cxi"), shots[0][:8])
    err = fails([f"--data_dir={tmp_path}/", "--dataset=nolabels", f"--log_dir={tmp_path}/logs"] + SMALL, capsys,
                tmp_path / "nolabels")
    assert "run_train.cxi: no labels" in err


@pytest.mark.parametrize("mode", ["eval", "predict", "save"])
def test_load_dir_without_checkpoint(tmp_path, capsys, mode):
    (tmp_path / "run").mkdir()
    err = fails([f"--mode={mode}", f"--load_dir={tmp_path}/run", f"--save_dir={tmp_path}/export"], capsys, tmp_path)
    assert f"--load_dir={tmp_path}/run: no checkpoint" in err


def test_log_dir_that_cannot_be_created(tfrecord_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file")
    err = fails([f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}/file/logs"] + SMALL, capsys, tmp_path)
    assert "--log_dir=" in err and "cannot create the run directory" in err


@pytest.fixture(scope="module")
def trained_run(tfrecord_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    assert airynet.main([f"--data_dir={tfrecord_dir}", f"--log_dir={logs}", "--out_dir_name=r"] + SMALL) == 0
    return os.path.join(str(logs), "helium_r")


@pytest.mark.parametrize("flag,expected", [("--resnet_size=34", "--resnet_size=34"),
                                           ("--num_classes=5", "--num_classes=5")])
def test_checkpoint_of_another_architecture(trained_run, capsys, flag, expected):
    err = fails(["--mode=eval", f"--load_dir={trained_run}", flag], capsys, trained_run)
    assert "model.ckpt-2: checkpoint does not match the network" in err and expected in err


def test_new_run_refuses_an_existing_run_directory(trained_run, tfrecord_dir, capsys):
    logs = os.path.dirname(trained_run)
    err = fails([f"--data_dir={tfrecord_dir}", f"--log_dir={logs}", "--out_dir_name=r"] + SMALL, capsys, logs)
    assert "already holds a run" in err and "--load_dir=" in err


def test_nan_pixels_are_masked_and_never_reach_the_loss(tmp_path, shots, caplog):
    images = shots[0][:16].astype(np.float32)
    images[3, 10:12, 10:12] = np.nan
    images[5, 0, 0] = np.inf
    os.makedirs(tmp_path / "nan")
    cxi.write_cxi_stacked(str(tmp_path / "nan" / "x_train.cxi"), images, shots[1][:16])
    cxi.write_cxi_stacked(str(tmp_path / "nan" / "x_eval.cxi"), images, shots[1][:16])
    assert airynet.main([f"--data_dir={tmp_path}/", "--dataset=nan", f"--log_dir={tmp_path}/logs",
                         "--log_step=1"] + SMALL) == 0
    assert "x_train.cxi: shot 3" in caplog.text and "x_train.cxi: shot 5" in caplog.text
