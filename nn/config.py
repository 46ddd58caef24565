"""Command-line flags, the run directory and the saved run config.

Flags are parsed once, in airynet.py, into an argparse.Namespace (`cfg`) that is passed down to every
module. Nothing here imports TensorFlow: airynet.py must set TensorFlow's environment variables from
the flags before TensorFlow is imported.
"""
import argparse
import datetime
import json
import os

from nn.files import atomic_file

HELIUM_CLASSES = ["spherical_oblate", "round", "elliptical", "prolate", "streak", "bent",
                  "asymmetric", "newton_rings", "double_rings", "layered", "empty"]

RESNET_SIZES = (18, 34, 50, 101, 152, 200)
VGG_SIZES = (16, 19)
MODES = ("train", "eval", "predict", "save")
MODERN_PIECES = ("schedule", "weight_decay", "ema", "bn_momentum", "area", "pos_weight", "augment")
CONFIG_FILE = "config.json"

# Flags that describe one invocation rather than the run: they are never taken from a saved config.
PER_INVOCATION = {"mode", "load_dir", "save_dir", "log_dir", "out_dir_name", "predict_dir", "overwrite",
                  "log_level", "num_shards", "shard_index", "gradcam", "save_npy", "save_images", "h5_layout",
                  "eval_steps", "use_nchw", "num_cpu_replicas", "mixed_precision", "jit_compile", "thresholds"}


class AiryNetError(Exception):
    """A problem with the user's input: airynet.py prints it as one line and exits with status 2."""


def first_line(error):
    """The first line of an exception's message (TensorFlow's without its " [Op:...]" suffix), for
    one-line error reports; the exception's type name where it has no message."""
    text = (getattr(error, "message", None) or str(error)).strip()
    if not text:
        return type(error).__name__
    return text.splitlines()[0].split(" [Op:")[0]


def str2bool(text):
    """The original's rule: 'true' or '1' (any case) is True, anything else False."""
    return str(text).lower() in ("true", "1")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage plus the message and exit; we want one line
        raise AiryNetError(message)


