"""The original's preprocessing, on whole batches: raw counts (or [0, 1] without the log activation),
centre crop to the largest power of two not above the stored size, bilinear resize to the target size,
gray to RGB, random flips in training; a detector mask (--mask) first, on the frame as stored.

Shared by the input pipeline, the exported SavedModel and live sorting, so that every path feeds the
network the same values.
"""
import math

import numpy as np
import tensorflow as tf

from nn.config import crop_size
from nn.inputs.masks import MASKED_VALUE

MAX_SHIFT = 0.04            # Recipe.augment: centre shifts up to this share of the image side...
INTENSITY_DECADES = 1.0     # ...and intensities scaled by a factor spread log-uniformly over a decade


def random_flips(images, seed):
    """Flip each image left-right and up-down, each with probability 1/2, from a stateless seed.

    In effect tf.image.stateless_random_flip_left_right/_up_down, written for gray batches: on a CPU,
    tf.reverse along the width of [N, H, W, 1] is much slower than along the last axis of the same data
    seen as [N, H, W], and the up-down flip is a gather of whole rows instead of a reverse plus a select
    (docs/performance.md)."""
    flip_ud, flip_lr = tf.unstack(tf.random.stateless_uniform([2, tf.shape(images)[0]], seed) < 0.5)
    gray = images.shape[-1] == 1
    if gray:
        images = images[..., 0]
    per_image = [-1] + [1] * (images.shape.rank - 1)
    images = tf.where(tf.reshape(flip_lr, per_image), tf.reverse(images, [2]), images)
    height = tf.shape(images)[1]
    rows = tf.range(height)
    rows = tf.where(flip_ud[:, None], height - 1 - rows, rows)  # [N, H]: each image's rows, in order
    images = tf.gather(images, rows, axis=1, batch_dims=1)
    return images[..., None] if gray else images


def bilinear_period(n_in, n_out):
    """Weights [p, q] of one period of a bilinear shrink from n_in to n_out <= n_in pixels.

    With half-pixel centres (tf.image.resize's convention), output pixel j samples the input at
    (j + 0.5) * n_in / n_out - 0.5. The pattern repeats every q = n_out / g outputs and p = n_in / g
    inputs (g = gcd), and when shrinking, the two inputs of each output lie in its own period: the resize
    of a whole axis is one [p] x [p, q] product per period."""
    g = math.gcd(n_in, n_out)
    p, q = n_in // g, n_out // g
    position = (np.arange(q) + 0.5) * p / q - 0.5
    lower = np.floor(position).astype(int)
    frac = position - lower
    weights = np.zeros((p, q))
    weights[lower, np.arange(q)] = 1 - frac
    weights[np.minimum(lower + 1, p - 1), np.arange(q)] += frac  # frac is 0 where lower is the last input
    return weights.astype(np.float32)


