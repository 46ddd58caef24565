"""Pictures to look at before trusting the network (CLI: scripts/plot.py). Matplotlib only, no TensorFlow.

- `gallery(h5_path, out_png, ...)`: from a predictions file (either h5 layout), one row per shot: the
  image as fed to the network on a log scale, then a Grad-CAM++ overlay for each predicted class
  (most probable first), titled with the class name and its probability.
- `eval_plots(run_dir, out_dir)`: from RUN/eval/scores.npz (written by --mode=eval: `probabilities`,
  `labels` and `predictions` [N, C], `class_names` [C], `decision_rule` and, where classes were decided
  by thresholds, `thresholds` [C]): per-class confusion counts of the classes eval predicted, by the
  rule eval used (the run's calibrated thresholds where it has thresholds.json, else p > 0.5, or the
  arg-max with --single_label), named in the picture (confusion.png), and precision-recall curves with
  their average precision and eval's decisions marked on them (pr_curves.png).

Figures are built with matplotlib's object API (Figure, no pyplot), which needs no global backend
choice and draws without a display; the *_figure functions return them, the others write PNGs. Every
PNG is written to a temporary name and renamed when complete.
"""
import os
from typing import NamedTuple

import h5py
import hdf5plugin  # noqa: F401  (registers the filters of prediction files: --h5_compression)
import matplotlib
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from nn import metrics
from nn.config import AiryNetError
from nn.files import atomic_path

MAX_OVERLAYS = 4  # Grad-CAM++ panels per shot
PANEL_INCHES = 2.3
DPI = 100


def _save(fig, path, overwrite):
    if os.path.exists(path) and not overwrite:
        raise AiryNetError(f"{path}: exists; pass --overwrite=true or choose another output")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    except OSError as e:
        raise AiryNetError(f"{path}: writing the picture failed ({e.strerror or e})") from e
    return path


# ----------------------------------------------------------------------------------------------
# Gallery of predictions

def read_shots(h5_path, count=8, start=0, class_name=None):
    """Up to `count` shots from record `start` on (only those predicted as `class_name`, if given) as
    (class_names, [{"name", "image" [H, W], "probs" [C], "preds" [C], "maps" [C, h, w] or None}],
    the decision thresholds [C] the file records, or None)."""
    try:
        f = h5py.File(h5_path, "r")
    except OSError as e:
        raise AiryNetError(f"{h5_path}: cannot open it as HDF5 ({e})") from e
    with f:
        layout = f.attrs.get("layout")
        if layout not in ("stacked", "per_shot"):
            raise AiryNetError(f"{h5_path}: not an AiryNet predictions file (no layout attribute)")
        names = [str(n) for n in f.attrs["class_names"]]
        thresholds = f.attrs.get("thresholds")  # files of earlier versions do not record them
        wanted = None
        if class_name is not None:
            if class_name not in names:
                raise AiryNetError(f"--class={class_name}: not one of {', '.join(names)}")
            wanted = names.index(class_name)
        if layout == "stacked":
            if "images" not in f:
                raise AiryNetError(f"{h5_path}: holds no images (the run did not save them)")
            preds = f["preds"][:]
            rows = [i for i in range(start, len(preds)) if wanted is None or preds[i, wanted]][:count]
            shots = [{"name": str(f["bids"][i]), "image": f["images"][i], "probs": f["probs"][i],
                      "preds": preds[i], "maps": f["grad_cam"][i].astype(np.float32) if "grad_cam" in f else None}
                     for i in rows]
        else:
            shots = []
            for name in list(f.keys())[start:]:
                g = f[name]
                if wanted is not None and not g["prediction"][wanted]:
                    continue
                maps = np.array([g[f"{c}/grad_cam"][:] for c in range(len(names))]) if "0" in g else None
                shots.append({"name": name, "image": g["img"][:], "probs": g["probability"][:],
                              "preds": g["prediction"][:], "maps": maps})
                if len(shots) == count:
                    break
    if not shots:
        raise AiryNetError(f"{h5_path}: no shots to show from record {start}"
                           + (f" predicted as {class_name}" if class_name else ""))
    for shot in shots:
        image = np.asarray(shot["image"], np.float32)
        shot["image"] = image.mean(axis=-1) if image.ndim == 3 else image
    return names, shots, thresholds