def build_parser():
    p = _Parser(prog="airynet.py", allow_abbrev=False,
                description="Classify single-shot diffraction patterns with ResNet-v2/VGG networks.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("network")
    g.add_argument("--resnet_size", type=int, default=18, choices=RESNET_SIZES,
                   help="Size of the ResNet-v2 (only with --airynet_type=resnet).")
    g.add_argument("--vgg_size", type=int, default=16, choices=VGG_SIZES,
                   help="Size of the VGG (only with --airynet_type=vgg).")
    g.add_argument("--airynet_type", type=str, default="resnet", choices=("resnet", "vgg"),
                   help="The architecture that is used.")

    g = p.add_argument_group("data")
    g.add_argument("--data_dir", type=str, default="../datasets/",
                   help="Prefix for --dataset: files are looked up in data_dir + dataset + '/'.")
    g.add_argument("--dataset", type=str, default="helium",
                   help="Dataset folder name under data_dir. 'synthetic' needs no files: simulated "
                        "helium-droplet patterns are generated from --random_seed.")
    g.add_argument("--log_dir", type=str, default="logs",
                   help="Runs are written to log_dir/{dataset}_{out_dir_name or MMDD_HHMMSS}.")
    g.add_argument("--load_dir", type=str, default="",
                   help="Run directory to resume training from, or to evaluate/predict/export.")
    g.add_argument("--save_dir", type=str, default="", help="Where --mode=save writes the SavedModel.")
    g.add_argument("--out_dir_name", type=str, default="", help="Name tag of the run directory.")
    g.add_argument("--mode", type=str, default="train", choices=MODES, help="What to do.")
    g.add_argument("--batch_size", type=int, default=24,
                   help="Images per batch and per replica (the global batch is this times the "
                        "number of replicas).")
    g.add_argument("--dataset_size", type=int, default=7264,
                   help="Images per epoch; sets the learning-rate schedule (and the size of the "
                        "synthetic training set).")
    for side, default in (("width", 259), ("height", 259), ("depth", 1)):
        g.add_argument(f"--ori_{side}", type=int, default=default, help=f"Stored image {side}.")
    for side, default in (("width", 224), ("height", 224), ("depth", 1)):
        g.add_argument(f"--target_{side}", type=int, default=default, help=f"Network input {side}.")
    g.add_argument("--num_classes", type=int, default=11, help="Number of classes.")
    g.add_argument("--single_label", type=str2bool, default=False,
                   help="Exclusive classes: softmax cross-entropy and arg-max predictions (the original's "
                        "cifar10 path) instead of multi-label sigmoids.")
    g.add_argument("--num_worker", type=int, default=4,
                   help="Parallel TFRecord readers (at most one per file) and synthetic-shot generators.")
    g.add_argument("--use_ccf", type=str2bool, default=False,
                   help="Read the cross-correlation image feature (image/ccf/encoded) instead of the "
                        "raw image.")
    g.add_argument("--add_noise", type=int, default=0, choices=(0, 1, 2, 3),
                   help="1-3: read the noise-augmented image feature image/noise{N}/encoded.")
    g.add_argument("--fraction_mode", type=str2bool, default=False,
                   help="Train on the fraction-of-data file *train_{fraction}.tfrecord.")
    g.add_argument("--fraction", type=float, default=1.0, help="The fraction used by --fraction_mode.")
    g.add_argument("--eval_every", type=int, default=10,
                   help="For a dataset held in one file for all modes: every Nth shot is held out "
                        "for eval, the rest trains; predict reads every shot.")
    g.add_argument("--sim_version", type=int, default=2, choices=(1, 2),
                   help="Version of the simulator behind --dataset=synthetic: 2 varies the detector and beam "
                        "from shot to shot; 1 is the earlier, easier distribution (for comparisons).")
    g.add_argument("--cxi_labels", type=str, default="",
                   help="Path of the label dataset inside stacked CXI files (default: the first of "
                        "entry_1/data_1/labels, entry_1/labels, labels that exists).")

    g = p.add_argument_group("training")
    g.add_argument("--recipe", type=str, default="paper", choices=("paper", "modern"),
                   help="paper: the original's training, unchanged. modern: warm-up and cosine decay, decoupled "
                        "weight decay, an average of the weights for inference, faster batch-norm averages, "
                        "area downsampling, rare classes weighted up, rotations, shifts and intensity scaling "
                        "(README, How well it learns).")
    g.add_argument("--recipe_without", type=str, default="",
                   help="Comma-separated pieces of --recipe=modern to leave out, for ablations: schedule, "
                        "weight_decay, ema, bn_momentum, area, pos_weight, augment.")
    g.add_argument("--calibration_fraction", type=float, default=None,
                   help="Share of the training shots held out, never trained on, to choose each class's "
                        "decision threshold at the end of training (default 0.1 with --recipe=modern, else 0).")
    g.add_argument("--train_steps", type=int, default=30000, help="Number of batches to train.")
    g.add_argument("--steps_per_eval", type=int, default=2500,
                   help="Train this many steps, then evaluate; repeat.")
    g.add_argument("--eval_steps", type=int, default=None,
                   help="Eval batches after each training chunk (default 100); in --mode=eval the "
                        "default is one full pass over the eval files.")
    g.add_argument("--lr", type=float, default=0.1, help="Learning rate, scaled: lr * batch / 128.")
    g.add_argument("--gamma", type=float, default=0.9, help="Nesterov momentum.")
    g.add_argument("--l1_regularization_scale", type=float, default=1e-5, help="L1 on every kernel.")
    g.add_argument("--l2_regularization_scale", type=float, default=1e-5, help="L2 on every kernel.")
    g.add_argument("--use_weight_decay", type=str2bool, default=False,
                   help="Add weight_decay * sum(l2_loss) over all trainable variables.")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="The amount of weight decay.")
    g.add_argument("--relu_leakiness", type=float, default=0.2, help="Leaky ReLU slope (0: ReLU).")
    g.add_argument("--use_log_act", type=str2bool, default=True,
                   help="Logarithmic activation after the first convolution (the network then sees "
                        "raw photon counts).")
    g.add_argument("--alpha", type=float, default=0.2, help="Alpha of the log activation.")
    g.add_argument("--beta", type=float, default=0.0, help="Beta of the log activation.")
    g.add_argument("--use_nchw", type=str2bool, default=True,
                   help="channels_first tensors (fast on NVIDIA GPUs; on a CPU it needs oneDNN).")
    g.add_argument("--mixed_precision", type=str, default="none", choices=("none", "bf16", "fp16"),
                   help="Compute in bfloat16 or float16 with float32 weights (GPUs; fp16 adds dynamic loss "
                        "scaling). The input layers up to the log activation and the logits stay float32. "
                        "Much slower on CPUs.")
    g.add_argument("--jit_compile", type=str2bool, default=False,
                   help="Compile the training step with XLA. (The log activation is XLA-fused in every "
                        "mode, whatever this flag says.)")

    g.add_argument("--num_cpu_replicas", type=int, default=1,
                   help="Split the CPU into this many logical devices and mirror training over them "
                        "(tests tf.distribute without GPUs).")

    g = p.add_argument_group("prediction")
    g.add_argument("--predict_dir", type=str, default="predictions",
                   help="Where --mode=predict writes its files (created when missing).")
    g.add_argument("--overwrite", type=str2bool, default=False,
                   help="Allow replacing existing prediction files.")
    g.add_argument("--thresholds", type=str, default="run",
                   help="Decision rule of eval, predict and save: 'run' uses the run's thresholds.json where "
                        "training wrote one (else 0.5); a number is one threshold for every class, and 0.5 is "
                        "the original rule.")
    g.add_argument("--gradcam", type=str2bool, default=True, help="Compute Grad-CAM++ maps.")
    g.add_argument("--h5_layout", type=str, default="stacked", choices=("stacked", "per_shot"),
                   help="Prediction HDF5 layout: chunked stacked datasets, or one group per shot "
                        "as the original wrote.")
    g.add_argument("--save_images", type=str2bool, default=True,
                   help="Store the network-input images in the stacked prediction HDF5 (the per_shot layout "
                        "always does).")
    g.add_argument("--save_npy", type=str2bool, default=False,
                   help="Also write the original's pickled {dataset}.npy dict.")
    g.add_argument("--num_shards", type=int, default=None,
                   help="Split predict records into this many shards (default: "
                        "SLURM_ARRAY_TASK_COUNT or 1).")
    g.add_argument("--shard_index", type=int, default=None,
                   help="Which shard this job predicts (default: SLURM_ARRAY_TASK_ID or 0).")

    g = p.add_argument_group("misc")
    g.add_argument("--log_level", type=str, default="INFO",
                   choices=("DEBUG", "INFO", "WARN", "WARNING", "ERROR"),
                   help="Log level; DEBUG also shows tracebacks of errors.")
    g.add_argument("--log_step", type=int, default=100, help="Log every N steps.")
    g.add_argument("--random_seed", type=int, default=1612, help="Seed for reproducibility.")
    return p


