"""tf.distribute and faults: two workers on localhost, mirrored logical CPUs, SIGTERM and kill -9 with resume,
sharded prediction, mixed precision and XLA, and the cluster spec built from SLURM's variables.

Runs that need a process of their own (a second worker, logical devices, signals) call the unchanged CLI
as a subprocess and read its output.
"""
import glob
import importlib.util
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import airynet
from conftest import make_cfg
from nn import checkpoints, distribute
from nn.config import AiryNetError
from nn.recipe import PAPER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset=helium", "--target_width=32", "--target_height=32", "--ori_width=40", "--ori_height=40",
        "--batch_size=4", "--num_worker=1", "--log_step=1", "--dataset_size=16", "--eval_steps=1"]
STEP_LINE = re.compile(r"^step (\d+):", re.M)


def start(flags, log_path, env=None):
    """airynet.py in a subprocess, its output (stdout and stderr) going to log_path."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "airynet.py"), *flags], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def read(path):
    with open(path) as f:
        return f.read()


def finish(proc, log_path, timeout=300):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"airynet.py did not finish within {timeout}s:\n{read(log_path)[-3000:]}")
    return proc.returncode, read(log_path)


def wait_for_step(proc, log_path, after, timeout=180):
    """Wait until the run has logged a step beyond `after`; returns the step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(s) for s in STEP_LINE.findall(read(log_path))]
        if steps and max(steps) > after:
            return max(steps)
        if proc.poll() is not None:
            pytest.fail(f"airynet.py exited ({proc.returncode}) before step {after + 1}:\n{read(log_path)[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no step beyond {after} within {timeout}s:\n{read(log_path)[-3000:]}")


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def step_of(path):
    return int(path.rsplit("-", 1)[1])


def confusion_total(text, step):
    """TN + FP + FN + TP of the log line of `step`: images x classes seen since the previous log line."""
    counts = re.search(rf"^step {step}: .*\[\[TN (\d+) FP (\d+)\] \[FN (\d+) TP (\d+)\]\]", text, re.M)
    return sum(map(int, counts.groups()))


def read_all_tensors(path):
    """Every tensor of checkpoint `path`, read in full (fails on a truncated or corrupt checkpoint)."""
    reader = tf.train.load_checkpoint(path)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}


# ----------------------------------------------------------------------------------------------
# Distribution

def test_two_workers_on_localhost_train_one_model(tfrecord_dir, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    log_dir = tmp_path / "logs"
    flags = ["--mode=train", f"--data_dir={tfrecord_dir}", f"--log_dir={log_dir}", "--out_dir_name=mw",
             "--train_steps=4", "--steps_per_eval=2"] + TINY
    procs = []
    for i in range(2):
        tmp = tmp_path / f"tmp{i}"
        tmp.mkdir()
        env = {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
               "TMPDIR": str(tmp)}
        # Worker 1 keeps its private checkpoints at DEBUG, so that its weights can be compared.
        procs.append(start(flags + ["--log_level=DEBUG"] * i, tmp_path / f"worker{i}.log", env))
    outputs = [finish(p, tmp_path / f"worker{i}.log") for i, p in enumerate(procs)]
    for i, (code, text) in enumerate(outputs):
        assert code == 0, text[-3000:]
        assert f"Strategy MultiWorkerMirroredStrategy with 2 replica(s) in sync (worker {i})" in text
        assert "step 4: lr 0.00625 " in text  # 0.1 * global batch (2 workers x 4) / 128
        # The confusion counts cover the global batch of 8 images x 11 classes on both workers.
        assert confusion_total(text, step=1) == 8 * 11

    # One run directory, written by the chief alone: its checkpoints and a single events file of its own.
    run_dir = log_dir / "helium_mw"
    assert os.listdir(log_dir) == ["helium_mw"]
    names = sorted(os.listdir(run_dir))
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    assert len(events) == 1 and f".{procs[0].pid}." in events[0]
    assert sorted(set(names) - set(events)) == ["checkpoint", "config.json", "eval",
                                                "model.ckpt-2.data-00000-of-00001", "model.ckpt-2.index",
                                                "model.ckpt-4.data-00000-of-00001", "model.ckpt-4.index",
                                                "ood.npz"]
    assert all(f".{procs[0].pid}." in n for n in os.listdir(run_dir / "eval"))
    assert tf.train.latest_checkpoint(str(run_dir)).endswith("model.ckpt-4")

    # Worker 1 saved the same step into its private directory; the weights and the optimizer state are
    # the same. Keras keeps batch-norm moving averages per replica (each replica normalises its own
    # batch), so those differ; the chief's are the ones saved.
    kept = glob.glob(str(tmp_path / "tmp1" / "airynet-worker-*"))
    assert len(kept) == 1
    chief = read_all_tensors(str(run_dir / "model.ckpt-4"))
    worker = read_all_tensors(tf.train.latest_checkpoint(kept[0]))
    assert chief.keys() == worker.keys()
    compared = [k for k in chief if "moving_mean" not in k and "moving_variance" not in k]
    assert len(compared) > 100
    for key in compared:
        np.testing.assert_array_equal(chief[key], worker[key], err_msg=key)


def test_mirrored_strategy_over_two_logical_cpus(tfrecord_dir, tmp_path):
    # Logical devices can only be configured before TensorFlow starts, hence a process of its own.
    flags = ["--mode=train", f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}", "--out_dir_name=m",
             "--num_cpu_replicas=2", "--train_steps=2", "--steps_per_eval=2", "--lr=0.64"] + TINY
    code, text = finish(start(flags, tmp_path / "out.log"), tmp_path / "out.log")
    assert code == 0, text[-3000:]
    assert "Strategy MirroredStrategy with 2 replica(s) in sync" in text
    assert "step 2: lr 0.04 " in text  # --batch_size is per replica: 0.64 * (2 x 4) / 128
    assert confusion_total(text, step=1) == 8 * 11
    assert tf.train.latest_checkpoint(str(tmp_path / "helium_m")).endswith("model.ckpt-2")


