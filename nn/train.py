"""Training and evaluation: the single home of the loss, the optimizer step, the predictions and the
metrics (what the original's Estimator model_fn defined), plus the loops around them.

The training loop is a custom tf.function loop rather than `model.fit` because the run must stop and
save at an exact step on SIGTERM, refuse to save after a NaN loss, resume at the step it stopped, and
alternate fixed-length training chunks with evaluation, all under tf.distribute.
"""
import atexit
import glob
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from nn import config, data, distribute
from nn.config import AiryNetError
from nn.networks import build_model

log = logging.getLogger("airynet")

LR_EPOCHS = (30, 60, 120, 150)  # the learning rate drops 10x at each of these epochs
LR_FACTORS = (1.0, 0.1, 0.01, 1e-3, 1e-4)
CHECKPOINT_NAME = "model.ckpt"
KEEP_CHECKPOINTS = 10
CHECKPOINT_EVERY_S = 3600
TRAIN_EVAL_STEPS = 100  # the original evaluated 100 batches after each training chunk


# ----------------------------------------------------------------------------------------------
# The model function: loss, optimizer, predictions, metrics

def learning_rate(cfg, replicas=1):
    """lr * global_batch / 128, divided by 10 at epochs 30, 60, 120 and 150."""
    global_batch = cfg.batch_size * replicas
    base = cfg.lr * global_batch / 128
    steps_per_epoch = cfg.dataset_size / global_batch
    boundaries = [int(round(e * steps_per_epoch)) for e in LR_EPOCHS]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, [base * f for f in LR_FACTORS])


def make_optimizer(cfg, model, replicas=1):
    optimizer = keras.optimizers.SGD(learning_rate(cfg, replicas), momentum=cfg.gamma, nesterov=True)
    if cfg.mixed_precision == "fp16":
        # float16 gradients underflow: scale the loss up and the gradients back down. Steps whose
        # gradients overflow are skipped and halve the scale (a few at the start, while it settles).
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    # Built here, inside the strategy scope: a lazily built optimizer fails its first distributed step.
    optimizer.build(model.trainable_variables)
    return optimizer


def probabilities(cfg, logits):
    return tf.nn.softmax(logits) if cfg.single_label else tf.sigmoid(logits)


def predicted_classes(cfg, logits):
    """0/1 flags: round(sigmoid) for multi-label data, the arg-max one-hot for single-label data."""
    if cfg.single_label:
        return tf.one_hot(tf.argmax(logits, axis=-1), tf.shape(logits)[-1])
    return tf.cast(logits > 0.0, tf.float32)  # round(sigmoid(x)) without the rounding at exactly 0.5


def loss_terms(cfg, model, labels, logits, global_batch):
    """Cross-entropy + mean of the per-layer L1/L2 penalties (+ weight decay), scaled for tf.distribute:
    each replica returns its share of the global-batch average, so summing over replicas gives it."""
    if cfg.single_label:
        per_example = tf.nn.softmax_cross_entropy_with_logits(labels, logits)
    else:
        per_example = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits), axis=-1)
    cross_entropy = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
    penalties = model.losses
    regularization = tf.add_n(penalties) / len(penalties) if penalties else tf.constant(0.0)
    if cfg.use_weight_decay:
        regularization += cfg.weight_decay * tf.add_n([tf.nn.l2_loss(v) for v in model.trainable_variables])
    regularization = tf.nn.scale_regularization_loss(regularization)
    return {"loss": cross_entropy + regularization, "cross_entropy": cross_entropy,
            "regularization": regularization}


class ConfusionCounts(keras.metrics.Metric):
    """Per-class true/false positives/negatives, [num_classes, 4] = (tp, fp, fn, tn)."""

    def __init__(self, num_classes, name="confusion", **kwargs):
        super().__init__(name=name, **kwargs)
        self.counts = self.add_variable((num_classes, 4), initializer="zeros", name="counts",
                                        dtype="float64", aggregation="sum")

    def update_state(self, labels, predictions):
        labels = tf.cast(labels > 0.5, tf.float64)
        predictions = tf.cast(predictions, tf.float64)
        tp = tf.reduce_sum(labels * predictions, axis=0)
        fp = tf.reduce_sum((1 - labels) * predictions, axis=0)
        fn = tf.reduce_sum(labels * (1 - predictions), axis=0)
        tn = tf.reduce_sum((1 - labels) * (1 - predictions), axis=0)
        self.counts.assign_add(tf.stack([tp, fp, fn, tn], axis=1))

    def result(self):
        return self.counts


