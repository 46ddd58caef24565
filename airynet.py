#!/usr/bin/env python3
"""AiryNet: classify single-shot diffraction patterns (Zimmermann et al., Phys. Rev. E 99, 063309, 2019).

    python airynet.py --mode=train --resnet_size=18
    python airynet.py --mode=predict --load_dir=logs/helium_0101_120000
    python airynet.py --mode=live --load_dir=logs/helium_0101_120000 --bridge=tcp://host:4545

Flags are parsed once, here, and the resulting config is passed down; see `--help` and README.md.
"""
import logging
import os
import sys

from nn import config

log = logging.getLogger("airynet")

MIXED_PRECISION_POLICIES = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def setup_logging(level):
    level = {"WARN": "WARNING"}.get(level, level)
    # Other libraries' loggers stay at WARNING; AiryNet's own follows --log_level.
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(level)
    # Quieten TensorFlow's C++ side unless debugging; this must happen before TensorFlow is imported.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if level == "DEBUG" else "2")
    # oneDNN is off by default on AMD CPUs; on, it is ~30% faster here and runs NCHW convolutions.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def run(cfg):
    if cfg.load_dir:
        overridden = config.merge_run_config(cfg, cfg.load_dir)
        if overridden:
            log.warning("Flags given on the command line override the run's saved config: %s",
                        ", ".join(f"--{k}" for k in overridden))
    import keras
    import tensorflow as tf
    if cfg.log_level != "DEBUG":
        tf.get_logger().setLevel("ERROR")
    keras.utils.set_random_seed(cfg.random_seed)
    if cfg.use_nchw and not tf.config.list_physical_devices("GPU"):
        # Checkpoints do not depend on the data format, so the faster NHWC is used on CPUs.
        log.warning("--use_nchw=true: no GPU found, using channels_last (NHWC), which is faster on CPUs")
        cfg.use_nchw = False
    if cfg.mixed_precision != "none" and not tf.config.list_physical_devices("GPU"):
        log.warning("--mixed_precision=%s: no GPU found; on CPUs mixed precision is much slower than float32 "
                    "(bfloat16 about 12x without --jit_compile=true)", cfg.mixed_precision)
    # Set on every run, "none" included: the policy is global and must not leak into a later run in this process.
    keras.mixed_precision.set_global_policy(MIXED_PRECISION_POLICIES[cfg.mixed_precision])

    from nn import train
    if cfg.mode == "train":
        return train.train(cfg)
    if cfg.mode == "eval":
        return train.evaluate(cfg)
    model, _ = train.restore_model(cfg)
    if cfg.mode == "live":
        from nn import live
        return live.run(cfg, model)
    if cfg.mode == "predict":
        from nn import predict
        return predict.run(cfg, model) or 0
    from nn import export
    return export.save(cfg, model) or 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    debug = any(a.replace(" ", "=") in ("--log_level=DEBUG",) for a in argv)
    try:
        cfg = config.parse_args(argv)
        setup_logging(cfg.log_level)
        return run(cfg)
    except config.AiryNetError as e:
        if debug:
            log.exception("Traceback")
        print(f"airynet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("airynet: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unforeseen failure still ends in one line unless debugging
        if debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"airynet: error: {type(e).__name__}: {message} (rerun with --log_level=DEBUG for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
