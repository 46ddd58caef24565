"""Physics simulator of single-shot helium-nanodroplet diffraction, with ground-truth labels.

Numpy only. `simulate(n, seed, size)` returns detector images in ADU (uint16) and the 11 label
flags of the public data set. Shot i of set `seed` is drawn from np.random.default_rng([seed, i])
alone, so it does not depend on n or on where a chunk starts, and its labels are the same in
every version.

Versions (`version=`, default VERSION):
- 1: the first release's shots, bit for bit (nn/inputs/simulate_v1.py, frozen): a fixed detector
  distance, droplet radii 15-48/k, 1-15 photons per pixel at the crop edge, photon counts with no
  detector model, a fixed beam stop and cross of module gaps.
- 2: the same droplets and classes (amplitudes, label hierarchy and shares of nn/inputs/simulate_v1.py,
  whose docstring explains each class's physics), seen through a detector and beam that change
  from shot to shot, so that a classifier cannot learn one instrument's quirks:

  | what varies per shot (Settings) | DEFAULT | SHIFTED |
  |---|---|---|
  | droplet equal-volume radius, 1/k (log; layered: from 28) | 14-80 | 20-95 |
  | scattering angle at the crop's half width (detector distance), deg | 25-35 | 35-42 |
  | beam centre off the crop centre, net px in x and y | +-3 | +-5 |
  | droplet envelope at the crop edge, photons/pixel (log) | 0.05-60 | 0.03-5 |
  | stray light beside the beam stop, photons/pixel (log); its fall-off, net px | 0.3-300; 1-4 | 1-1000; 2-5 |
  | flat background, photons/pixel (log) | 0.001-0.1 | 0.01-0.2 |
  | gain, ADU per photon (log) | 1-12 | 12-30 |
  | readout noise, photons rms | 0.05-0.35 | 0.2-0.45 |
  | saturation, ADU (log) | 8,191-65,535 | 2,047-16,383 |
  | beam-stop radius, net px (plus a holder strip on half the shots) | 2-5 | 4-6 |
  | module gaps: a cross or one straight gap, width net px, off centre by | 0.6-3, +-2 | 2-4, +-3 |
  | hot pixels (at 20-100% of saturation), dead pixels: share of pixels (log) | 1e-5 - 1e-3 | 1e-4 - 3e-3 |

  newton_rings: the pair's distance along the beam is drawn log-uniformly between 1.5 dark
  fringes inside the crop and fringes 2.5 stored pixels apart at the crop's edge, so their
  period spans everything the stored size resolves (the inner fringes, whose period grows like
  1/r towards the centre, stay visible after downsampling). All other class parameters are those
  of version 1, measured in the shot's own geometry.

"Network pixels" (net px): pixels of a 64x64 network input; the pipeline's central power-of-two
crop (259 -> 256) spans 64 of them whatever the stored size, so 64, 128 and 259 pixel shots are
the same physics sampled more or less finely. Counts per pixel do not depend on the stored size.

Detector model (version 2): photons ~ Poisson(intensity x solid angle); ADU = gain x photons +
Gaussian readout noise, rounded, clipped to [0, saturation]; hot pixels read a large value; the
beam stop, its holder, the module gaps and dead pixels read 0 (as the pipeline's CXI masks do).
`fixed_detector` draws these once for a whole set, as at a beamline (`simulate(..., fixed=)`; its
`mask()` is what `--mask` takes); each shot's other draws stay those of the per-shot detector.
"""
import dataclasses
from typing import NamedTuple

import numpy as np

from nn.inputs import simulate_v1
from nn.config import AiryNetError, crop_size
from nn.inputs.simulate_v1 import (ASYMMETRIC, BENT, CLASS_SHARES, DOUBLE_RINGS, ELLIPTICAL,  # noqa: F401
                                   EMPTY, LAYERED, NET_PIXELS, NEWTON_RINGS, PROLATE, ROUND,
                                   SPHERICAL_OBLATE, STREAK, draw_labels, jet, oblate_view, sphere,
                                   spheroid, unit)

