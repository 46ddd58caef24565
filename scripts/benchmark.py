#!/usr/bin/env python3
"""Throughput figures, printed (never asserted): input pipeline, training and prediction.

    python scripts/benchmark.py input      # TFRecord and CXI readers, 259x259 -> 224x224, batch 24
    python scripts/benchmark.py input --baseline   # ... and plain per-shot pipelines on the same data
    python scripts/benchmark.py train      # ResNet-18 224x224x1 batch 24: bare step vs the real loop
    python scripts/benchmark.py train --compare_torch   # ... and the same net's training step under torch.compile
    python scripts/benchmark.py predict    # ResNet-18 224x224x1 batch 24: the step without and with Grad-CAM++
                                           # and airynet.py --mode=predict end to end (defaults, --gradcam=false),
                                           # plain and with XLA (--jit_inference), taking turns round by round
    python scripts/benchmark.py predict --compare_torch   # ... and the same net under torch.compile
    python scripts/benchmark.py ood        # the step with each out-of-distribution score (nn/ood.py) against the
                                           # step without, with and without the Grad-CAM++ maps, taking turns
    python scripts/benchmark.py stages     # predict's hot path stage by stage (read, decode, ..., writer), ms a batch
    python scripts/benchmark.py live       # 1024x1024 pnCCD-like frames from a local Karabo bridge, classified
                                           # at 224x224 live vs offline predict of the same frames as a run
    python scripts/benchmark.py live --view --rounds=3   # live runs publishing without and with a --mode=view
                                           # attached (and a client fetching what its page fetches), taking turns
    python scripts/benchmark.py h5         # HDF5 filters on predict outputs: write, size, read back
    python scripts/benchmark.py repeat --runs=20   # the same airynet.py --mode=predict (or --repeat_mode=train)
                                           # run N times, each in a new process: the spread of the rates

Common flags: --size (stored), --target, --batch_size, --resnet_size, --steps; the data is synthetic,
written once to --work (default /tmp/airynet-bench).
"""
import argparse
import os
import sys
import subprocess
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from nn import config  # noqa: E402
from nn.recipe import PAPER  # noqa: E402  (every benchmark here runs the paper's recipe)
from nn.inputs import cxi, data, simulate, tfrecord


def make_cfg(args, *flags):
    return config.parse_args([f"--ori_width={args.size}", f"--ori_height={args.size}",
                              f"--target_width={args.target}", f"--target_height={args.target}",
                              f"--batch_size={args.batch_size}", f"--resnet_size={args.resnet_size}",
                              f"--num_worker={args.num_worker}", "--use_nchw=false", *flags])


# More shots than the shuffle buffer (data.shuffle_buffer: 5,000 + 3 batches), so that a timed run reads as many
# shots as it takes, the steady state of a real dataset.
SHOTS = 8000


def write_data(args, n=SHOTS):
    """A TFRecord, a stacked CXI and a per-shot CXI directory of n synthetic shots, written once."""
    dirs = {k: os.path.join(args.work, f"{k}{args.size}_{n}") for k in ("tfrecord", "stacked", "shots")}
    if not all(os.path.isdir(d) for d in dirs.values()):
        chunks = [simulate.simulate(min(2000, n - start), 1, args.size, start=start) for start in range(0, n, 2000)]
        images, labels = (np.concatenate(parts) for parts in zip(*chunks))
        ids = np.arange(n)
        for d in dirs.values():
            os.makedirs(d, exist_ok=True)
        tfrecord.write(os.path.join(dirs["tfrecord"], "b_train.tfrecord"), images, labels)
        cxi.write_cxi_stacked(os.path.join(dirs["stacked"], "b_train.cxi"), images, labels, ids)
        cxi.write_cxi_shots(os.path.join(dirs["shots"], "b_train.cxi"), images, labels, ids)
    eval_file = os.path.join(dirs["tfrecord"], "b_eval.tfrecord")  # the training loop evaluates too
    if not os.path.exists(eval_file):
        images, labels = simulate.simulate(96, 2, args.size)
        tfrecord.write(eval_file, images, labels)
    return dirs


def images_per_second(run_batch, n_batches, batch_size):
    """Throughput of n_batches calls of run_batch(), each handling batch_size images."""
    start = time.perf_counter()
    for _ in range(n_batches):
        run_batch()
    return n_batches * batch_size / (time.perf_counter() - start)


def steady_rates(datasets, args):
    """{name: [images/s of each of args.rounds timed runs of args.steps batches]}. The datasets take
    turns, run by run, so that a slow spell of a shared machine hits them alike; only one is iterated at
    a time (an idle one would fill its prefetch queues meanwhile and look faster when its turn came), and
    each run starts after a warm-up that fills the shuffle buffer and the queues."""
    rates = {name: [] for name in datasets}
    for _ in range(args.rounds):
        for name, dataset in datasets.items():
            batches = iter(dataset)
            for _ in range(10):
                next(batches)
            rates[name].append(images_per_second(lambda: next(batches), args.steps, args.batch_size))
            del batches
    return rates


def plain_pipelines(args, dirs):
    """The straightforward pipelines, per record, with tf.image ops: the yardstick on the same machine.
    TFRecord: parse, crop or pad, resize and flip one record at a time in parallel map calls. HDF5: one
    shot at a time from a Python generator over h5py (in shuffled order), then the same per-shot map."""
    import h5py
    size, crop = args.size, config.crop_size(args.size)

    def prepare(image):
        image = tf.image.resize_with_crop_or_pad(tf.cast(image, tf.float32), crop, crop)
        image = tf.image.resize(image, (args.target, args.target))
        return tf.image.random_flip_up_down(tf.image.random_flip_left_right(image))

    def parse(record):
        example = tf.io.parse_single_example(record, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})
        return prepare(tf.reshape(tf.io.decode_raw(example["image/encoded"], tf.uint16), [size, size, 1]))

    def shots(path, stacked):
        with h5py.File(path, "r") as f:
            if stacked:
                images = f["entry_1/data_1/data"]
            else:
                images = [f[k]["instrument_1/detector_1/data"] for k in f if k.startswith("entry_")]
            while True:
                for i in np.random.default_rng(1).permutation(len(images)):
                    yield images[i][...][..., None]

    def from_h5(name):
        path = os.path.join(dirs[name], "b_train.cxi")
        records = tf.data.Dataset.from_generator(lambda: shots(path, name == "stacked"),
                                                 output_signature=tf.TensorSpec([size, size, 1], tf.float32))
        return records.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)

    records = tf.data.TFRecordDataset(os.path.join(dirs["tfrecord"], "b_train.tfrecord")).shuffle(2000).repeat()
    return {"tfrecord": records.map(parse, num_parallel_calls=tf.data.AUTOTUNE),
            "stacked": from_h5("stacked"), "shots": from_h5("shots")}


