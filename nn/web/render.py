"""Pictures of shots for the browser: an image on a log scale as a PNG, optionally with a Grad-CAM map
of one class laid over it in colour (pillow and numpy; no matplotlib, which costs ~10x the time)."""
import io

import numpy as np
from PIL import Image

# Anchor colours of the overlay's map (0 -> transparent dark violet, 1 -> yellow), after matplotlib's
# "inferno"; values in between are interpolated linearly.
ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)
OVERLAY_ALPHA = 0.6  # the map's opacity where it is 1; it fades with the map's value


def log_scaled(image):
    """An image [H, W] or [H, W, 1] of any dtype as uint8 on a log scale: log1p of the photon counts
    (negative values, e.g. after background subtraction, count as 0), stretched so that the largest
    value becomes 255. uint8 images are taken as already scaled (what live mode publishes)."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., 0]
    if image.dtype == np.uint8:
        return image
    logged = np.log1p(np.clip(np.nan_to_num(image.astype(np.float32)), 0, None))
    top = float(logged.max()) if logged.size else 0.0
    if top <= 0:
        return np.zeros(image.shape, np.uint8)
    return np.round(logged * (255 / top)).astype(np.uint8)


def colour(values):
    """RGB uint8 [..., 3] of `values` in [0, 1] along ANCHORS."""
    position = np.clip(values, 0, 1) * (len(ANCHORS) - 1)
    low = np.minimum(position.astype(int), len(ANCHORS) - 2)
    frac = (position - low)[..., None]
    return np.round(ANCHORS[low] * (1 - frac) + ANCHORS[low + 1] * frac).astype(np.uint8)


def overlaid(gray, heat):
    """RGB uint8 [H, W, 3]: the uint8 image `gray` with the map `heat` [h, w] (any scale; normalised to
    its maximum) resized to it and blended in by its value."""
    height, width = gray.shape
    heat = np.nan_to_num(np.asarray(heat, np.float32))
    top = float(heat.max()) if heat.size else 0.0
    heat = heat / top if top > 0 else np.zeros_like(heat)
    resized = np.asarray(Image.fromarray(heat, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    alpha = (OVERLAY_ALPHA * np.clip(resized, 0, 1))[..., None]
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    return np.round(rgb * (1 - alpha) + colour(resized).astype(np.float32) * alpha).astype(np.uint8)


def png(image, heat=None):
    """PNG bytes of `image` on a log scale (gray), or in colour with the map `heat` laid over it."""
    gray = log_scaled(image)
    picture = Image.fromarray(gray if heat is None else overlaid(gray, heat))
    out = io.BytesIO()
    picture.save(out, "PNG", compress_level=1)  # level 1: a fraction of the time, barely larger for these
    return out.getvalue()