VERSIONS = (1, 2)
VERSION = 2   # what simulate() draws unless told otherwise
LAYERED_MIN_RADIUS = 28.0   # 1/k: ring periods under 6 network pixels
DETECTOR_STREAM = 2 ** 62   # fixed_detector's random stream: beyond every shot index


@dataclasses.dataclass(frozen=True)
class Settings:
    """Ranges that version 2 draws from per shot (see the module docstring); (low, high) pairs."""
    radius: tuple = (14.0, 80.0)
    edge_angle: tuple = (25.0, 35.0)
    centre_offset: float = 3.0
    edge_photons: tuple = (0.05, 60.0)
    stray: tuple = (0.3, 300.0)
    stray_length: tuple = (1.0, 4.0)
    background: tuple = (1e-3, 0.1)
    gain: tuple = (1.0, 12.0)
    read_noise: tuple = (0.05, 0.35)
    saturation: tuple = (8191.0, 65535.0)
    beam_stop: tuple = (2.0, 5.0)
    gap: tuple = (0.6, 3.0)
    gap_offset: float = 2.0
    hot: tuple = (1e-5, 1e-3)
    dead: tuple = (1e-5, 1e-3)


DEFAULT = Settings()
# Moved settings for a robustness test set: a closer detector, larger droplets, dimmer shots on a
# noisier, higher-gain detector with a lower saturation, more stray light, a larger beam stop.
SHIFTED = Settings(radius=(20.0, 95.0), edge_angle=(35.0, 42.0), centre_offset=5.0,
                   edge_photons=(0.03, 5.0), stray=(1.0, 1000.0), stray_length=(2.0, 5.0),
                   background=(0.01, 0.2), gain=(12.0, 30.0), read_noise=(0.2, 0.45),
                   saturation=(2047.0, 16383.0), beam_stop=(4.0, 6.0), gap=(2.0, 4.0), gap_offset=3.0,
                   hot=(1e-4, 3e-3), dead=(1e-4, 3e-3))
PRESETS = {"default": DEFAULT, "shifted": SHIFTED}
# SHIFTED's moves one group at a time (scripts/protocol.py --per_setting: which move costs what).
SHIFT_GROUPS = {"radius": ("radius",), "distance": ("edge_angle",), "centre": ("centre_offset",),
                "photons": ("edge_photons",), "stray_light": ("stray", "stray_length"), "background": ("background",),
                "gain": ("gain",), "read_noise": ("read_noise",), "saturation": ("saturation",),
                "masks": ("beam_stop", "gap", "gap_offset"), "bad_pixels": ("hot", "dead")}


def shifted_in(group):
    """DEFAULT with one group of settings (a key of SHIFT_GROUPS) moved to SHIFTED's values."""
    return dataclasses.replace(DEFAULT, **{name: getattr(SHIFTED, name) for name in SHIFT_GROUPS[group]})


class Geometry(NamedTuple):
    """One shot's detector geometry; lengths in network pixels, q in units of the wave number."""
    q: np.ndarray          # (3, size, size) momentum transfer k (s - z)
    q2: np.ndarray         # |q|^2
    x: np.ndarray          # (1, size) column position relative to the beam
    y: np.ndarray          # (size, 1) row position relative to the beam
    radius: np.ndarray     # distance from the beam
    cos3: np.ndarray       # solid angle of a flat pixel, relative to the centre's
    distance: float        # detector distance
    q_edge: float          # |q| at the crop's half width
    pixel: float           # network pixels per stored pixel