def test_cluster_from_slurm_variables(monkeypatch, tmp_path):
    assert distribute.expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert distribute.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_STEP_NODELIST": "gpu[08-09]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    assert distribute.tf_config_from_slurm(env) == {
        "cluster": {"worker": ["gpu08:21234", "gpu08:21235", "gpu09:21234", "gpu09:21235"]},
        "task": {"type": "worker", "index": 3}}
    assert distribute.tf_config_from_slurm({**env, "AIRYNET_PORT": "5000"})["cluster"]["worker"][2] == "gpu09:5000"
    assert distribute.tf_config_from_slurm({**env, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    with pytest.raises(AiryNetError, match="SLURM_NTASKS=5"):
        distribute.tf_config_from_slurm({**env, "SLURM_NTASKS": "5"})
    # Every worker refuses a run directory that already holds a run, before they connect.
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                "task": {"type": "worker", "index": 1}}))
    (tmp_path / "helium_old").mkdir()
    (tmp_path / "helium_old" / "config.json").write_text("{}")
    with pytest.raises(AiryNetError, match="already holds a run"):
        distribute.make_strategy(make_cfg(f"--log_dir={tmp_path}", "--out_dir_name=old"))
    with pytest.raises(AiryNetError, match="--out_dir_name"):
        distribute.make_strategy(make_cfg(f"--log_dir={tmp_path}"))


# ----------------------------------------------------------------------------------------------
# Preemption and faults

def test_sigterm_saves_the_current_step_and_the_rerun_resumes(tfrecord_dir, tmp_path, caplog):
    flags = ["--mode=train", f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}", "--out_dir_name=t",
             "--train_steps=100000", "--steps_per_eval=50000"] + TINY
    proc = start(flags, tmp_path / "out.log")
    wait_for_step(proc, tmp_path / "out.log", after=2)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    code, text = finish(proc, tmp_path / "out.log", timeout=60)
    assert code == 143, text[-3000:]
    assert time.time() - sent < 20  # a graph call lasts about a second, then one save
    saved = re.search(r"Saved (\S+) \(SIGTERM received\)", text)
    assert saved, text[-3000:]
    step = step_of(saved[1])
    # The checkpoint holds the step the run had reached, not the last chunk end (there was none).
    assert step == max(int(s) for s in STEP_LINE.findall(text)) and step >= 3
    run_dir = str(tmp_path / "helium_t")
    assert tf.train.latest_checkpoint(run_dir) == saved[1]
    assert f"Stopped (SIGTERM received) at step {step}. Rerun with --load_dir={run_dir}" in text

    assert airynet.main(["--mode=train", f"--load_dir={run_dir}", f"--train_steps={step + 2}"]) == 0
    assert f"Resuming from {saved[1]} (step {step})" in caplog.text
    assert tf.train.latest_checkpoint(run_dir).endswith(f"model.ckpt-{step + 2}")


def started_from(step):
    """What a run logs when it starts at `step` (a run killed before its first checkpoint starts afresh)."""
    return f"(step {step})" if step else "Starting fresh"