def bench_input(args):
    # A timed run (after the warm-up, which fills the shuffle buffer) must end before the last shot: the
    # next pass starts by refilling the whole buffer, a pause a real dataset meets once an epoch.
    if data.shuffle_buffer(args.batch_size) + (10 + args.steps + 10) * args.batch_size > SHOTS:  # + read-ahead
        sys.exit(f"--steps={args.steps}: a timed input run must stay within the {SHOTS} benchmark shots")
    dirs = write_data(args)
    print(f"input pipeline, {args.size}x{args.size} uint16 -> {args.target}x{args.target}, batch {args.batch_size}, "
          f"train mode (shuffle, flips), {args.num_worker} workers, {os.cpu_count()} cores")
    plain = plain_pipelines(args, dirs) if args.baseline else {}
    for name, directory in dirs.items():
        cfg = make_cfg(args, f"--data_dir={os.path.dirname(directory)}/", f"--dataset={os.path.basename(directory)}")
        datasets = {"airynet": data.dataset(cfg, PAPER, "train")}
        if name in plain:
            datasets["plain"] = plain[name].batch(args.batch_size).prefetch(tf.data.AUTOTUNE)
        runs = steady_rates(datasets, args)
        rates = {k: np.median(v) for k, v in runs.items()}
        # The first run reads its shots for the first time (a per-shot CXI file: HDF5 looks each one up).
        line = (f"  {name:<9} {rates['airynet']:8.0f} img/s (median of {args.rounds} runs of {args.steps} batches; "
                f"first run {runs['airynet'][0]:.0f})")
        if "plain" in rates:
            ratio = rates["airynet"] / rates["plain"]
            line += f"; plain per-shot pipeline {rates['plain']:.0f} img/s (AiryNet {ratio:.2f}x)"
        print(line, flush=True)


def bench_train(args):
    from nn import train
    from nn.models.networks import build_model
    cfg = make_cfg(args, "--dataset=synthetic")
    model = build_model(cfg)
    optimizer = train.make_optimizer(cfg, PAPER, model)
    images = tf.random.uniform([args.batch_size, args.target, args.target, 1], 0, 1000)
    labels = tf.cast(tf.random.uniform([args.batch_size, cfg.num_classes]) > 0.5, tf.float32)

    @tf.function
    def bare_step():
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = train.loss_terms(cfg, model, labels, logits, args.batch_size)["loss"]
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    bare_step()
    bare = images_per_second(bare_step, args.steps, args.batch_size)
    print(f"train ResNet-{args.resnet_size} {args.target}x{args.target}x1 batch {args.batch_size}")
    print(f"  bare train step (in-memory batch): {bare:8.1f} img/s")

    # The real code path: airynet's training loop on TFRecords (input pipeline, flips, metrics, logging),
    # which logs its own throughput without the first call (graph tracing), eval and checkpoints.
    dirs = write_data(args)
    import logging
    import re
    import airynet
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("airynet").addHandler(handler)
    assert airynet.main(cli_train_flags(args, dirs, args.steps + 2)) == 0
    loop = float(next(re.search(r"throughput ([\d.]+) img/s", m).group(1) for m in lines if "throughput" in m))
    print(f"  airynet training loop (TFRecord input, flips, metrics, one log): {loop:8.1f} img/s "
          f"({100 * (bare / loop - 1):+.1f}% time per step over the bare step)")
    if args.compare_torch:
        compiled = torch_training_rate(cfg, args.steps)
        print(f"  PyTorch torch.compile training step, same net: {compiled:8.1f} img/s "
              f"(bare step {bare / compiled:.2f}x, airynet loop {loop / compiled:.2f}x)")


def cli_train_flags(args, dirs, steps):
    """airynet.py flags training `steps` steps on the TFRecords of write_data, into a new run directory,
    with one evaluation and one log line at the end."""
    return ["--mode=train", f"--data_dir={args.work}/", f"--dataset={os.path.basename(dirs['tfrecord'])}",
            f"--log_dir={args.work}/runs", f"--out_dir_name=bench{time.time_ns()}", f"--train_steps={steps}",
            f"--steps_per_eval={steps}", "--eval_steps=1", f"--log_step={steps}", f"--dataset_size={SHOTS}",
            f"--ori_width={args.size}", f"--ori_height={args.size}", f"--target_width={args.target}",
            f"--target_height={args.target}", f"--batch_size={args.batch_size}", f"--resnet_size={args.resnet_size}"]


def write_predict_data(args, n):
    """A TFRecord of n synthetic shots with bunch IDs (the predict schema) and a run directory holding
    an initialised network (checkpoint and config.json), both written once."""
    from nn import checkpoints
    from nn.models.networks import build_model
    directory = os.path.join(args.work, f"predict{args.size}_{n}")
    run_dir = os.path.join(args.work, f"run_resnet{args.resnet_size}_{args.target}")
    if not os.path.isdir(directory):
        images = np.concatenate([simulate.simulate(min(2000, n - start), 3, args.size, start=start)[0]
                                 for start in range(0, n, 2000)])
        os.makedirs(directory + ".tmp", exist_ok=True)
        tfrecord.write(os.path.join(directory + ".tmp", "b_predict.tfrecord"), images, 1000 + np.arange(n))
        os.replace(directory + ".tmp", directory)
    if checkpoints.latest_checkpoint(run_dir) is None:
        cfg = make_cfg(args, "--dataset=synthetic")
        os.makedirs(run_dir, exist_ok=True)
        tf.train.CheckpointManager(tf.train.Checkpoint(model=build_model(cfg)), run_dir,
                                   checkpoint_name=checkpoints.CHECKPOINT_NAME, max_to_keep=1).save(0)
        config.save_config(cfg, run_dir)
    return directory, run_dir