def _log_uniform(rng, bounds):
    """A Python float: numpy scalars would promote the float32 arrays it multiplies to float64."""
    low, high = bounds
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _geometry(rng, size, s):
    crop = crop_size(size)   # the pipeline's centre crop: largest power of two
    pixel = NET_PIXELS / crop
    u = ((np.arange(size) - size // 2) * pixel).astype(np.float32)
    edge = np.deg2rad(rng.uniform(*s.edge_angle))
    distance = float((NET_PIXELS / 2) / np.tan(edge))   # Python floats keep the arrays float32
    cx, cy = rng.uniform(-s.centre_offset, s.centre_offset, 2)
    x, y = (u - np.float32(cx))[None, :], (u - np.float32(cy))[:, None]
    r2 = x * x + y * y
    inv = 1 / np.sqrt(r2 + np.float32(distance ** 2))
    cos = np.float32(distance) * inv
    q = np.empty((3, size, size), np.float32)
    np.multiply(x, inv, out=q[0])
    np.multiply(y, inv, out=q[1])
    # q_z = cos theta - 1, written without the cancellation near the centre; |q|^2 = -2 q_z.
    np.divide(-r2 * inv * inv, 1 + cos, out=q[2])
    return Geometry(q, -2 * q[2], x, y, np.sqrt(r2), cos * cos * cos, distance, float(2 * np.sin(edge / 2)), pixel)


def newton_kdz_range(g):
    """Bounds of the pair distance along the beam (k d_z) of newton_rings fringes cos(q_z k d_z):
    from 1.5 dark fringes inside the crop to a fringe period of 2.5 stored pixels at its edge."""
    edge = NET_PIXELS / 2
    qz_edge = g.distance / np.hypot(edge, g.distance) - 1
    slope = g.distance * edge / np.hypot(edge, g.distance) ** 3   # |d q_z / d r| at the edge, per net px
    finest = 2 * np.pi / (slope * 2.5 * g.pixel)
    return 3 * np.pi / abs(qz_edge), max(finest, 6 * np.pi / abs(qz_edge))


def _droplet(rng, labels, g, radius):
    """Amplitude of the droplet (and core) on the detector, with its random diffuse surface."""
    azimuth = rng.uniform(0, 2 * np.pi)
    if labels[PROLATE]:
        c_over_a = rng.uniform(1.8, 2.8)
        ratio = rng.uniform(1.6, min(2.6, 0.97 * c_over_a))
        tilt = np.arcsin(np.sqrt((ratio ** 2 - 1) / (c_over_a ** 2 - 1)))
    else:
        ratio = rng.uniform(1.2, 1.5) if labels[ELLIPTICAL] else rng.uniform(1.0, 1.03)
        c_over_a, tilt = oblate_view(rng, ratio)
    a = radius / c_over_a ** (1 / 3)
    axis = np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)])
    amp = spheroid(g.q, g.q2, a, a * c_over_a, axis)
    if labels[LAYERED]:
        core = rng.uniform(0.5, 0.7)
        contrast = rng.uniform(0.85, 1.15) / core   # equal high-q amplitudes: full beats
        amp += contrast * core ** 3 * spheroid(g.q, g.q2, a * core, a * c_over_a * core, axis)
    surface = np.exp(-0.5 * rng.uniform(0.0, 3.0) ** 2 * g.q2)
    return amp * surface, surface


