"""--mode=train: the loss, the optimizer and the loop that alternates training chunks with evaluation
(what the original's Estimator model_fn and train_and_evaluate did), under the run's nn.recipe.Recipe.

The loop is a custom tf.function loop rather than `model.fit` because the run must stop and save at an
exact step on SIGTERM, refuse to save after a NaN loss, resume at the step it stopped, and alternate
fixed-length training chunks with evaluation, all under tf.distribute. Read it in phases:
  1. data and run directory (bad data fails before anything is created);
  2. the state: model, optimizer, averaged weights (`build_learner`) and their checkpoints (`build_state`);
  3. the step functions, pure graph calls returning their numbers (`step_functions`), called on the
     run's input (`StepCalls`);
  4. the loop: training chunks (`train_chunk`), each ending in a checkpoint and an evaluation (`evaluate_chunk`).
"""
import atexit
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections import namedtuple
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from nn import calibrate, checkpoints, config, distribute, metrics, ood
from nn.inputs import data
from nn.models import networks
from nn.config import AiryNetError
from nn.recipe import WeightAverage, averaged_weights, positive_weights, warmup_cosine, weight_average
from nn.signals import StopSignal

log = logging.getLogger("airynet")

LR_EPOCHS = (30, 60, 120, 150)  # the learning rate drops 10x at each of these epochs
LR_FACTORS = (1.0, 0.1, 0.01, 1e-3, 1e-4)
CHECKPOINT_EVERY_S = 3600
TRAIN_EVAL_STEPS = 100  # the original evaluated 100 batches after each training chunk
SECONDS_PER_CALL = 1.0  # steps per graph call are sized so that signals and the progress bar stay responsive


# ----------------------------------------------------------------------------------------------
# The model function: learning rate, optimizer, loss

def learning_rate(cfg, recipe, replicas=1):
    """lr * global_batch / 128, divided by 10 at epochs 30, 60, 120 and 150; or, where the recipe says
    so, warmed up to that peak and decayed along a cosine."""
    global_batch = cfg.batch_size * replicas
    base = cfg.lr * global_batch / 128
    if recipe.cosine_schedule:
        return warmup_cosine(base, cfg.train_steps)
    steps_per_epoch = cfg.dataset_size / global_batch
    boundaries = [int(round(e * steps_per_epoch)) for e in LR_EPOCHS]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, [base * f for f in LR_FACTORS])


def make_optimizer(cfg, recipe, model, replicas=1):
    """Nesterov SGD, with the recipe's decoupled weight decay (none in the paper's)."""
    optimizer = keras.optimizers.SGD(learning_rate(cfg, recipe, replicas), momentum=cfg.gamma, nesterov=True,
                                     weight_decay=recipe.weight_decay or None)
    if recipe.weight_decay:
        # On the kernels only: decaying biases and batch-norm scales towards 0 only fights the normalisation.
        optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
    if cfg.mixed_precision == "fp16":
        # float16 gradients underflow: scale the loss up and the gradients back down. Steps whose
        # gradients overflow are skipped and halve the scale (a few at the start, while it settles).
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    # Built here, inside the strategy scope: a lazily built optimizer fails its first distributed step.
    optimizer.build(model.trainable_variables)
    return optimizer


def loss_terms(cfg, model, labels, logits, global_batch, pos_weight=None):
    """Cross-entropy (positives weighted by `pos_weight` [C] where given) + mean of the per-layer L1/L2
    penalties (+ weight decay), scaled for tf.distribute: each replica returns its share of the
    global-batch average, so summing over replicas gives it."""
    if cfg.single_label:
        per_example = tf.nn.softmax_cross_entropy_with_logits(labels, logits)
    elif pos_weight is not None:
        per_example = tf.reduce_mean(tf.nn.weighted_cross_entropy_with_logits(labels, logits, pos_weight), axis=-1)
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