def cli_predict_flags(args, directory, run_dir, out_dir):
    return ["--mode=predict", f"--load_dir={run_dir}", f"--data_dir={os.path.dirname(directory)}/",
            f"--dataset={os.path.basename(directory)}", f"--predict_dir={out_dir}", "--overwrite=true",
            f"--batch_size={args.batch_size}"]


def cli_predict_rate(flags):
    """(shots per second after the first batch, seconds of the whole command, seconds of XLA compiles) of
    one `airynet.py --mode=predict` in this process, from its own log lines."""
    import re
    import airynet
    started = time.perf_counter()
    with LogLines() as lines:
        assert airynet.main(flags) == 0
    seconds = time.perf_counter() - started
    line = next(m for m in lines if m.startswith("Predicted"))
    compiles = sum(float(re.search(r"took ([\d.]+) s", m)[1]) for m in lines if m.startswith("XLA compile took"))
    return float(re.search(r"([\d.]+) after the first batch", line)[1]), seconds, compiles


def cpu_model():
    """The CPU's model name as /proc/cpuinfo gives it (Linux), else the platform's word for it."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_line():
    load = os.getloadavg()[0]
    return (f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {load:.1f} over the last minute"
            + (": other jobs share the cores" if load > os.cpu_count() else ""))


# Step variants of the predict benchmark: (maps, --jit_inference). Without maps "maps" compiles nothing,
# so it is "none".
STEP_VARIANTS = {"forward, plain": (None, "none"), "forward, XLA": (None, "all"),
                 "with maps, plain": ("layer", "none"), "with maps, XLA maps (default)": ("layer", "maps"),
                 "with maps, XLA all": ("layer", "all")}
# End-to-end runs: airynet.py flags.
CLI_VARIANTS = {"defaults, plain": ["--jit_inference=none"], "defaults, XLA maps (default)": [],
                "defaults, XLA all": ["--jit_inference=all"],
                "--gradcam=false, plain": ["--gradcam=false", "--jit_inference=none"],
                "--gradcam=false, XLA all": ["--gradcam=false", "--jit_inference=all"],
                "--h5_compression=zstd": ["--h5_compression=zstd"], "--h5_compression=none": ["--h5_compression=none"]}


def bench_predict(args):
    """The step's variants (forward only and with the maps; plain, XLA for the maps, XLA for all) and
    torch.compile's forward pass, then airynet.py --mode=predict end to end with the default outputs and
    with --gradcam=false, plain and with XLA, all taking turns for --rounds rounds. Each rate is also given
    as a ratio to torch.compile's (or the plain forward's) in the same round; the medians of those ratios
    close the output."""
    import logging
    import keras
    import airynet
    from nn import inference
    from nn.models.networks import build_model
    extra = args.flags.split()
    cfg = make_cfg(args, "--dataset=synthetic", *extra)
    keras.mixed_precision.set_global_policy(airynet.MIXED_PRECISION_POLICIES[cfg.mixed_precision])
    model = build_model(cfg)
    print(f"predict ResNet-{args.resnet_size} {args.target}x{args.target}x1 batch {args.batch_size} {args.flags}")
    print("  " + machine_line(), flush=True)
    images = tf.random.uniform([cfg.batch_size, cfg.target_height, cfg.target_width, cfg.target_depth], 0, 100)
    logging.getLogger("airynet").setLevel(logging.INFO)  # for make_step's compile times
    steps, compiles = {}, []
    for name, (maps, jit) in STEP_VARIANTS.items():
        with LogLines() as lines:
            steps[name] = inference.make_step(cfg, model, maps, jit=jit)
        compiles += [f"{name}: {line[4:]}" for line in lines]  # "XLA compile took ..." less "XLA "
    print("  XLA compiles: " + "; ".join(compiles))
    runs = {name: (lambda step=step: step(images)["probabilities"].numpy()) for name, step in steps.items()}
    for run_batch in runs.values():
        run_batch()  # trace and warm up
    yardstick = "forward, plain"
    if args.compare_torch:
        yardstick = "torch.compile forward"
        runs[yardstick] = torch_inference_batch(cfg)
    cli_variants = CLI_VARIANTS if args.predict_shots else {}  # --predict_shots=0: the steps only
    if cli_variants:
        directory, run_dir = write_predict_data(args, args.predict_shots)
        out_dir = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else args.work, "airynet-bench-predict")
    rates, commands = {name: [] for name in [*runs, *cli_variants]}, {name: [] for name in cli_variants}
    for round_ in range(args.rounds):
        for name, run_batch in runs.items():
            rates[name].append(images_per_second(run_batch, args.steps, cfg.batch_size))
        for name, flags in cli_variants.items():
            rate, seconds, compiles = cli_predict_rate(cli_predict_flags(args, directory, run_dir, out_dir) + flags + extra)
            rates[name].append(rate)
            commands[name].append((seconds, compiles))
        print(f"  round {round_ + 1} ({os.getloadavg()[0]:.1f} load): " + ", ".join(
            f"{name} {values[-1]:.1f}" for name, values in rates.items()), flush=True)
    print(f"  img/s (step: {args.steps} batches a round; end to end: {args.predict_shots} shots from a TFRecord, "
          f"after the first batch), median of {args.rounds} rounds, and the median ratio to {yardstick}:")
    for name, values in rates.items():
        ratio = np.median(np.array(values) / np.array(rates[yardstick]))
        line = f"    {name:<36} {np.median(values):7.1f}   {ratio:.2f}x"
        if name in commands:
            seconds, compiles = np.median(np.array(commands[name]), axis=0)
            line += f"   command {seconds:.1f} s" + (f", XLA compiles {compiles:.1f} s" if compiles else "")
        print(line)
    print("  " + machine_line())


def bench_ood(args):
    """The predict step with each out-of-distribution method's score against the same step without one
    (with the Grad-CAM++ maps, as predict's default, and without), taking turns batch by batch for
    --steps x --rounds batches: the median ratio of neighbouring batches' times gives the score's cost. The statistics are fitted
    on random features of the right sizes: the cost does not depend on their values."""
    import tempfile
    from nn import inference, ood
    from nn.models.networks import build_model
    cfg = make_cfg(args, "--dataset=synthetic", *args.flags.split())
    model = build_model(cfg)
    images = tf.random.uniform([cfg.batch_size, cfg.target_height, cfg.target_width, cfg.target_depth], 0, 100)
    print(f"ood ResNet-{args.resnet_size} {args.target}x{args.target}x1 batch {args.batch_size} {args.flags}")
    print("  " + machine_line(), flush=True)
    rng = np.random.default_rng(0)
    runs = {}
    with tempfile.TemporaryDirectory() as run_dir:
        for maps in ("layer", None):
            cfg.load_dir = ""
            runs[(maps, "none")] = inference.make_step(cfg, model, maps)
            for method in ood.METHODS:
                sizes = [int(t.shape[-1]) for t in ood.feature_tensors(model, method)]
                stats = ood.fit_stats(method, [rng.normal(size=(ood.FIT_SHOTS, k)) for k in sizes])
                ood.save(run_dir, method, stats, 1.0, "random statistics (benchmark)")
                cfg.load_dir = run_dir
                runs[(maps, method)] = inference.make_step(cfg, model, maps)
                if maps is None:  # the score alone, on features of a batch, in the same rotation
                    runs[("score alone", method)] = _score_alone(ood.load(cfg), model, cfg.batch_size)
    for step in runs.values():
        step(images)["probabilities"].numpy()  # trace and warm up
    # One batch of each variant in turn, --steps times over: a batch's time against the batch without a
    # score just before it, so that the load of a shared machine, which changes over seconds, cancels.
    seconds = {key: [] for key in runs}
    for _ in range(args.steps * args.rounds):
        for key, step in runs.items():
            start = time.perf_counter()
            step(images)["probabilities"].numpy()
            seconds[key].append(time.perf_counter() - start)
    print(f"  {args.steps * args.rounds} batches of each, taking turns batch by batch ({os.getloadavg()[0]:.1f} load): "
          f"img/s (median batch), and the cost per shot against the step without a score (median of the ratios "
          f"of batches run one after the other; quartiles):")
    for (maps, method), values in seconds.items():
        ratios = np.array(values) / np.array(seconds[(maps if maps != "score alone" else None, "none")])
        ratios -= maps != "score alone"  # the score alone: its time as a share of the step's
        q1, median, q3 = np.percentile(ratios, [25, 50, 75])
        print(f"    {maps if maps == 'score alone' else 'with maps' if maps else 'no maps':<11} {method:<20} {cfg.batch_size / np.median(values):7.1f}   "
              f"{median:+.1%} ({q1:+.1%} .. {q3:+.1%})")
    print("  " + machine_line())


def _score_alone(scorer, model, batch_size):
    """A step-like callable: the scorer on random logits and features of one batch, as a tf.function."""
    features = [tf.random.normal([batch_size, int(t.shape[-1])]) for t in scorer.tensors(model)]
    logits = tf.random.normal([batch_size, int(model.output.shape[-1])])
    score = tf.function(lambda: scorer(logits, features))
    return lambda images: {"probabilities": score()["ood_score"]}


def bench_stages(args):
    """Where the time of predict's hot path goes: each stage timed alone, batch after batch, on --steps
    batches of the predict TFRecord (--size -> --target px), in ms a batch: wall time and the process's CPU
    time (all its threads: what a stage takes from the cores the network needs), medians over the batches.
    The network's stages run the step of the flags (--flags, e.g. --flags=--jit_inference=none), then
    airynet.py --mode=predict runs end to end on the same data for comparison."""
    import glob
    import shutil
    import tempfile
    from nn import checkpoints, inference, predict
    from nn.inputs.preprocess import preprocess
    from nn.models import networks
    from nn.outputs import writers
    directory, run_dir = write_predict_data(args, args.predict_shots)
    extra = args.flags.split()
    cfg = make_cfg(args, f"--data_dir={os.path.dirname(directory)}/", f"--dataset={os.path.basename(directory)}",
                   f"--load_dir={run_dir}", *extra)
    model, _ = checkpoints.restore_model(cfg, PAPER)
    files = sorted(glob.glob(os.path.join(directory, "*.tfrecord")))
    read = iter(tf.data.TFRecordDataset(files).batch(cfg.batch_size).repeat())
    serialized = [next(read) for _ in range(args.steps)]
    decode = tf.function(lambda s: tfrecord.decode_records(s, cfg, "predict"))
    decoded = [decode(s) for s in serialized]
    prepare = tf.function(lambda images: preprocess(images, cfg, PAPER, training=False))
    batches = [dict(extra, image=prepare(images)) for images, extra in decoded]
    forward, with_maps = inference.make_step(cfg, model, None), inference.make_step(cfg, model, "layer")
    results = [with_maps(b["image"]) for b in batches]
    outputs = tf.function(lambda logits: (networks.probabilities(logits, cfg.single_label),
                                          networks.predicted_classes(logits, cfg.single_label)))
    log_act = model.get_layer("log_activation")
    stem = tf.random.normal([cfg.batch_size, *log_act.input.shape[1:]], 0, 100)
    rows = [predict._rows(r, b, with_images=True) for r, b in zip(results, batches)]
    tmp = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    paths = writers.output_paths(tmp, "stages")
    spec = data.dataset(cfg, PAPER, "predict").element_spec
    with writers.Outputs([]) as out:  # left without commit(): the files are removed
        out.writers += [predict._writer(cfg, model, kind, path, (0, 1), spec) for kind, path in paths.items()]
        h5 = out.writers[1]
        stages = {"read (TFRecord)": lambda i: next(read),
                  "decode": lambda i: decode(serialized[i])[0].numpy(),
                  "crop and resize": lambda i: prepare(decoded[i][0]).numpy(),
                  "log activation (part of the forward)": lambda i: log_act(stem).numpy(),
                  "forward": lambda i: forward(batches[i]["image"])["probabilities"].numpy(),
                  "forward and maps": lambda i: with_maps(batches[i]["image"])["probabilities"].numpy(),
                  "probabilities and classes": lambda i: outputs(results[i]["probabilities"])[0].numpy(),
                  "results to numpy": lambda i: predict._rows(results[i], batches[i], with_images=True),
                  "images into the h5": lambda i: h5.write({"bids": rows[i]["bids"], "images": rows[i]["images"]}),
                  "writer thread's work (txt, h5: all fields)": lambda i: out.write(rows[i])}
        print(f"predict's stages, ResNet-{args.resnet_size}, {args.size} -> {args.target} px, batch "
              f"{args.batch_size} {args.flags}; ms a batch, median of {args.steps} batches")
        print("  " + machine_line())
        for name, stage in stages.items():
            stage(0)  # trace and warm up
            wall, cpu = [], []
            for i in range(args.steps):
                started, cpu_started = time.perf_counter(), time.process_time()
                stage(i)
                wall.append(1e3 * (time.perf_counter() - started))
                cpu.append(1e3 * (time.process_time() - cpu_started))
            print(f"    {name:<44} {np.median(wall):8.1f} wall {np.median(cpu):8.1f} CPU", flush=True)
    out_dir = os.path.join(tmp, "cli")
    rate, seconds, compiles = cli_predict_rate(cli_predict_flags(args, directory, run_dir, out_dir) + extra)
    print(f"  airynet.py --mode=predict end to end: {1e3 * args.batch_size / rate:.1f} ms a batch after the first "
          f"({rate:.1f} shots/s); the command took {seconds:.1f} s, XLA compiles {compiles:.1f} s")
    shutil.rmtree(tmp)
    print("  " + machine_line())


def predict_outputs(args):
    """{name: array} of what a default predict run stores for --predict_shots shots: the images as fed,
    the Grad-CAM++ maps (float16) and the probabilities of an initialised network."""
    from nn import checkpoints, inference
    directory, run_dir = write_predict_data(args, args.predict_shots)
    cfg = make_cfg(args, f"--data_dir={os.path.dirname(directory)}/", f"--dataset={os.path.basename(directory)}",
                   f"--load_dir={run_dir}")
    model, _ = checkpoints.restore_model(cfg, PAPER)
    step = inference.make_step(cfg, model)
    parts = []
    for batch in data.dataset(cfg, PAPER, "predict"):
        result = step(batch["image"])
        parts.append({"images": batch["image"].numpy(), "grad_cam": result["grad_cam"].numpy().astype(np.float16),
                      "probs": result["probabilities"].numpy()})
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def h5_filters():
    """The candidate filters: name -> h5py create_dataset keyword arguments."""
    import hdf5plugin
    from nn.outputs import h5out
    blosc = hdf5plugin.Blosc
    return {f"gzip {h5out.GZIP_LEVEL} + shuffle (default, --h5_compression=gzip)": h5out.filter_options("gzip"),
            **{f"gzip {level} + shuffle": {"compression": "gzip", "compression_opts": level, "shuffle": True}
               for level in (1, 2, 3, 4, 6) if level != h5out.GZIP_LEVEL},
            "gzip 1, no shuffle": {"compression": "gzip", "compression_opts": 1},
            "lzf + shuffle": {"compression": "lzf", "shuffle": True},
            "bitshuffle + LZ4 (--h5_compression=lz4)": dict(hdf5plugin.Bitshuffle(cname="lz4")),
            "bitshuffle + Zstd": dict(hdf5plugin.Bitshuffle(cname="zstd")),
            "Blosc LZ4 5 + shuffle": dict(blosc(cname="lz4", clevel=5, shuffle=blosc.SHUFFLE)),
            "Blosc Zstd 1 + shuffle (--h5_compression=zstd)": dict(blosc(cname="zstd", clevel=1, shuffle=blosc.SHUFFLE)),
            "Blosc Zstd 1 + bitshuffle": dict(blosc(cname="zstd", clevel=1, shuffle=blosc.BITSHUFFLE)),
            "Blosc2 Zstd 1 + shuffle": dict(hdf5plugin.Blosc2(cname="zstd", clevel=1, filters=hdf5plugin.Blosc2.SHUFFLE)),
            "none (--h5_compression=none)": {}}


def bench_h5(args):
    """Write the outputs of a predict run with each filter as StackedWriter does (chunks from
    nn.outputs.h5out.chunk_rows, batches of --batch_size), then read everything and single shots back."""
    import h5py
    from nn.outputs import h5out
    outputs = predict_outputs(args)
    path = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else args.work, "airynet-bench.h5")
    raw = sum(v.nbytes for v in outputs.values())
    n = len(outputs["images"])
    shots = np.random.default_rng(0).integers(0, n, 20)
    print(f"predict outputs of {n} shots: images {outputs['images'].shape[1:]} float32, maps "
          f"{outputs['grad_cam'].shape[1:]} float16, probs; {raw / n / 1e3:.0f} kB a shot uncompressed; "
          f"best of {args.rounds} rounds")
    print(f"  {'filter':<48} {'write MB/s':>10} {'CPU MB/s':>9} {'size':>6} {'read all MB/s':>14} {'one shot ms':>12}")
    for name, options in h5_filters().items():
        best = [0.0, 0.0, 0.0, np.inf, 0.0]
        for _ in range(args.rounds):
            start, cpu = time.perf_counter(), time.thread_time()  # CPU time: what other jobs' load leaves alone
            with h5py.File(path, "w") as f:
                for key, values in outputs.items():
                    f.create_dataset(key, shape=(0,) + values.shape[1:], maxshape=(None,) + values.shape[1:],
                                     dtype=values.dtype, chunks=(h5out.chunk_rows(values.dtype, values.shape[1:]),)
                                     + values.shape[1:], **options)
                for first in range(0, n, args.batch_size):
                    end = min(n, first + args.batch_size)
                    for key, values in outputs.items():
                        f[key].resize(end, axis=0)
                        step = f[key].chunks[0]
                        for i in range(first, end, step):
                            f[key][i:min(end, i + step)] = values[i:min(end, i + step)]
            written, cpu = time.perf_counter(), time.thread_time() - cpu
            with h5py.File(path, "r") as f:
                assert all(np.array_equal(f[k][:], v) for k, v in outputs.items())
            read = time.perf_counter()
            with h5py.File(path, "r") as f:
                for i in shots:
                    for key in outputs:
                        f[key][i]
            one = (time.perf_counter() - read) / len(shots)
            best = [max(best[0], raw / (written - start) / 1e6), max(best[1], raw / os.path.getsize(path)),
                    max(best[2], raw / (read - written) / 1e6), min(best[3], one * 1e3), max(best[4], raw / cpu / 1e6)]
        print(f"  {name:<48} {best[0]:10.0f} {best[4]:9.0f} {1 / best[1]:6.1%} {best[2]:14.0f} {best[3]:12.2f}",
              flush=True)
    os.remove(path)


class LogLines(list):
    """Collects the airynet logger's messages (the summaries of predict and live runs)."""

    def __enter__(self):
        import logging
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.append(record.getMessage())
        logging.getLogger("airynet").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging
        logging.getLogger("airynet").removeHandler(self.handler)


def bench_repeat(args):
    """The same CLI command run --runs times, each in a new process (so that anything decided once per
    process, such as thread placement, varies as between a user's runs): each run's rate from its own log
    line, then the distribution."""
    import re
    import shlex
    import statistics
    script = args.airynet or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "airynet.py")
    if args.repeat_mode == "predict":
        directory, run_dir = write_predict_data(args, args.predict_shots)
        out_dir = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else args.work, "airynet-bench-repeat")
        command = lambda: cli_predict_flags(args, directory, run_dir, out_dir)
        pattern, unit = r"([\d.]+) after the first batch", "shots/s after the first batch"
    else:
        dirs = write_data(args)
        command = lambda: cli_train_flags(args, dirs, args.steps)  # a new run directory each time
        pattern, unit = r"throughput ([\d.]+) img/s", "img/s (training loop, its own log line)"
    extra = shlex.split(args.flags)
    rates, walls = [], []
    print(f"{os.path.relpath(script)} --mode={args.repeat_mode} {args.flags}, {args.runs} runs:", flush=True)
    for i in range(args.runs):
        run_flags = command() + extra
        started = time.monotonic()
        done = subprocess.run([sys.executable, script, *run_flags], capture_output=True, text=True)
        walls.append(time.monotonic() - started)
        found = re.search(pattern, done.stderr + done.stdout)
        if done.returncode or not found:
            sys.exit(f"run {i + 1} failed (exit status {done.returncode}): {(done.stderr or done.stdout)[-800:]}")
        rates.append(float(found[1]))
        print(f"  run {i + 1:2d}: {rates[-1]:7.1f} {unit}; the command took {walls[-1]:5.1f} s", flush=True)
    for name, values in ((unit, rates), ("s per command", walls)):
        median = statistics.median(values)
        print(f"  {name}: min {min(values):.1f}, median {median:.1f}, max {max(values):.1f}; min/median "
              f"{min(values) / median:.2f}, max/median {max(values) / median:.2f}")


