#!/usr/bin/env python3
"""The evaluation protocol: each recipe ("arm") trained with several seeds and scored on a held-out
test set from a disjoint seed range and on a shifted test set (simulator settings moved), through
the command line, as a user would run it.

    python scripts/protocol.py --out=protocol --arm paper="" --arm no_log="--use_log_act=false" \\
        --seeds=0,1,2 --train_shots=3000 --test_shots=800 --size=259 --target=64 --steps=1200

For each seed S it writes, with scripts/make_dataset.py (version 2 of nn/inputs/simulate.py, TFRecords):
  data/train_sS    training shots 0..train_shots-1 of simulator seed S (and a few eval shots after
                   them, for the check at the end of training);
  data/heldout_sS  test_shots shots of seed 100000+S: the same distribution, never seen in training;
  data/shifted_sS  test_shots shots of seed 200000+S with the SHIFTED settings (other detector
                   distance, droplet sizes, photons, gain, noise, stray light).
With --per_setting also data/shift_GROUP_sS for each group of nn/inputs/simulate.py's SHIFT_GROUPS: the held-out
shots (same seeds) with only that group of settings moved to SHIFTED's values, so that each group's
cost shows on its own (a second table: macro-F1 per moved group and arm). With --masked also
data/fixed_heldout_sS, fixed_masks_sS, fixed_bad_pixels_sS: the held-out shots seen through one detector
per set (make_dataset.py --fixed_detector; as drawn, beam stop and gaps moved, bad pixels moved), each
scored without and with `--mask` of the set's own mask.npy (RUN/eval_fixed_masks_masked.json, ...).
Then for each arm it trains runs/train_sS_ARM_sS (`--random_seed=S` plus the arm's flags), runs
`--mode=eval` on the test sets (kept as RUN/eval_heldout.json, RUN/eval_shifted.json, ...) and
prints macro-F1 mean +- sd over the seeds and each class's mean F1. Finished steps are skipped on
a rerun, so an interrupted protocol continues where it stopped: a data set counts as finished once
make_dataset.py has moved it into place (it writes into NAME.partial until then). The settings that
shape data and runs (shots, sizes, steps, batch, each arm's flags) are kept in OUT/protocol.json, and a
rerun in the same --out with other settings is refused rather than mixing old runs with new ones; more
seeds and more arms may be added.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from nn.files import atomic_file  # noqa: E402
from nn.inputs.simulate import SHIFT_GROUPS  # noqa: E402

SETTINGS = ("train_shots", "test_shots", "size", "target", "steps", "batch")  # what a rerun must not change
SPLITS = {"heldout": (100000, []), "shifted": (200000, ["--shifted"])}   # seed offset, make_dataset flags
# --masked: the held-out shots seen through one detector per set, as at a beamline: as drawn by default,
# and with the beam stop and gaps or the bad pixels moved to the shifted values.
FIXED = {"fixed_heldout": [], "fixed_masks": ["--shift", "masks"], "fixed_bad_pixels": ["--shift", "bad_pixels"]}
MASKED = "_masked"   # suffix of an evaluation given the set's own mask.npy
FIXED_BASE = "fixed_heldout"   # the row the others' changes are measured from


def evaluation_sets(per_setting, masked=False):
    """The test sets' names (seed suffix left out): held-out, shifted, per setting shift_GROUP, and with
    --masked the fixed-detector sets."""
    return (list(SPLITS) + ([f"shift_{group}" for group in SHIFT_GROUPS] if per_setting else [])
            + (list(FIXED) if masked else []))


def evaluations(per_setting, masked=False):
    """The kept evaluations' names: each test set, and each fixed-detector set again with its mask."""
    return evaluation_sets(per_setting, masked) + ([name + MASKED for name in FIXED] if masked else [])


def simulated_as(split):
    """(seed offset, make_dataset flags) of a test set; shift_GROUP: the held-out shots, that group moved;
    fixed_*: the held-out shots through one detector."""
    if split in SPLITS:
        return SPLITS[split]
    if split in FIXED:
        return SPLITS["heldout"][0], ["--fixed_detector", *FIXED[split]]
    return SPLITS["heldout"][0], ["--shift", split.removeprefix("shift_")]


def parse_arm(text):
    """NAME="--flag=v --flag2=v" -> (NAME, [flags])."""
    name, sep, flags = text.partition("=")
    if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(f"--arm {text!r}: expected NAME=\"--flag=value ...\"")
    return name, shlex.split(flags)


def run(cmd, log_path):
    """Runs one command, its output appended to log_path; a failure stops the protocol, naming the log."""
    with open(log_path, "a") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT) != 0:
            sys.exit(f"protocol: error: {shlex.join(cmd[:3])} ... failed; see {log_path}")


