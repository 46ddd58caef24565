#!/usr/bin/env python3
"""The active-learning measurement (docs/labelling.md): a simulator-trained model meets shots with the
SHIFTED settings, whose simulator labels play the labeller.

    python scripts/active_learning.py run --out=/work/runs/al --pretrained=PROTOCOL/runs/train_s{seed}_modern_s{seed} \\
        --seed=0 [--strategies=uncertain,random --budgets=50,100,200 --steps=100]
    python scripts/active_learning.py table --out=/work/runs/al --seeds=0,1,2 --plot=docs/active_learning.png

`run`, for one seed S, writes with scripts/make_dataset.py (TFRecords, version 2, SHIFTED):
  OUT/data/pool_sS   --pool shots of simulator seed 300000+S: the unlabelled pool;
  OUT/data/test_sS   --test shots of seed 400000+S: the held-out shifted test set.
Then for each strategy it labels in rounds: the shots of the next budget are picked by nn/labelling/
selection.py from the pool with the network of the previous round (the pretrained one first), written
with the label file writer of --mode=label (nn/labelling/labelfile.py), and a run is fine-tuned on all
labels so far with `--mode=train --init_from=PRETRAINED` (--steps steps); it is scored with `--mode=eval`
on the test set. Also: the pretrained run with no labels, and a run trained from scratch (same recipe and
steps) on the 200 labels that `uncertain` chose. Results: OUT/s{S}/results.json (a finished cell is
skipped on a rerun). `table` prints the markdown table of macro-F1 (mean +- sd over the seeds) and plots it.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import airynet  # noqa: E402
from nn.files import atomic_file  # noqa: E402

POOL_OFFSET, TEST_OFFSET = 300000, 400000
SCORE = "macro_f1"


def make_data(out, seed, pool, test, size):
    for name, offset, flags in (("pool", POOL_OFFSET, ["--modes", "train", "--dataset_size", str(pool)]),
                                ("test", TEST_OFFSET, ["--modes", "eval", "--eval_size", str(test)])):
        target = os.path.join(out, "data", f"{name}_s{seed}")
        if not os.path.isdir(target):
            subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_dataset.py"), "--out", target,
                            "--size", str(size), "--format", "tfrecord", "--random_seed", str(offset + seed),
                            "--shifted", *flags], check=True)


def read_pool(path, size):
    """-> (uint16 images [N, size, size, 1], int16 labels [N, 11]) of the pool's TFRecord file(s)."""
    import tensorflow as tf
    from nn.inputs.tfrecord import LABEL_KEY
    images, labels = [], []
    for name in sorted(os.listdir(path)):
        for record in tf.data.TFRecordDataset(os.path.join(path, name)):
            feature = tf.train.Example.FromString(record.numpy()).features.feature
            images.append(np.frombuffer(feature["image/encoded"].bytes_list.value[0], np.uint16).reshape(size, size, 1))
            labels.append(np.frombuffer(feature[LABEL_KEY].bytes_list.value[0], np.int16))
    return np.stack(images), np.stack(labels)


def network_view(run_dir, images, common):
    """-> (probabilities, thresholds, features) of the run's network on the pool, as --mode=label sees them."""
    from nn import checkpoints, config, recipe
    from nn.labelling.session import scores
    cfg = config.parse_args(["--mode=predict", f"--load_dir={run_dir}", *common])
    config.merge_run_config(cfg, run_dir)
    resolved = recipe.resolve(cfg)
    model, _ = checkpoints.restore_model(cfg, resolved)
    probabilities, features, _ = scores(cfg, resolved, model, images)
    thresholds = checkpoints.decision_thresholds(cfg)
    return probabilities, np.full(11, 0.5) if thresholds is None else thresholds, features


