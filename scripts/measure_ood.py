#!/usr/bin/env python3
"""Measure every out-of-distribution score of nn/ood.py on one trained run, or tabulate several runs.

    python scripts/measure_ood.py --load_dir=RUN --heldout=DIR --sets shifted=DIR crystal=DIR ... --out=RUN.json
    python scripts/measure_ood.py --table A.json B.json C.json

Each DIR holds `*eval.tfrecord` (or CXI) files: the held-out droplet shots, and a set each to tell from
them (scripts/make_dataset.py --kind=...; the SHIFTED droplets); --pooled names sets to measure also as one.
Every method is fitted as training fits
the default (statistics from the training shots, threshold from the calibration split) and scored on all
sets from one forward pass per shot. Per method and set: AUROC against the held-out shots, the FPR at 95%
TPR, and the share flagged `unknown` by the fitted threshold (the held-out shots' own share too).
--table prints the mean and standard deviation over the runs as Markdown. Other flags go to airynet.py
(--batch_size).
"""
import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from fit_ood import load_run  # noqa: E402
from nn import config, metrics, ood  # noqa: E402

POOLED = "pooled"  # the --pooled sets as one
ALL_BLOCKS = "mahalanobis_layers"  # its features hold every other method's (the penultimate ones last)


def blocks_for(method, features):
    return features if method == ALL_BLOCKS else features[-1:] if method in ood.FEATURE_METHODS else []


def features_of(cfg, recipe, model, directory, mode="eval", shots=100000):
    run = copy.copy(cfg)
    directory = os.path.normpath(directory)
    run.data_dir, run.dataset = os.path.dirname(directory) + "/", os.path.basename(directory)
    return ood.collect(run, recipe, model, mode, ALL_BLOCKS, shots)


def measure(flags, heldout, sets, pooled=()):
    cfg, recipe, model, _ = load_run(flags)
    train = ood.collect(cfg, recipe, model, "train", ALL_BLOCKS, ood.FIT_SHOTS)
    held_back = ood.collect(cfg, recipe, model, "calibrate" if recipe.calibration_share > 0 else "eval",
                            ALL_BLOCKS, ood.THRESHOLD_SHOTS)
    tested = {"heldout": features_of(cfg, recipe, model, heldout)}
    tested.update({name: features_of(cfg, recipe, model, d) for name, d in sets.items()})
    result = {"load_dir": os.path.abspath(cfg.load_dir), "shots": {k: len(v[0]) for k, v in tested.items()},
              "methods": {}}
    for method in ood.METHODS:
        stats = ood.fit_stats(method, blocks_for(method, train[1]))

        def scores(part):
            return ood.score(method, stats, part[0], blocks_for(method, part[1]), cfg.single_label).numpy()

        threshold = ood.threshold_of(scores(held_back))
        s = {name: scores(part) for name, part in tested.items()}
        if pooled:
            s[POOLED] = np.concatenate([s[name] for name in pooled])
        result["methods"][method] = {"threshold": threshold,
                                     "unknown_heldout": float(np.mean(s["heldout"] > threshold)),
                                     "sets": {name: {"auroc": metrics.auroc(s["heldout"], s[name]),
                                                     "fpr95": metrics.fpr_at_tpr(s["heldout"], s[name]),
                                                     "unknown": float(np.mean(s[name] > threshold))}
                                              for name in [*sets, *([POOLED] if pooled else [])]}}
    return result


def table(paths):
    runs = [json.load(open(p)) for p in paths]
    methods = list(runs[0]["methods"])
    sets = list(runs[0]["methods"][methods[0]]["sets"])

    def cell(values, digits=3):
        return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.{digits}f}"

    lines = []
    for what, label in (("auroc", "AUROC"), ("fpr95", "FPR at 95% TPR"), ("unknown", "unknown (fitted threshold)")):
        lines += [f"\n{label}, mean ± sd over {len(runs)} runs:\n", "| method | " + " | ".join(sets) + " |",
                  "|---|" + "---|" * len(sets)]
        for m in methods:
            cells = [cell([r["methods"][m]["sets"][s][what] for r in runs]) for s in sets]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["\nunknown on the held-out droplets (fitted threshold):\n", "| method | share |", "|---|---|"]
    lines += [f"| {m} | {cell([r['methods'][m]['unknown_heldout'] for r in runs])} |" for m in methods]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heldout", help="The held-out droplet shots' directory.")
    p.add_argument("--sets", nargs="*", default=[], help="NAME=DIR: the sets to tell from the held-out shots.")
    p.add_argument("--pooled", default="", help="NAME,NAME,...: these sets together as one more set, 'pooled'.")
    p.add_argument("--out", help="The JSON to write.")
    p.add_argument("--table", nargs="*", help="Tabulate these JSON files instead.")
    args, flags = p.parse_known_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    try:
        sets = dict(s.split("=", 1) for s in args.sets)
        result = measure(flags, args.heldout, sets, [n for n in args.pooled.split(",") if n])
    except (config.AiryNetError, ValueError) as e:
        print(f"measure_ood.py: error: {e}", file=sys.stderr)
        return 2
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({m: {s: round(v["auroc"], 3) for s, v in r["sets"].items()}
                      for m, r in result["methods"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