def _explicit_flags(parser, argv):
    """Names of the flags given on the command line (so a saved run config does not override them)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def parse_args(argv):
    parser = build_parser()
    cfg = parser.parse_args(argv)
    cfg.explicit = _explicit_flags(parser, argv)
    validate(cfg)
    return cfg


def validate(cfg):
    positive = ["batch_size", "dataset_size", "ori_width", "ori_height", "ori_depth", "target_width",
                "target_height", "num_classes", "num_worker", "train_steps", "steps_per_eval",
                "log_step", "eval_every", "num_cpu_replicas"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise AiryNetError(f"--{name}={getattr(cfg, name)}: must be a positive integer")
    if cfg.target_depth not in (1, 3):
        raise AiryNetError(f"--target_depth={cfg.target_depth}: must be 1 (gray) or 3 (RGB)")
    if cfg.eval_steps is not None and cfg.eval_steps < 1:
        raise AiryNetError(f"--eval_steps={cfg.eval_steps}: must be a positive integer")
    if cfg.lr <= 0:
        raise AiryNetError(f"--lr={cfg.lr}: must be positive")
    if not 0 < cfg.fraction <= 1:
        raise AiryNetError(f"--fraction={cfg.fraction}: must be in (0, 1]")
    unknown = set(filter(None, cfg.recipe_without.split(","))) - set(MODERN_PIECES)
    if unknown:
        raise AiryNetError(f"--recipe_without={cfg.recipe_without}: unknown pieces {sorted(unknown)}; "
                           f"the pieces are {', '.join(MODERN_PIECES)}")
    if cfg.calibration_fraction is None:
        cfg.calibration_fraction = 0.1 if cfg.recipe == "modern" else 0.0
    if not 0 <= cfg.calibration_fraction <= 0.5:
        raise AiryNetError(f"--calibration_fraction={cfg.calibration_fraction}: must be in [0, 0.5]")
    if cfg.thresholds != "run":
        try:
            threshold = float(cfg.thresholds)
        except ValueError:
            threshold = -1.0
        if not 0 < threshold < 1:
            raise AiryNetError(f"--thresholds={cfg.thresholds}: must be 'run' or a number in (0, 1)")
    if cfg.mode == "save" and not cfg.save_dir:
        raise AiryNetError("--save_dir: --mode=save needs a directory to write the SavedModel to")
    if cfg.mode in ("eval", "predict", "save") and not cfg.load_dir:
        raise AiryNetError(f"--load_dir: --mode={cfg.mode} needs the run directory of a trained model")


def class_names(cfg):
    """The helium names where the class count matches the public dataset, else plain indices."""
    if cfg.num_classes == len(HELIUM_CLASSES):
        return list(HELIUM_CLASSES)
    return [str(i) for i in range(cfg.num_classes)]


def crop_size(n):
    """The side of the stored image's centre crop: the largest power of two not above n (259 -> 256,
    1035 -> 1024), as the original's preprocessing took it."""
    return 1 << (int(n).bit_length() - 1)


