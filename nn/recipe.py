"""The training recipe of a run, resolved once (`resolve`) into a frozen `Recipe` that is handed to
whatever depends on it: `PAPER`, the original's training, or `MODERN`, what short runs on small data use
today, less the pieces --recipe_without leaves out (for ablations). Under `MODERN`:

  * linear warm-up over the first WARMUP_FRACTION of the steps, then cosine decay to 0: a run ends on
    weights that settled at a small learning rate instead of wherever a constant rate left them;
  * decoupled weight decay in the Nesterov SGD (not on biases and batch-norm parameters; nn/train.py);
  * an exponential moving average of the weights (`WeightAverage`), used for the evaluations during
    training, the calibration, and every restored model (predict, eval, save, live sorting);
  * batch-norm moving averages with momentum BN_MOMENTUM, which forget the first steps' statistics
    within a run of a thousand steps;
  * positive-class weights in the sigmoid cross-entropy for rare classes (`positive_weights`);
  * in nn/inputs/preprocess.py, area downsampling and stronger augmentation;
  * a share of the training shots held out to choose the decision thresholds (nn/calibrate.py).

The paper's recipe never calls this module's training pieces, so it stays what it was.
"""
import contextlib
import dataclasses

import keras
import numpy as np
import tensorflow as tf

from nn.models import layers

WARMUP_FRACTION = 0.05
# Keras' decoupled decay shrinks weights by lr * WEIGHT_DECAY per step; with momentum 0.9 this matches
# the usual coupled L2 of 5e-4 (which momentum amplifies tenfold).
WEIGHT_DECAY = 5e-3
BN_MOMENTUM = 0.9
CALIBRATION_SHARE = 0.1
EMA_EVERY = 4           # the average is updated every 4th step (steps 1, 5, 9, ...): a pass over every
                        # weight at every step is a noticeable share of a step on a CPU (docs/performance.md)
EMA_MOMENTUM = 0.96     # per update: an average over about the last 100 steps...
EMA_WARMUP = 10         # ...after a warm-up of a few updates, in which it follows the weights closely
MAX_POSITIVE_WEIGHT = 10.0


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every choice that --recipe, --recipe_without and --calibration_fraction make; the defaults are the
    paper's.

    cosine_schedule: warm-up and cosine decay (`warmup_cosine`) instead of the original's steps;
    weight_decay: decoupled weight decay of the kernels per unit of learning rate (0: none);
    average_weights: infer with an exponential moving average of the weights (`WeightAverage`);
    bn_momentum: momentum of the batch-norm moving averages;
    area_downsampling: shrinks by more than 2x average whole areas instead of sampling bilinearly;
    augment: training images are rotated, shifted and scaled in intensity after the flips;
    positive_class_weights: the positives of rare classes weigh more in the loss (`positive_weights`);
    calibration_share: share of the training shots held out to choose the decision thresholds.
    """
    cosine_schedule: bool = False
    weight_decay: float = 0.0
    average_weights: bool = False
    bn_momentum: float = layers.BN_MOMENTUM
    area_downsampling: bool = False
    augment: bool = False
    positive_class_weights: bool = False
    calibration_share: float = 0.0


PAPER = Recipe()
MODERN = Recipe(cosine_schedule=True, weight_decay=WEIGHT_DECAY, average_weights=True, bn_momentum=BN_MOMENTUM,
                area_downsampling=True, augment=True, positive_class_weights=True,
                calibration_share=CALIBRATION_SHARE)

# The field that each piece of --recipe_without (config.MODERN_PIECES) turns back to the paper's value.
PIECES = {"schedule": "cosine_schedule", "weight_decay": "weight_decay", "ema": "average_weights",
          "bn_momentum": "bn_momentum", "area": "area_downsampling", "pos_weight": "positive_class_weights",
          "augment": "augment"}


def resolve(cfg):
    """The run's Recipe: the one place that reads --recipe, --recipe_without and --calibration_fraction,
    once they are validated and, with --load_dir, merged with the run's saved config. The calibration
    share is the flag's where given, else the recipe's."""
    recipe = PAPER
    if cfg.recipe == "modern":
        left_out = filter(None, cfg.recipe_without.split(","))
        recipe = dataclasses.replace(MODERN, **{PIECES[p]: getattr(PAPER, PIECES[p]) for p in left_out})
    if cfg.calibration_fraction is not None:
        recipe = dataclasses.replace(recipe, calibration_share=cfg.calibration_fraction)
    return recipe


def warmup_cosine(base, train_steps):
    """Linear warm-up from 0 to `base`, then cosine decay to 0 at `train_steps`."""
    warmup = max(1, int(round(WARMUP_FRACTION * train_steps)))
    return keras.optimizers.schedules.CosineDecay(0.0, max(1, train_steps - warmup), warmup_target=base,
                                                  warmup_steps=warmup)


def positive_weights(frequencies):
    """pos_weight of each class in the sigmoid cross-entropy from its share of positive training shots:
    sqrt(negatives / positives), between 1 and MAX_POSITIVE_WEIGHT. The square root lifts a class seen in
    3% of the shots about 5.7x instead of 32x, which would make it over-called (its threshold, chosen
    afterwards on the calibration split, fixes the decision; the weight is there for what it learns)."""
    share = np.clip(np.asarray(frequencies, np.float64), 1e-6, 1.0)
    return np.clip(np.sqrt((1 - share) / share), 1.0, MAX_POSITIVE_WEIGHT).astype(np.float32)


class WeightAverage(tf.Module):
    """An exponential moving average of a model's trainable weights, saved in the checkpoint as `ema`,
    updated after every EMA_EVERY-th optimizer step, starting with the first.

    momentum min(EMA_MOMENTUM, n / (n + EMA_WARMUP)) at the n-th update, so the first update copies the
    weights and the average never holds the random initialisation for long in a short run. Under
    tf.distribute it is updated outside the replicas (in cross-replica context), from the weights that
    every replica holds alike after a step."""

    def __init__(self, model):
        super().__init__(name="ema")
        self.averages = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in model.trainable_variables]
        self.updates = tf.Variable(0.0, trainable=False)

    def update(self, variables, step):
        """After optimizer step `step` (1 after the first): update every EMA_EVERY-th step."""
        tf.cond(tf.equal((step - 1) % EMA_EVERY, 0), lambda: self._update(variables), self.updates.read_value)

    def _update(self, variables):
        n = self.updates.read_value()
        momentum = tf.minimum(EMA_MOMENTUM, n / (n + EMA_WARMUP))
        for average, v in zip(self.averages, variables):
            average.assign_sub((1 - momentum) * (average - tf.cast(v, average.dtype)))
        return self.updates.assign_add(1.0)

    def copy_to(self, model):
        """Give the model the averaged weights (for inference)."""
        for v, a in zip(model.trainable_variables, self.averages):
            v.assign(a)


def weight_average(recipe, model):
    """The model's WeightAverage where the recipe averages the weights, else None."""
    return WeightAverage(model) if recipe.average_weights else None


@contextlib.contextmanager
def averaged_weights(model, average):
    """The model with the averaged weights inside the block, its own weights back after it (a no-op
    without an average)."""
    if average is None:
        yield model
        return
    variables = model.trainable_variables
    saved = [tf.identity(v) for v in variables]
    for v, a in zip(variables, average.averages):
        v.assign(a)
    try:
        yield model
    finally:
        for v, s in zip(variables, saved):
            v.assign(s)
