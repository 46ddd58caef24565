"""--mode=predict: classify every predict record once, in order, and stream the results to disk.

The files (`{dataset}.txt`, `{dataset}.h5` in the stacked or per-shot layout, optionally `{dataset}.npy`)
are described field by field in README.md, "Outputs". A sharded run (--num_shards > 1, or a SLURM job
array) inserts `.shard{i}of{n}` into the names, and shard i holds records i, i + n, i + 2n, ...;
`merge` (CLI: scripts/merge_predictions.py) joins the shards into the files an unsharded run writes.
Every file is written under its partial name (nn/files.py) and renamed when all are complete, so a crash
never leaves a file that looks finished; existing files are refused unless --overwrite=true.
"""
import contextlib
import logging
import os
import time

import h5py
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from nn import checkpoints, config
from nn.inputs import data, tfrecord
from nn.models import gradcam, networks
from nn.outputs import h5out
from nn.config import AiryNetError, first_line
from nn.files import partial_name

log = logging.getLogger("airynet")

TXT_HEADER = "Bunch_ID:\tClasses:\tProbabilities:\n"
CXI_VERSION = 160


# ----------------------------------------------------------------------------------------------
# The computation: one tf.function per batch

def make_step(cfg, model, maps="layer", conv=False):
    """tf.function images [B, H, W, D] -> {"probabilities", "classes" (uint8) and, unless `maps` is
    None, "grad_cam" float32 [B, C, h, w]}: at the target layer's resolution ("layer") or resized to
    the input size ("resized"); with `conv`, also the target layer's activations "conv" float32
    [B, h, w, K]."""
    spec = tf.TensorSpec([None, cfg.target_height, cfg.target_width, cfg.target_depth], tf.float32)
    thresholds = checkpoints.decision_thresholds(cfg)

    def outputs(logits):
        return {"probabilities": networks.probabilities(logits, cfg.single_label),
                "classes": tf.cast(networks.predicted_classes(logits, cfg.single_label, thresholds), tf.uint8)}

    if maps is None and not conv:
        return tf.function(lambda images: outputs(model(images, training=False)), input_signature=[spec])
    act_model = gradcam.activation_model(model, networks.GRADCAM_LAYER)
    channels_first = gradcam.is_channels_first(model)

    @tf.function(input_signature=[spec])
    def step(images):
        if maps is None:
            acts, logits = act_model(images, training=False)
            result = outputs(logits)
            if channels_first:
                acts = tf.transpose(acts, [0, 2, 3, 1])
        else:
            logits, cams, acts = gradcam.logits_and_maps(act_model, images, channels_first, with_activations=True)
            if maps == "resized":
                cams = gradcam.resize_maps(cams, (cfg.target_height, cfg.target_width))
            result = {**outputs(logits), "grad_cam": cams}
        if conv:
            result["conv"] = tf.cast(acts, tf.float32)
        return result

    return step


