#!/usr/bin/env python3
"""Time per training step of --recipe=paper and --recipe=modern, printed (never asserted).

    python scripts/benchmark_recipe.py --size=259 --target=64 --rounds=12 --steps=10 [--without=ema,augment]

Each recipe's step is what nn/train.py runs: preprocessing of raw uint16 shots in training mode (the
modern recipe's area downsampling, rotations, shifts and intensity scaling included), forward and
backward pass, the optimizer and, under modern, the update of the averaged weights. `--without` adds
arms of modern without one piece each. The arms take turns round by round, so that a neighbour's load on the CPU hits them alike; the best round of each and the
median of the per-round ratios are reported.
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
from nn.inputs import simulate
from nn.models import networks
from nn.inputs.preprocess import preprocess  # noqa: E402


def make_step(cfg, shots, labels):
    run_recipe = recipe.resolve(cfg)
    model = networks.build_model(cfg, run_recipe.bn_momentum)
    optimizer = train.make_optimizer(cfg, run_recipe, model)
    average = recipe.weight_average(run_recipe, model)
    pos_weight = recipe.positive_weights(simulate.CLASS_SHARES) if run_recipe.positive_class_weights else None

    @tf.function
    def step(i):
        images = preprocess(shots, cfg, run_recipe, training=True, seed=tf.stack([tf.constant(0, tf.int64), i]))
        with tf.GradientTape() as tape:
            terms = train.loss_terms(cfg, model, labels, model(images, training=True), cfg.batch_size, pos_weight)
        grads = tape.gradient(terms["loss"], model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        if average is not None:
            average.update(model.trainable_variables, optimizer.iterations)
        return terms["loss"]

    return step


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
    steps = {}
    for name, flags in arms.items():
        cfg = config.parse_args([f"--ori_width={args.size}", f"--ori_height={args.size}", f"--target_width={args.target}",
                                 f"--target_height={args.target}", f"--batch_size={args.batch_size}",
                                 "--use_nchw=false", *flags])
        steps[name] = make_step(cfg, shots, labels)
        steps[name](tf.constant(0, tf.int64)).numpy()  # trace
    times = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for i in range(args.steps):
                loss = step(tf.constant(r * args.steps + i + 1, tf.int64))
            loss.numpy()
            times[name].append((time.perf_counter() - start) / args.steps)
    print(f"{args.size} px -> {args.target} px, batch {args.batch_size}, {args.rounds} rounds of {args.steps} steps; "
          f"ms/step in the best round, then the median over rounds of the ratio to paper in the same round:")
    for name, t in times.items():
        ratios = np.array(t) / np.array(times["paper"])
        print(f"  {name:<28}{min(t) * 1000:8.0f} ms{np.median(ratios):8.3f}")

if __name__ == "__main__":
    main()