def live_setup(args, offline=True):
    """The frames (an .npy for the bridge and, for `offline`, a EuXFEL mock run), the model and the flags
    both live and offline runs take: (frames path, source, common flags)."""
    import airynet
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from test_euxfel import PNCCD, write_pnccd_run  # the mock run writer of the tests (EXtra-data's writer)
    frames = np.kron(simulate.simulate(args.frames, seed=5, size=256)[0], np.ones((1, 4, 4))).astype(np.float32)
    if offline:
        write_pnccd_run(os.path.join(args.work, "live", "r0001"), frames)
    os.makedirs(os.path.join(args.work, "live"), exist_ok=True)
    frames_path = os.path.join(args.work, "live", "frames.npy")
    np.save(frames_path, frames)
    run_dir = os.path.join(args.work, "live", "synthetic_model")
    if not os.path.exists(os.path.join(run_dir, "checkpoint")):  # an untrained-but-real run: one step
        airynet.main(["--mode=train", "--dataset=synthetic", f"--data_dir={args.work}/none/",
                      f"--log_dir={args.work}/live", "--out_dir_name=model", "--train_steps=1", "--steps_per_eval=1",
                      "--eval_steps=1", "--dataset_size=24", f"--batch_size={args.batch_size}", "--log_level=WARNING"])
    common = [f"--load_dir={run_dir}", f"--batch_size={args.batch_size}", f"--target_width={args.target}",
              f"--target_height={args.target}", "--overwrite=true", "--log_level=INFO"]
    return frames_path, PNCCD + ":output", common


