"""Files that appear whole or not at all.

Every file AiryNet writes for a user (run configs, eval results, pictures, datasets, predictions) is
written under a temporary name beside its final one and renamed when complete: rename(2) is atomic on
POSIX file systems, so a crash, a full disk or Ctrl-C never leaves a file that looks finished.
"""
import contextlib
import os
import shutil

PARTIAL = ".partial"


def partial_name(path):
    """The temporary name of `path` while it is being written."""
    return path + PARTIAL


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """Open `path` for writing under its partial name; rename it to `path` when the block succeeds,
    remove it when the block fails.

        with atomic_file("metrics.json") as f:
            json.dump(metrics, f)
    """
    tmp = partial_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_path(path):
    """Like atomic_file, for writers that open the file themselves (h5py, TFRecordWriter, savefig):
    yields the partial name to write to."""
    tmp = partial_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path):
    """A folder of files that appears whole: yields its partial name, a fresh empty folder to write into
    (one left by a killed earlier attempt is removed first), and renames it to `path` when the block
    succeeds (`path` may exist if empty); removes it when the block fails."""
    tmp = partial_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
