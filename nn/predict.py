"""--mode=predict: classify every predict record once, in order, and stream the results to disk.

The files (`{dataset}.txt`, `{dataset}.h5` in the stacked or per-shot layout, optionally `{dataset}.npy`)
are written by nn/outputs/writers.py and described field by field in README.md, "Outputs". A sharded run
(--num_shards > 1, or a SLURM job array) inserts `.shard{i}of{n}` into the names, and shard i holds
records i, i + n, i + 2n, ...; `merge` (CLI: scripts/merge_predictions.py) joins the shards into the
files an unsharded run writes. Every file is written under its partial name (nn/files.py) and renamed
when all are complete, so a crash never leaves a file that looks finished; existing files are refused
unless --overwrite=true, and so is a second run (or merge) writing the same names while one is under way
(`{name}.lock`, nn/outputs/writers.py). The h5 file's root attributes record what produced it
(nn/outputs/provenance.py).
"""
import logging
import os
import time

import h5py
import numpy as np
from tqdm import tqdm

from nn import config, inference, ood
from nn.inputs import data, tfrecord
from nn.models import networks
from nn.outputs import h5out, provenance, writers
from nn.config import AiryNetError
from nn.files import partial_name

log = logging.getLogger("airynet")


def shard_of(cfg):
    """(index, count) of this job: the flags, else a SLURM job array, else (0, 1)."""
    count = cfg.num_shards or int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    index = cfg.shard_index
    if index is None:
        index = int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    if count < 1 or not 0 <= index < count:
        raise AiryNetError(f"--shard_index={index}, --num_shards={count}: need 0 <= shard_index < num_shards")
    return index, count


# ----------------------------------------------------------------------------------------------
# The run

def run(cfg, recipe, model, dataset=None):
    """Predict every record of `dataset` (default: nn.inputs.data.dataset(cfg, recipe, "predict", shard=...)) and
    write the files described in the module docstring. A second run writing the same files meanwhile
    refuses at start."""
    shard = shard_of(cfg)
    paths = writers.output_paths(cfg.predict_dir, cfg.dataset, shard, cfg.save_npy)
    with writers.claimed(cfg.predict_dir, paths.values(), cfg.overwrite):
        from_files = dataset is None
        if from_files:
            dataset = data.dataset(cfg, recipe, "predict", shard=shard)
        attrs = _attrs(cfg, data.find_files(cfg, "predict")[0] if from_files else None)
        start = time.perf_counter()
        first_batch, shots = _predict(cfg, model, dataset, from_files, paths, attrs)
    _log_rate(start, first_batch, shots, paths, shard)


def _predict(cfg, model, dataset, from_files, paths, attrs):
    """Write the files at `paths`; -> ((time, shots) after the first batch or None, shots)."""
    stacked = cfg.h5_layout == "stacked"
    step = inference.make_step(cfg, model, maps=("layer" if stacked else "resized") if cfg.gradcam else None,
                               conv=cfg.save_conv)
    # The per-shot layout always holds the image; --save_images=false leaves it out of the stacked file.
    with_images = cfg.save_images or not stacked
    shots, first_batch = 0, None
    with writers.Outputs([]) as out:
        for kind, path in paths.items():
            with writers.writing(partial_name(path)):  # added at once: a later failure removes its file
                out.writers.append(_writer(cfg, model, kind, path, dataset.element_spec, attrs))
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
    return first_batch, shots


def _writer(cfg, model, kind, path, element_spec, attrs):
    """The writer of the file `kind` ("txt", "h5" or "npy") at `path`; `attrs`: the h5 file's root
    attributes."""
    shard = shard_of(cfg)
    if kind == "txt":
        return writers.TxtWriter(path)
    if kind == "npy":
        return writers.NpyWriter(path, shard)
    names = config.class_names(cfg)
    if cfg.h5_layout == "stacked":
        return writers.StackedWriter(path, _stacked_fields(cfg, model, element_spec), names, attrs,
                                     cfg.h5_compression)
    return writers.PerShotWriter(path, names, attrs, shard, counter_names=tfrecord.is_one_hot_predict(cfg))


