"""--mode=eval: every eval record once (or --eval_steps batches) through the restored network; writes
RUN/eval/metrics.json and RUN/eval/scores.npz and prints a per-class table."""
import json
import logging
import os

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from nn import checkpoints, config, metrics
from nn.inputs import data, masks
from nn.models import networks
from nn.config import AiryNetError
from nn.files import atomic_file

log = logging.getLogger("airynet")


def evaluate(cfg, recipe):
    model, step = checkpoints.restore_model(cfg, recipe)
    rule = checkpoints.decision_rule(cfg)
    thresholds = rule.thresholds
    ds = data.dataset(cfg, recipe, "eval", one_pass=cfg.eval_steps is None)
    if cfg.eval_steps:
        ds = ds.take(cfg.eval_steps)

    @tf.function
    def forward(images):
        logits = model(images, training=False)
        return (networks.probabilities(logits, cfg.single_label),
                networks.predicted_classes(logits, cfg.single_label, thresholds))

    counts, scores, truths, predicted = 0, [], [], []
    try:
        for images, labels in tqdm(ds, desc="eval", unit="batch", dynamic_ncols=True):
            probs, classes = forward(images)
            counts += metrics.confusion_counts(labels.numpy(), classes.numpy())
            scores.append(probs.numpy())
            truths.append(labels.numpy())
            predicted.append(classes.numpy().astype(np.uint8))
    except data.READ_ERRORS as e:
        raise data.describe_failure(cfg, "eval", e) from e
    if not scores:
        raise AiryNetError(f"{data.dataset_dir(cfg)}: the eval data holds no shots")

    names = config.class_names(cfg)
    result = {"step": step, "shots": int(sum(len(s) for s in scores)), **masks.record(cfg.mask, cfg.mask_good),
              **metrics.metrics_from_counts(counts, names)}
    scores, truths = np.concatenate(scores), np.concatenate(truths)
    for c, threshold, ece in zip(result["per_class"], _listed(thresholds, len(names)),
                                 metrics.expected_calibration_error(scores, truths)):
        c["threshold"], c["ece"] = threshold, float(ece)
    out_dir = os.path.join(cfg.load_dir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    with atomic_file(os.path.join(out_dir, "metrics.json")) as f:
        json.dump(result, f, indent=2)
    with atomic_file(os.path.join(out_dir, "scores.npz"), "wb") as f:
        np.savez(f, probabilities=scores, labels=truths,
                 predictions=np.concatenate(predicted),  # the flags the metrics counted
                 class_names=np.array(names), decision_rule=rule.text, **_thresholds_entry(thresholds))
    listed = "" if thresholds is None else ": " + ", ".join(f"{n} {t:.3f}" for n, t in zip(names, thresholds))
    log.info("Eval of step %d over %d shots, decisions by %s%s:\n%s", step, result["shots"], rule.text, listed,
             metrics.format_metrics(result))
    log.info("Wrote %s and scores.npz", os.path.join(out_dir, "metrics.json"))
    return 0


def _thresholds_entry(thresholds):
    """scores.npz's `thresholds` [C] where the classes were decided by thresholds (the pictures mark them)."""
    return {} if thresholds is None else {"thresholds": np.asarray(thresholds, np.float32)}


def _listed(thresholds, num_classes):
    """Each class's threshold for metrics.json (None: the original rule, above 0.5)."""
    return [None] * num_classes if thresholds is None else [float(t) for t in thresholds]