def resize(images, height, width):
    """Bilinear resize (half-pixel centres, as tf.image.resize) of [N, H, W, D] to float32 [N, height,
    width, D].

    A gray image shrunk by less than 2x in both directions (the default 256 -> 224) uses every input
    pixel, and is resized by two small matrix products per period (bilinear_period): rows, then columns,
    where the period is at most 16 input pixels (longer ones make the products large and mostly zeros).
    That beats tf.image.resize's per-pixel kernel on a CPU. Larger shrinks (1024 -> 224) read a fraction
    of the pixels, and tf.image.resize, fed the stored integers directly, is the faster way there; so
    also for RGB and enlarging (docs/performance.md)."""
    n_in = images.shape[1:3]
    periods = [bilinear_period(a, b) for a, b in zip(n_in, (height, width)) if b <= a < 2 * b]
    if images.shape[-1] != 1 or len(periods) < 2 or max(w.shape[0] for w in periods) > 16:
        return tf.image.resize(images, (height, width), method="bilinear")
    rows, cols = periods
    x = tf.cast(images[..., 0], tf.float32)
    if rows.shape != (1, 1):  # [q, p] @ [N, H/p, p, W] -> [N, H/p, q, W]
        x = tf.matmul(rows.T, tf.reshape(x, [-1, n_in[0] // rows.shape[0], rows.shape[0], n_in[1]]))
    if cols.shape != (1, 1):  # [N * height * W/p, p] @ [p, q]
        x = tf.matmul(tf.reshape(x, [-1, cols.shape[0]]), cols)
    return tf.reshape(x, [-1, height, width, 1])


def preprocess(images, cfg, recipe, training=False, seed=None, mask=None):
    """Raw counts [N, ori_h, ori_w, ori_d] (any real dtype) -> network input [N, target_h, target_w,
    target_d] float32, resized and (in training) augmented as the run's nn.recipe.Recipe says.
    mask: bool [ori_h, ori_w], True where the detector records nothing useful (nn/inputs/masks.py)."""
    if mask is not None:  # the one place every mode's frames pass through, whole, before the crop
        images = tf.where(tf.constant(mask[None, :, :, None]), tf.constant(MASKED_VALUE, images.dtype), images)
    crop_h, crop_w = crop_size(cfg.ori_height), crop_size(cfg.ori_width)
    top, left = (cfg.ori_height - crop_h) // 2, (cfg.ori_width - crop_w) // 2  # as resize_with_crop_or_pad
    images = images[:, top:top + crop_h, left:left + crop_w]
    if area_downsampling(cfg, recipe):
        cropped = None if mask is None else mask[top:top + crop_h, left:left + crop_w]
        images = area_resize(images, cfg.target_height, cfg.target_width, cropped)
    else:
        images = resize(images, cfg.target_height, cfg.target_width)
    if not cfg.use_log_act:
        images = images / 65535.0  # the uint16 range, as the original's image-dtype conversion did
    if training:
        images = random_flips(images, seed)
        if recipe.augment:
            images = augment(images, tf.random.experimental.stateless_fold_in(seed, 1))
    if cfg.target_depth == 3 and cfg.ori_depth == 1:
        images = tf.image.grayscale_to_rgb(images)
    elif cfg.target_depth == 1 and cfg.ori_depth == 3:
        images = tf.image.rgb_to_grayscale(images)
    return images


# ----------------------------------------------------------------------------------------------
# The modern recipe's pieces

def area_downsampling(cfg, recipe):
    """Whether the resize averages whole areas: where the recipe says so, when the target is under half
    the crop. A bilinear shrink by more than 2x reads only some of the pixels (2 of 4 per axis at 4x) and
    aliases the fine fringes of a pattern; at 2x or less it already uses every pixel."""
    crop_h, crop_w = crop_size(cfg.ori_height), crop_size(cfg.ori_width)
    return recipe.area_downsampling and (crop_h > 2 * cfg.target_height or crop_w > 2 * cfg.target_width)


def area_resize(images, height, width, mask=None):
    """Area downsampling to [N, height, width, D] float32. With a mask (bool [H, W], True = bad, already
    MASKED_VALUE in `images`), each area is the mean of its good pixels alone, and an area with none reads
    MASKED_VALUE: a gap narrower than an area leaves no trace, and a partly masked area is not dimmed.
    Measured better than the plain mean of the zeroed pixels (docs/results.md, Detector masks)."""
    if mask is None:
        return tf.image.resize(images, (height, width), method="area")
    good = tf.image.resize((~mask)[None, :, :, None].astype(np.float32), (height, width), method="area")
    summed = tf.image.resize(images, (height, width), method="area")   # masked pixels add 0
    return tf.where(good > 0, summed / tf.maximum(good, 1e-6), tf.constant(MASKED_VALUE, tf.float32))


def augment(images, seed):
    """Each image rotated by a uniform angle about its centre, shifted by up to MAX_SHIFT of its side
    and scaled in intensity by 10^u, u uniform over INTENSITY_DECADES: symmetries of a diffraction
    pattern (the droplet's orientation, the beam's pointing, the pulse energy). One bilinear transform
    per image, at the target size, where it costs least; corners rotated in from outside are 0, as
    pixels outside a detector."""
    n, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
    u = tf.random.stateless_uniform([4, n], seed)
    angle = 2 * math.pi * u[0]
    shift_x, shift_y = (2 * u[1] - 1) * MAX_SHIFT * width, (2 * u[2] - 1) * MAX_SHIFT * height
    gain = 10.0 ** ((u[3] - 0.5) * INTENSITY_DECADES)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # Each output pixel (x, y) reads the input at R(angle) (x - c - shift) + c.
    transforms = tf.stack([cos, -sin, cx - cos * (cx + shift_x) + sin * (cy + shift_y),
                           sin, cos, cy - sin * (cx + shift_x) - cos * (cy + shift_y),
                           tf.zeros_like(cos), tf.zeros_like(cos)], axis=1)
    images = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=[height, width], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")
    return images * gain[:, None, None, None]