def confusion_counts(labels, predictions):
    """metrics.confusion_counts inside the graph, (tp, fp, fn, tn) per class: float64 [C, 4], so that sums
    over replicas and steps stay exact."""
    labels = tf.cast(labels > 0.5, tf.float64)
    predictions = tf.cast(predictions > 0.5, tf.float64)
    return tf.stack([tf.reduce_sum(labels * predictions, axis=0), tf.reduce_sum((1 - labels) * predictions, axis=0),
                     tf.reduce_sum(labels * (1 - predictions), axis=0),
                     tf.reduce_sum((1 - labels) * (1 - predictions), axis=0)], axis=1)


# ----------------------------------------------------------------------------------------------
# Phase 2: the state

@dataclass
class Learner:
    """What a training step updates: the network, its optimizer and, where the recipe averages the
    weights, their average (for inference)."""
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    average: WeightAverage = None


def build_learner(cfg, recipe, replicas=1, init_from=""):
    """The run's Learner, built inside the strategy's scope; its network starts from the weights of the run
    in `init_from` where given. A frozen stem is frozen before the optimizer and the average are built, so
    that both hold the trainable weights only (the same on every resume)."""
    model = networks.build_model(cfg, recipe.bn_momentum)
    if init_from:
        checkpoints.load_weights(model, init_from, recipe, cfg, "--init_from",
                                 config.saved_flag(init_from, "freeze_stem", False))
    networks.freeze_stem(model, cfg.freeze_stem)
    return Learner(model, make_optimizer(cfg, recipe, model, replicas), weight_average(recipe, model))


@dataclass
class State:
    """The Learner, its checkpoints and the step it reached."""
    learner: Learner
    checkpoint: tf.train.Checkpoint
    manager: tf.train.CheckpointManager
    step: int
    saved_step: int = None  # the step of the newest checkpoint written or restored
    last_save: float = 0.0  # time.time() of the newest checkpoint (or of the start), for the hourly save

    def save(self, reason, log_it):
        """Checkpoint the current step, unless that step is already saved (e.g. a stop right after a
        chunk's checkpoint; the same on every worker, since saving is a collective)."""
        if self.step != self.saved_step:
            path = self.manager.save(checkpoint_number=self.step)
            self.saved_step = self.step
            if log_it:
                log.info("Saved %s (%s)", path, reason)
        return time.time()


def build_state(cfg, recipe, strategy, cluster, run_dir, resume_path):
    with strategy.scope():
        # A resumed run continues from its own checkpoint, never again from --init_from's.
        learner = build_learner(cfg, recipe, strategy.num_replicas_in_sync, "" if resume_path else cfg.init_from)
        # The SGD is saved, not the fp16 loss-scale wrapper around it, so that a run can be resumed
        # with any --mixed_precision; a resumed fp16 run starts its loss scale afresh.
        saved = {"model": learner.model, "optimizer": getattr(learner.optimizer, "inner_optimizer", learner.optimizer)}
        if learner.average is not None:
            saved["ema"] = learner.average
        checkpoint = tf.train.Checkpoint(**saved)
    # Only the chief keeps checkpoints; the other workers must still save (a collective op) but
    # into a private temporary directory, removed at exit (kept at --log_level=DEBUG, for inspection).
    ckpt_dir = run_dir if cluster.is_chief else tempfile.mkdtemp(prefix="airynet-worker-")
    if not cluster.is_chief:
        if cfg.log_level == "DEBUG":
            log.debug("This worker's private checkpoints go to %s and are kept", ckpt_dir)
        else:
            atexit.register(shutil.rmtree, ckpt_dir, ignore_errors=True)
    manager = checkpoints.make_manager(checkpoint, ckpt_dir, checkpoints.KEEP_CHECKPOINTS if cluster.is_chief else 1)
    if resume_path:
        checkpoints.restore(checkpoint, resume_path, cfg)
    step = int(learner.optimizer.iterations.numpy())
    return State(learner, checkpoint, manager, step, step if resume_path else None, time.time())