def _hit(rng, labels, g, s):
    """Mean photons per pixel scattered by the hit, before the solid angle and the detector."""
    # Core-shell beats repeat every few ring periods: a layered droplet must be large enough for
    # several rings to fit inside the crop, or its nodes would not be seen.
    low, high = s.radius
    radius = _log_uniform(rng, (max(low, LAYERED_MIN_RADIUS) if labels[LAYERED] else low, high))
    amp, surface = _droplet(rng, labels, g, radius)
    for present, elevation in ((labels[STREAK], rng.uniform(0, np.deg2rad(3))),
                               (labels[BENT], rng.uniform(np.deg2rad(55), np.deg2rad(75)))):
        if present:
            m = unit(elevation * rng.choice([-1, 1]), rng.uniform(0, 2 * np.pi))
            width = rng.uniform(0.5, 1.5)
            # A streak 2-3 network pixels wide (FWHM) at any elevation and detector distance.
            length = 2.355 * g.distance / (rng.uniform(2.0, 3.0) * np.cos(elevation))
            envelope = 3.0 / (g.q_edge * radius) ** 2
            strength = np.sqrt(rng.uniform(10.0, 60.0)) * envelope / np.exp(-0.5 * (width * g.q_edge) ** 2)
            amp += strength * jet(g.q, g.q2, m, length, width)
    intensity = amp * amp
    if labels[NEWTON_RINGS] or labels[ASYMMETRIC]:
        kdz = _log_uniform(rng, newton_kdz_range(g)) if labels[NEWTON_RINGS] else rng.uniform(80.0, 160.0)
        offset = rng.uniform(0.0, 0.7) if labels[NEWTON_RINGS] else rng.uniform(10.0, 24.0)
        d_perp = kdz * offset / g.distance   # fringe circles centred `offset` net px off the beam
        phi = rng.uniform(0, 2 * np.pi)
        d = np.array([d_perp * np.cos(phi), d_perp * np.sin(phi), kdz], np.float32)
        f = rng.uniform(0.3, 1.0) if labels[NEWTON_RINGS] else rng.uniform(0.6, 1.0)
        intensity *= 1 + f + 2 * np.sqrt(f) * np.cos(np.tensordot(d, g.q, 1))
    if labels[DOUBLE_RINGS]:
        small = rng.uniform(0.4, 0.65)
        fluence = rng.uniform(0.2, 0.8) / small ** 2
        intensity += fluence * small ** 6 * (sphere(np.sqrt(g.q2) * (radius * small)) * surface) ** 2
    edge_photons = _log_uniform(rng, s.edge_photons)
    return (edge_photons * (g.q_edge * radius) ** 4 / 9.0) * intensity