def live_run(args, port, setup, *flags):
    """One live run from a bridge process of its own: (frames/s, p99 latency, received, processed, dropped)."""
    import re
    import airynet
    frames_path, source, common = setup
    # The bridge in a process of its own, as a local bridge is (karabo-bridge-server-sim,
    # karabo-bridge-serve-files), not threads of the process it is measuring.
    server = subprocess.Popen([sys.executable, "-c", BRIDGE_SERVER, str(port), source, frames_path, str(args.offer)])
    try:
        with LogLines() as lines:
            airynet.main(["--mode=live", f"--bridge=tcp://127.0.0.1:{port}", f"--live_seconds={args.seconds}",
                          f"--predict_dir={args.work}/live/online", *common, *flags])
    finally:
        server.terminate()
        server.wait()
    summary = next(line for line in lines if line.startswith("live: received"))
    received, trains, processed, _, dropped, _, seconds = (float(v) for v in re.findall(r"[\d.]+", summary)[:7])
    p99 = re.search(r"p99 ([\d.]+) s", summary)  # nan when nothing was processed
    return processed / seconds if seconds else 0.0, float(p99[1]) if p99 else float("nan"), received, processed, dropped


def bench_live(args):
    """Live (--mode=live from a local bridge) against offline predict of the same frames as a EuXFEL run,
    both with the default outputs (txt, stacked h5 with images) and without Grad-CAM++ maps, taking turns."""
    import re
    import airynet
    setup = live_setup(args)
    print(f"live vs offline predict: {args.frames} pnCCD-like frames 1024x1024 (assembled 1078x1024), "
          f"ResNet-{args.resnet_size} at {args.target}x{args.target}, batch {args.batch_size}")
    ratios, p99s = [], []
    for round_ in range(args.rounds):
        with LogLines() as lines:
            airynet.main(["--mode=predict", f"--data_dir={args.work}/live/", "--dataset=r0001", "--gradcam=false",
                          f"--predict_dir={args.work}/live/offline", *setup[2]])
        # The rate after the first batch, which builds the graph (live excludes its set-up too).
        offline = float(re.search(r"Predicted \d+ shots in [\d.]+ s \([\d.]+ shots/s, ([\d.]+) after the first",
                                  "\n".join(lines))[1])
        rate, p99, received, processed, dropped = live_run(args, 45000 + round_, setup)
        print(f"  round {round_ + 1}: live {rate:6.1f} frames/s, offline {offline:6.1f} shots/s, ratio "
              f"{rate / offline:.2f}; latency p99 {p99:.3f} s; received {received:.0f} = processed {processed:.0f} "
              f"+ dropped {dropped:.0f}: {received == processed + dropped}", flush=True)
        ratios.append(rate / offline)
        p99s.append(p99)
    print(f"  {args.rounds} rounds: ratio median {np.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}); "
          f"latency p99 median {np.median(p99s):.3f} s (max {max(p99s):.3f})")


