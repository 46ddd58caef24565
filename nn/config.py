"""Command-line flags, the run directory and the saved run config.

Flags are parsed once, in airynet.py, into an argparse.Namespace (`cfg`) that is passed down to every
module. Nothing here imports TensorFlow: airynet.py must set TensorFlow's environment variables from
the flags before TensorFlow is imported.
"""
import argparse
import copy
import datetime
import json
import os
import re

from nn.files import atomic_file

HELIUM_CLASSES = ["spherical_oblate", "round", "elliptical", "prolate", "streak", "bent",
                  "asymmetric", "newton_rings", "double_rings", "layered", "empty"]

RESNET_SIZES = (18, 34, 50, 101, 152, 200)
VGG_SIZES = (16, 19)
MODES = ("train", "eval", "predict", "save", "live", "view")
JIT_INFERENCE = ("maps", "all", "none")  # --jit_inference: what XLA compiles in predict and live
MODERN_PIECES = ("schedule", "weight_decay", "ema", "bn_momentum", "area", "pos_weight", "augment")
CONFIG_FILE = "config.json"
FRACTIONS = (0.25, 0.5, 0.75)  # --fraction's choices, as the 2018 original's parser had them

# Flags that describe one invocation rather than the run: they are never taken from a saved config.
PER_INVOCATION = {"mode", "load_dir", "save_dir", "log_dir", "out_dir_name", "predict_dir", "overwrite",
                  "log_level", "num_shards", "shard_index", "gradcam", "save_npy", "save_images", "save_conv",
                  "h5_layout", "h5_compression", "eval_steps", "use_nchw", "num_cpu_replicas", "mixed_precision", "jit_compile",
                  "jit_inference", "bridge", "bridge_socket", "bridge_source", "bridge_key", "geometry", "publish",
                  "publish_socket", "publish_images", "gradcam_every", "live_trains", "live_seconds", "thresholds", "pulses",
                  "view_source", "view_socket", "view_host", "view_port"}


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
                        "helium-droplet patterns are generated from --random_seed. Also the name of "
                        "--mode=predict's output files, and of --mode=live's when given (else "
                        "live_<first train ID>).")
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
                   help="Parallel TFRecord readers (at most one per file), synthetic-shot generators and "
                        "batches being preprocessed.")
    g.add_argument("--use_ccf", type=str2bool, default=False,
                   help="Read the cross-correlation image feature image/ccf_noise_* instead of the raw "
                        "image/encoded*.")
    g.add_argument("--add_noise", type=int, default=0, choices=(0, 1, 2, 3),
                   help="Read a noise-augmented image feature: suffix _noise_mean (1), _noise_mean_std (2), "
                        "_noise_max (3); with --use_ccf, 0 reads image/ccf_noise_.")
    g.add_argument("--fraction_mode", type=str2bool, default=False,
                   help="Train and predict on the fraction-of-data files *{mode}*{fraction with _ for .}"
                        ".tfrecord (e.g. *train*0_25.tfrecord); eval reads *eval.tfrecord.")
    g.add_argument("--fraction", type=float, default=0.25, choices=FRACTIONS,
                   help="The fraction used by --fraction_mode.")
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
                        "(docs/results.md).")
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
                   help="Compile the training step with XLA (predict and live: --jit_inference). (The log "
                        "activation is XLA-fused in every mode, whatever this flag says.)")
    g.add_argument("--jit_inference", type=str, default="maps", choices=JIT_INFERENCE,
                   help="What XLA compiles in predict and live (a flag of its own: --jit_compile keeps the "
                        "original's default, off, for training): 'maps' the Grad-CAM++ maps from the last "
                        "block on, which XLA makes nearly free, while the convolutions stay with oneDNN, "
                        "which on CPUs is faster than XLA's; 'all' the whole network step (worth trying on "
                        "GPUs); 'none' nothing. The compiled part runs at --batch_size: shorter batches are "
                        "padded, so that it is compiled once, at start-up.")

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
    g.add_argument("--h5_compression", type=str, default="gzip", choices=("gzip", "zstd", "lz4", "none"),
                   help="Filter of the stacked prediction HDF5: gzip is standard HDF5, which every HDF5 reader "
                        "opens; zstd (Blosc) and lz4 (bitshuffle) write and read faster but need "
                        "`import hdf5plugin` (or the plugins) to read; none writes uncompressed.")
    g.add_argument("--save_images", type=str2bool, default=None,
                   help="Store the network-input images in the stacked prediction HDF5 (the per_shot layout "
                        "always does). Default true, but false for --mode=live, where they cost target_height "
                        "x target_width x target_depth x 4 bytes a shot, barely compressible: 200 KB at "
                        "224x224x1, 0.7 GB an hour per frame/s (7 GB an hour at the pnCCD's 10 Hz, 12 GB at "
                        "17 frames/s).")
    g.add_argument("--save_conv", type=str2bool, default=False,
                   help="Also store the activations of the Grad-CAM layer (the last conv block) per shot "
                        "(`conv`, channels last).")
    g.add_argument("--save_npy", type=str2bool, default=False,
                   help="Also write the original's pickled {dataset}.npy dict.")
    g.add_argument("--num_shards", type=int, default=None,
                   help="Split predict records into this many shards (default: "
                        "SLURM_ARRAY_TASK_COUNT or 1).")
    g.add_argument("--shard_index", type=int, default=None,
                   help="Which shard this job predicts (default: SLURM_ARRAY_TASK_ID or 0).")

    g = p.add_argument_group("live")  # --mode=live; the source, key and geometry flags also serve EuXFEL runs
    g.add_argument("--bridge", type=str, default="",
                   help="Karabo bridge endpoint to classify shots from, e.g. tcp://host:4545 (--mode=live).")
    g.add_argument("--bridge_socket", type=str, default="REQ", choices=("REQ", "SUB", "PULL"),
                   help="Socket type of --bridge: REQ for a REP server, SUB for PUB, PULL for PUSH.")
    g.add_argument("--bridge_source", type=str, default="",
                   help="Source holding the images, or the name of a detector whose modules come as one source "
                        "each, e.g. SPB_DET_AGIPD1M-1 (default: the first such detector, else the first source with "
                        "an image key, e.g. SQS_NQS_PNCCD1MP/CAL/PNCCD_FMT-0:output); also for EuXFEL run "
                        "directories.")
    g.add_argument("--bridge_key", type=str, default="",
                   help="Key of the images in the source (default: data.image or image.data).")
    g.add_argument("--geometry", type=str, default="",
                   help="CrystFEL .geom file to assemble modular detectors (default: EXtra-geom's example "
                        "geometry of AGIPD1M, LPD1M, DSSC1M, JUNGFRAU or pnCCD).")
    g.add_argument("--pulses", type=str, default="",
                   help="Frames (pulses, memory cells) of each train to classify, by their index in the train: "
                        "START:STOP[:STEP] or a comma list such as 0,2,4 (default: all). Live mode, EuXFEL run "
                        "directories and virtual CXI files.")
    g.add_argument("--publish", type=str, default="",
                   help="Endpoint to publish the results on in the Karabo bridge protocol, e.g. tcp://*:4600.")
    g.add_argument("--publish_socket", type=str, default="REP", choices=("REP", "PUB", "PUSH"),
                   help="Socket type of --publish (clients use REQ, SUB or PULL respectively).")
    g.add_argument("--publish_images", type=str2bool, default=True,
                   help="Publish each shot's image with its results (uint8, log-scaled, at the network's input "
                        "size), for --mode=view; needs --publish.")
    g.add_argument("--gradcam_every", type=int, default=0,
                   help="Publish Grad-CAM++ maps of every Nth shot (0: none); needs --publish, as the maps go "
                        "to the stream only.")
    g.add_argument("--live_trains", type=int, default=0, help="Stop after classifying N trains (0: never).")
    g.add_argument("--live_seconds", type=float, default=0, help="Stop after S seconds (0: never).")

    g = p.add_argument_group("view")  # --mode=view: the browser view of a prediction file or a live stream
    g.add_argument("--view_source", type=str, default="",
                   help="What --mode=view shows: a prediction file (stacked or per-shot .h5), a folder of shard "
                        "files, or tcp://HOST:PORT, the --publish stream of a live run.")
    g.add_argument("--view_socket", type=str, default="SUB", choices=("SUB", "REQ", "PULL"),
                   help="Socket type for a tcp:// --view_source, matching the run's --publish_socket (PUB, REP, "
                        "PUSH). Use a PUB publisher with views: a REQ view takes results from other REQ clients.")
    g.add_argument("--view_host", type=str, default="127.0.0.1",
                   help="Address the view listens on; any other than loopback needs the token it logs at start.")
    g.add_argument("--view_port", type=int, default=None,
                   help="Port the view listens on (default: the first free of 8600..8609; 0: any free port).")

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
    unknown = set(filter(None, cfg.recipe_without.split(","))) - set(MODERN_PIECES)
    if unknown:
        raise AiryNetError(f"--recipe_without={cfg.recipe_without}: unknown pieces {sorted(unknown)}; "
                           f"the pieces are {', '.join(MODERN_PIECES)}")
    # Unset, it stays None (so in the saved config too): the recipe's share applies (nn/recipe.py).
    if cfg.calibration_fraction is not None and not 0 <= cfg.calibration_fraction <= 0.5:
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
    validate_live(cfg)
    validate_view(cfg)
    if cfg.mode in ("eval", "predict", "save", "live") and not cfg.load_dir:
        raise AiryNetError(f"--load_dir: --mode={cfg.mode} needs the run directory of a trained model")


