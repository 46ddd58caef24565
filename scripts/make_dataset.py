#!/usr/bin/env python3
"""Write the synthetic helium dataset to disk, in the original TFRecord schema or as CXI files.

    python scripts/make_dataset.py --out=../datasets/synthetic --format=tfrecord --size=259

writes part{K}_train.*, part{K}_eval.* and part{K}_predict.* files (at most --per_file shots each), with
the same shots as `--dataset=synthetic` generates in memory for the same --random_seed, --dataset_size
and size: train = shots 0..dataset_size-1, eval and predict = the held-out shots after them. Predict
TFRecords hold bunch IDs (the shot index) instead of labels, as the original's helium files did.
--version picks the simulator version (default: nn/inputs/simulate.py's VERSION), --shifted its SHIFTED
settings (version 2), --shift=GROUP only one group of them (DEFAULT otherwise), --eval_size the number
of eval/predict shots (default: as --dataset=synthetic), --fixed_detector one detector for the whole set
(with its mask.npy). --kind=KIND writes shots that are not droplets (nn/inputs/nondroplet.py: crystal, ice,
speckle, multi, faults; labels all 0) as eval and predict files, to test the out-of-distribution score; never
training files. The files are written into OUT.partial and
appear in OUT together at the end, so an interrupted run never leaves a dataset that looks finished.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nn import config  # noqa: E402
from nn.files import atomic_dir  # noqa: E402
from nn.inputs import cxi, data, nondroplet, simulate, tfrecord  # noqa: E402

EXTENSIONS = {"tfrecord": "tfrecord", "cxi_shots": "cxi", "cxi_stacked": "cxi"}


def write_split(out, fmt, mode, first, last, per_file, draw):
    """Shots first..last-1 of `draw(count, start) -> (images, labels)` as files of `per_file` shots."""
    for part, start in enumerate(tqdm(range(first, last, per_file), desc=mode, unit="file")):
        count = min(per_file, last - start)
        images, labels = draw(count, start)
        ids = np.arange(start, start + count)
        path = os.path.join(out, f"part{part:03d}_{mode}.{EXTENSIONS[fmt]}")
        if fmt == "tfrecord":
            tfrecord.write(path, images, ids.astype(np.int32) if mode == "predict" else labels)
        elif fmt == "cxi_shots":
            cxi.write_cxi_shots(path, images, labels, ids)
        else:
            cxi.write_cxi_stacked(path, images, labels, ids)


def check_args(args):
    """The splits to write; exits with a one-line error where the flags contradict each other or --out holds files."""
    existing = sorted(os.listdir(args.out)) if os.path.isdir(args.out) else []
    if existing:
        what = "dataset files" if any(f.startswith("part") for f in existing) else "other files"
        sys.exit(f"make_dataset.py: error: {args.out} already holds {what} ({existing[0]}, ...); "
                 f"choose another --out")
    moved = [flag for flag, given in (("--shifted", args.shifted), ("--shift", args.shift),
                                      ("--fixed_detector", args.fixed_detector)) if given]
    if moved and args.version == 1:
        sys.exit(f"make_dataset.py: error: {moved[0]}: version 1 has fixed settings")
    if args.shifted and args.shift:
        sys.exit("make_dataset.py: error: --shifted moves every setting; --shift one group: give one of them")
    modes = (args.modes or ("eval,predict" if args.kind else "train,eval,predict")).split(",")
    if args.kind and (moved or args.version or "train" in modes):
        sys.exit("make_dataset.py: error: --kind: writes only eval and predict files, with no simulator version, "
                 "shift or fixed detector")
    return modes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Output directory (data_dir + dataset for airynet.py).")
    p.add_argument("--format", choices=sorted(EXTENSIONS), default="tfrecord")
    p.add_argument("--size", type=int, default=259, help="Stored image size (pass it as --ori_width/height).")
    p.add_argument("--dataset_size", type=int, default=7264, help="Training shots.")
    p.add_argument("--random_seed", type=int, default=1612)
    p.add_argument("--per_file", type=int, default=1024, help="Shots per file.")
    p.add_argument("--modes", default=None, help="Splits to write (default train,eval,predict; with --kind eval,predict).")
    p.add_argument("--kind", choices=nondroplet.KINDS, default=None,
                   help="Shots that are not droplets, for out-of-distribution tests (never training files).")
    p.add_argument("--version", type=int, choices=simulate.VERSIONS, default=None,
                   help=f"Simulator version (default {simulate.VERSION}).")
    p.add_argument("--shifted", action="store_true", help="Version 2's SHIFTED settings (a robustness test set).")
    p.add_argument("--shift", choices=sorted(simulate.SHIFT_GROUPS),
                   help="Move only this group of settings to SHIFTED's values (version 2).")
    p.add_argument("--eval_size", type=int, default=None, help="Eval and predict shots (default: as --dataset=synthetic).")
    p.add_argument("--fixed_detector", action="store_true",
                   help="One detector (beam stop, gaps, bad pixels) for every shot, as at a beamline (version 2); "
                        "its mask (1 = bad) is written as OUT/mask.npy, for airynet.py --mask.")
    args = p.parse_args(argv)
    modes = check_args(args)
    cfg = config.parse_args([f"--dataset_size={args.dataset_size}"])
    settings = simulate.SHIFTED if args.shifted else simulate.shifted_in(args.shift) if args.shift else None
    fixed = simulate.fixed_detector(args.random_seed, args.size, settings) if args.fixed_detector else None

    def draw(count, start):
        if args.kind:
            return nondroplet.simulate(args.kind, count, args.random_seed, args.size, start=start)
        return simulate.simulate(count, args.random_seed, args.size, start=start, version=args.version,
                                 settings=settings, fixed=fixed)

    with atomic_dir(args.out) as staging:
        if fixed is not None:
            np.save(os.path.join(staging, "mask.npy"), fixed.mask())
        for mode in modes:
            # Every training shot: a run that calibrates holds its calibration shots out of these files itself.
            first, last = data.synthetic_range(cfg, mode, calibration_share=0.0)
            if args.eval_size is not None and mode != "train":
                last = first + args.eval_size
            write_split(staging, args.format, mode, first, last, args.per_file, draw)
    print(f"Wrote {args.format} files to {args.out}")


if __name__ == "__main__":
    main()
