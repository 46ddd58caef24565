"""The input pipeline: one tf.data path for original TFRecords, CXI/HDF5 files and the synthetic dataset.

Sources (looked up in `data_dir + dataset + "/"`, as the original did; README, Data formats):
  * `*{mode}.tfrecord`: the original schema (nn/inputs/tfrecord.py);
  * `*{mode}.cxi` / `*{mode}.h5`: CXI files in either layout (nn/inputs/cxi.py);
  * a directory whose CXI/HDF5 files are not split by mode: every `--eval_every`-th shot (counting
    over the sorted files) is held out for eval, the others train, and predict reads them all;
  * `--dataset=synthetic` with no files: simulated helium-droplet shots (nn/inputs/simulate.py), generated
    deterministically from `--random_seed` and cached in memory on first use.

Every source yields the same tensors and goes through nn.inputs.preprocess.preprocess.
Batches: train/eval give `(images, labels)`; predict gives dicts with "image", "bunch_id" and, where
the source has labels, "label".
"""
import glob
import os

import numpy as np
import tensorflow as tf

from nn import config
from nn.inputs import cxi, euxfel, masks, simulate, tfrecord
from nn.config import AiryNetError, first_line
from nn.inputs.preprocess import preprocess

# Batches prepared ahead of the network.
PREFETCH_BATCHES = 2


def dataset_dir(cfg):
    return cfg.data_dir + cfg.dataset + "/"


def file_stem(cfg, mode):
    """What the files of `mode` end in before the extension: the mode, or with --fraction_mode (train
    and predict only) `{mode}*{fraction with '_' for '.'}`, as the original globbed them."""
    if cfg.fraction_mode and mode in ("train", "predict"):
        return f"{mode}*{str(cfg.fraction).replace('.', '_')}"
    return mode


def find_files(cfg, mode):
    """-> (kind, files, split) with kind 'tfrecord' | 'cxi' | 'synthetic'; split: None or the mode
    whose share of an unsplit CXI directory to read."""
    directory = dataset_dir(cfg)
    if not os.path.isdir(directory):
        if cfg.dataset == "synthetic":
            return "synthetic", [], None
        raise AiryNetError(f"{directory}: dataset directory does not exist (--data_dir + --dataset)")
    if euxfel.is_run_directory(directory):  # RAW-/CORR-R*-*.h5 files of a European XFEL run
        return "euxfel", [directory], None
    stem = file_stem(cfg, mode)
    for kind, extensions in (("tfrecord", ("tfrecord",)), ("cxi", ("cxi", "h5"))):
        files = sorted(f for ext in extensions for f in glob.glob(os.path.join(directory, f"*{stem}.{ext}")))
        if files:
            return kind, files, None
    unsplit = sorted(glob.glob(os.path.join(directory, "*.cxi")) + glob.glob(os.path.join(directory, "*.h5")))
    if unsplit and stem == mode:  # a fraction is never silently replaced by all the data
        return "cxi", unsplit, mode
    if cfg.dataset == "synthetic":
        return "synthetic", [], None
    raise AiryNetError(f"{directory}: no *{stem}.tfrecord, *{stem}.cxi or *{stem}.h5 files "
                       + (f"(nor unsplit *.cxi/*.h5) for --mode={mode}" if stem == mode else
                          f"for --mode={mode} with --fraction_mode (--fraction={cfg.fraction})"))


# ----------------------------------------------------------------------------------------------
# Synthetic