def validate_live(cfg):
    for name in ("gradcam_every", "live_trains", "live_seconds"):
        if getattr(cfg, name) < 0:
            raise AiryNetError(f"--{name}={getattr(cfg, name)}: must not be negative")
    for name in ("bridge", "publish"):
        value = getattr(cfg, name)
        if value and not re.fullmatch(r"(tcp://[^:/\s]+:\d+|ipc://\S+|inproc://\S+)", value):
            raise AiryNetError(f"--{name}={value}: not a ZeroMQ endpoint such as tcp://host:4545")
    if cfg.mode == "live" and not cfg.bridge:
        raise AiryNetError("--bridge: --mode=live needs the Karabo bridge endpoint, e.g. --bridge=tcp://host:4545")
    if cfg.mode == "live" and cfg.gradcam_every and not cfg.publish:
        raise AiryNetError(f"--gradcam_every={cfg.gradcam_every}: the maps go only to the published stream; "
                           f"pass --publish=tcp://*:PORT or leave --gradcam_every at 0")
    if cfg.save_images is None:
        cfg.save_images = cfg.mode != "live"
    if cfg.geometry and not os.path.isfile(cfg.geometry):
        raise AiryNetError(f"--geometry={cfg.geometry}: no such file")
    from nn.inputs.detectors import parse_pulses  # imported here: nn.inputs.detectors imports this module
    parse_pulses(cfg.pulses)


