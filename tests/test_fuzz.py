"""Fuzzing the TFRecord and CXI readers: every damaged or mistyped file ends in a clean one-line error
naming the file, or in a correct read; never in a crash or a hang."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_damaged_files_end_in_clean_errors_or_correct_reads(tmp_path):
    cases = 45
    result = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_readers.py"), str(tmp_path), "2026",
                             str(cases)], capture_output=True, text=True, timeout=240)  # a hang fails here
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(outcomes) == cases + 7  # plus the mistyped files
    for o in outcomes:
        assert o["outcome"] in ("ok", "error")
        if o["outcome"] == "ok":
            assert o["detail"] == 6, o  # a correct read has every shot
        else:
            assert "\n" not in o["detail"] and (".tfrecord:" in o["detail"] or ".cxi:" in o["detail"]), o
    errors = [o for o in outcomes if o["outcome"] == "error"]
    # Damage that TFRecord's CRCs or HDF5's structure catch must be reported, not read as data.
    assert sum(o["case"].startswith("tfrecord/") for o in errors) == sum(
        o["case"].startswith("tfrecord/") for o in outcomes)
    assert all(o["outcome"] == "error" for o in outcomes if o["case"].startswith(("tfrecord_", "cxi_")))