def _ratio(numerator, denominator):
    return float(numerator / denominator) if denominator else 0.0


def metrics_from_counts(counts, names):
    """All reported metrics from per-class (tp, fp, fn, tn) counts."""
    counts = np.asarray(counts, np.float64)
    tp, fp, fn, tn = counts.T
    TP, FP, FN, TN = counts.sum(axis=0)
    denominator = math.sqrt((TP + FP) * (TP + FN) * (TN + FP) * (TN + FN))
    per_class, f1s = [], []
    for i, name in enumerate(names):
        defined = tp[i] + fp[i] + fn[i] > 0  # a class never present and never predicted has no F1
        f1 = _ratio(2 * tp[i], 2 * tp[i] + fp[i] + fn[i]) if defined else None
        if f1 is not None:
            f1s.append(f1)
        per_class.append({"name": name, "precision": _ratio(tp[i], tp[i] + fp[i]),
                          "recall": _ratio(tp[i], tp[i] + fn[i]), "f1": f1, "support": int(tp[i] + fn[i]),
                          "accuracy": _ratio(tp[i] + tn[i], counts[i].sum())})
    return {
        "accuracy": _ratio(TP + TN, counts.sum()),
        "mean_per_class_accuracy": float(np.mean([c["accuracy"] for c in per_class])),
        "precision": _ratio(TP, TP + FP),
        "recall": _ratio(TP, TP + FN),
        "true_positives": int(TP), "false_positives": int(FP), "false_negatives": int(FN),
        "true_negatives": int(TN),
        "mcc": float((TP * TN - FP * FN) / denominator) if denominator else 0.0,
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "micro_f1": _ratio(2 * TP, 2 * TP + FP + FN),
        "per_class": per_class,
    }


