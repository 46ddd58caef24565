"""Linear baseline on the synthetic helium set: one-vs-rest logistic regression on 32x32 log images.

The synthetic classes are meant to be learnable from structure (fringe spacing, ellipticity,
streak orientation at random angles) but not linearly separable from a downsampled log image.
This script prints the held-out per-class F1 and macro-F1 of such a linear model.

    python scripts/baseline_logreg.py --size=256 [--train=6000 --test=1500]

Pipeline: centre crop to the largest power of two (as the input pipeline does), log1p,
32x32 block mean, standardise with training statistics. Independent L2-regularised logistic
regressions per class, fitted by accelerated full-batch gradient descent (numpy only). The L2
strength is chosen by macro-F1 on the last 20% of the training shots. A class with no positive
shot among the held-out ones has no defined F1 and is left out of the macro average (reported).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nn.config import HELIUM_CLASSES, crop_size  # noqa: E402
from nn.inputs.simulate import simulate  # noqa: E402

GRID = 32


def features(images):
    """Centre crop to a power of two, log1p, GRIDxGRID block mean: float32 [n, GRID*GRID]."""
    size = images.shape[1]
    crop = crop_size(size)
    o = (size - crop) // 2
    x = np.log1p(images[:, o:o + crop, o:o + crop].astype(np.float32))
    f = crop // GRID
    return x.reshape(len(x), GRID, f, GRID, f).mean((2, 4)).reshape(len(x), -1)


def fit(x, y, l2, steps):
    """Per-class logistic regression, loss mean BCE + l2/2 |w|^2, Nesterov gradient descent."""
    n, d = x.shape
    v = np.random.default_rng(0).standard_normal(d).astype(np.float32)
    for _ in range(50):   # power iteration: the largest curvature fixes a safe step size
        v = x.T @ (x @ v) / n
        v /= np.linalg.norm(v)
    lipschitz = float(v @ (x.T @ (x @ v)) / n) / 4 + l2
    w = np.zeros((d + 1, y.shape[1]), np.float32)
    xb = np.hstack([x, np.ones((n, 1), np.float32)])
    prev = w.copy()
    for t in range(steps):
        look = w + (t / (t + 3)) * (w - prev)
        grad = xb.T @ (1 / (1 + np.exp(-(xb @ look))) - y) / n
        grad[:-1] += l2 * look[:-1]
        prev, w = w, look - grad / lipschitz
    return w


def predict(w, x):
    return x @ w[:-1] + w[-1] > 0


def f1_scores(pred, y):
    """Per-class F1; NaN where the class has no positive shot."""
    tp = (pred & (y > 0)).sum(0)
    pos = (y > 0).sum(0)
    f1 = 2 * tp / np.maximum(pred.sum(0) + pos, 1)
    return np.where(pos > 0, f1, np.nan)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="stored image size")
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--test", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0, help="training set seed; held-out uses seed+1")
    p.add_argument("--steps", type=int, default=1500)
    args = p.parse_args()

    img, y = simulate(args.train, args.seed, args.size)
    x = features(img)
    img, y_test = simulate(args.test, args.seed + 1, args.size)
    x_test = features(img)
    del img
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mean) / std, (x_test - mean) / std
    y, y_test = y.astype(np.float32), y_test.astype(np.float32)

    split = int(0.8 * len(x))
    best = None
    for l2 in (1e-4, 1e-3, 1e-2, 1e-1):
        w = fit(x[:split], y[:split], l2, args.steps)
        score = np.nanmean(f1_scores(predict(w, x[split:]), y[split:]))
        print(f"l2={l2:g}: validation macro-F1 {score:.3f}")
        if best is None or score > best[0]:
            best = (score, l2)
    w = fit(x, y, best[1], args.steps)
    f1 = f1_scores(predict(w, x_test), y_test)
    print(f"size {args.size}, l2={best[1]:g}, {args.train} train / {args.test} held-out shots")
    for name, s, pos in zip(HELIUM_CLASSES, f1, y_test.sum(0)):
        print(f"  {name:17s} F1 {s:.3f}  ({int(pos)} positives)")
    missing = [n for n, s in zip(HELIUM_CLASSES, f1) if np.isnan(s)]
    print(f"held-out macro-F1 {np.nanmean(f1):.3f}"
          + (f" (left out, no positives: {', '.join(missing)})" if missing else ""))


if __name__ == "__main__":
    main()