def write_labels(folder, chosen, images, labels, test_dir):
    """A dataset folder (named `labels`): the chosen pool shots as labels_train.tfrecord (by the --mode=label writer) and the
    test set as labels_eval.tfrecord (the check at the end of training)."""
    from nn.labelling.labelfile import open_label_file
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    out = open_label_file(os.path.join(folder, "labels_train.tfrecord"), labels.shape[1])
    for i in chosen:
        out.append({"id": f"pool:{i}", "image": images[i], "bunch_id": int(i), "source": "pool"}, labels[i])
    test_file = sorted(os.listdir(test_dir))[0]
    os.symlink(os.path.join(test_dir, test_file), os.path.join(folder, "labels_eval.tfrecord"))


def train_and_score(args, name, folder, init_from):
    """Train runs/NAME on the labels in `folder` (from `init_from`, else from scratch), score it on the test set."""
    runs = os.path.join(args.out, f"s{args.seed}", "runs")
    run_dir = os.path.join(runs, f"labels_{name}")  # log_dir/{dataset}_{out_dir_name}
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = ["--mode=train", f"--data_dir={os.path.dirname(folder)}/", f"--dataset={os.path.basename(folder)}",
             f"--log_dir={runs}", f"--out_dir_name={name}", f"--random_seed={args.seed}", f"--train_steps={args.steps}",
             f"--steps_per_eval={args.steps}", "--eval_steps=1", f"--lr={args.lr}", "--num_worker=2",
             f"--ori_width={args.size}", f"--ori_height={args.size}", "--log_step=50"]
    flags += [f"--init_from={init_from}"] if init_from else ["--recipe=modern", f"--target_width={args.target}",
                                                              f"--target_height={args.target}"]
    assert airynet.main(flags) == 0, name
    return score(args, run_dir)


def score(args, run_dir):
    assert airynet.main(["--mode=eval", f"--load_dir={run_dir}", f"--data_dir={args.out}/data/",
                         f"--dataset=test_s{args.seed}", "--batch_size=24", "--num_worker=2"]) == 0
    with open(os.path.join(run_dir, "eval", "metrics.json")) as f:
        return json.load(f)[SCORE]


def own_copy(run_dir, copy):
    """The pretrained run's config, thresholds and latest checkpoint copied to `copy`, so that nothing
    (the eval files of --mode=eval) is ever written into the run being measured."""
    if not os.path.exists(os.path.join(copy, "checkpoint")):
        from nn import checkpoints
        latest = checkpoints.latest_checkpoint(run_dir)
        os.makedirs(copy + ".partial", exist_ok=True)
        for name in os.listdir(run_dir):
            if name in ("config.json", "thresholds.json", "checkpoint") or name.startswith(os.path.basename(latest) + "."):
                shutil.copy(os.path.join(run_dir, name), os.path.join(copy + ".partial", name))
        os.replace(copy + ".partial", copy)
    return copy


def run(args):
    from nn.labelling import selection
    make_data(args.out, args.seed, args.pool, args.test, args.size)
    seed_dir = os.path.join(args.out, f"s{args.seed}")
    os.makedirs(seed_dir, exist_ok=True)
    results_path = os.path.join(seed_dir, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}

    def keep(key, value):
        results[key] = value
        with atomic_file(results_path) as f:
            json.dump(results, f, indent=1)
        print(f"seed {args.seed}: {key} = {value}", flush=True)

    pretrained = own_copy(args.pretrained.format(seed=args.seed), os.path.join(seed_dir, "runs", "pretrained"))
    if "none_0" not in results:
        keep("none_0", score(args, pretrained))
    images, labels = read_pool(os.path.join(args.out, "data", f"pool_s{args.seed}"), args.size)
    common = [f"--ori_width={args.size}", f"--ori_height={args.size}", "--batch_size=24", "--num_worker=2"]
    for strategy in args.strategies.split(","):
        chosen, model_dir = [], pretrained
        for budget in map(int, args.budgets.split(",")):
            key = f"{strategy}_{budget}"
            chosen_path = os.path.join(seed_dir, f"{key}.json")
            if key in results and os.path.exists(chosen_path):
                chosen = json.load(open(chosen_path))
                model_dir = os.path.join(seed_dir, "runs", f"labels_{key}")
                continue
            probabilities, thresholds, features = network_view(model_dir, images, common)
            ranked = selection.order(strategy, probabilities, thresholds, features, args.seed)
            chosen = chosen + [int(i) for i in ranked if i not in set(chosen)][:budget - len(chosen)]
            folder = os.path.join(seed_dir, "labels", key, "labels")
            write_labels(folder, chosen, images, labels, os.path.join(args.out, "data", f"test_s{args.seed}"))
            with atomic_file(chosen_path) as f:
                json.dump(chosen, f)
            keep(key, train_and_score(args, key, folder, pretrained))
            model_dir = os.path.join(seed_dir, "runs", f"labels_{key}")
    last = max(map(int, args.budgets.split(",")))
    if args.scratch and f"scratch_{last}" not in results:
        keep(f"scratch_{last}", train_and_score(args, f"scratch_{last}",
                                                 os.path.join(seed_dir, "labels", f"uncertain_{last}", "labels"), None))