def new_run_dir(cfg, now=None, tag=None):
    """log_dir/{dataset}_{tag or out_dir_name or MMDD_HHMMSS}, refused if it already holds a run."""
    now = now or datetime.datetime.now()
    tag = tag or cfg.out_dir_name or now.strftime("%m%d_%H%M%S")
    run_dir = os.path.join(cfg.log_dir, f"{cfg.dataset}_{tag}")
    if os.path.exists(os.path.join(run_dir, CONFIG_FILE)):
        raise AiryNetError(f"--out_dir_name: {run_dir} already holds a run; resume it with "
                           f"--load_dir={run_dir} or choose another --out_dir_name")
    return run_dir


def save_config(cfg, run_dir):
    values = {k: v for k, v in vars(cfg).items() if k != "explicit"}
    with atomic_file(os.path.join(run_dir, CONFIG_FILE)) as f:
        json.dump(values, f, indent=2, sort_keys=True)


def merge_run_config(cfg, run_dir):
    """Fill every flag that was not given explicitly from the run's saved config.

    Explicit flags win, so a user can point a trained model at other data (--data_dir, --dataset,
    --batch_size, ...). Returns the names of the explicit flags that differ from the saved run.
    """
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise AiryNetError(f"{path}: cannot read the saved run config ({e})")
    differing = []
    for key, value in saved.items():
        if key in PER_INVOCATION or not hasattr(cfg, key):
            continue
        if key in cfg.explicit:
            if getattr(cfg, key) != value:
                differing.append(key)
        else:
            setattr(cfg, key, value)
    return differing
