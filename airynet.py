#!/usr/bin/env python3
"""AiryNet: classify single-shot diffraction patterns (Zimmermann et al., Phys. Rev. E 99, 063309, 2019).

    python airynet.py --mode=train --resnet_size=18
    python airynet.py --mode=predict --load_dir=logs/helium_0101_120000
    python airynet.py --mode=live --load_dir=logs/helium_0101_120000 --bridge=tcp://host:4545

Flags are parsed once, here, and the resulting config is passed down; see `--help` and README.md.
"""
import contextlib
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


@contextlib.contextmanager
def native_stderr_silenced(silenced):
    """File descriptor 2 pointed at /dev/null inside the block. TensorFlow's C++ side logs while it is
    imported (absl's "before InitializeLog" notice, oneDNN's), before any log level can apply and
    whatever TF_CPP_MIN_LOG_LEVEL says; Python's own errors still reach the terminal after the block."""
    if not silenced:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def run(cfg):
    if cfg.load_dir:
        overridden = config.merge_run_config(cfg, cfg.load_dir)
        if overridden:
            log.warning("Flags given on the command line override the run's saved config: %s",
                        ", ".join(f"--{k}" for k in overridden))
    with native_stderr_silenced(cfg.log_level != "DEBUG"):
        import keras
        import tensorflow as tf
    if cfg.log_level != "DEBUG":
        tf.get_logger().setLevel("ERROR")
    keras.utils.set_random_seed(cfg.random_seed)
    if cfg.use_nchw and not tf.config.list_physical_devices("GPU"):
        # Checkpoints do not depend on the data format, so the faster NHWC is used on CPUs; the default
        # (the original's) is switched without a word, an explicit --use_nchw=true with a warning.
        if "use_nchw" in cfg.explicit:
            log.warning("--use_nchw=true: no GPU found, using channels_last (NHWC), which is faster on CPUs")
        cfg.use_nchw = False
    if cfg.mixed_precision != "none" and not tf.config.list_physical_devices("GPU"):
        log.warning("--mixed_precision=%s: no GPU found; on CPUs its speed depends on the CPU (slower than float32 "
                    "without bfloat16 units, faster with them) and it moves probabilities slightly; see "
                    "docs/performance.md", cfg.mixed_precision)
    # Set on every run, "none" included: the policy is global and must not leak into a later run in this process.
    keras.mixed_precision.set_global_policy(MIXED_PRECISION_POLICIES[cfg.mixed_precision])

    from nn import recipe
    from nn.inputs import cxi
    try:
        return dispatch(cfg, recipe.resolve(cfg))  # the run's recipe, now that its flags are final
    finally:
        cxi.close_all()


def dispatch(cfg, recipe):
    """One module per mode; predict, save and eval never import the training module."""
    if cfg.mode == "train":
        from nn import train
        return train.train(cfg, recipe)
    if cfg.mode == "eval":
        from nn import evaluate
        return evaluate.evaluate(cfg, recipe)
    from nn import checkpoints
    model, _ = checkpoints.restore_model(cfg, recipe)
    if cfg.mode == "live":
        from nn.beamline import live
        return live.run(cfg, recipe, model)
    if cfg.mode == "predict":
        from nn import predict
        return predict.run(cfg, recipe, model) or 0
    from nn import export
    return export.save(cfg, recipe, model) or 0


def debug_requested(argv, cfg):
    """Whether errors show tracebacks: the parsed --log_level, or, where parsing failed, the flag as
    given in either form argparse accepts (--log_level=DEBUG or --log_level DEBUG)."""
    if cfg is not None:
        return cfg.log_level == "DEBUG"
    return any(a == "--log_level=DEBUG" or (a == "--log_level" and argv[i + 1:i + 2] == ["DEBUG"])
               for i, a in enumerate(argv))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        cfg = config.parse_args(argv)
        setup_logging(cfg.log_level)
        if cfg.mode == "view":  # no TensorFlow: the view only reads what the classifier wrote or publishes
            from nn.web import view
            return view.run(cfg)
        return run(cfg)
    except config.AiryNetError as e:
        if debug_requested(argv, cfg):
            log.exception("Traceback")
        print(f"airynet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("airynet: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unforeseen failure still ends in one line unless debugging
        if debug_requested(argv, cfg):
            raise
        print(f"airynet: error: {type(e).__name__}: {config.first_line(e)} (rerun with --log_level=DEBUG for "
              f"details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
