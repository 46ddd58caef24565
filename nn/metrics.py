"""The metrics arithmetic: per-class confusion counts and everything reported from them.

Counts are [num_classes, 4] arrays of (tp, fp, fn, tn), from numpy arrays by `confusion_counts` (and in
the training graph by nn.train's graph twin of it); the training log, --mode=eval and the plots all turn
them into numbers with `metrics_from_counts`. No TensorFlow here: the plots import this module.
"""
import math

import numpy as np


def confusion_counts(labels, predictions):
    """Per-class (tp, fp, fn, tn) [C, 4] from 0/1 labels and predictions [N, C] (numpy); for one class,
    [N] arrays give its four counts."""
    labels, predictions = np.asarray(labels) > 0.5, np.asarray(predictions) > 0.5
    return np.stack([(predictions & labels).sum(0), (predictions & ~labels).sum(0),
                     (~predictions & labels).sum(0), (~predictions & ~labels).sum(0)], axis=-1)


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
# Decision thresholds and calibration, from scores [N, C] and 0/1 labels [N, C]

FLOAT32_ABOVE_ZERO = float(np.nextafter(np.float32(0), np.float32(1)))   # the smallest float32 above 0
FLOAT32_BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))    # the largest float32 below 1


def best_f1_thresholds(probabilities, labels, default=0.5):
    """Each class's threshold t that maximises its F1 with the rule `probability >= t`: halfway between
    the lowest score called positive and the next lower score (or half of it), so that shots scored like
    the calibration shots fall on the same side. `default` for a class without positives.

    Thresholds stay inside (0, 1) in float32, as which they are stored and applied: halving a score
    of 0 (every shot called positive) gives 0, and a halfway point just below 1 rounds to 1, either of
    which a run's thresholds file may not hold. The clip changes no decision but for scores of exactly 0."""
    probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels) > 0.5
    thresholds = np.full(probabilities.shape[1], default)
    for c in range(probabilities.shape[1]):
        order = np.argsort(-probabilities[:, c], kind="stable")
        scores, positive = probabilities[order, c], labels[order, c]
        if not positive.any():
            continue
        tp = np.cumsum(positive)                   # calling the first k + 1 shots positive
        f1 = 2 * tp / (np.arange(1, len(scores) + 1) + positive.sum())
        last = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))  # only between distinct scores
        k = last[np.argmax(f1[last])]
        below = scores[k + 1] if k + 1 < len(scores) else 0.0
        thresholds[c] = (scores[k] + below) / 2
    return np.clip(thresholds, FLOAT32_ABOVE_ZERO, FLOAT32_BELOW_ONE)


def expected_calibration_error(probabilities, labels, bins=10):
    """Each class's expected calibration error [C]: over `bins` equal-width bins of the predicted
    probability, the shot-weighted mean of |mean probability - share of positives| in the bin."""
    probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels, np.float64)
    which = np.minimum((probabilities * bins).astype(int), bins - 1)
    errors = np.zeros(probabilities.shape[1])
    for c in range(probabilities.shape[1]):
        for b in np.unique(which[:, c]):
            members = which[:, c] == b
            errors[c] += members.sum() * abs(probabilities[members, c].mean() - labels[members, c].mean())
    return errors / max(len(probabilities), 1)


# ----------------------------------------------------------------------------------------------
# Out-of-distribution detection, from scores that are higher for out-of-distribution shots

def auroc(in_scores, out_scores):
    """Area under the ROC curve of telling `out_scores` from `in_scores` by thresholding: the chance that
    an out-of-distribution shot scores above an in-distribution one, ties counting half (Mann-Whitney U,
    from the ranks of both sets together)."""
    x, y = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    both = np.concatenate([x, y])
    order = np.argsort(both, kind="stable")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    sums = np.zeros(len(counts))
    np.add.at(sums, inverse, ranks)
    ranks = (sums / counts)[inverse]  # tied scores share their mean rank
    return float((ranks[len(x):].sum() - len(y) * (len(y) + 1) / 2) / (len(x) * len(y)))


def fpr_at_tpr(in_scores, out_scores, tpr=0.95):
    """Share of out-of-distribution shots taken for in-distribution ones where the threshold keeps `tpr`
    of the in-distribution shots (at or under it)."""
    threshold = np.quantile(np.asarray(in_scores, np.float64), tpr)
    return float(np.mean(np.asarray(out_scores, np.float64) <= threshold))