def _stacked_fields(cfg, model, element_spec):
    """The stacked file's datasets for this run: labels and pulse IDs (EuXFEL runs: bunch ID = train ID)
    where the data has them; the maps at the target layer's resolution with --gradcam, its activations
    with --save_conv."""
    image_shape = (cfg.target_height, cfg.target_width, cfg.target_depth) if cfg.save_images else None
    fields = writers.stacked_fields(cfg.num_classes, image_shape, labels="label" in element_spec,
                                    pulses="pulse" in element_spec, ood=ood.load(cfg) is not None)
    if cfg.gradcam:
        fields["grad_cam"] = ("float16", (cfg.num_classes,) + inference.map_size(model), {
            "layer": networks.GRADCAM_LAYER, "upsample_to": [cfg.target_height, cfg.target_width],
            "upsample_method": "bilinear, half-pixel centres (tf.image.resize)"})
    if cfg.save_conv:
        fields["conv"] = ("float32", inference.conv_shape(model), {"layer": networks.GRADCAM_LAYER,
                                                                   "axes": "shot, height, width, channels"})
    return fields


def _attrs(cfg, data_kind):
    """The root attributes that record the run (nn/outputs/provenance.py) and the maps' method."""
    maps = (f"Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19) of the class logits at layer {networks.GRADCAM_LAYER}"
            if cfg.gradcam else "off")
    return {**provenance.attributes(cfg, data_kind), "gradcam": maps}


def _rows(result, batch, with_images):
    """One batch of the network's results and its inputs as numpy arrays, named as the files name them."""
    rows = {"bids": batch["bunch_id"].numpy(), "probs": result["probabilities"].numpy(),
            "preds": result["classes"].numpy()}
    for name in ("grad_cam", "conv", "ood_score", "unknown"):  # present when asked for / fitted
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
    finals = writers.output_paths(predict_dir, dataset_name, save_npy=True)
    shards = [writers.output_paths(predict_dir, dataset_name, (i, num_shards), save_npy=True)
              for i in range(num_shards)]
    kinds = [kind for kind in finals if any(os.path.exists(s[kind]) for s in shards)]
    if num_shards < 2 or not kinds:
        raise AiryNetError(f"{shards[0]['h5']}: no shard files of {num_shards} shards to merge")
    for kind in kinds:
        missing = [s[kind] for s in shards if not os.path.exists(s[kind])]
        if missing:
            raise AiryNetError(f"{missing[0]}: missing; every shard of the job must have finished")
    paths = {kind: finals[kind] for kind in kinds}
    merge_fns = {"txt": _merge_txt, "h5": _merge_h5, "npy": _merge_npy}
    with writers.claimed(predict_dir, paths.values(), overwrite), writers.Outputs([]) as out:
        for kind, path in paths.items():
            with writers.writing(partial_name(path)):
                merge_fns[kind](path, [s[kind] for s in shards], out.writers)
        out.commit()
    log.info("Merged %d shards into %s", num_shards, ", ".join(paths.values()))
    return list(paths.values())


def _merge_txt(path, sources, opened):
    """Each merge function appends its writer to `opened` as soon as it exists, so that a failure
    removes the partial file."""
    opened.append(writer := writers.TxtWriter(path))
    files = [open(p) for p in sources]
    try:
        for f in files:
            if f.readline() != writers.TXT_HEADER:
                raise AiryNetError(f"{f.name}: not a prediction txt file (wrong header)")
        j = 0
        while line := files[j % len(files)].readline():
            writer.file.write(line)
            j += 1
    finally:
        for f in files:
            f.close()


def _merge_npy(path, sources, opened):
    opened.append(writer := writers.NpyWriter(path))
    # Our own shard files, written by this tool at the user's request (--save_npy=true).
    parts = [np.load(p, allow_pickle=True).item() for p in sources]
    iterators = [iter(part.items()) for part in parts]
    for j in range(sum(len(part) for part in parts)):
        key, value = next(iterators[j % len(iterators)])
        writer.shots[key] = value


def _merge_h5(path, sources, opened):
    files = [h5py.File(p, "r") for p in sources]
    f0 = files[0]
    try:
        layout = f0.attrs.get("layout")
        attrs = {k: v for k, v in f0.attrs.items() if k not in ("layout", "class_names")}
        names = [str(n) for n in f0.attrs["class_names"]]
        if layout == "per_shot":
            opened.append(writer := writers.PerShotWriter(path, names, attrs))
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
        opened.append(writer := writers.StackedWriter(path, fields, names, attrs, compression))
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