def make_data(args, seed, log_path):
    """The training set and the test sets of one seed (skipping those already written)."""
    data = os.path.join(args.out, "data")
    jobs = {f"train_s{seed}": ["--random_seed", str(seed), "--dataset_size", str(args.train_shots),
                               "--modes", "train,eval", "--eval_size", str(2 * args.batch)]}
    for split in evaluation_sets(args.per_setting, args.masked):
        offset, flags = simulated_as(split)
        jobs[f"{split}_s{seed}"] = ["--random_seed", str(offset + seed), "--modes", "eval",
                                    "--eval_size", str(args.test_shots), *flags]
    for name, flags in jobs.items():
        out = os.path.join(data, name)
        if os.path.isdir(out):
            continue
        run([sys.executable, "scripts/make_dataset.py", "--out", out, "--size", str(args.size),
             "--format", "tfrecord"] + flags, log_path)


def train_and_eval(args, arm, flags, seed, log_path):
    """Trains one arm with one seed and evaluates it on both test sets (skipping finished steps)."""
    size = [f"--ori_width={args.size}", f"--ori_height={args.size}",
            f"--target_width={args.target}", f"--target_height={args.target}"]
    data_dir = os.path.join(args.out, "data") + os.sep
    runs = os.path.join(args.out, "runs")
    run_dir = os.path.join(runs, f"train_s{seed}_{arm}_s{seed}")
    if not os.path.exists(os.path.join(run_dir, f"model.ckpt-{args.steps}.index")):
        # A run stopped part-way (SIGTERM saves a checkpoint) is resumed, not started again.
        where = ([f"--load_dir={run_dir}"] if os.path.isdir(run_dir)
                 else [f"--log_dir={runs}", f"--out_dir_name={arm}_s{seed}"])
        run([sys.executable, "airynet.py", "--mode=train", f"--data_dir={data_dir}", f"--dataset=train_s{seed}",
             *where, f"--random_seed={seed}",
             f"--dataset_size={args.train_shots}", f"--train_steps={args.steps}", f"--steps_per_eval={args.steps}",
             "--eval_steps=2", f"--batch_size={args.batch}", f"--num_worker={args.num_worker}"]
            + size + flags, log_path)
    for name in evaluations(args.per_setting, args.masked):
        kept = os.path.join(run_dir, f"eval_{name}.json")
        if os.path.exists(kept):
            continue
        split = name.removesuffix(MASKED)
        mask = [f"--mask={data_dir}{split}_s{seed}/mask.npy"] if name.endswith(MASKED) else []
        run([sys.executable, "airynet.py", "--mode=eval", f"--load_dir={run_dir}", f"--data_dir={data_dir}",
             f"--dataset={split}_s{seed}", f"--batch_size={args.batch}", *mask], log_path)
        os.replace(os.path.join(run_dir, "eval", "metrics.json"), kept)
    return run_dir