def _live(rng, g, s, size):
    """Pixels that record light: not behind the beam stop or its holder, in no gap, not dead."""
    stop = rng.uniform(*s.beam_stop)
    dx, dy = rng.uniform(-0.2, 0.2, 2) * stop   # the stop sits nearly, not exactly, on the beam
    live = (g.x - dx) ** 2 + (g.y - dy) ** 2 >= stop * stop
    if rng.random() < 0.5:   # the rod that holds the stop, from the stop to the detector's edge
        phi = rng.uniform(0, 2 * np.pi)
        along = g.x * np.cos(phi) + g.y * np.sin(phi)
        across = -g.x * np.sin(phi) + g.y * np.cos(phi)
        live &= ~((along > 0) & (np.abs(across) < rng.uniform(0.3, 0.6) * stop))
    # Gaps between modules, fixed to the detector (not to the beam): a cross of four modules or
    # two halves split along one axis.
    u = (np.arange(size) - size // 2) * g.pixel
    cross = rng.random() < 0.5
    horizontal = rng.random() < 0.5
    for along_rows in (True, False):
        if cross or along_rows == horizontal:
            centre = rng.uniform(-s.gap_offset, s.gap_offset)
            gap = np.abs(u - centre) < rng.uniform(*s.gap) / 2
            live &= ~(gap[:, None] if along_rows else gap[None, :])
    dead = rng.binomial(live.size, _log_uniform(rng, s.dead))
    live.flat[rng.integers(0, live.size, dead)] = False
    return live


def _detector(rng, photons_mean, live, s, fixed=None):
    """ADU image: Poisson photons times the gain, readout noise, hot pixels, saturation, mask."""
    gain = _log_uniform(rng, s.gain)
    adu = rng.standard_normal(live.shape, dtype=np.float32)
    adu *= gain * rng.uniform(*s.read_noise)
    adu += gain * rng.poisson(photons_mean).astype(np.float32)
    full = np.floor(_log_uniform(rng, s.saturation))
    hot = rng.binomial(adu.size, _log_uniform(rng, s.hot))
    where, level = rng.integers(0, adu.size, hot), rng.uniform(0.2, 1.0, hot)
    if fixed is not None:   # the set's own hot pixels (drawn above all the same, so the noise that follows is)
        where, level = fixed.hot, fixed.hot_level
    adu.flat[where] = level * full
    adu *= live
    np.clip(adu, 0, full, out=adu)
    return (adu + 0.5).astype(np.uint16)   # rounded to the nearest ADU


class FixedDetector(NamedTuple):
    """A detector that stays the same for every shot of a set, as at a beamline (fixed_detector)."""
    live: np.ndarray        # bool [size, size]: pixels that record light (not beam stop, holder, gap, dead)
    hot: np.ndarray         # flat indices of the hot pixels
    hot_level: np.ndarray   # each hot pixel's reading, as a share of the shot's saturation

    def mask(self):
        """uint8 [size, size], 1 = bad: every pixel that does not record the shot's light."""
        bad = ~self.live
        bad.flat[self.hot] = True
        return bad.astype(np.uint8)


def fixed_detector(seed, size, settings=None):
    """The detector of set `seed`: beam stop (centred on the crop, where the beam is on average), holder,
    gaps, dead and hot pixels drawn once from the settings' ranges, from a stream that no shot uses."""
    s = DEFAULT if settings is None else settings
    rng = np.random.default_rng([seed, DETECTOR_STREAM])
    g = _geometry(rng, size, dataclasses.replace(s, centre_offset=0.0))
    live = _live(rng, g, s, size)
    hot = rng.integers(0, live.size, rng.binomial(live.size, _log_uniform(rng, s.hot)))
    return FixedDetector(live, hot, rng.uniform(0.2, 1.0, hot.size))


def simulate_shot(rng, size, version=None, settings=None, fixed=None):
    """One shot: (image uint16 [size, size] in ADU (version 1: photon counts), labels int16 [11]).
    fixed: a FixedDetector (version 2) in place of the detector drawn for this shot."""
    version = VERSION if version is None else version
    if version == 1:
        if settings is not None or fixed is not None:
            raise AiryNetError("simulator version 1: its settings are fixed (settings apply to version 2)")
        return simulate_v1.simulate_shot(rng, size)
    if version != 2:
        raise AiryNetError(f"--sim_version={version}: the simulator has versions {VERSIONS}")
    s = DEFAULT if settings is None else settings
    labels = draw_labels(rng)   # first, as in version 1: the same labels for the same shot index
    g = _geometry(rng, size, s)
    mean = np.zeros((size, size), np.float32) if labels[EMPTY] else _hit(rng, labels, g, s)
    # Stray light off the beam-line apertures, falling off outside the smallest beam stop, on a
    # flat background.
    length = rng.uniform(*s.stray_length)
    stray = _log_uniform(rng, s.stray) * float(np.exp(s.beam_stop[0] / length))
    mean += stray * np.exp(g.radius * np.float32(-1 / length)) + np.float32(_log_uniform(rng, s.background))
    live = _live(rng, g, s, size)   # drawn with a fixed detector too: the shot's later draws stay the same
    if fixed is not None:
        live = fixed.live
    mean *= g.cos3
    mean *= live   # nothing is drawn for pixels that record nothing
    return _detector(rng, mean, live, s, fixed), labels

def simulate(n, seed, size, start=0, version=None, settings=None, fixed=None):
    """Shots start..start+n-1 of the synthetic set `seed`: (images uint16 [n, size, size],
    labels int16 [n, 11]). Shot i depends only on (seed, i, size, version, settings), never on n
    or start. version: 1 or 2 (default VERSION); settings: a Settings for version 2 (DEFAULT);
    fixed: one FixedDetector for every shot (version 2; default: a detector drawn per shot)."""
    images = np.empty((n, size, size), np.uint16)
    labels = np.empty((n, len(CLASS_SHARES)), np.int16)
    for i in range(n):
        images[i], labels[i] = simulate_shot(np.random.default_rng([seed, start + i]), size, version, settings,
                                             fixed)
    return images, labels
