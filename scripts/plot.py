#!/usr/bin/env python3
"""Render PNGs to look at (see nn/outputs/plots.py):

    python scripts/plot.py gallery predictions/helium.h5 --out=gallery.png [--shots=8 --start=0 --class=round]
    python scripts/plot.py eval logs/helium_RUN [--out_dir=logs/helium_RUN/eval]
    python scripts/plot.py simulated --out=docs/gallery_v2.png [--size=259 --per_class=5 --version=2 --shifted]
    python scripts/plot.py nondroplet --out=docs/ood_gallery.png [--size=259 --per_kind=5 --seed=0]

`gallery` reads a predictions file (either h5 layout); `eval` reads RUN/eval/scores.npz, written by
`airynet.py --mode=eval --load_dir=RUN`, and writes confusion.png and pr_curves.png.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nn import config  # noqa: E402
from nn.inputs import simulate
from nn.outputs import plots


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gallery", help="Shots with their Grad-CAM++ overlays, from a predictions h5.")
    g.add_argument("h5", help="A predictions file written by --mode=predict.")
    g.add_argument("--out", default=None, help="The PNG to write (default: next to the h5, *.gallery.png).")
    g.add_argument("--shots", type=int, default=8, help="How many shots (rows).")
    g.add_argument("--start", type=int, default=0, help="The first record to consider.")
    g.add_argument("--class", dest="class_name", default=None, help="Only shots predicted as this class.")
    e = sub.add_parser("eval", help="Confusion counts and precision-recall curves of an eval run.")
    e.add_argument("run_dir", help="A run directory after --mode=eval (holds eval/scores.npz).")
    e.add_argument("--out_dir", default=None, help="Where to write the PNGs (default: RUN/eval).")
    s = sub.add_parser("simulated", help="Simulated shots of every class (nn/inputs/simulate.py), one row per class.")
    s.add_argument("--out", required=True, help="The PNG to write.")
    s.add_argument("--size", type=int, default=259, help="Stored image size.")
    s.add_argument("--per_class", type=int, default=5, help="Shots per class (columns).")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--version", type=int, default=None, help="Simulator version (default: the current one).")
    s.add_argument("--shifted", action="store_true", help="Version 2 with its SHIFTED settings.")
    n = sub.add_parser("nondroplet", help="Shots that are not droplets (nn/inputs/nondroplet.py), one row per kind.")
    n.add_argument("--out", required=True, help="The PNG to write.")
    n.add_argument("--size", type=int, default=259, help="Stored image size.")
    n.add_argument("--per_kind", type=int, default=5, help="Shots per kind (columns).")
    n.add_argument("--seed", type=int, default=0)
    for parser in (g, e, s, n):
        parser.add_argument("--overwrite", type=config.str2bool, default=False, help="Replace existing PNGs.")
    args = p.parse_args(argv)
    try:
        if args.what == "gallery":
            out = args.out or os.path.splitext(args.h5)[0] + ".gallery.png"
            written = [plots.gallery(args.h5, out, args.shots, args.start, args.class_name, args.overwrite)]
        elif args.what == "simulated":
            simulation = plots.Simulation(args.size, args.seed, args.version,
                                          simulate.SHIFTED if args.shifted else None)
            written = [plots.class_gallery(args.out, simulation, args.per_class, args.overwrite)]
        elif args.what == "nondroplet":
            written = [plots.nondroplet_gallery(args.out, args.size, args.seed, args.per_kind, args.overwrite)]
        else:
            written = plots.eval_plots(args.run_dir, args.out_dir, args.overwrite)
    except config.AiryNetError as err:
        print(f"plot: error: {err}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