def bench_live_view(args):
    """Live sorting publishing (PUB, images on) without and with a view attached (airynet.py --mode=view
    subscribed, and a client fetching what the page fetches twice a second: summary, 24 shots, the images
    it has not shown yet), taking turns; the view and the client are processes of their own, as at a beamline."""
    import psutil
    setup = live_setup(args, offline=False)
    print(f"live without and with a view: {args.frames} pnCCD-like frames 1024x1024, ResNet-{args.resnet_size} at "
          f"{args.target}x{args.target}, batch {args.batch_size}, --publish_socket=PUB, {args.seconds:.0f} s a run")
    rates = {False: [], True: []}
    for round_ in range(args.rounds):
        for attached in (False, True):
            port = 45100 + 2 * round_ + attached
            publish = [f"--publish=tcp://127.0.0.1:{port + 50}", "--publish_socket=PUB"]
            viewer = [] if not attached else [subprocess.Popen(
                [sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "airynet.py"),
                 "--mode=view", f"--view_source=tcp://127.0.0.1:{port + 50}", f"--view_port={port + 100}"]),
                subprocess.Popen([sys.executable, "-c", PAGE_CLIENT, f"http://127.0.0.1:{port + 100}"])]
            try:
                rate, p99, received, processed, dropped = live_run(args, port, setup, *publish)
                cpu = [sum(psutil.Process(proc.pid).cpu_times()[:2]) for proc in viewer]
            finally:
                for proc in viewer:
                    proc.terminate()
                    proc.wait()
            rates[attached].append(rate)
            used = f", CPU of the view {cpu[0]:.1f} s and of its client {cpu[1]:.1f} s" if cpu else ""
            print(f"  round {round_ + 1}, {'with' if attached else 'without'} a view: {rate:6.2f} frames/s, "
                  f"latency p99 {p99:.3f} s, received {received:.0f}, dropped {dropped:.0f}{used}", flush=True)
    without, with_view = np.median(rates[False]), np.median(rates[True])
    print(f"  median of {args.rounds}: without {without:.2f} frames/s, with a view {with_view:.2f}: "
          f"{with_view / without:.3f}x")


