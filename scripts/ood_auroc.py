#!/usr/bin/env python3
"""How well a run's out-of-distribution score tells two prediction files apart: AUROC, the false-positive
rate at 95% true-positive rate, and each file's share flagged `unknown`.

    python scripts/ood_auroc.py predictions/droplets.h5 predictions/crystals.h5

The first file holds in-distribution shots, the second out-of-distribution ones (which carry no labels);
both are h5 files of --mode=predict or --mode=live, stacked or per-shot, of a run with an out-of-distribution
fit (nn/ood.py). Prints one line of JSON.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from nn import metrics  # noqa: E402
from nn.config import AiryNetError  # noqa: E402


def read_scores(path):
    """(ood_score [N], unknown [N]) of a prediction file in either layout."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("layout") == "per_shot":
                groups = [g for g in f.values() if isinstance(g, h5py.Group)]
                if groups and "ood_score" in groups[0]:
                    return (np.array([g["ood_score"][()] for g in groups], np.float32),
                            np.array([g["unknown"][()] for g in groups], np.uint8))
            elif "ood_score" in f:
                return f["ood_score"][:], f["unknown"][:]
    except OSError as e:
        raise AiryNetError(f"{path}: cannot read it as HDF5 ({e})") from e
    raise AiryNetError(f"{path}: holds no ood_score (its run has no out-of-distribution fit: scripts/fit_ood.py)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_distribution", help="Predictions of in-distribution shots.")
    p.add_argument("out_of_distribution", help="Predictions of out-of-distribution shots.")
    args = p.parse_args(argv)
    try:
        (s_in, u_in), (s_out, u_out) = read_scores(args.in_distribution), read_scores(args.out_of_distribution)
        if not len(s_in) or not len(s_out):
            raise AiryNetError(f"{args.in_distribution if not len(s_in) else args.out_of_distribution}: holds no shots")
    except AiryNetError as e:
        print(f"ood_auroc.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"auroc": round(metrics.auroc(s_in, s_out), 4),
                      "fpr_at_95_tpr": round(metrics.fpr_at_tpr(s_in, s_out), 4),
                      "unknown_in": round(float(np.mean(u_in)), 4), "unknown_out": round(float(np.mean(u_out)), 4),
                      "shots_in": len(s_in), "shots_out": len(s_out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