def benchmark(cfg, model, n_batches, repeats=2):
    """{variant: images per second} of the predict step alone (no input pipeline, no files) on random
    batches of cfg.batch_size: without maps, with the maps at layer resolution (the stacked layout) and
    resized to the input (the per-shot layout). The variants take turns so that a neighbour's load on
    the CPU hits them alike; the best of `repeats` rounds is reported."""
    images = tf.random.uniform([cfg.batch_size, cfg.target_height, cfg.target_width, cfg.target_depth],
                               0, 100 if cfg.use_log_act else 1)
    variants = {"without maps": None, "with maps (layer size)": "layer", "with maps (resized)": "resized"}
    steps = {name: make_step(cfg, model, maps) for name, maps in variants.items()}
    for step in steps.values():
        step(images)["probabilities"].numpy()  # trace and warm up
    rates = {name: 0.0 for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(n_batches):
                out = step(images)
            out["probabilities"].numpy()
            rates[name] = max(rates[name], n_batches * cfg.batch_size / (time.perf_counter() - start))
    return rates


# ----------------------------------------------------------------------------------------------
# Output files

def shard_of(cfg):
    """(index, count) of this job: the flags, else a SLURM job array, else (0, 1)."""
    count = cfg.num_shards or int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    index = cfg.shard_index
    if index is None:
        index = int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    if count < 1 or not 0 <= index < count:
        raise AiryNetError(f"--shard_index={index}, --num_shards={count}: need 0 <= shard_index < num_shards")
    return index, count


def output_paths(predict_dir, dataset_name, shard=(0, 1), save_npy=False):
    """{"txt", "h5"[, "npy"]} -> path."""
    index, count = shard
    stem = os.path.basename(os.path.normpath(dataset_name)) + (f".shard{index}of{count}" if count > 1 else "")
    kinds = ("txt", "h5", "npy") if save_npy else ("txt", "h5")
    return {kind: os.path.join(predict_dir, f"{stem}.{kind}") for kind in kinds}


def _prepare(paths, overwrite):
    """Create the output directory and refuse to replace existing files unless told to."""
    directory = os.path.dirname(next(iter(paths.values())))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise AiryNetError(f"--predict_dir={directory}: cannot create it ({e.strerror})") from e
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise AiryNetError(f"{existing[0]}: exists; pass --overwrite=true to replace it or choose another "
                           f"--predict_dir")


class _Outputs:
    """Writers that write to `<path>.partial` and appear under their final names only on commit().

    Used as a context manager: leaving it without commit() (an error, Ctrl-C) removes the partial files
    and leaves every existing file as it was. OSErrors become AiryNetErrors naming the file."""

    def __init__(self, writers):
        self.writers = writers

    def __enter__(self):
        return self

    def write(self, batch):
        for w in self.writers:
            with _naming(w.tmp):
                w.write(batch)

    def commit(self):
        for w in self.writers:
            with _naming(w.tmp):
                w.close()
        for w in self.writers:
            with _naming(w.path):
                os.replace(w.tmp, w.path)
        self.writers = []

    def __exit__(self, *exc):
        for w in self.writers:
            try:
                w.close()
            except Exception:  # the file is deleted anyway; the first error is the one to report
                pass
            if os.path.exists(w.tmp):
                os.remove(w.tmp)
        return False


@contextlib.contextmanager
def _naming(path):
    """Turn an OSError (disk full, permissions) into an AiryNetError that names `path`."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or first_line(e)
        raise AiryNetError(f"{path}: writing failed ({reason}); the partial file is removed, files completed "
                           f"before are intact") from e


class TxtWriter:
    def __init__(self, path):
        self.path, self.tmp = path, partial_name(path)
        self.file = open(self.tmp, "w")
        self.file.write(TXT_HEADER)

    def write(self, batch):
        self.file.writelines(format_txt_line(bid, flags, probs)
                             for bid, flags, probs in zip(batch["bids"], batch["preds"], batch["probs"]))

    def close(self):
        self.file.close()


def format_txt_line(bid, flags, probs):
    """The original's line: its Python lists' text without quotes and brackets."""
    return f"{bid}\t{', '.join(str(int(f)) for f in flags)}\t{', '.join(f'{p:.4f}' for p in probs)}\n"


# A flush writes the file's metadata and evicts the chunk cache, so that appending the next batch reads
# and recompresses the last chunks again: at live's small batches, once a second (and when writing pauses)
# is what a viewer needs.
SWMR_FLUSH_SECONDS = 1.0


class StackedWriter:
    """The stacked layout (see the module docstring). `fields`: name -> (dtype, shape per shot,
    attributes); rows are appended with write({name: array [B, ...]}). `compression`: one of
    h5out.COMPRESSIONS."""

    def __init__(self, path, fields, class_names, attrs, compression="gzip", swmr=False):
        """swmr: write in HDF5's single-writer/multiple-reader mode, flushed after a batch at most every
        SWMR_FLUSH_SECONDS (and by flush()), so that a viewer can read the file while it grows (--mode=live)."""
        self.path, self.tmp = path, partial_name(path)
        self.swmr = swmr
        self.flushed, self.flushed_rows = time.monotonic(), 0
        filters = h5out.filter_options(compression)
        self.file = h5py.File(self.tmp, "w", libver="latest" if swmr else "earliest")
        self.rows = 0
        f = self.file
        f.attrs.update({"layout": "stacked", "class_names": class_names, **attrs, "h5_compression": compression,
                        "h5_filters": h5out.describe(compression)})
        for name, (dtype, shape, attrs) in fields.items():
            shape = tuple(shape)
            f.create_dataset(name, shape=(0,) + shape, maxshape=(None,) + shape, dtype=dtype,
                             chunks=(h5out.chunk_rows(dtype, shape),) + shape, **filters).attrs.update(attrs)
        f["cxi_version"] = CXI_VERSION
        f["entry_1/result_1/score"] = h5py.SoftLink("/probs")
        f["entry_1/result_1/headings"] = np.array(class_names, dtype=h5py.string_dtype())
        if "images" in fields:
            f["entry_1/data_1/data"] = h5py.SoftLink("/images")
        if swmr:
            f.swmr_mode = True

    def write(self, batch):
        n = len(batch["bids"])
        for name, values in batch.items():
            if name in self.file:
                ds = self.file[name]
                ds.resize(self.rows + n, axis=0)
                # A chunk per call: h5py holds its process-wide lock for the whole call, compression
                # included, and an HDF5 input reader waits for it; per chunk it waits for one at most.
                step = ds.chunks[0]
                for i in range(0, n, step):
                    ds[self.rows + i:self.rows + i + step] = values[i:i + step]
        self.rows += n
        if self.swmr and time.monotonic() - self.flushed >= SWMR_FLUSH_SECONDS:
            self.flush()

    def flush(self):
        """Make the rows written so far visible to readers."""
        if self.rows != self.flushed_rows:
            self.file.flush()
        self.flushed, self.flushed_rows = time.monotonic(), self.rows

    def close(self):
        self.file.close()


class PerShotWriter:
    """The original's layout: one group per shot (see the module docstring)."""

    def __init__(self, path, class_names, attrs, shard=(0, 1), counter_names=False):
        self.path, self.tmp = path, partial_name(path)
        self.file = h5py.File(self.tmp, "w", track_order=True)
        self.file.attrs.update({"layout": "per_shot", "class_names": class_names, **attrs})
        self.shard = shard
        self.counter_names = counter_names  # --dataset=cxidb: groups named by the record index
        self.rows = 0  # records written by this shard

    def write(self, batch):
        index, count = self.shard
        for i, bid in enumerate(batch["bids"]):
            record = (self.rows + i) * count + index  # the shot's index in the unsharded record stream
            if self.counter_names:
                name = str(record)
            else:
                name = str(bid) if str(bid) not in self.file else f"{bid}_{record}"
            g = self.file.create_group(name)
            if self.counter_names:  # the original's cxidb fields: class indices as scalars
                if "labels" in batch:
                    g.create_dataset("ground_truth", data=np.argmax(batch["labels"][i]), dtype="float32")
                g.create_dataset("pred", data=np.argmax(batch["probs"][i]), dtype="int32")
            elif "labels" in batch:
                g["label"] = batch["labels"][i]
            image = batch["images"][i]
            g["img"] = image[..., 0] if image.shape[-1] == 1 else image  # gray as [H, W], as the original
            g.create_dataset("prediction", data=batch["preds"][i], dtype="int32")
            g["probability"] = batch["probs"][i]
            if "conv" in batch:
                g["conv"] = batch["conv"][i]
            if "grad_cam" in batch:
                for c, cam in enumerate(batch["grad_cam"][i]):
                    g[f"{c}/grad_cam"] = cam
        self.rows += len(batch["bids"])

    def close(self):
        self.file.close()


class NpyWriter:
    """The original's pickled dict (only with --save_npy=true), written at the end."""

    def __init__(self, path, shard=(0, 1)):
        self.path, self.tmp = path, partial_name(path)
        self.shard = shard
        self.shots = {}
        open(self.tmp, "wb").close()  # fail early if the file cannot be created

    def write(self, batch):
        index, count = self.shard
        for bid, flags, probs in zip(batch["bids"], batch["preds"], batch["probs"]):
            record = len(self.shots) * count + index
            self.shots[f"shot_{record + 1:05d}"] = [int(bid), flags.copy(), probs.copy()]

    def close(self):
        if self.shots is not None:
            with open(self.tmp, "wb") as f:
                np.save(f, self.shots, allow_pickle=True)
            self.shots = None


def _attrs(cfg):
    return {"dataset": cfg.dataset, "load_dir": cfg.load_dir, "network": (
        f"resnet{cfg.resnet_size}" if cfg.airynet_type == "resnet" else f"vgg{cfg.vgg_size}"),
        "gradcam": "Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19) of the class logits at layer "
                   f"{networks.GRADCAM_LAYER}" if cfg.gradcam else "off"}


def map_size(cfg, model):
    """(h, w) of the Grad-CAM++ maps at the target layer's resolution."""
    shape = model.get_layer(networks.GRADCAM_LAYER).output.shape
    return tuple(shape[2:4]) if gradcam.is_channels_first(model) else tuple(shape[1:3])


def conv_shape(cfg, model):
    """(h, w, K) of the Grad-CAM layer's activations, channels last."""
    shape = tuple(model.get_layer(networks.GRADCAM_LAYER).output.shape[1:])
    return shape[1:] + shape[:1] if gradcam.is_channels_first(model) else shape


def _fields(cfg, map_shape, has_labels, images, conv=None):
    c = cfg.num_classes
    fields = {"bids": ("int64", (), {}), "probs": ("float32", (c,), {}), "preds": ("uint8", (c,), {})}
    if map_shape is not None:
        fields["grad_cam"] = ("float16", (c,) + tuple(map_shape), {
            "layer": networks.GRADCAM_LAYER, "upsample_to": [cfg.target_height, cfg.target_width],
            "upsample_method": "bilinear, half-pixel centres (tf.image.resize)"})
    if conv is not None:
        fields["conv"] = ("float32", conv, {"layer": networks.GRADCAM_LAYER,
                                            "axes": "shot, height, width, channels"})
    if images:
        fields["images"] = ("float32", (cfg.target_height, cfg.target_width, cfg.target_depth), {})
    if has_labels:
        fields["labels"] = ("float32", (c,), {})
    return fields


# ----------------------------------------------------------------------------------------------
# The run

def run(cfg, recipe, model, dataset=None):
    """Predict every record of `dataset` (default: nn.inputs.data.dataset(cfg, recipe, "predict", shard=...)) and
    write the files described in the module docstring."""
    shard = shard_of(cfg)
    paths = output_paths(cfg.predict_dir, cfg.dataset, shard, cfg.save_npy)
    _prepare(paths, cfg.overwrite)
    from_files = dataset is None
    if from_files:
        dataset = data.dataset(cfg, recipe, "predict", shard=shard)
    stacked = cfg.h5_layout == "stacked"
    step = make_step(cfg, model, maps=("layer" if stacked else "resized") if cfg.gradcam else None,
                     conv=cfg.save_conv)
    # The per-shot layout always holds the image; --save_images=false leaves it out of the stacked file.
    with_images = cfg.save_images or not stacked
    has_labels = "label" in dataset.element_spec
    names = config.class_names(cfg)
    start, shots, first_batch = time.perf_counter(), 0, None
    with _Outputs([]) as out:
        for kind, path in paths.items():
            with _naming(partial_name(path)):
                if kind == "txt":
                    out.writers.append(TxtWriter(path))
                elif kind == "npy":
                    out.writers.append(NpyWriter(path, shard))
                elif stacked:
                    fields = _fields(cfg, map_size(cfg, model) if cfg.gradcam else None, has_labels, with_images,
                                     conv_shape(cfg, model) if cfg.save_conv else None)
                    if "pulse" in dataset.element_spec:  # sources with pulses (EuXFEL runs): (bunch ID, pulse)
                        fields["pulses"] = ("int64", (), {})
                    out.writers.append(StackedWriter(path, fields, names, _attrs(cfg), cfg.h5_compression))
                else:
                    out.writers.append(PerShotWriter(path, names, _attrs(cfg), shard,
                                                     counter_names=tfrecord.is_one_hot_predict(cfg)))
        # Batches are compressed and written by one thread while the next ones are computed (TensorFlow
        # and h5py release the GIL). At most two wait in its queue, so memory stays flat; a write error
        # surfaces at the next batch, naming the file.
        with tqdm(unit="shot", desc=f"predict {os.path.basename(paths['h5'])}", dynamic_ncols=True,
                  mininterval=2.0, disable=None) as bar, h5out.WriterThread(out.write) as writer:
            for batch in _reading(cfg, dataset, from_files):
                writer.put(_rows(step(batch["image"]), batch, with_images))
                shots += len(batch["bunch_id"])
                bar.update(len(batch["bunch_id"]))
                if first_batch is None:
                    first_batch = time.perf_counter(), shots  # the first call builds the graph
        out.commit()
    _log_rate(start, first_batch, shots, paths, shard)


def _rows(result, batch, with_images):
    """One batch of the network's results and its inputs as numpy arrays, named as the files name them."""
    rows = {"bids": batch["bunch_id"].numpy(), "probs": result["probabilities"].numpy(),
            "preds": result["classes"].numpy()}
    for name in ("grad_cam", "conv"):  # present when --gradcam / --save_conv asked for them
        if name in result:
            rows[name] = result[name].numpy()
    if with_images:
        rows["images"] = batch["image"].numpy()
    if "label" in batch:
        rows["labels"] = batch["label"].numpy()
    if "pulse" in batch:
        rows["pulses"] = batch["pulse"].numpy()
    return rows


def _log_rate(start, first_batch, shots, paths, shard):
    end = time.perf_counter()
    if shots == 0:
        log.warning("The predict data of shard %d of %d holds no shots; the files are empty", *shard)
    steady = ""
    if first_batch and shots > first_batch[1]:
        steady = f", {(shots - first_batch[1]) / (end - first_batch[0]):.1f} after the first batch"
    log.info("Predicted %d shots in %.1f s (%.1f shots/s%s); wrote %s", shots, end - start,
             shots / (end - start), steady, ", ".join(paths.values()))


def _reading(cfg, dataset, from_files):
    """Iterate `dataset`, turning a read failure of the predict files into an AiryNetError naming them."""
    iterator = iter(dataset)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except data.READ_ERRORS as e:
            if not from_files:
                raise
            raise data.describe_failure(cfg, "predict", e) from e
        yield batch


# ----------------------------------------------------------------------------------------------
# Merging the shards of a job array

MERGE_BLOCK_BYTES = 64 << 20  # rows are interleaved in blocks of about this size


def merge(predict_dir, dataset_name, num_shards, overwrite=False):
    """Join `{dataset}.shard{i}of{n}.*` into the files an unsharded run writes (same content, same
    record order: record j comes from shard j % n). Returns the files written; the shards stay."""
    finals = output_paths(predict_dir, dataset_name, save_npy=True)
    shards = [output_paths(predict_dir, dataset_name, (i, num_shards), save_npy=True) for i in range(num_shards)]
    kinds = [kind for kind in finals if any(os.path.exists(s[kind]) for s in shards)]
    if num_shards < 2 or not kinds:
        raise AiryNetError(f"{shards[0]['h5']}: no shard files of {num_shards} shards to merge")
    for kind in kinds:
        missing = [s[kind] for s in shards if not os.path.exists(s[kind])]
        if missing:
            raise AiryNetError(f"{missing[0]}: missing; every shard of the job must have finished")
    paths = {kind: finals[kind] for kind in kinds}
    _prepare(paths, overwrite)
    merge_fns = {"txt": _merge_txt, "h5": _merge_h5, "npy": _merge_npy}
    with _Outputs([]) as out:
        for kind, path in paths.items():
            with _naming(partial_name(path)):
                merge_fns[kind](path, [s[kind] for s in shards], out.writers)
        out.commit()
    log.info("Merged %d shards into %s", num_shards, ", ".join(paths.values()))
    return list(paths.values())


def _merge_txt(path, sources, writers):
    """Each merge function appends its writer to `writers` as soon as it exists, so that a failure
    removes the partial file."""
    writers.append(writer := TxtWriter(path))
    files = [open(p) for p in sources]
    try:
        for f in files:
            if f.readline() != TXT_HEADER:
                raise AiryNetError(f"{f.name}: not a prediction txt file (wrong header)")
        j = 0
        while line := files[j % len(files)].readline():
            writer.file.write(line)
            j += 1
    finally:
        for f in files:
            f.close()


def _merge_npy(path, sources, writers):
    writers.append(writer := NpyWriter(path))
    # Our own shard files, written by this tool at the user's request (--save_npy=true).
    parts = [np.load(p, allow_pickle=True).item() for p in sources]
    iterators = [iter(part.items()) for part in parts]
    for j in range(sum(len(part) for part in parts)):
        key, value = next(iterators[j % len(iterators)])
        writer.shots[key] = value


def _merge_h5(path, sources, writers):
    files = [h5py.File(p, "r") for p in sources]
    f0 = files[0]
    try:
        layout = f0.attrs.get("layout")
        attrs = {k: v for k, v in f0.attrs.items() if k not in ("layout", "class_names")}
        names = [str(n) for n in f0.attrs["class_names"]]
        if layout == "per_shot":
            writers.append(writer := PerShotWriter(path, names, attrs))
            groups = [list(f.keys()) for f in files]
            for j in range(sum(len(g) for g in groups)):
                name = groups[j % len(files)][j // len(files)]
                target = name if name not in writer.file else f"{name}_{j}"
                files[j % len(files)].copy(files[j % len(files)][name], writer.file, name=target)
            return
        if layout != "stacked":
            raise AiryNetError(f"{sources[0]}: not an AiryNet prediction file (layout attribute {layout!r})")
        rows = [name for name, ds in f0.items()  # the datasets with one row per shot
                if isinstance(ds, h5py.Dataset) and ds.maxshape[:1] == (None,)]
        fields = {name: (f0[name].dtype, f0[name].shape[1:], dict(f0[name].attrs)) for name in rows}
        compression = str(f0.attrs.get("h5_compression", "gzip"))  # files written before the flag: gzip
        writers.append(writer := StackedWriter(path, fields, names, attrs, compression))
        row_bytes = sum(f0[name].dtype.itemsize * int(np.prod(f0[name].shape[1:])) for name in rows)
        block = max(1, MERGE_BLOCK_BYTES // (row_bytes * len(files)))
        for start in range(0, len(f0["bids"]), block):
            batch = {}
            for name in rows:
                parts = [f[name][start:start + block] for f in files]
                merged = np.empty((sum(len(p) for p in parts),) + parts[0].shape[1:], parts[0].dtype)
                for i, part in enumerate(parts):
                    merged[i::len(files)] = part  # shard i holds the records i, i + n, i + 2n, ...
                batch[name] = merged
            writer.write(batch)
    finally:
        for f in files:
            f.close()