# argv: base URL. What the page fetches twice a second: the summary, a page of 24 shots and the images of
# those it has not shown before (a browser has the others in its cache: the view lets it keep them).
PAGE_CLIENT = """
import json, sys, time, urllib.request
base, shown = sys.argv[1], set()
def get(path):
    try:
        with urllib.request.urlopen(base + path, timeout=5) as r:
            return r.read()
    except OSError:
        return None
while True:
    time.sleep(0.5)
    get("/api/summary")
    page = get("/api/shots?limit=24")
    for shot in json.loads(page)["shots"] if page else []:
        if shot["id"] not in shown:
            shown.add(shot["id"])
            get(f"/api/shots/{shot['id']}/image.png")
"""


# argv: port, source, frames.npy, trains a second (0: as fast as asked). Frames cycled, train IDs counting up.
BRIDGE_SERVER = """
import sys, time
import numpy as np
from karabo_bridge import ServerInThread
port, source, path, rate = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
frames = np.load(path)
with ServerInThread(f"tcp://127.0.0.1:{port}", sock="REP", maxlen=4) as server:
    i, start = 0, time.monotonic()
    while True:
        if rate:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
        try:
            server.feed({source: {"data.image": frames[i % len(frames)]}}, {source: {"timestamp.tid": 10 ** 6 + i}},
                        timeout=0.2)
            i += 1
        except Exception:  # queue full: the classifier is behind
            continue
"""


