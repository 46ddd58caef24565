#!/usr/bin/env python3
"""Fit the out-of-distribution score of a trained run (nn/ood.py) and write RUN/ood.npz, as training does
at its end; for runs trained before the score existed, or to fit another method.

    python scripts/fit_ood.py --load_dir=logs/synthetic_quickstart [--method=mahalanobis]

Other airynet.py flags (--data_dir, --dataset, --batch_size) point the run at its data as for --mode=eval.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import airynet  # noqa: E402
from nn import config  # noqa: E402

with airynet.native_stderr_silenced(True):  # TensorFlow's import-time notices, as airynet.py does
    from nn import ood  # noqa: E402


def load_run(flags):
    """(cfg, recipe, model, step) of the run that `flags` (airynet.py's, with --load_dir) name."""
    cfg = config.parse_args(["--mode=eval", *flags])
    if not cfg.load_dir:
        raise config.AiryNetError("--load_dir: required (the run to fit the score for)")
    airynet.setup_logging(cfg.log_level)
    config.merge_run_config(cfg, cfg.load_dir)
    import keras
    from nn import checkpoints, recipe
    keras.utils.set_random_seed(cfg.random_seed)
    cfg.use_nchw = False  # NHWC on CPUs; a GPU run's checkpoint restores in either layout
    run_recipe = recipe.resolve(cfg)
    model, step = checkpoints.restore_model(cfg, run_recipe)
    return cfg, run_recipe, model, step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=ood.METHODS, default=ood.DEFAULT_METHOD)
    args, flags = p.parse_known_args(argv)
    try:
        cfg, run_recipe, model, step = load_run(flags)
        if ood.fit_run(cfg, run_recipe, model, cfg.load_dir, step, args.method) is None:
            return 1
    except config.AiryNetError as e:
        print(f"fit_ood.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