def format_metrics(m):
    lines = [f"accuracy {m['accuracy']:.4f}  mean per-class accuracy {m['mean_per_class_accuracy']:.4f}  "
             f"precision {m['precision']:.4f}  recall {m['recall']:.4f}  MCC {m['mcc']:.4f}  "
             f"macro-F1 {m['macro_f1']:.4f}  micro-F1 {m['micro_f1']:.4f}  "
             f"TP {m['true_positives']} FP {m['false_positives']} FN {m['false_negatives']}",
             f"{'class':<18}{'precision':>10}{'recall':>10}{'F1':>10}{'support':>10}"]
    for c in m["per_class"]:
        f1 = "n/a" if c["f1"] is None else f"{c['f1']:.4f}"
        lines.append(f"{c['name']:<18}{c['precision']:>10.4f}{c['recall']:>10.4f}{f1:>10}{c['support']:>10}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Checkpoints

def latest_checkpoint(run_dir):
    return tf.train.latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None


def restore(checkpoint, path, cfg, partial=False):
    """Restore `path`, turning a mismatch with the model the flags describe into an AiryNetError."""
    try:
        status = checkpoint.restore(path)
        if partial:
            status.expect_partial()
        status.assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
        arch = (f"--airynet_type={cfg.airynet_type} --resnet_size={cfg.resnet_size} "
                f"--vgg_size={cfg.vgg_size} --num_classes={cfg.num_classes}")
        raise AiryNetError(f"{path}: checkpoint does not match the network the flags describe ({arch}): "
                           f"{str(e).strip().splitlines()[0]}") from e


def step_of(path):
    return int(path.rsplit("-", 1)[1])


def restore_model(cfg):
    """The network of the run in cfg.load_dir, with its latest weights (for eval/predict/save)."""
    path = latest_checkpoint(cfg.load_dir)
    if path is None:
        raise AiryNetError(f"--load_dir={cfg.load_dir}: no checkpoint ({CHECKPOINT_NAME}-STEP) found there")
    model = build_model(cfg)
    restore(tf.train.Checkpoint(model=model), path, cfg, partial=True)
    log.info("Restored %s (step %d)", path, step_of(path))
    return model, step_of(path)


# ----------------------------------------------------------------------------------------------
# Training

class StopSignal:
    """Turns SIGTERM/SIGINT into a flag that the loop checks between steps (SLURM preemption)."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _image_summaries(cfg, images, labels, logits, step):
    """Input images (log scale, as a physicist views them) and labels next to predictions."""
    shown = images[:3]
    shown = tf.math.log1p(tf.maximum(shown, 0.0)) if cfg.use_log_act else shown
    shown = shown / (tf.reduce_max(shown, axis=[1, 2, 3], keepdims=True) + 1e-12)
    tf.summary.image("input_images", shown, step=step, max_outputs=3)
    versus = tf.concat([labels, probabilities(cfg, logits)], axis=1)[tf.newaxis, :, :, tf.newaxis]
    tf.summary.image("labels_vs_predictions", versus, step=step)


def train(cfg):
    strategy, cluster = distribute.make_strategy(cfg)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.batch_size * replicas
    # The datasets check their sources as they are built: bad data fails before the run directory is made.
    # On GPUs the distributed iterators copy the next batches into GPU memory while a step runs.
    to_device = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    train_ds = strategy.distribute_datasets_from_function(
        lambda ctx: data.dataset(cfg, "train", input_context=ctx), to_device)
    eval_ds = strategy.distribute_datasets_from_function(
        lambda ctx: data.dataset(cfg, "eval", input_context=ctx), to_device)
    run_dir, resume_path = _prepare_run_dir(cfg, cluster)
    distribute.log_start(cfg, strategy, resume_path, cluster)

    with strategy.scope():
        model = build_model(cfg)
        optimizer = make_optimizer(cfg, model, replicas)
        counts = ConfusionCounts(cfg.num_classes)
        # The SGD is saved, not the fp16 loss-scale wrapper around it, so that a run can be resumed
        # with any --mixed_precision; a resumed fp16 run starts its loss scale afresh.
        sgd = getattr(optimizer, "inner_optimizer", optimizer)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=sgd)
    # Only the chief keeps checkpoints; the other workers must still save (a collective op) but
    # into a private temporary directory, removed at exit (kept at --log_level=DEBUG, for inspection).
    ckpt_dir = run_dir if cluster.is_chief else tempfile.mkdtemp(prefix="airynet-worker-")
    if not cluster.is_chief:
        if cfg.log_level == "DEBUG":
            log.debug("This worker's private checkpoints go to %s and are kept", ckpt_dir)
        else:
            atexit.register(shutil.rmtree, ckpt_dir, ignore_errors=True)
    manager = tf.train.CheckpointManager(checkpoint, ckpt_dir, checkpoint_name=CHECKPOINT_NAME,
                                         max_to_keep=KEEP_CHECKPOINTS if cluster.is_chief else 1)
    if resume_path:
        restore(checkpoint, resume_path, cfg)
    if cluster.is_chief:
        # A run killed while saving leaves the save's temporary directory behind. That checkpoint never
        # reached the `checkpoint` file, which is written last, so the directory is garbage.
        for leftover in glob.glob(os.path.join(glob.escape(run_dir), f"{CHECKPOINT_NAME}-*_temp")):
            shutil.rmtree(leftover, ignore_errors=True)
    step = int(optimizer.iterations.numpy())

    train_iter, eval_iter = iter(train_ds), iter(eval_ds)
    writer = tf.summary.create_file_writer(run_dir) if cluster.is_chief else tf.summary.create_noop_writer()
    eval_writer = (tf.summary.create_file_writer(os.path.join(run_dir, "eval")) if cluster.is_chief
                   else tf.summary.create_noop_writer())
    sums = {k: keras.metrics.Sum(name=k) for k in ("cross_entropy", "regularization", "steps")}

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            terms = loss_terms(cfg, model, labels, logits, global_batch)
            scaled_loss = optimizer.scale_loss(terms["loss"])  # the loss itself unless fp16
        grads = tape.gradient(scaled_loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        counts.update_state(labels, predicted_classes(cfg, logits))
        return terms, logits

    if cfg.jit_compile:
        # XLA compiles the per-replica step; the loop around it reads the input iterator, which XLA cannot.
        replica_step = tf.function(replica_step, jit_compile=True)

    @tf.function
    def train_steps(iterator, n):
        """n steps in one graph call; stops early when the loss turns NaN/Inf."""
        finite = tf.constant(True)
        for _ in tf.range(n):
            terms, _ = strategy.run(replica_step, args=next(iterator))
            loss = strategy.reduce("SUM", terms["loss"], axis=None)
            finite = tf.math.is_finite(loss)
            if not finite:
                break
            for k in ("cross_entropy", "regularization"):
                sums[k].update_state(strategy.reduce("SUM", terms[k], axis=None))
            sums["steps"].update_state(1.0)
        return finite

    @tf.function
    def summary_step(iterator):
        """One extra forward pass for the image summaries (every log_step steps, so it costs little)."""
        def forward(images, labels):
            return images, labels, model(images, training=False)
        images, labels, logits = strategy.run(forward, args=next(iterator))
        pick = lambda t: strategy.experimental_local_results(t)[0]
        return pick(images), pick(labels), pick(logits)

    @tf.function
    def eval_step(iterator):
        def forward(images, labels):
            counts.update_state(labels, predicted_classes(cfg, model(images, training=False)))
        strategy.run(forward, args=next(iterator))

    saved_step = step if resume_path else None

    def save(reason):
        nonlocal saved_step
        if step != saved_step:  # e.g. a stop right after a chunk's checkpoint; the same on every worker
            path = manager.save(checkpoint_number=step)
            saved_step = step
            if cluster.is_chief:
                log.info("Saved %s (%s)", path, reason)
        return time.time()

    vote = distribute.make_vote(strategy)
    eval_steps = cfg.eval_steps or TRAIN_EVAL_STEPS
    names = config.class_names(cfg)
    last_save = time.time()
    steps_per_call, exit_code, stopping = 1, 0, False
    bar = tqdm(total=cfg.train_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not cluster.is_chief or None)
    with StopSignal() as stop:
        first_call, timed_from, timed_steps, timed_seconds = True, (time.time(), step), 0, 0.0
        while step < cfg.train_steps:
            chunk_end = min((step // cfg.steps_per_eval + 1) * cfg.steps_per_eval, cfg.train_steps)
            while step < chunk_end:
                next_log = (step // cfg.log_step + 1) * cfg.log_step
                # Alone this is a formality; in a cluster all workers agree to stop, save and step together.
                stopping, hourly, n = vote(stop.received is not None, time.time() - last_save > CHECKPOINT_EVERY_S,
                                           min(steps_per_call, chunk_end - step, next_log - step))
                if stopping:
                    break
                if hourly:
                    last_save = save("hourly")
                started, before = time.time(), step
                try:
                    finite = train_steps(train_iter, tf.constant(n))
                except data.READ_ERRORS as e:
                    raise data.describe_failure(cfg, "train", e) from e
                step = int(optimizer.iterations.numpy())
                if not bool(finite):
                    last = manager.latest_checkpoint or "none"
                    raise AiryNetError(f"step {step}: the loss is NaN or Inf; stopped without saving "
                                       f"(last good checkpoint: {last}). Lower --lr or check the data.")
                bar.update(step - before)  # fewer than n when fp16 loss scaling skipped overflowing steps
                if first_call:  # the first call traces the graph; throughput counts the calls after it
                    first_call, timed_from = False, (time.time(), step)
                # Aim at about one graph call per second, so that signals and the bar stay responsive.
                seconds_per_step = (time.time() - started) / n
                steps_per_call = max(1, min(cfg.log_step, int(1.0 / max(seconds_per_step, 1e-6))))
                if step != before and step % cfg.log_step == 0:
                    _log_training(cfg, writer, sums, counts, optimizer, step, bar)
                    with writer.as_default():
                        _image_summaries(cfg, *summary_step(train_iter), step=step)
            if stopping:
                reason = f"{stop.received} received" if stop.received else "another worker was stopped"
                save(reason)
                log.warning("Stopped (%s) at step %d. Rerun with --load_dir=%s to resume.", reason, step, run_dir)
                exit_code = 130 if stop.received == "SIGINT" else 143
                break
            timed_steps += step - timed_from[1]
            timed_seconds += time.time() - timed_from[0]
            last_save = save(f"end of chunk at step {step}")
            counts.reset_state()
            evaluated = 0
            while evaluated < eval_steps and not stop.received:  # a signal cuts the eval short
                try:
                    eval_step(eval_iter)
                except data.READ_ERRORS as e:
                    raise data.describe_failure(cfg, "eval", e) from e
                evaluated += 1
            metrics = metrics_from_counts(counts.result().numpy(), names)  # read on every worker: a collective
            counts.reset_state()
            bar.clear()
            log.info("Eval at step %d over %d batches:\n%s", step, evaluated, format_metrics(metrics))
            with eval_writer.as_default():
                for k in ("accuracy", "mean_per_class_accuracy", "precision", "recall", "mcc", "macro_f1"):
                    tf.summary.scalar(k, metrics[k], step=step)
            eval_writer.flush()
            timed_from = (time.time(), step)
    bar.close()
    writer.flush()
    if exit_code == 0:
        log.info("Training finished at step %d; run directory %s", step, run_dir)
    if timed_seconds > 0:
        log.info("Training throughput %.1f img/s over %d steps (logging and summaries included; the first "
                 "call, which traces the graph, evaluation and checkpoints excluded)",
                 timed_steps * global_batch / timed_seconds, timed_steps)
    return exit_code


def _log_training(cfg, writer, sums, counts, optimizer, step, bar):
    n = max(sums["steps"].result().numpy(), 1.0)
    cross_entropy = sums["cross_entropy"].result().numpy() / n
    regularization = sums["regularization"].result().numpy() / n
    m = metrics_from_counts(counts.result().numpy(), config.class_names(cfg))
    lr = float(optimizer.learning_rate)  # the schedule's value at the current step
    bar.write(f"step {step}: lr {lr:.5g}  cross-entropy {cross_entropy:.4f}  train accuracy {m['accuracy']:.4f}  "
              f"confusion [[TN {m['true_negatives']} FP {m['false_positives']}] "
              f"[FN {m['false_negatives']} TP {m['true_positives']}]]")
    with writer.as_default():
        for name, value in (("learning_rate", lr), ("cross_entropy", cross_entropy),
                            ("regularization_penalty", regularization), ("train_accuracy", m["accuracy"]),
                            ("mcc", m["mcc"])):
            tf.summary.scalar(name, value, step=step)
    for m in sums.values():
        m.reset_state()
    counts.reset_state()


def _prepare_run_dir(cfg, cluster):
    """-> (run_dir, checkpoint to resume from or None). Fresh runs get a new directory; --load_dir resumes."""
    if cfg.load_dir:
        if not os.path.isdir(cfg.load_dir):
            raise AiryNetError(f"--load_dir={cfg.load_dir}: no such run directory")
        run_dir = cfg.load_dir
        resume = latest_checkpoint(run_dir)
        if resume is None and not os.path.isfile(os.path.join(run_dir, config.CONFIG_FILE)):
            raise AiryNetError(f"--load_dir={run_dir}: holds neither a checkpoint nor a {config.CONFIG_FILE}")
    else:
        run_dir, resume = cluster.run_dir or config.new_run_dir(cfg), None
    if cluster.is_chief:
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:
            raise AiryNetError(f"--log_dir={cfg.log_dir}: cannot create the run directory {run_dir} "
                               f"({e.strerror})") from e
        config.save_config(cfg, run_dir)
    return run_dir, resume


# ----------------------------------------------------------------------------------------------
# Evaluation (--mode=eval)

def evaluate(cfg):
    model, step = restore_model(cfg)
    ds = data.dataset(cfg, "eval", one_pass=cfg.eval_steps is None)
    if cfg.eval_steps:
        ds = ds.take(cfg.eval_steps)
    counts = ConfusionCounts(cfg.num_classes)

    @tf.function
    def forward(images):
        logits = model(images, training=False)
        return probabilities(cfg, logits), predicted_classes(cfg, logits)

    scores, truths, predicted = [], [], []
    try:
        for images, labels in tqdm(ds, desc="eval", unit="batch", dynamic_ncols=True):
            probs, classes = forward(images)
            counts.update_state(labels, classes)
            scores.append(probs.numpy())
            truths.append(labels.numpy())
            predicted.append(classes.numpy().astype(np.uint8))
    except data.READ_ERRORS as e:
        raise data.describe_failure(cfg, "eval", e) from e
    if not scores:
        raise AiryNetError(f"{data.dataset_dir(cfg)}: the eval data holds no shots")
    metrics = metrics_from_counts(counts.result().numpy(), config.class_names(cfg))
    metrics = {"step": step, "shots": int(sum(len(s) for s in scores)), **metrics}
    out_dir = os.path.join(cfg.load_dir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, "metrics.json"), lambda f: json.dump(metrics, f, indent=2), "w")
    _atomic_write(os.path.join(out_dir, "scores.npz"),
                  lambda f: np.savez(f, probabilities=np.concatenate(scores), labels=np.concatenate(truths),
                                     predictions=np.concatenate(predicted),  # the flags the metrics counted
                                     class_names=np.array(config.class_names(cfg))), "wb")
    log.info("Eval of step %d over %d shots:\n%s", step, metrics["shots"], format_metrics(metrics))
    log.info("Wrote %s and scores.npz", os.path.join(out_dir, "metrics.json"))
    return 0


def _atomic_write(path, write, mode):
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        write(f)
    os.replace(tmp, path)