def table(args):
    found = {}
    for seed in args.seeds.split(","):
        path = os.path.join(args.out, f"s{seed}", "results.json")
        if os.path.exists(path):
            for key, value in json.load(open(path)).items():
                found.setdefault(key, {})[seed] = value
    print("| labels | arm | macro-F1 (mean ± sd) | seeds | per seed |\n|---|---|---|---|---|")
    order = sorted(found, key=lambda k: (int(k.rsplit("_", 1)[1]), k))
    for key in order:
        values = np.array(list(found[key].values()))
        arm, budget = key.rsplit("_", 1)
        sd = values.std(ddof=1) if len(values) > 1 else 0.0
        per_seed = ", ".join(f"s{s} {v:.3f}" for s, v in found[key].items())
        print(f"| {budget} | {arm} | {values.mean():.3f} ± {sd:.3f} | {len(values)} | {per_seed} |")
    if args.plot:
        plot(found, args.plot)


def plot(found, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    none = found.get("none_0", {})
    for arm, marker in (("uncertain", "o"), ("random", "s"), ("diverse", "^"), ("scratch", "x")):
        points = sorted((int(k.rsplit("_", 1)[1]), np.array(list(v.values()))) for k, v in found.items()
                        if k.rsplit("_", 1)[0] == arm)
        if not points:
            continue
        if arm != "scratch" and none:  # every strategy starts from the pretrained run with no labels
            points = [(0, np.array(list(none.values())))] + points
        x = [p[0] for p in points]
        ax.errorbar(x, [p[1].mean() for p in points], yerr=[p[1].std(ddof=1) if len(p[1]) > 1 else 0 for p in points],
                    marker=marker, capsize=3, label="from scratch, uncertain's labels" if arm == "scratch" else arm,
                    linestyle="none" if arm == "scratch" else "-")
    ax.set_xlabel("labelled shifted shots")
    ax.set_ylabel("macro-F1 on held-out shifted shots")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="One seed: data, rounds of labels, fine-tunes, scores.")
    r.add_argument("--out", required=True)
    r.add_argument("--pretrained", required=True, help="The simulator-trained run; {seed} is replaced.")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--strategies", default="uncertain,random")
    r.add_argument("--budgets", default="50,100,200")
    r.add_argument("--steps", type=int, default=60, help="Training steps of each fine-tune (and of scratch).")
    r.add_argument("--lr", type=float, default=0.05)
    r.add_argument("--pool", type=int, default=1000)
    r.add_argument("--test", type=int, default=800)
    r.add_argument("--size", type=int, default=259)
    r.add_argument("--target", type=int, default=64)
    r.add_argument("--scratch", type=int, default=1, help="1: also train from scratch on uncertain's last labels.")
    t = sub.add_parser("table", help="The table over the seeds, and the plot.")
    t.add_argument("--out", required=True)
    t.add_argument("--seeds", default="0,1,2")
    t.add_argument("--plot", default="")
    args = p.parse_args(argv)
    run(args) if args.what == "run" else table(args)


if __name__ == "__main__":
    main()