def collect(runs_dir, arms, seeds, splits=tuple(SPLITS)):
    """{arm: {split: [metrics dict per seed]}} from the kept eval files; missing ones are left out."""
    found = {}
    for arm in arms:
        for split in splits:
            for seed in seeds:
                path = os.path.join(runs_dir, f"train_s{seed}_{arm}_s{seed}", f"eval_{split}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        found.setdefault(arm, {}).setdefault(split, []).append(json.load(f))
    return found


def summarise(metrics):
    """Macro-F1 mean and sd (0 for one seed) and each class's mean F1 over a list of metrics dicts (NaN
    where a class was never present nor predicted in any seed: its F1 is undefined, as in metrics.json)."""
    macro = np.array([m["macro_f1"] for m in metrics])
    names = [c["name"] for c in metrics[0]["per_class"]]
    per_class = {}
    for i, name in enumerate(names):
        defined = [m["per_class"][i]["f1"] for m in metrics if m["per_class"][i]["f1"] is not None]
        per_class[name] = float(np.mean(defined)) if defined else float("nan")
    return {"macro_f1": float(macro.mean()), "sd": float(macro.std(ddof=1)) if len(macro) > 1 else 0.0,
            "seeds": len(macro), "per_class": per_class}


def _cell(f1):
    return "n/a" if np.isnan(f1) else f"{f1:.3f}"


def format_table(found):
    """A Markdown table: one column per arm and test set, macro-F1 mean +- sd, then per-class F1."""
    columns = [(arm, split, summarise(found[arm][split])) for arm in found for split in SPLITS if split in found[arm]]
    if not columns:
        return "no finished evaluations"
    names = list(columns[0][2]["per_class"])
    lines = ["| class | " + " | ".join(f"{arm} ({split}, {s['seeds']} seeds)" for arm, split, s in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_cell(s['per_class'][name]) for _, _, s in columns) + " |")
    lines.append("| **macro-F1** | " + " | ".join(f"**{s['macro_f1']:.3f} ± {s['sd']:.3f}**" for _, _, s in columns)
                 + " |")
    return "\n".join(lines)


def format_setting_table(found):
    """A Markdown table of macro-F1 mean +- sd: one row per test set (held-out, each moved group of settings,
    shifted), one column per arm."""
    arms = list(found)
    order = [s for s in evaluation_sets(True) if s != "shifted"] + ["shifted"]
    lines = ["| test set | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for split in (s for s in order if any(s in found[arm] for arm in arms)):
        cells = []
        for arm in arms:
            s = summarise(found[arm][split]) if split in found[arm] else None
            cells.append(f"{s['macro_f1']:.3f} ± {s['sd']:.3f} ({s['seeds']})" if s else "")
        name = {"heldout": "held-out (nothing moved)", "shifted": "shifted (everything moved)"}.get(
            split, split.removeprefix("shift_") + " moved")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_mask_table(found):
    """A Markdown table of macro-F1 mean +- sd on the fixed-detector sets: one row per set, for each arm a
    column without and one with the set's mask, each with its change from the held-out row."""
    arms = list(found)
    header = [f"{arm}, {kind}" for arm in arms for kind in ("no mask", "mask")]
    lines = ["| one detector per set | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for split in FIXED:
        cells = []
        for arm in arms:
            for name in (split, split + MASKED):
                if name not in found[arm]:
                    cells.append("")
                    continue
                s = summarise(found[arm][name])
                base = found[arm].get(FIXED_BASE + name.removeprefix(split))
                change = f", {s['macro_f1'] - summarise(base)['macro_f1']:+.3f}" if base and split != FIXED_BASE else ""
                cells.append(f"{s['macro_f1']:.3f} ± {s['sd']:.3f} ({s['seeds']}{change})")
        lines.append(f"| {split.removeprefix('fixed_')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_settings(args, arms):
    """Record the settings that shape this --out's data and runs in OUT/protocol.json, or refuse a rerun
    whose settings differ from those recorded (arms not recorded yet are added)."""
    path = os.path.join(args.out, "protocol.json")
    wanted = {name: getattr(args, name) for name in SETTINGS}
    recorded = {}
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
    for name, value in wanted.items():
        if name in recorded and recorded[name] != value:
            sys.exit(f"protocol: error: {path} records --{name}={recorded[name]}; this run asks for "
                     f"--{name}={value}: use another --out")
    recorded_arms = recorded.get("arms", {})
    for arm, flags in arms.items():
        if arm in recorded_arms and recorded_arms[arm] != flags:
            sys.exit(f"protocol: error: {path} records arm {arm} as {shlex.join(recorded_arms[arm])!r}; this run "
                     f"asks for {shlex.join(flags)!r}: name the arm differently or use another --out")
    with atomic_file(path) as f:
        json.dump({**wanted, "arms": {**recorded_arms, **arms}}, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Folder for data, runs, logs (reused: finished steps are skipped).")
    p.add_argument("--arm", action="append", type=parse_arm, default=None,
                   help='NAME="--flag=value ..." (repeat); default: one arm, paper="".')
    p.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds (simulator and training).")
    p.add_argument("--train_shots", type=int, default=3000)
    p.add_argument("--test_shots", type=int, default=800)
    p.add_argument("--size", type=int, default=259, help="Stored shot size.")
    p.add_argument("--target", type=int, default=64, help="Network input size.")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--num_worker", type=int, default=2)
    p.add_argument("--per_setting", action="store_true",
                   help="Also test on the held-out shots with one group of settings moved at a time "
                        "(11 more test sets).")
    p.add_argument("--masked", action="store_true",
                   help="Also test on held-out shots with one detector per set (as drawn; beam stop and gaps "
                        "moved; bad pixels moved), each without and with the set's mask (3 more test sets).")
    p.add_argument("--table_only", action="store_true", help="Only print the table of what is finished.")
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)   # the commands run from the repository root
    arms = dict(args.arm or [("paper", [])])
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "protocol.log")
    if not args.table_only:
        check_settings(args, arms)
        for seed in seeds:
            make_data(args, seed, log_path)
            for arm, flags in arms.items():
                print(f"seed {seed}, arm {arm}: {train_and_eval(args, arm, flags, seed, log_path)}", flush=True)
    found = collect(os.path.join(args.out, "runs"), list(arms), seeds, evaluations(args.per_setting, args.masked))
    table = format_table(found)
    if args.per_setting:
        table += "\n\nmacro-F1 (seeds) with one group of settings moved:\n\n" + format_setting_table(found)
    if args.masked:
        table += "\n\nmacro-F1 (seeds, change from held-out) with one detector per set:\n\n" + format_mask_table(found)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
