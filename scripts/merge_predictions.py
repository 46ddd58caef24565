#!/usr/bin/env python3
"""Merge the prediction files of a sharded run (a SLURM job array, or --num_shards=N) into the files an
unsharded run writes:

    python scripts/merge_predictions.py --predict_dir=predictions --dataset=helium --num_shards=4

reads predictions/helium.shard{0..3}of4.{txt,h5[,npy]} and writes predictions/helium.{txt,h5[,npy]}.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nn import config  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predict_dir", default="predictions", help="Where the shard files are.")
    p.add_argument("--dataset", default="helium", help="The --dataset of the prediction run.")
    p.add_argument("--num_shards", type=int, required=True, help="The number of shards of the run.")
    p.add_argument("--overwrite", type=config.str2bool, default=False, help="Allow replacing merged files.")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from nn import predict  # imports TensorFlow, which the argument check above does not need
    try:
        predict.merge(args.predict_dir, args.dataset, args.num_shards, args.overwrite)
    except config.AiryNetError as e:
        print(f"merge_predictions: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
