"""Fuzzing the TFRecord and CXI readers: every damaged or mistyped file ends in a clean one-line error
naming the file, or in a read of every shot; never in a crash or a hang. A read counts as correct only
where its network inputs equal the undamaged file's, pixel for pixel; HDF5 keeps no checksum of
uncompressed data, so damage to a CXI file's pixel bytes alone reads as other pixels, which nothing can
detect, and the test says exactly where that may happen."""
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
            assert o["detail"] == 6, o  # every shot
            # Other pixels only from bytes flipped or zeroed inside a CXI file (no checksum covers them);
            # a truncated file that reads at all reads the same pixels.
            assert o["same_pixels"] or (o["case"].startswith(("cxi/", "shots/"))
                                        and not o["case"].endswith("/truncate")), o
        else:
            assert "\n" not in o["detail"] and (".tfrecord:" in o["detail"] or ".cxi:" in o["detail"]), o
    assert any(o["outcome"] == "ok" and o["same_pixels"] for o in outcomes)  # the comparison can succeed
    errors = [o for o in outcomes if o["outcome"] == "error"]
    # Damage that TFRecord's CRCs or HDF5's structure catch must be reported, not read as data.
    assert sum(o["case"].startswith("tfrecord/") for o in errors) == sum(
        o["case"].startswith("tfrecord/") for o in outcomes)
    assert all(o["outcome"] == "error" for o in outcomes if o["case"].startswith(("tfrecord_", "cxi_")))
