#!/usr/bin/env python3
"""Time per training step of --recipe=paper and --recipe=modern, printed (never asserted).

    python scripts/benchmark_recipe.py --size=259 --target=64 --rounds=12 --steps=10 [--without=ema,augment]

Each arm runs nn/train.py's own training step (train.step_functions, with the model, optimizer and
averaged weights of train.build_learner and the class weights of train.class_weights) under TensorFlow's
default strategy, which training uses on a machine without GPUs. Its input is one batch of raw uint16
shots, preprocessed in training mode by nn.inputs.preprocess as the input pipeline does (the modern
recipe's area downsampling, rotations, shifts and intensity scaling included), with nothing prepared
ahead: the time per step holds the preprocessing, the forward and backward pass, the optimizer and, under
modern, the update of the averaged weights. `--without` adds arms of modern without one piece each. The
arms take turns round by round, so that a neighbour's load on the CPU hits them alike; the best round of
each and the median of the per-round ratios are reported.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from nn import config, recipe, train  # noqa: E402
from nn.inputs import simulate  # noqa: E402
from nn.inputs.preprocess import preprocess  # noqa: E402


def batches(cfg, run_recipe, shots, labels):
    """The same shots and labels at every step, preprocessed in training mode with a new seed each time,
    as the input pipeline's batches are. Each batch is prepared when the step asks for it (no prefetch),
    so that its preprocessing counts in the step's time."""
    seeds = tf.data.Dataset.counter().map(lambda i: tf.stack([tf.constant(0, tf.int64), i]))
    ds = tf.data.Dataset.zip(tf.data.Dataset.from_tensors((shots, labels)).repeat(), seeds)
    ds = ds.map(lambda batch, seed: (preprocess(batch[0], cfg, run_recipe, training=True, seed=seed), batch[1]))
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.inject_prefetch = False
    return ds.with_options(options)


def make_steps(cfg, shots, labels):
    """-> run(n): n training steps of nn/train.py in one graph call, as training makes them."""
    run_recipe = recipe.resolve(cfg)
    strategy = tf.distribute.get_strategy()
    learner = train.build_learner(cfg, run_recipe)
    steps = train.step_functions(cfg, strategy, learner, train.class_weights(cfg, run_recipe))
    iterator = iter(batches(cfg, run_recipe, shots, labels))
    return lambda n: steps.train(iterator, tf.constant(n))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=259)
    p.add_argument("--target", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=24)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=10, help="Steps per round.")
    p.add_argument("--without", default="", help="Comma-separated pieces: one more arm each, modern without it.")
    args = p.parse_args()
    images, labels = simulate.simulate(args.batch_size, 0, args.size)
    shots = tf.constant(images[..., None])
    labels = tf.constant(labels, tf.float32)
    arms = {"paper": ["--recipe=paper"], "modern": ["--recipe=modern"]}
    for piece in filter(None, args.without.split(",")):
        arms[f"modern without {piece}"] = ["--recipe=modern", f"--recipe_without={piece}"]
    runs = {}
    for name, flags in arms.items():
        # --dataset=synthetic: the class weights come from the simulator's class shares, as for these shots.
        cfg = config.parse_args([f"--ori_width={args.size}", f"--ori_height={args.size}", f"--target_width={args.target}",
                                 f"--target_height={args.target}", f"--batch_size={args.batch_size}",
                                 "--dataset=synthetic", "--use_nchw=false", *flags])
        runs[name] = make_steps(cfg, shots, labels)
        runs[name](1)["steps"].numpy()  # trace
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run(args.steps)["steps"].numpy()
            times[name].append((time.perf_counter() - start) / args.steps)
    print(f"{args.size} px -> {args.target} px, batch {args.batch_size}, {args.rounds} rounds of {args.steps} steps; "
          f"ms/step in the best round, then the median over rounds of the ratio to paper in the same round:")
    for name, t in times.items():
        ratios = np.array(t) / np.array(times["paper"])
        print(f"  {name:<28}{min(t) * 1000:8.0f} ms{np.median(ratios):8.3f}")


if __name__ == "__main__":
    main()
