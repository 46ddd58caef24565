"""The batch scripts in scripts/slurm/ on a real single-node SLURM cluster (scripts/slurm_local.sh; needs root):
a 2-task training job forming one MultiWorkerMirroredStrategy, the prediction job array plus its merge job,
and `scancel --full -s TERM` of a training job followed by a resubmission that resumes.

The scripts ask for GPUs, many CPUs and a site's partition and account; the tests override those on the
sbatch command line to fit the 2-CPU test node, and pass tiny AiryNet flags through the scripts.
Without root every test here is skipped with the reason; as root (CI) a cluster that does not come up
is a failure of scripts/slurm_local.sh, not a skip.
"""
import os
import re
import subprocess
import time

import pytest
import tensorflow as tf

import airynet
from test_distribute import ROOT, TINY, assert_same_predictions, free_ports, read

LOCAL = os.path.join(ROOT, "scripts", "slurm_local.sh")
SBATCH = ["sbatch", "--parsable", "--partition=debug", "--account=airynet-test", "--gres=none", "--time=10",
          "--cpus-per-task=1", f"--chdir={ROOT}"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment (SLURM_CONF) of a local cluster, started for this module and stopped after it."""
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root: it runs slurmd and munged and may apt-get install them")
    state = tmp_path_factory.mktemp("slurm")
    ctld_port, slurmd_port = free_ports(2)
    env = dict(os.environ, AIRYNET_SLURMCTLD_PORT=str(ctld_port), AIRYNET_SLURMD_PORT=str(slurmd_port))
    up = subprocess.run([LOCAL, "up", str(state)], env=env, capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        subprocess.run([LOCAL, "down", str(state)], capture_output=True, timeout=60)
        pytest.fail(f"the local SLURM cluster did not come up: {up.stderr.strip()[-800:]}")
    yield dict(os.environ, SLURM_CONF=up.stdout.split()[-1], PYTHONUNBUFFERED="1")
    subprocess.run([LOCAL, "down", str(state)], check=True, timeout=60)


def sbatch(env, script, *flags, options=(), timeout=600):
    """Submit scripts/slurm/<script> with AiryNet `flags`; -> (job ID, sbatch's exit status: the job's
    own with --wait)."""
    done = subprocess.run(SBATCH + list(options) + [os.path.join(ROOT, "scripts", "slurm", script), *flags],
                          env=env, capture_output=True, text=True, timeout=timeout)
    job = done.stdout.strip().split(";")[0]
    assert job.isdigit(), done.stderr
    return job, done.returncode


def wait_until_gone(env, job, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout.strip():
            return
        time.sleep(0.2)
    pytest.fail(f"job {job} still in the queue after {timeout}s")


@pytest.fixture(scope="module")
def training_job(slurm, tfrecord_dir, tmp_path_factory):
    """train_multi_node.sbatch as 2 tasks on the one node, run to its end: (job ID, status, output, work dir)."""
    work = tmp_path_factory.mktemp("slurm_train")
    (work / "tmp").mkdir()
    # A private TMPDIR shows what the non-chief worker leaves behind; a free port for the workers.
    env = dict(slurm, TMPDIR=str(work / "tmp"), AIRYNET_PORT=str(free_ports(1)[0]))
    job, status = sbatch(env, "train_multi_node.sbatch", f"--data_dir={tfrecord_dir}", f"--log_dir={work / 'logs'}",
                         "--train_steps=2", "--steps_per_eval=2", *TINY,
                         options=["--wait", "--nodes=1", "--ntasks-per-node=2", f"--output={work / 'train.out'}"])
    return job, status, read(work / "train.out"), work


def test_two_task_job_trains_one_model(training_job):
    job, status, text, work = training_job
    assert status == 0, text[-3000:]
    for rank in (0, 1):  # srun --label prefixes each line with the task's rank
        assert f"{rank}: " in text and re.search(
            rf"^{rank}: .*Strategy MultiWorkerMirroredStrategy with 2 replica\(s\) in sync \(worker {rank}\)$",
            text, re.M), text[-3000:]
        assert f"{rank}: step 2: lr 0.00625 " in text  # one global batch of 2 x 4
    assert os.listdir(work / "logs") == [f"helium_job{job}"]
    run_dir = str(work / "logs" / f"helium_job{job}")
    assert tf.train.latest_checkpoint(run_dir).endswith("model.ckpt-2")
    assert os.listdir(work / "tmp") == []  # the non-chief removed its private checkpoints


def test_prediction_array_and_merge_equal_one_unsharded_prediction(slurm, training_job, tmp_path):
    job, status, _, work = training_job
    assert status == 0
    run_dir = str(work / "logs" / f"helium_job{job}")
    assert airynet.main(["--mode=predict", f"--load_dir={run_dir}", f"--predict_dir={tmp_path / 'whole'}",
                         "--gradcam=false"]) == 0
    array, _ = sbatch(slurm, "predict_array.sbatch", f"--load_dir={run_dir}", f"--predict_dir={tmp_path / 'sharded'}",
                      "--gradcam=false", options=["--array=0-1", f"--output={tmp_path}/predict_%a.out"])
    merge, status = sbatch(slurm, "merge_predictions.sbatch", f"--predict_dir={tmp_path / 'sharded'}",
                           "--dataset=helium", "--num_shards=2",
                           options=["--wait", f"--dependency=afterok:{array}", f"--output={tmp_path}/merge.out"])
    assert status == 0, "\n".join(read(p)[-2000:] for p in tmp_path.glob("*.out"))
    assert sorted(os.listdir(tmp_path / "sharded")) == ["helium.h5", "helium.shard0of2.h5", "helium.shard0of2.txt",
                                                         "helium.shard1of2.h5", "helium.shard1of2.txt", "helium.txt"]
    assert_same_predictions(tmp_path / "whole", tmp_path / "sharded")


def test_scancel_term_saves_and_the_resubmitted_job_resumes(slurm, tfrecord_dir, tmp_path):
    flags = [f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path / 'logs'}", "--train_steps=100000",
             "--steps_per_eval=50000", *TINY]
    out = tmp_path / "first.out"
    job, _ = sbatch(slurm, "train_single_node.sbatch", *flags, options=[f"--output={out}"])
    deadline = time.time() + 180
    while not re.search(r"^step 3:", read(out) if out.exists() else "", re.M):
        assert time.time() < deadline, f"job {job} did not reach step 3:\n{read(out)[-3000:] if out.exists() else ''}"
        time.sleep(0.2)
    # --full: signal the batch shell too, which is AiryNet itself (the script execs it).
    subprocess.run(["scancel", "--full", "--signal=TERM", job], env=slurm, check=True)
    wait_until_gone(slurm, job)
    text = read(out)
    saved = re.search(r"Saved (\S+) \(SIGTERM received\)", text)
    assert saved, text[-3000:]
    step = int(saved[1].rsplit("-", 1)[1])
    assert step == max(int(s) for s in re.findall(r"^step (\d+):", text, re.M))
    run_dir = str(tmp_path / "logs" / f"helium_job{job}")
    assert tf.train.latest_checkpoint(run_dir) == saved[1]
    info = subprocess.run(["scontrol", "show", "job", job], env=slurm, capture_output=True, text=True).stdout
    assert "ExitCode=143:0" in info, info

    resumed, status = sbatch(slurm, "train_single_node.sbatch", f"--load_dir={run_dir}", f"--train_steps={step + 2}",
                             options=["--wait", f"--output={tmp_path / 'second.out'}"])
    text = read(tmp_path / "second.out")
    assert status == 0, text[-3000:]
    assert f"Resuming from {saved[1]} (step {step})" in text
    assert tf.train.latest_checkpoint(run_dir).endswith(f"model.ckpt-{step + 2}")