def _log_norm(image):
    """Log colour scale from a low percentile of the positive pixels to the maximum."""
    positive = image[image > 0]
    if positive.size == 0:
        return None
    top = float(positive.max())
    return LogNorm(vmin=min(float(np.percentile(positive, 5)), top / 10), vmax=top, clip=True)


def _overlay(ax, image, norm, cam):
    """The image in gray with the map on top in red to yellow, transparent where the map is low, so
    that the pattern stays visible and the colour marks where the evidence is."""
    h, w = image.shape
    ax.imshow(image, cmap="gray", norm=norm, interpolation="nearest")
    cam = np.clip(cam, 0, 1)
    rgba = matplotlib.colormaps["autumn"](cam)
    rgba[..., 3] = 0.75 * cam ** 1.5
    # extent stretches a map at the network layer's resolution over the whole image, bilinearly.
    ax.imshow(rgba, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")


def gallery(h5_path, out_png, count=8, start=0, class_name=None, overwrite=False):
    """Render the gallery PNG (see the module docstring). Returns out_png."""
    return _save(gallery_figure(h5_path, count, start, class_name), out_png, overwrite)


def gallery_figure(h5_path, count=8, start=0, class_name=None):
    """The gallery's Figure: one row of axes per shot."""
    names, shots, thresholds = read_shots(h5_path, count, start, class_name)
    order = [np.argsort(-s["probs"]) for s in shots]
    shown = [[c for c in o if s["preds"][c]][:MAX_OVERLAYS] or list(o[:1]) for s, o in zip(shots, order)]
    has_maps = shots[0]["maps"] is not None
    cols = 1 + (max(len(s) for s in shown) if has_maps else 0)
    fig = Figure(figsize=(cols * PANEL_INCHES, len(shots) * (PANEL_INCHES + 0.5)))
    axes = fig.subplots(len(shots), cols, squeeze=False)
    for row, (shot, classes) in zip(axes, zip(shots, shown)):
        for ax in row:
            ax.axis("off")
        norm = _log_norm(shot["image"])
        row[0].imshow(shot["image"], cmap="magma", norm=norm, interpolation="nearest")
        predicted = ", ".join(names[c] for c in classes if shot["preds"][c]) or "no class"
        row[0].set_title(f"shot {shot['name']} (log scale)\n{predicted}", fontsize=8)
        if not has_maps:
            continue
        for ax, c in zip(row[1:], classes):
            _overlay(ax, shot["image"], norm, shot["maps"][c])
            note = "" if shot["preds"][c] else "\n(top class, not predicted" + (
                f": threshold {thresholds[c]:.2f})" if thresholds is not None else ")")
            ax.set_title(f"{names[c]}  p={shot['probs'][c]:.2f}{note}", fontsize=8)
    fig.suptitle(f"{os.path.basename(h5_path)}\nGrad-CAM++ of the predicted classes\n(red to yellow: more "
                 f"evidence)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / fig.get_figheight()))
    return fig


# ----------------------------------------------------------------------------------------------
# Evaluation

class Scores(NamedTuple):
    """What --mode=eval wrote to RUN/eval/scores.npz, as the evaluation pictures use it."""
    path: str
    probs: np.ndarray   # [N, C]
    labels: np.ndarray  # bool [N, C]
    names: list         # [C] class names
    preds: np.ndarray   # bool [N, C], the classes eval predicted
    rule: str           # how eval decided them (nn.checkpoints.decision_rule)
    thresholds: np.ndarray | None  # [C] where the classes were decided by thresholds


def read_scores(run_dir):
    """The Scores of the run's last --mode=eval."""
    path = os.path.join(run_dir, "eval", "scores.npz")
    if not os.path.isfile(path):
        raise AiryNetError(f"{path}: missing; run --mode=eval --load_dir={run_dir} first")
    with np.load(path, allow_pickle=False) as z:
        probs, labels = z["probabilities"].astype(np.float64), z["labels"] > 0.5
        names = [str(n) for n in z["class_names"]] if "class_names" in z else list(map(str, range(probs.shape[1])))
        if "predictions" in z:
            preds = z["predictions"] > 0
            rule = str(z["decision_rule"]) if "decision_rule" in z else "eval's rule (not recorded in this file)"
        else:  # the earliest files: multi-label, decided at p > 0.5
            preds, rule = probs > 0.5, "probability > 0.5, the original rule"
        thresholds = z["thresholds"].astype(np.float64) if "thresholds" in z else None
    return Scores(path, probs, labels, names, preds, rule, thresholds)


def precision_recall(scores, labels):
    """Precision and recall at every distinct threshold, from the highest score down (starting at
    recall 0, precision 1), and the average precision sum_k (R_k - R_k-1) P_k. None without positives."""
    positives = labels.sum()
    if positives == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(labels)[last_of_tie]
    fp = last_of_tie + 1 - tp
    precision = np.r_[1.0, tp / (tp + fp)]
    recall = np.r_[0.0, tp / positives]
    return precision, recall, float(np.sum(np.diff(recall) * precision[1:]))


def eval_plots(run_dir, out_dir=None, overwrite=False):
    """confusion.png and pr_curves.png in out_dir (default RUN/eval). Returns their paths."""
    scores = read_scores(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "eval")
    return [_save(confusion_figure(scores), os.path.join(out_dir, "confusion.png"), overwrite),
            _save(pr_figure(scores), os.path.join(out_dir, "pr_curves.png"), overwrite)]


def confusion_figure(scores):
    """One row per class: TP, FN, FP, TN of eval's predicted classes, then precision, recall, F1 and,
    where the classes were decided by thresholds, the class's threshold."""
    names = scores.names
    tp, fp, fn, tn = metrics.confusion_counts(scores.labels, scores.preds).T
    counts = np.stack([tp, fn, fp, tn], axis=1)
    # Colour: the share of the class's positives (TP, FN) or negatives (FP, TN), so rare and common
    # classes read alike; good cells (TP, TN) and bad cells (FN, FP) use their own colour maps.
    pos, neg = np.maximum(tp + fn, 1)[:, None], np.maximum(fp + tn, 1)[:, None]
    share = counts / np.concatenate([pos, pos, neg, neg], axis=1)
    fig = Figure(figsize=(9.5, 0.42 * len(names) + 1.8))
    ax = fig.subplots()
    good = np.ma.masked_array(share, mask=np.zeros_like(share, bool) | [[False, True, True, False]])
    bad = np.ma.masked_array(share, mask=np.zeros_like(share, bool) | [[True, False, False, True]])
    ax.imshow(good, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    ax.imshow(bad, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=9,
                color="white" if share[i, j] > 0.6 else "black")
    precision = np.divide(tp, tp + fp, out=np.full(len(tp), np.nan), where=tp + fp > 0)
    recall = np.divide(tp, tp + fn, out=np.full(len(tp), np.nan), where=tp + fn > 0)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.full(len(tp), np.nan), where=2 * tp + fp + fn > 0)
    def fmt(x):
        return " -- " if np.isnan(x) else f"{x:.2f}"

    for i in range(len(names)):
        threshold = "" if scores.thresholds is None else f"   t {scores.thresholds[i]:.2f}"
        ax.text(3.6, i, f"P {fmt(precision[i])}   R {fmt(recall[i])}   F1 {fmt(f1[i])}{threshold}", va="center",
                fontsize=9, family="monospace")
    ax.set_xticks(range(4), ["TP", "FN", "FP", "TN"])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlim(-0.5, 7.4)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=0)
    ax.set_title(f"Confusion counts per class of eval's predicted classes ({len(scores.probs)} shots)\n"
                 f"decided by {scores.rule}\n{scores.path}", fontsize=9, wrap=True)
    fig.tight_layout()
    return fig


def pr_figure(scores):
    """Each class's precision-recall curve, with eval's decisions on it as a dot."""
    fig = Figure(figsize=(10, 6))
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab10"].colors
    for c, name in enumerate(scores.names):
        curve = precision_recall(scores.probs[:, c], scores.labels[:, c])
        # Ten distinct colours, then the same colours dashed.
        style = {"color": colours[c % 10], "ls": "-" if c < 10 else "--"}
        if curve is None:
            ax.plot([], [], **style, label=f"{name}: no positives")
            continue
        precision, recall, ap = curve
        threshold = "" if scores.thresholds is None else f", t {scores.thresholds[c]:.2f}"
        ax.step(recall, precision, where="post", lw=1.6, **style, label=f"{name} (AP {ap:.2f}{threshold})")
        tp, fp, fn, _ = metrics.confusion_counts(scores.labels[:, c], scores.preds[:, c])
        if tp + fp:  # the operating point of eval's predicted classes
            ax.plot(tp / (tp + fn), tp / (tp + fp), "o", color=style["color"], ms=5)
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(f"Precision-recall per class (dots: eval's predicted classes, decided by {scores.rule})\n"
                 f"{scores.path}", fontsize=9, wrap=True)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Simulated shots of every class

def pick_class_examples(labels, per_class):
    """For each class, the indices of up to `per_class` shots that carry it, those with the fewest
    other labels first, so that each row shows what distinguishes its class."""
    counts = labels.sum(1)
    return [[int(i) for i in np.flatnonzero(labels[:, c])[np.argsort(counts[labels[:, c] > 0], kind="stable")]]
            [:per_class] for c in range(labels.shape[1])]


class Simulation(NamedTuple):
    """Which simulated shots to show: nn/inputs/simulate.py's arguments but for the shot numbers."""
    size: int = 259             # stored image size
    seed: int = 0
    version: int | None = None  # None: simulate.VERSION
    settings: object = None     # a simulate.Settings for version 2; None: its default


def class_gallery(out_png, simulation=Simulation(), per_class=5, overwrite=False):
    """One row per class of simulated shots at the stored size, on a log scale, titled with all their
    labels. Returns out_png."""
    from nn.inputs import simulate   # numpy only; imported here so that the other pictures need none of it
    from nn.config import HELIUM_CLASSES
    size, seed, version, settings = simulation
    _, labels = simulate.simulate(40 * per_class * 8, seed, 8, version=version, settings=settings)
    rows = pick_class_examples(labels, per_class)
    fig = Figure(figsize=(per_class * PANEL_INCHES, len(rows) * (PANEL_INCHES + 0.3)))
    axes = fig.subplots(len(rows), per_class, squeeze=False)
    for row, (c, picks) in zip(axes, enumerate(rows)):
        for ax in row:
            ax.axis("off")
        for ax, i in zip(row, picks):
            image, label = simulate.simulate(1, seed, size, start=i, version=version, settings=settings)
            ax.imshow(image[0], cmap="magma", norm=_log_norm(image[0]), interpolation="nearest")
            others = [HELIUM_CLASSES[k] for k in np.flatnonzero(label[0]) if k != c]
            ax.set_title(f"{HELIUM_CLASSES[c]}\n{', '.join(others) or '-'} (shot {i})", fontsize=7)
    preset = next((name for name, value in simulate.PRESETS.items() if value == settings), "custom")
    which = f"version {version or simulate.VERSION}" + ("" if settings is None else f", {preset} settings")
    fig.suptitle(f"Simulated shots of every class, {size}x{size} px, log scale (nn/inputs/simulate.py, {which}, "
                 f"seed {seed})", fontsize=9, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    return _save(fig, out_png, overwrite)


def nondroplet_gallery(out_png, size=259, seed=0, per_kind=5, overwrite=False):
    """One row per kind of non-droplet shot (nn/inputs/nondroplet.py) below a row of droplet shots, at the
    stored size on a log scale. Returns out_png."""
    from nn.inputs import nondroplet, simulate   # numpy only, as in class_gallery
    rows = [("droplets", simulate.simulate(per_kind, seed, size)[0])]
    rows += [(kind, nondroplet.simulate(kind, per_kind, seed, size)[0]) for kind in nondroplet.KINDS]
    fig = Figure(figsize=(per_kind * PANEL_INCHES, len(rows) * (PANEL_INCHES + 0.3)))
    axes = fig.subplots(len(rows), per_kind, squeeze=False)
    for row, (kind, images) in zip(axes, rows):
        for i, (ax, image) in enumerate(zip(row, images)):
            ax.axis("off")
            ax.imshow(image, cmap="magma", norm=_log_norm(image), interpolation="nearest")
            ax.set_title(f"{kind} (shot {i})", fontsize=7)
    fig.suptitle(f"Shots that are not droplets (nn/inputs/nondroplet.py) below droplet shots, {size}x{size} px, "
                 f"log scale, seed {seed}", fontsize=9, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    return _save(fig, out_png, overwrite)