def torch_net(cfg):
    """The same ResNet-v2 (basic blocks, log activation, leaky ReLU) in PyTorch, uncompiled, in
    channels_last memory: the yardstick for AiryNet's prediction and training.
    Needs `pip install torch==2.13.0` (not a requirement of AiryNet)."""
    import math
    try:
        import torch
    except ImportError:
        sys.exit("--compare_torch needs PyTorch: pip install torch==2.13.0")
    from torch import nn
    from torch.nn import functional as F
    from nn.models import resnet
    blocks, bottleneck = resnet.SIZES[cfg.resnet_size]
    if bottleneck:
        sys.exit(f"--compare_torch: only the basic-block ResNets (18, 34), not --resnet_size={cfg.resnet_size}")
    slope = cfg.relu_leakiness

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride, project):
            super().__init__()
            self.bn1, self.bn2 = nn.BatchNorm2d(c_in, eps=1e-5), nn.BatchNorm2d(c_out, eps=1e-5)
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.proj = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if project else None  # as nn/models/resnet.py

        def forward(self, x):
            pre = F.leaky_relu(self.bn1(x), slope)
            shortcut = x if self.proj is None else self.proj(pre)
            return self.conv2(F.leaky_relu(self.bn2(self.conv1(pre)), slope)) + shortcut

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(cfg.target_depth, 64, 7, 2, 3, bias=False)
            layers, c_in = [], 64
            for n, c_out, stride in zip(blocks, resnet.GROUP_FILTERS, resnet.GROUP_STRIDES):
                for i in range(n):
                    layers.append(Block(c_in, c_out, stride if i == 0 else 1, project=i == 0))
                    c_in = c_out
            self.blocks = nn.Sequential(*layers)
            self.bn, self.fc = nn.BatchNorm2d(c_in, eps=1e-5), nn.Linear(c_in, cfg.num_classes)

        def forward(self, x):
            x = self.stem(x)
            x = cfg.alpha * torch.sign(x) * torch.log1p(math.e * x.abs()) + cfg.beta
            x = self.blocks(F.max_pool2d(x, 3, 2, 1))
            return self.fc(F.leaky_relu(self.bn(x), slope).mean((2, 3)))

    return Net().to(memory_format=torch.channels_last)


def torch_images(cfg):
    import torch
    images = torch.rand(cfg.batch_size, cfg.target_depth, cfg.target_height, cfg.target_width).mul(100)
    return images.to(memory_format=torch.channels_last)


def torch_inference_batch(cfg):
    """A callable that runs one batch through torch_net under torch.compile in inference mode (compiled and
    warmed up here)."""
    import torch
    net, images = torch.compile(torch_net(cfg).eval()), torch_images(cfg)

    def run_batch():
        with torch.inference_mode():
            net(images)

    for _ in range(3):
        run_batch()
    return run_batch


def torch_training_rate(cfg, n_batches, repeats=3):
    """Images per second of torch_net's training step under torch.compile (forward, sigmoid cross-entropy,
    backward, Nesterov SGD with the L2 term as weight decay: the paper's recipe), on one in-memory batch."""
    import torch
    net = torch_net(cfg).train()
    images, labels = torch_images(cfg), (torch.rand(cfg.batch_size, cfg.num_classes) > 0.5).float()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=2e-5)

    @torch.compile
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(3):  # compile and warm up
        step()
    return max(images_per_second(lambda: step().item(), n_batches, cfg.batch_size) for _ in range(repeats))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("input", "train", "predict", "ood", "stages", "h5", "live", "repeat"))
    p.add_argument("--view", action="store_true",
                   help="Live: instead of offline predict, compare live runs without and with a --mode=view attached.")
    p.add_argument("--size", type=int, default=259)
    p.add_argument("--target", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=24)
    p.add_argument("--resnet_size", type=int, default=18)
    p.add_argument("--num_worker", type=int, default=4)
    p.add_argument("--steps", type=int, help="Batches timed: input 60 a run (at most 102), train/predict 40.")
    p.add_argument("--rounds", type=int, default=None,
                   help="Timed runs per pipeline (input; default 5), h5 filter (default 5) or live/offline pair "
                        "(live; default 2, about 45 s each: the ratio moves by 10-20%% between rounds).")
    p.add_argument("--predict_shots", type=int, default=480,
                   help="Predict, stages: shots of each end-to-end run (predict: 0 times the steps only).")
    p.add_argument("--baseline", action="store_true",
                   help="Input: also time plain per-shot pipelines (tf.image ops; h5py generator) on the same data.")
    p.add_argument("--compare_torch", action="store_true",
                   help="Train/predict: also time the same net under PyTorch's torch.compile (needs torch).")
    p.add_argument("--frames", type=int, default=288,
                   help="Live: frames in the run (offline) and cycled (live); 12 batches, as the offline rate after "
                        "the first batch is inflated by the input prefetched while that batch builds the graph.")
    p.add_argument("--seconds", type=float, default=20, help="Live: seconds of each live run.")
    p.add_argument("--offer", type=float, default=0, help="Live: trains offered a second (0: as fast as asked).")
    p.add_argument("--runs", type=int, default=20, help="Repeat: runs of the command.")
    p.add_argument("--repeat_mode", choices=("predict", "train"), default="predict",
                   help="Repeat: predict --predict_shots shots, or train --steps steps.")
    p.add_argument("--airynet", help="Repeat: the airynet.py to run (default: this checkout's), e.g. an older "
                                     "checkout's, for a before/after comparison on the same data.")
    p.add_argument("--flags", default="", help="Repeat, predict, stages: further airynet.py flags, e.g. "
                                                "--flags='--gradcam=false' or --flags='--mixed_precision=bf16'")
    p.add_argument("--work", default="/tmp/airynet-bench")
    args = p.parse_args()
    if args.steps is None:
        args.steps = 60 if args.what == "input" else 40
    if args.rounds is None:
        args.rounds = 2 if args.what in ("live", "predict") else 5
    {"input": bench_input, "train": bench_train, "predict": bench_predict, "ood": bench_ood, "stages": bench_stages,
     "h5": bench_h5, "live": bench_live_view if args.view else bench_live, "repeat": bench_repeat}[args.what](args)


if __name__ == "__main__":
    main()