def validate_view(cfg):
    if cfg.view_port is not None and not 0 <= cfg.view_port < 65536:
        raise AiryNetError(f"--view_port={cfg.view_port}: must be a port number, 0..65535")
    if cfg.mode == "view" and not cfg.view_source:
        raise AiryNetError("--view_source: --mode=view needs a prediction file, a folder of shard files or a "
                           "live run's tcp://HOST:PORT")
    if cfg.mode == "live" and cfg.publish_images and not cfg.publish and "publish_images" in getattr(cfg, "explicit", ()):
        raise AiryNetError("--publish_images=true: the images go only to the published stream; pass "
                           "--publish=tcp://*:PORT")


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
    saved = _upgraded(saved)
    differing, taken = [], {}
    for key, value in saved.items():
        if key in PER_INVOCATION or not hasattr(cfg, key):
            continue
        if key in cfg.explicit:
            if getattr(cfg, key) != value:
                differing.append(key)
        else:
            taken[key] = value
    for key, value in taken.items():
        _check_saved_value(path, cfg, key, value)
    for key, value in taken.items():
        setattr(cfg, key, value)
    _refuse_ignored_data_dir(cfg, taken, run_dir)
    return differing


def _refuse_ignored_data_dir(cfg, taken, run_dir):
    """A run trained on simulated shots takes --dataset=synthetic from its config; an explicit --data_dir
    without --dataset then names data that nothing would read (data_dir/synthetic/ does not exist, so the
    shots would be simulated): the user most likely meant their data, so say how to ask for it."""
    reads_data = cfg.mode in ("train", "eval", "predict")
    if (reads_data and taken.get("dataset") == "synthetic" and "data_dir" in cfg.explicit
            and not os.path.isdir(cfg.data_dir + cfg.dataset)):
        raise AiryNetError(f"--data_dir={cfg.data_dir}: the run in {run_dir} was trained on --dataset=synthetic "
                           f"(simulated shots, no files), so this --data_dir would be ignored; pass "
                           f"--dataset=NAME to read {cfg.data_dir}NAME/, or --dataset=synthetic for simulated shots")


def _upgraded(saved):
    """A run config saved by an earlier version of AiryNet, in today's terms."""
    saved = dict(saved)
    saved.setdefault("sim_version", 1)  # before --sim_version there was only the first simulator
    if not saved.get("fraction_mode") and saved.get("fraction") not in FRACTIONS:
        saved.pop("fraction", None)  # 1.0, the earlier default, which nothing reads without --fraction_mode
    return saved


JSON_TYPES = {str2bool: (bool, "true or false"), str: (str, "a string"), int: (int, "an integer"),
              float: ((int, float), "a number")}


def _check_saved_value(path, cfg, key, value):
    """A value taken from a run's config.json gets the checks the same flag gets on the command line:
    its type, its choices and validate()."""
    action = next(a for a in build_parser()._actions if a.dest == key)
    expected, text = JSON_TYPES[action.type]
    try:
        if value is None:
            if action.default is not None:
                raise AiryNetError(f"must be {text}")
        elif not isinstance(value, expected) or (isinstance(value, bool) and action.type is not str2bool):
            raise AiryNetError(f"must be {text}")
        elif action.choices and value not in action.choices:
            raise AiryNetError(f"must be one of {', '.join(map(str, action.choices))}")
        trial = copy.copy(cfg)
        setattr(trial, key, value)
        validate(trial)
    except AiryNetError as e:
        raise AiryNetError(f"{path}: \"{key}\": {json.dumps(value)} is not valid ({e}); fix the file or "
                           f"pass --{key}") from None