def test_kill_9_at_random_moments_loses_only_the_steps_since_the_last_checkpoint(tfrecord_dir, tmp_path):
    run_dir = str(tmp_path / "helium_k")
    first = ["--mode=train", f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}", "--out_dir_name=k",
             "--train_steps=16", "--steps_per_eval=2"] + TINY
    rng = random.Random(2026)
    resumed, history = 0, []
    for attempt in range(3):
        log_path = tmp_path / f"attempt{attempt}.log"
        proc = start(first if attempt == 0 else ["--mode=train", f"--load_dir={run_dir}"], log_path)
        # Kill a random fraction of a step after a random step 1-4 steps on: inside a step, an eval or a save.
        wait_for_step(proc, log_path, after=resumed + rng.randint(0, 3))
        delay = rng.uniform(0.0, 0.6)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        text = read(log_path)
        reached = max(int(s) for s in STEP_LINE.findall(text))
        assert started_from(resumed) in text, text[-3000:]
        # Every checkpoint the index names is complete, and the latest is at most one chunk behind.
        state = tf.train.get_checkpoint_state(run_dir)
        paths = list(state.all_model_checkpoint_paths) if state else []
        for path in paths:
            read_all_tensors(path)
        latest = step_of(paths[-1]) if paths else 0
        history.append(f"resumed at {resumed}, killed {delay:.2f}s after a step: reached {reached}, "
                       f"latest checkpoint {latest}")
        assert resumed <= latest <= reached and reached - latest <= 2, history
        resumed = latest
    # What a kill during a save leaves (TensorFlow's temporary directory of that save) is removed on resume.
    os.makedirs(os.path.join(run_dir, "model.ckpt-99_temp"))
    code, text = finish(start(["--mode=train", f"--load_dir={run_dir}"], tmp_path / "last.log"), tmp_path / "last.log")
    assert code == 0, text[-3000:]
    assert started_from(resumed) in text, history
    assert tf.train.latest_checkpoint(run_dir).endswith("model.ckpt-16")
    assert not glob.glob(os.path.join(run_dir, "*_temp*")), history


# ----------------------------------------------------------------------------------------------
# Sharded prediction, mixed precision, XLA

def merge_main(argv):
    spec = importlib.util.spec_from_file_location("merge_predictions", os.path.join(ROOT, "scripts",
                                                                                     "merge_predictions.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def assert_same_predictions(whole, merged):
    with open(whole / "helium.txt") as a, open(merged / "helium.txt") as b:
        assert a.read() == b.read()
    with h5py.File(whole / "helium.h5", "r") as a, h5py.File(merged / "helium.h5", "r") as b:
        assert sorted(a) == sorted(b)
        for name in a:
            if isinstance(a[name], h5py.Dataset):
                atol = 1e-3 if name == "grad_cam" else 1e-6  # float16 maps
                rtol = 1e-5 if name == "ood_score" else 0  # sums of squares in the hundreds, float32
                np.testing.assert_allclose(a[name][()], b[name][()], rtol=rtol, atol=atol, err_msg=name)


def test_sharded_prediction_plus_merge_equals_unsharded(tfrecord_dir, tmp_path, monkeypatch):
    run = ["--mode=train", f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}", "--out_dir_name=p",
           "--train_steps=2", "--steps_per_eval=2"] + TINY
    assert airynet.main(run) == 0
    predict = ["--mode=predict", f"--load_dir={tmp_path / 'helium_p'}", "--batch_size=3"]
    assert airynet.main(predict + [f"--predict_dir={tmp_path / 'whole'}"]) == 0
    # A job array of two: the shard comes from SLURM's variables.
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for i in range(2):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(i))
        assert airynet.main(predict + [f"--predict_dir={tmp_path / 'sharded'}"]) == 0
    assert sorted(os.listdir(tmp_path / "sharded")) == ["helium.shard0of2.h5", "helium.shard0of2.txt",
                                                         "helium.shard1of2.h5", "helium.shard1of2.txt"]
    assert merge_main([f"--predict_dir={tmp_path / 'sharded'}", "--dataset=helium", "--num_shards=2"]) == 0
    with open(tmp_path / "sharded" / "helium.shard1of2.txt") as f:
        assert [line.split("\t")[0] for line in f][1:] == ["1001", "1003", "1005", "1007"]
    assert_same_predictions(tmp_path / "whole", tmp_path / "sharded")


@pytest.fixture
def float32_policy_afterwards():
    """The dtype policy is global: leave the float32 default to the tests that follow."""
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_and_xla_train_and_resume(tfrecord_dir, tmp_path, caplog, capsys, float32_policy_afterwards):
    run = ["--mode=train", f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}", "--out_dir_name=x",
           "--train_steps=2", "--steps_per_eval=2", "--mixed_precision=fp16"] + TINY + ["--batch_size=2"]
    assert airynet.main(run) == 0
    assert "--mixed_precision=fp16: no GPU found" in caplog.text
    assert "mixed precision fp16; XLA-compiled training step off" in caplog.text
    run_dir = str(tmp_path / "helium_x")
    # The checkpoint holds the SGD, not fp16's loss-scale wrapper: bf16 with XLA continues the fp16 run.
    resume = ["--mode=train", f"--load_dir={run_dir}", "--train_steps=4", "--mixed_precision=bf16",
              "--jit_compile=true"]
    assert airynet.main(resume) == 0
    assert "mixed precision bf16; XLA-compiled training step on" in caplog.text and "(step 2)" in caplog.text
    losses = [float(x) for x in re.findall(r"cross-entropy (\S+)", capsys.readouterr().out)]
    assert len(losses) >= 4 and np.all(np.isfinite(losses))
    assert tf.train.latest_checkpoint(run_dir).endswith("model.ckpt-4")
    # ...and a float32 model loads it.
    keras.mixed_precision.set_global_policy("float32")
    _, step = checkpoints.restore_model(make_cfg(f"--load_dir={run_dir}", "--mode=eval", "--use_nchw=false"), PAPER)
    assert step == 4