def class_weights(cfg, recipe):
    """The loss's positive-class weights [C] where the recipe weighs rare classes up (multi-label data),
    else None."""
    if not recipe.positive_class_weights or cfg.single_label:
        return None
    frequencies = data.class_frequencies(cfg, recipe)
    pos_weight = positive_weights(frequencies)
    log.info("Positive-class weights (from class shares %s): %s", [round(float(f), 3) for f in frequencies],
             [round(float(w), 2) for w in pos_weight])
    return pos_weight


# ----------------------------------------------------------------------------------------------
# Phase 3: the step functions

Steps = namedtuple("Steps", "train eval summary")


def step_functions(cfg, strategy, learner, pos_weight=None):
    """-> Steps(train, eval, summary), tf.functions over a distributed iterator:

    train(iterator, n) -> {"finite", "steps", "cross_entropy", "regularization", "counts"}: n steps
      in one graph call (sums over the steps; stops early when the loss turns NaN/Inf);
    eval(iterator) -> confusion counts [C, 4] of one batch;
    summary(iterator) -> (images, labels, logits) of one batch, for the image summaries.
    """
    eval_step, summary_step = inference_functions(cfg, strategy, learner.model)
    return Steps(train_function(cfg, strategy, learner, pos_weight), eval_step, summary_step)