def synthetic_range(cfg, mode, calibration_share):
    """Shot indices of each split: train 0..dataset_size-1 less the calibration shots (that share of
    them), which are the last ones of that range; eval and predict the held-out shots after."""
    n_eval = max(256, cfg.dataset_size // 8)
    n_calibration = int(round(cfg.dataset_size * calibration_share))
    if mode == "train":
        return 0, cfg.dataset_size - n_calibration
    if mode == "calibrate":
        return cfg.dataset_size - n_calibration, cfg.dataset_size
    return cfg.dataset_size, cfg.dataset_size + n_eval


def _synthetic_records(cfg, mode, calibration_share):
    first, last = synthetic_range(cfg, mode, calibration_share)
    chunk = 32
    starts = np.arange(first, last, chunk, dtype=np.int64)

    def make(start):
        count = int(min(chunk, last - start))
        images, labels = simulate.simulate(count, cfg.random_seed, cfg.ori_height, start=int(start),
                                           version=cfg.sim_version)
        return images.astype(np.float32), labels.astype(np.float32), np.arange(start, start + count)

    def generate(start):
        images, labels, ids = tf.numpy_function(make, [start], [tf.float32, tf.float32, tf.int64])
        return {"image": tf.reshape(images, [-1, cfg.ori_height, cfg.ori_width, 1]),
                "label": tf.reshape(labels, [-1, cfg.num_classes]), "bunch_id": tf.reshape(ids, [-1])}

    ds = tf.data.Dataset.from_tensor_slices(starts)
    ds = ds.map(generate, num_parallel_calls=cfg.num_worker, deterministic=True).unbatch()
    return ds.cache()  # simulated once per process; the uint16 shots are small next to a GPU's input


# ----------------------------------------------------------------------------------------------
# The calibration split of file data: every N-th training shot, N = round(1 / the Recipe's calibration_share)

def calibration_every(calibration_share):
    return max(2, int(round(1 / calibration_share))) if calibration_share > 0 else 0


def _split_calibration(records, cfg, calibration_share, kind, split, mode):
    """Training records without the calibration shots (mode "train") or only them ("calibrate"). A
    shot's rank among the training shots decides: CXI shots carry their index over the files (less
    the --eval_every shots held out for eval when the files are unsplit), TFRecords are counted in the
    order in which training reads them, which is the same on every pass."""
    every = calibration_every(calibration_share)
    if not every or mode not in ("train", "calibrate"):
        return records
    if kind == "cxi":
        rank = lambda shot: shot["index"] - ((shot["index"] + 1) // cfg.eval_every if split else 0)
        held = lambda shot: tf.equal(rank(shot) % every, every - 1)
        return records.filter(held if mode == "calibrate" else lambda shot: tf.logical_not(held(shot)))
    keep = (lambda i, _: tf.equal(i % every, every - 1)) if mode == "calibrate" else \
        (lambda i, _: tf.not_equal(i % every, every - 1))
    return records.enumerate().filter(keep).map(lambda _, record: record)


def class_frequencies(cfg, recipe):
    """Each class's share of positive training shots: the simulator's class shares for synthetic data,
    else counted over the training labels (at most FREQUENCY_SHOTS of them, in file order; the training
    shots are those the recipe leaves after its calibration split)."""
    kind, _, _ = find_files(cfg, "train")
    if kind == "synthetic":
        return np.asarray(simulate.CLASS_SHARES, np.float64)
    counts, shots = 0.0, 0
    for _, labels in dataset(cfg, recipe, "train", one_pass=True).take(max(1, FREQUENCY_SHOTS // cfg.batch_size)):
        counts += labels.numpy().sum(axis=0)
        shots += len(labels)
    return np.asarray(counts, np.float64) / max(shots, 1)


FREQUENCY_SHOTS = 20000


# ----------------------------------------------------------------------------------------------
# The pipeline

def check_sources(cfg, mode):
    """find_files plus cheap checks (each TFRecord's first record, each CXI file's layout, the synthetic
    sizes), so that mistakes show before a run creates anything. -> (kind, files, split); for CXI the
    files come as opened nn.cxi readers."""
    kind, files, split = find_files(cfg, mode)
    if kind == "tfrecord":
        for f in files:
            tfrecord.check(f, cfg, mode, max_records=1)
    elif kind == "cxi":
        files = [cxi.open_cxi(f, cfg, needs_labels=mode in ("train", "eval")) for f in files]
    elif kind == "euxfel":
        if mode != "predict":
            raise AiryNetError(f"{files[0]}: a European XFEL run carries no labels; use it with --mode=predict")
    elif cfg.ori_height != cfg.ori_width or cfg.ori_depth != 1:
        raise AiryNetError(f"--ori_height/--ori_width/--ori_depth: the synthetic dataset is square and "
                           f"gray, got {cfg.ori_height}x{cfg.ori_width}x{cfg.ori_depth}")
    elif cfg.num_classes != len(config.HELIUM_CLASSES):
        raise AiryNetError(f"--num_classes={cfg.num_classes}: the synthetic dataset has "
                           f"{len(config.HELIUM_CLASSES)} classes")
    return kind, files, split


def shuffle_buffer(batch_size):
    """Shots held by the train/eval shuffle: the original's 5000 + 3 batches."""
    return 5000 + 3 * batch_size


def dataset(cfg, recipe, mode, *, shard=(0, 1), one_pass=None, input_context=None):
    """Batches of `mode` data ready for the network; see the module docstring for their structure.

    recipe: the run's nn.recipe.Recipe: its calibration split, resize and augmentation.
    one_pass: read every record once in order (default for predict) instead of shuffled forever.
    shard: (index, count): keep records j with j % count == index (prediction on a cluster).
    input_context: a tf.distribute.InputContext; each input pipeline then reads its own share.
    """
    if one_pass is None:
        one_pass = mode in ("predict", "calibrate")
    # The calibration split is read from the training files in the order training reads them.
    kind, files, split = check_sources(cfg, "train" if mode == "calibrate" else mode)
    # The calibration split, and the training shots left beside it, are read in training's order, which
    # decides which TFRecord shots are held out; a one-pass read of either holds the same shots as training's.
    in_order = one_pass and mode not in ("train", "calibrate")
    if kind == "tfrecord":
        records = tfrecord.records(files, cfg, in_order)
    elif kind == "cxi":
        records = cxi.records(files, cfg, split, in_order)
    elif kind == "euxfel":
        records = euxfel.records(cfg, files[0])
    else:  # simulated shots are split by index range (synthetic_range), never a second time
        records = _synthetic_records(cfg, mode, recipe.calibration_share)
    if kind != "synthetic":
        records = _split_calibration(records, cfg, recipe.calibration_share, kind, split, mode)
    shard_index, shard_count = shard
    if input_context is not None:
        shard_count *= input_context.num_input_pipelines
        shard_index = shard_index * input_context.num_input_pipelines + input_context.input_pipeline_id
    if shard_count > 1:
        records = records.shard(shard_count, shard_index)
    if not one_pass:
        records = records.shuffle(shuffle_buffer(cfg.batch_size), seed=cfg.random_seed).repeat()
    records = records.batch(cfg.batch_size, drop_remainder=not one_pass)

    training = mode == "train" and not one_pass
    mask = masks.load(cfg.mask, cfg.mask_good, (cfg.ori_height, cfg.ori_width))
    seeds = tf.data.Dataset.counter().map(lambda i: tf.stack([tf.cast(cfg.random_seed, tf.int64), i]))

    def finish(batch, seed):
        if kind == "tfrecord":
            images, extra = tfrecord.decode_records(batch, cfg, mode)
        else:
            images = batch["image"]
            extra = {k: batch[k] for k in ("bunch_id", "label", "pulse") if k in batch}  # pulse: EuXFEL runs
        images = preprocess(images, cfg, recipe, training=training, seed=seed, mask=mask)
        if mode == "predict":
            return dict(extra, image=images)
        return images, extra["label"]

    ds = tf.data.Dataset.zip(records, seeds).map(finish, num_parallel_calls=cfg.num_worker)
    return ds.prefetch(PREFETCH_BATCHES).with_options(FIXED_PARALLELISM)


# Parallelism and prefetch are set above, and tf.data's autotuning is off. Its thread sleeps for doubling
# periods, up to seconds, and an iterator's teardown waits for its next wake-up: short predict runs took
# up to twice their time in half the runs, and every eval during training paid the same wait
# (docs/performance.md; scripts/benchmark.py repeat).
FIXED_PARALLELISM = tf.data.Options()
FIXED_PARALLELISM.autotune.enabled = False


# What TensorFlow raises when a record cannot be decoded (InvalidArgument), a TFRecord is corrupt
# (DataLoss) or a Python reader fails inside tf.numpy_function (Unknown).
READ_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.DataLossError, tf.errors.UnknownError)


def describe_failure(cfg, mode, error):
    """Turn a TensorFlow error raised while reading `mode` data into an AiryNetError naming the culprit:
    the CXI reader's own error, else the TFRecord file and record a full scan finds bad, else TensorFlow's
    first line."""
    failure = cxi.take_failure()
    if failure is not None:
        return failure
    kind, files, _ = find_files(cfg, mode)
    if kind == "tfrecord":
        for f in files:  # a full scan finds the file and record, and raises
            tfrecord.check(f, cfg, mode)
    return AiryNetError(f"{dataset_dir(cfg)}: reading {mode} data failed: {first_line(error)}")
