"""What a user sees on the terminal of a CPU run: AiryNet's own lines first, TensorFlow's import-time
notices (absl, oneDNN) not at all unless --log_level=DEBUG, and no warning about a flag left at its default."""
import os
import subprocess
import sys

import airynet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--mode=train", "--dataset=synthetic", "--dataset_size=16", "--ori_width=48", "--ori_height=48",
         "--target_width=32", "--target_height=32", "--train_steps=1", "--steps_per_eval=1", "--eval_steps=1",
         "--batch_size=4", "--num_worker=1", "--resnet_size=18"]


def test_a_cpu_run_starts_with_airynets_own_lines(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "airynet.py"), *TRAIN, f"--log_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert " INFO TensorFlow 2." in lines[0], lines[:3]
    assert not any("absl" in line or "oneDNN" in line or "use_nchw" in line for line in lines), lines[:5]


def test_only_an_explicit_use_nchw_warns_without_a_gpu(tmp_path, caplog):
    assert airynet.main(TRAIN + [f"--log_dir={tmp_path / 'default'}"]) == 0
    assert "--use_nchw=true: no GPU found" not in caplog.text
    assert airynet.main(TRAIN + [f"--log_dir={tmp_path / 'explicit'}", "--use_nchw=true"]) == 0
    assert "--use_nchw=true: no GPU found" in caplog.text