def train_function(cfg, strategy, learner, pos_weight):
    """Steps.train: forward, loss (positives weighted by `pos_weight` where given), backward and
    optimizer on every replica, then the update of the averaged weights."""
    model, optimizer = learner.model, learner.optimizer
    global_batch = cfg.batch_size * strategy.num_replicas_in_sync
    sum_replicas = lambda t: strategy.reduce("SUM", t, axis=None)

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            terms = loss_terms(cfg, model, labels, logits, global_batch, pos_weight)
            scaled_loss = optimizer.scale_loss(terms["loss"])  # the loss itself unless fp16
        grads = tape.gradient(scaled_loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        counts = confusion_counts(labels, networks.predicted_classes(logits, cfg.single_label))
        return terms, counts

    if cfg.jit_compile:
        # XLA compiles the per-replica step; the loop around it reads the input iterator, which XLA cannot.
        replica_step = tf.function(replica_step, jit_compile=True)

    @tf.function
    def train_steps(iterator, n):
        finite, done = tf.constant(True), tf.constant(0.0)
        cross_entropy, regularization = tf.constant(0.0), tf.constant(0.0)
        counts = tf.zeros([cfg.num_classes, 4], tf.float64)
        for _ in tf.range(n):
            terms, step_counts = strategy.run(replica_step, args=next(iterator))
            if learner.average is not None:  # outside the replicas: every replica holds the same weights
                learner.average.update(model.trainable_variables, optimizer.iterations)
            finite = tf.math.is_finite(sum_replicas(terms["loss"]))
            if not finite:
                break
            cross_entropy += sum_replicas(terms["cross_entropy"])
            regularization += sum_replicas(terms["regularization"])
            counts += sum_replicas(step_counts)
            done += 1.0
        return {"finite": finite, "steps": done, "cross_entropy": cross_entropy,
                "regularization": regularization, "counts": counts}

    return train_steps


def inference_functions(cfg, strategy, model):
    """-> (Steps.eval, Steps.summary)."""
    @tf.function
    def eval_step(iterator):
        def forward(images, labels):
            logits = model(images, training=False)
            return confusion_counts(labels, networks.predicted_classes(logits, cfg.single_label))
        return strategy.reduce("SUM", strategy.run(forward, args=next(iterator)), axis=None)

    @tf.function
    def summary_step(iterator):
        """One extra forward pass for the image summaries (every log_step steps, so it costs little)."""
        def forward(images, labels):
            return images, labels, model(images, training=False)
        images, labels, logits = strategy.run(forward, args=next(iterator))
        pick = lambda t: strategy.experimental_local_results(t)[0]
        return pick(images), pick(labels), pick(logits)

    return eval_step, summary_step


class StepCalls:
    """The step functions called on the run's input iterators; a record that cannot be read becomes an
    AiryNetError naming the culprit (data.describe_failure)."""

    def __init__(self, cfg, steps, train_ds, eval_ds):
        self.cfg, self.steps = cfg, steps
        self.train_iter, self.eval_iter = iter(train_ds), iter(eval_ds)

    def train(self, n):
        with self._reading("train"):
            return self.steps.train(self.train_iter, tf.constant(n))

    def eval(self):
        with self._reading("eval"):
            return self.steps.eval(self.eval_iter).numpy()

    def summary(self):
        return self.steps.summary(self.train_iter)

    @contextlib.contextmanager
    def _reading(self, mode):
        try:
            yield
        except data.READ_ERRORS as e:
            raise data.describe_failure(self.cfg, mode, e) from e


# ----------------------------------------------------------------------------------------------
# Phase 4: the loop

def train(cfg, recipe):
    # Phase 1: data and run directory. The datasets check their sources as they are built, so bad data
    # fails before the run directory is made. On GPUs the distributed iterators copy the next batches
    # into GPU memory while a step runs.
    strategy, cluster = distribute.make_strategy(cfg)
    to_device = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    train_ds, eval_ds = (strategy.distribute_datasets_from_function(
        lambda ctx, mode=mode: data.dataset(cfg, recipe, mode, input_context=ctx), to_device)
        for mode in ("train", "eval"))
    run_dir, resume_path = _prepare_run_dir(cfg, cluster)
    distribute.log_start(cfg, strategy, resume_path, cluster)
    # Phase 2: the state, and the loss's class weights.
    state = build_state(cfg, recipe, strategy, cluster, run_dir, resume_path)
    pos_weight = class_weights(cfg, recipe)
    # Phase 3: the step functions, on the run's input.
    calls = StepCalls(cfg, step_functions(cfg, strategy, state.learner, pos_weight), train_ds, eval_ds)
    # Phase 4: the loop, then the decision thresholds.
    logger = TrainingLog(cfg, run_dir, cluster.is_chief, state.step, cfg.batch_size * strategy.num_replicas_in_sync)
    exit_code = loop(cfg, state, calls, distribute.make_vote(strategy), logger, run_dir)
    if exit_code == 0:
        log.info("Training finished at step %d; run directory %s", state.step, run_dir)
        inherited = inherited_thresholds(cfg)
        if cluster.is_chief and (recipe.calibration_share > 0 or inherited is not None) and not cfg.single_label:
            with averaged_weights(state.learner.model, state.learner.average):
                calibrate.calibrate(cfg, recipe, state.learner.model, run_dir, state.step, inherited)
        if cluster.is_chief:  # the out-of-distribution score's statistics and threshold (nn/ood.py)
            with averaged_weights(state.learner.model, state.learner.average):
                ood.fit_run(cfg, recipe, state.learner.model, run_dir, state.step)
    logger.log_throughput()
    return exit_code


def inherited_thresholds(cfg):
    """--init_from's decision thresholds [C] (0.5 where it has no thresholds.json, its rule), else None."""
    if not cfg.init_from:
        return None
    thresholds = checkpoints.read_thresholds(cfg.init_from, cfg.num_classes)
    return np.full(cfg.num_classes, 0.5, np.float32) if thresholds is None else thresholds


def loop(cfg, state, calls, vote, logger, run_dir):
    """Training chunks of --steps_per_eval steps up to --train_steps, each ending in a checkpoint and an
    evaluation. -> the exit code: 0, or 130/143 when SIGINT/SIGTERM stopped it (after a checkpoint)."""
    with StopSignal() as stop, logger:
        def agree(hourly, steps):  # in a cluster, every worker's stop signal, hourly save and steps, agreed
            return vote(stop.received is not None, hourly, steps)

        while state.step < cfg.train_steps:
            chunk_end = min((state.step // cfg.steps_per_eval + 1) * cfg.steps_per_eval, cfg.train_steps)
            if train_chunk(state, calls, chunk_end, agree, logger):
                reason = f"{stop.received} received" if stop.received else "another worker was stopped"
                state.save(reason, logger.is_chief)
                log.warning("Stopped (%s) at step %d. Rerun with --load_dir=%s to resume.", reason, state.step,
                            run_dir)
                return 130 if stop.received == "SIGINT" else 143
            logger.throughput.pause(state.step)
            state.last_save = state.save(f"end of chunk at step {state.step}", logger.is_chief)
            logger.bar.clear()
            with averaged_weights(state.learner.model, state.learner.average):
                evaluate_chunk(calls, cfg.eval_steps or TRAIN_EVAL_STEPS, stop, logger, state.step)
            logger.throughput.resume(state.step)
    return 0


def train_chunk(state, calls, chunk_end, agree, logger):
    """Train up to step `chunk_end` in graph calls of about a second each, logging every log_step
    steps and checkpointing hourly. -> True when a signal stopped it (the caller saves)."""
    steps_per_call, optimizer = 1, state.learner.optimizer
    while state.step < chunk_end:
        next_log = (state.step // logger.log_step + 1) * logger.log_step
        # Alone this is a formality; in a cluster all workers agree to stop, save and step together.
        stopping, hourly, n = agree(time.time() - state.last_save > CHECKPOINT_EVERY_S,
                                    min(steps_per_call, chunk_end - state.step, next_log - state.step))
        if stopping:
            return True
        if hourly:
            state.last_save = state.save("hourly", logger.is_chief)
        started, before = time.time(), state.step
        out = calls.train(n)
        state.step = int(optimizer.iterations.numpy())
        if not bool(out["finite"]):
            raise AiryNetError(f"step {state.step}: the loss is NaN or Inf; stopped without saving (last good "
                               f"checkpoint: {state.manager.latest_checkpoint or 'none'}). Lower --lr or check the data.")
        logger.bar.update(state.step - before)  # fewer than n when fp16 loss scaling skipped overflowing steps
        logger.throughput.started_if_first(state.step)  # the first call traces the graph: not counted
        logger.add({k: v.numpy() for k, v in out.items() if k != "finite"})
        seconds_per_step = (time.time() - started) / n
        steps_per_call = max(1, min(logger.log_step, int(SECONDS_PER_CALL / max(seconds_per_step, 1e-6))))
        if state.step != before and state.step % logger.log_step == 0:
            logger.log(state.step, float(optimizer.learning_rate))
            logger.images(*calls.summary(), step=state.step)
    return False


def evaluate_chunk(calls, batches, stop, logger, step):
    """`batches` eval batches, fewer when a signal arrives; their metrics logged and summarised."""
    counts, evaluated = 0.0, 0
    while evaluated < batches and not stop.received:  # a signal cuts it short
        counts += calls.eval()
        evaluated += 1
    logger.eval(counts, evaluated, step)


# ----------------------------------------------------------------------------------------------
# Around the loop: logs, summaries and throughput, the run directory

class TrainingLog:
    """What the run reports (chief only): the progress bar, the training log line every --log_step steps
    and TensorBoard summaries, from the numbers the step functions return (sums over the steps since the
    last log line), and the throughput. A context manager: the bar closes and the summaries are flushed
    on exit."""

    def __init__(self, cfg, run_dir, is_chief, first_step, global_batch):
        self.is_chief, self.names, self.log_step = is_chief, config.class_names(cfg), cfg.log_step
        self.use_log_act, self.single_label = cfg.use_log_act, cfg.single_label
        writer = tf.summary.create_file_writer if is_chief else lambda _: tf.summary.create_noop_writer()
        self.writer, self.eval_writer = writer(run_dir), writer(os.path.join(run_dir, "eval"))
        self.sums = {}
        self.bar = tqdm(total=cfg.train_steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not is_chief or None)
        self.throughput = Throughput(global_batch)

    def add(self, numbers):
        for k, v in numbers.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def log(self, step, lr):
        n = max(self.sums.get("steps", 0.0), 1.0)
        cross_entropy, regularization = self.sums["cross_entropy"] / n, self.sums["regularization"] / n
        m = metrics.metrics_from_counts(self.sums["counts"], self.names)
        self.bar.write(f"step {step}: lr {lr:.5g}  cross-entropy {cross_entropy:.4f}  train accuracy {m['accuracy']:.4f}  "
                  f"confusion [[TN {m['true_negatives']} FP {m['false_positives']}] "
                  f"[FN {m['false_negatives']} TP {m['true_positives']}]]")
        with self.writer.as_default():
            for name, value in (("learning_rate", lr), ("cross_entropy", cross_entropy),
                                ("regularization_penalty", regularization), ("train_accuracy", m["accuracy"]),
                                ("mcc", m["mcc"])):
                tf.summary.scalar(name, value, step=step)
        self.sums = {}

    def images(self, images, labels, logits, step):
        """Input images (log scale, as a physicist views them) and labels next to predictions."""
        shown = images[:3]
        shown = tf.math.log1p(tf.maximum(shown, 0.0)) if self.use_log_act else shown
        shown = shown / (tf.reduce_max(shown, axis=[1, 2, 3], keepdims=True) + 1e-12)
        versus = tf.concat([labels, networks.probabilities(logits, self.single_label)], axis=1)
        with self.writer.as_default():
            tf.summary.image("input_images", shown, step=step, max_outputs=3)
            tf.summary.image("labels_vs_predictions", versus[tf.newaxis, :, :, tf.newaxis], step=step)

    def eval(self, counts, batches, step):
        m = metrics.metrics_from_counts(np.broadcast_to(counts, (len(self.names), 4)), self.names)
        log.info("Eval at step %d over %d batches:\n%s", step, batches, metrics.format_metrics(m))
        with self.eval_writer.as_default():
            for k in ("accuracy", "mean_per_class_accuracy", "precision", "recall", "mcc", "macro_f1"):
                tf.summary.scalar(k, m[k], step=step)
        self.eval_writer.flush()

    def log_throughput(self):
        if self.throughput.seconds > 0:
            log.info("Training throughput %.1f img/s over %d steps (logging and summaries included; the first "
                     "call, which traces the graph, evaluation and checkpoints excluded)", self.throughput.rate(),
                     self.throughput.steps)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        self.bar.close()
        self.writer.flush()
        self.eval_writer.flush()


class Throughput:
    """Images per second of the training graph calls, without the first call (which traces the
    graph), evaluations and checkpoints."""

    def __init__(self, global_batch):
        self.global_batch, self.steps, self.seconds = global_batch, 0, 0.0
        self.since, self.first_call = None, True

    def started_if_first(self, step):
        if self.first_call:
            self.first_call = False
            self.resume(step)

    def resume(self, step):
        self.since = (time.time(), step)

    def pause(self, step):
        if self.since is not None:
            started, first = self.since
            self.steps += step - first
            self.seconds += time.time() - started
            self.since = None

    def rate(self):
        return self.steps * self.global_batch / self.seconds


def _prepare_run_dir(cfg, cluster):
    """-> (run_dir, checkpoint to resume from or None). Fresh runs get a new directory; --load_dir resumes."""
    if cfg.load_dir:
        if not os.path.isdir(cfg.load_dir):
            raise AiryNetError(f"--load_dir={cfg.load_dir}: no such run directory")
        run_dir = cfg.load_dir
        resume = checkpoints.latest_checkpoint(run_dir)
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
