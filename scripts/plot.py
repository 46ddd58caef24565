#!/usr/bin/env python3
"""Render PNGs to look at (see nn/plots.py):

    python scripts/plot.py gallery predictions/helium.h5 --out=gallery.png [--shots=8 --start=0 --class=round]
    python scripts/plot.py eval logs/helium_RUN [--out_dir=logs/helium_RUN/eval]

`gallery` reads a predictions file (either h5 layout); `eval` reads RUN/eval/scores.npz, written by
`airynet.py --mode=eval --load_dir=RUN`, and writes confusion.png and pr_curves.png.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nn import config, plots  # noqa: E402


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
    for parser in (g, e):
        parser.add_argument("--overwrite", type=config.str2bool, default=False, help="Replace existing PNGs.")
    args = p.parse_args(argv)
    try:
        if args.what == "gallery":
            out = args.out or os.path.splitext(args.h5)[0] + ".gallery.png"
            written = [plots.gallery(args.h5, out, args.shots, args.start, args.class_name, args.overwrite)]
        else:
            written = plots.eval_plots(args.run_dir, args.out_dir, args.overwrite)
    except config.AiryNetError as err:
        print(f"plot: error: {err}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
