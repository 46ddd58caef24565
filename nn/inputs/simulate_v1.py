"""Version 1 of the helium-droplet simulator, frozen: `simulate(..., version=1)` (nn/inputs/simulate.py)
draws these shots bit for bit, so that results of earlier runs stay comparable. Do not change
what it computes; version 2 lives in nn/inputs/simulate.py and reuses the droplet physics below.

Physics simulator of single-shot helium-nanodroplet diffraction, with ground-truth labels.

Numpy only. Each shot is the far-field intensity of one hit (or of no hit) in the first Born
approximation, recorded on a flat detector in wide-angle geometry, with Poisson photon noise,
a central beam-stop hole and a cross-shaped gap between four detector modules (zero counts).
Shot i of set `seed` is drawn from np.random.default_rng([seed, i]) alone.

Geometry
--------
Everything is defined relative to the central power-of-two crop that the input pipeline takes
(259 -> 256): the crop's half width is 32 "network pixels" (pixels of a 64x64 network input)
and sees a scattering angle of 30 degrees. A pattern stored at 64, 128 or 259 pixels is the
same physics, sampled more or less finely. Sphere ring periods are 3.6-12 network pixels and
streaks 2-3 pixels wide, so the class-defining features survive the resize to 64x64.
The momentum transfer of a pixel is q = k (s - z) (s: unit vector to the pixel, z: the beam),
in units of the wave number k. Its component q_z along the beam grows like |q|^2; this
Ewald-sphere curvature makes the "bent", "newton_rings" and "asymmetric" patterns.

Objects (Born approximation: amplitude = Fourier transform of the density)
--------------------------------------------------------------------------
- Sphere of radius R: A = V 3 (sin x - x cos x) / x^3 with x = |q| R -> rings of period
  ~pi/R under an envelope falling as |q|^-4.
- Spheroid with semi-axes a, a, c and symmetry axis n: the sphere amplitude with
  x = sqrt(a^2 |q|^2 + (c^2 - a^2) (q.n)^2), i.e. an effective radius along q.
- Core-shell: shell amplitude plus (core - shell) contrast times the core amplitude.
- Droplet pair: A1 + A2 exp(i q.d); identical droplets give I1 (1 + f + 2 sqrt(f) cos(q.d)).
- Thin jet with a Gaussian density profile along unit vector m:
  A ~ exp(-(L^2 (q.m)^2 + w^2 (|q|^2 - (q.m)^2)) / 2): a streak where q.m = 0.
- A diffuse droplet surface (Gaussian interface, random width) damps droplet amplitudes by
  exp(-sigma^2 |q|^2 / 2), so the fall-off towards the edge differs from shot to shot.

Classes and why each is visible (the public data set's 11 classes, in its order)
-------------------------------------------------------------------------------
- spherical_oblate: a droplet of rotational, oblate or spherical, shape -> closed rings.
  Every such shot is exactly one of:
  - round: a sphere, or an oblate droplet seen along its axis -> circular rings
    (apparent axis ratio 1.00-1.03);
  - elliptical: an oblate droplet (c/a >= 0.6) seen off-axis -> elliptical rings, stretched
    along the droplet's projected short axis (apparent ratio 1.2-1.5).
- prolate: a prolate droplet (c/a 1.8-2.8; fast-rotating droplets turn prolate beyond the
  oblate stability limit) seen from the side -> a strongly elongated pattern (ratio
  1.6-2.6), stretched perpendicular to the droplet's long axis. Never spherical_oblate.
- streak: a thin jet through a prolate droplet, lying in the plane perpendicular to the
  beam (elevation < 3 deg) -> a straight bright line through the centre, perpendicular to
  the jet, reaching the edge.
- bent: the same jet tilted out of that plane (elevation 55-75 deg): the plane q.m = 0 cuts
  the Ewald sphere in a circle through the origin -> a streak curving into an arc.
- asymmetric: two identical droplets displaced obliquely to the beam. Their fringes cos(q.d)
  are circles centred 10-24 network pixels off the pattern centre (q_z breaks Friedel
  symmetry at wide angles) -> sparse fringes on one side, dense on the other.
- newton_rings: two identical droplets one behind the other along the beam -> fringes
  cos(q_z d_z) with q_z ~ |q|^2: concentric dark rings at radii ~ sqrt(n), like Newton's
  rings, cutting through the droplet rings.
- double_rings: a second, smaller droplet (0.4-0.65 R) elsewhere in the focus. Their pair
  fringes are finer than a pixel and average out, so the two intensities add: the fine rings
  of the large droplet inside, the coarse rings of the small one further out.
- layered: a dense core (0.5-0.7 R) in a helium shell. Core and shell amplitudes of equal
  strength at high q beat -> the rings fade to dark nodes every ~4-7 ring periods.
- empty: no droplet in the focus -> only stray light around the beam stop and background.
At most one of asymmetric, newton_rings, double_rings and layered is drawn for a
spherical_oblate shot; at most one of streak and bent for a prolate shot.
Random per shot: size, orientation, axis ratios, pair distances and fluences, jet direction,
surface width, brightness, stray light and background.

Shares (CLASS_SHARES; public data in brackets): spherical_oblate 88% (90.7), round 76.6%
(79.7), elliptical 11.4% (11.0), prolate 9% (6.2), streak 3.6% (3.3), bent 4.5% (5.4),
asymmetric 5.3% (5.1), newton_rings 6.6% (6.3), double_rings 4.4% (3.0), layered 4.4%
(0.65), empty 3% (2.9). Rare classes are raised so that ~7k shots hold a few hundred each.

Intensities: the sharp droplet's |q|^-4 envelope at the crop edge is 1-15 photons per pixel
(log-uniform); rings beside the beam stop hold ~10^3-10^5 photons and saturate at 65535.
Counts per pixel do not depend on the stored size.
"""
import functools

import numpy as np

from nn.config import HELIUM_CLASSES, crop_size

(SPHERICAL_OBLATE, ROUND, ELLIPTICAL, PROLATE, STREAK, BENT,
 ASYMMETRIC, NEWTON_RINGS, DOUBLE_RINGS, LAYERED, EMPTY) = range(len(HELIUM_CLASSES))

# Shot kinds. Rare classes of the public data (double_rings 3%, layered 0.65%) are raised to a
# few percent so that a classifier sees a few hundred of them in ~7k shots.
P_EMPTY = 0.03
P_PROLATE = 0.09
P_STREAK_IF_PROLATE = 0.4
P_BENT_IF_PROLATE = 0.5
P_ELLIPTICAL_IF_SPHERICAL = 0.13
# At most one modifier per spherical_oblate shot; the rest have none.
MODIFIERS_IF_SPHERICAL = {NEWTON_RINGS: 0.075, DOUBLE_RINGS: 0.05, ASYMMETRIC: 0.06, LAYERED: 0.05}

P_SPHERICAL = 1.0 - P_EMPTY - P_PROLATE
CLASS_SHARES = np.array([
    P_SPHERICAL,
    P_SPHERICAL * (1 - P_ELLIPTICAL_IF_SPHERICAL),
    P_SPHERICAL * P_ELLIPTICAL_IF_SPHERICAL,
    P_PROLATE,
    P_PROLATE * P_STREAK_IF_PROLATE,
    P_PROLATE * P_BENT_IF_PROLATE,
    P_SPHERICAL * MODIFIERS_IF_SPHERICAL[ASYMMETRIC],
    P_SPHERICAL * MODIFIERS_IF_SPHERICAL[NEWTON_RINGS],
    P_SPHERICAL * MODIFIERS_IF_SPHERICAL[DOUBLE_RINGS],
    P_SPHERICAL * MODIFIERS_IF_SPHERICAL[LAYERED],
    P_EMPTY,
])  # expected share of shots carrying each label

NET_PIXELS = 64                      # the crop is described in pixels of a 64x64 network input
EDGE_ANGLE = np.deg2rad(30.0)        # scattering angle at the crop's half width
DISTANCE = (NET_PIXELS / 2) / np.tan(EDGE_ANGLE)   # detector distance, network pixels
Q_EDGE = 2 * np.sin(EDGE_ANGLE / 2)  # |q| / k at the crop's half width
BEAM_STOP = 3.0                      # beam-stop radius, network pixels
GAP = 1.2                            # module gap width, network pixels
SATURATION = np.iinfo(np.uint16).max


@functools.lru_cache(maxsize=8)
def _geometry(size):
    """Per-pixel q vector (3, size, size), |q|^2, detector response and stray-light profile."""
    crop = crop_size(size)   # the pipeline's centre crop: largest power of two
    u = (np.arange(size) - size // 2) * (NET_PIXELS / crop)
    x, y = np.meshgrid(u, u)
    dist = np.sqrt(x * x + y * y + DISTANCE ** 2)
    q = np.stack([x / dist, y / dist, DISTANCE / dist - 1.0]).astype(np.float32)
    radius = np.hypot(x, y)
    live = (radius >= BEAM_STOP) & (np.abs(x) >= GAP / 2) & (np.abs(y) >= GAP / 2)
    # The solid angle of a flat pixel falls as cos^3 of the scattering angle.
    response = np.where(live, (DISTANCE / dist) ** 3, 0.0).astype(np.float32)
    # Stray light scattered off the beam-line apertures, falling off beside the beam stop.
    stray = np.exp(-(radius - BEAM_STOP) / 2.0).astype(np.float32)
    arrays = q, (q * q).sum(0), response, stray
    for a in arrays:
        a.flags.writeable = False   # cached and shared by every shot of this size
    return arrays


def sphere(x):
    """Normalised sphere amplitude 3 (sin x - x cos x) / x^3 (1 at x = 0)."""
    x = np.maximum(x, np.float32(1e-2))   # the exact centre is behind the beam stop anyway
    return 3 * (np.sin(x) - x * np.cos(x)) / (x * x * x)


def spheroid(q, q2, a, c, axis):
    """Amplitude of a spheroid (semi-axes a, a, c; symmetry axis `axis`), normalised to 1."""
    qn = np.tensordot(axis.astype(np.float32), q, 1)
    return sphere(np.sqrt(a * a * q2 + (c * c - a * a) * qn * qn))


def jet(q, q2, axis, length, width):
    """Amplitude of a thin Gaussian jet along `axis`, normalised to 1: a streak at q.axis = 0."""
    qm = np.tensordot(axis.astype(np.float32), q, 1)
    qm2 = qm * qm
    return np.exp(-0.5 * (length * length * qm2 + width * width * (q2 - qm2)))


def unit(elevation, azimuth):
    """Unit vector with the given elevation out of the detector plane and azimuth in it."""
    return np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                     np.sin(elevation)])


def oblate_view(rng, ratio):
    """Axis ratio c/a <= 1 and tilt of an oblate droplet whose pattern has the apparent ratio.

    Seen at tilt t from its axis, the rings' axis ratio is 1 / sqrt(cos^2 t + (c/a)^2 sin^2 t).
    """
    c_over_a = rng.uniform(0.6, 1.0 / ratio)
    sin2 = (1.0 / ratio ** 2 - 1.0) / (c_over_a ** 2 - 1.0) if c_over_a < 1 else 0.0
    return c_over_a, np.arcsin(np.sqrt(np.clip(sin2, 0.0, 1.0)))


def draw_labels(rng):
    """The shot's int16 label vector, drawn with the shares above and the hierarchy built in."""
    labels = np.zeros(len(HELIUM_CLASSES), np.int16)
    u = rng.random()
    if u < P_EMPTY:
        labels[EMPTY] = 1
    elif u < P_EMPTY + P_PROLATE:
        labels[PROLATE] = 1
        v = rng.random()   # one jet at most: straight or bent
        labels[STREAK] = v < P_STREAK_IF_PROLATE
        labels[BENT] = P_STREAK_IF_PROLATE <= v < P_STREAK_IF_PROLATE + P_BENT_IF_PROLATE
    else:
        labels[SPHERICAL_OBLATE] = 1
        labels[ELLIPTICAL if rng.random() < P_ELLIPTICAL_IF_SPHERICAL else ROUND] = 1
        v = rng.random()
        for cls, p in MODIFIERS_IF_SPHERICAL.items():
            if v < p:
                labels[cls] = 1
                break
            v -= p
    return labels


def _hit(rng, labels, q, q2):
    """Mean photons per pixel scattered by the hit, before the detector response."""
    # Equal-volume radius in 1/k, the same for every shape: sphere ring periods of 12 to 3.6
    # network pixels.
    radius = rng.uniform(15.0, 48.0)
    azimuth = rng.uniform(0, 2 * np.pi)
    if labels[PROLATE]:
        c_over_a = rng.uniform(1.8, 2.8)
        ratio = rng.uniform(1.6, min(2.6, 0.97 * c_over_a))
        tilt = np.arcsin(np.sqrt((ratio ** 2 - 1) / (c_over_a ** 2 - 1)))
    else:
        ratio = rng.uniform(1.2, 1.5) if labels[ELLIPTICAL] else rng.uniform(1.0, 1.03)
        c_over_a, tilt = oblate_view(rng, ratio)
    a = radius / c_over_a ** (1 / 3)           # semi-axes a, a, c = a c_over_a: volume of `radius`
    axis = np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)])
    amp = spheroid(q, q2, a, a * c_over_a, axis)   # 1 at q = 0
    if labels[LAYERED]:
        core = rng.uniform(0.5, 0.7)
        # Shell (~R) and core (~contrast core^3 R / core^2) have equal high-q amplitudes: full beats.
        contrast = rng.uniform(0.85, 1.15) / core
        amp += contrast * core ** 3 * spheroid(q, q2, a * core, a * c_over_a * core, axis)
    # A diffuse droplet surface (Gaussian interface of width sigma) damps the amplitude by
    # exp(-sigma^2 q^2 / 2): the |q|^-4 fall-off steepens by a random amount per shot.
    surface = np.exp(-0.5 * rng.uniform(0.0, 3.0) ** 2 * q2)
    amp *= surface

    for present, elevation in ((labels[STREAK], rng.uniform(0, np.deg2rad(3))),
                               (labels[BENT], rng.uniform(np.deg2rad(55), np.deg2rad(75)))):
        if present:
            m = unit(elevation * rng.choice([-1, 1]), rng.uniform(0, 2 * np.pi))
            # q.m changes by cos(elevation) / DISTANCE per pixel across the streak: a jet of this
            # length draws a streak 2-3 pixels wide (FWHM) at any elevation.
            width = rng.uniform(0.5, 1.5)
            length = 2.355 * DISTANCE / (rng.uniform(2.0, 3.0) * np.cos(elevation))
            # On the streak at the crop edge the jet outshines the (sharp) droplet envelope 10-60x.
            envelope = 3.0 / (Q_EDGE * radius) ** 2
            strength = np.sqrt(rng.uniform(10.0, 60.0)) * envelope / np.exp(-0.5 * (width * Q_EDGE) ** 2)
            # Coherent with the droplet: the jet runs through its centre.
            amp += strength * jet(q, q2, m, length, width)
    intensity = amp * amp

    if labels[NEWTON_RINGS] or labels[ASYMMETRIC]:
        kdz = rng.uniform(50.0, 240.0) if labels[NEWTON_RINGS] else rng.uniform(80.0, 160.0)
        offset = rng.uniform(0.0, 0.7) if labels[NEWTON_RINGS] else rng.uniform(10.0, 24.0)
        # The fringes are circles about the point where q.d is stationary, DISTANCE d_perp / d_z
        # from the pattern centre.
        d_perp = kdz * offset / DISTANCE
        phi = rng.uniform(0, 2 * np.pi)
        d = np.array([d_perp * np.cos(phi), d_perp * np.sin(phi), kdz], np.float32)
        # Fluence on the second droplet; the off-centre fringes of oblique pairs are drawn strong.
        f = rng.uniform(0.3, 1.0) if labels[NEWTON_RINGS] else rng.uniform(0.6, 1.0)
        intensity *= 1 + f + 2 * np.sqrt(f) * np.cos(np.tensordot(d, q, 1))
    if labels[DOUBLE_RINGS]:
        small = rng.uniform(0.4, 0.65)
        # Fluence ratio: the small droplet's |q|^-4 envelope is 0.2-0.8x the large one's.
        fluence = rng.uniform(0.2, 0.8) / small ** 2
        intensity += fluence * small ** 6 * (sphere(np.sqrt(q2) * (radius * small)) * surface) ** 2

    # The sharp sphere's envelope 9 / (q R)^4 at the crop edge holds 1-15 photons per pixel.
    edge_photons = np.exp(rng.uniform(np.log(1.0), np.log(15.0)))
    return (edge_photons * (Q_EDGE * radius) ** 4 / 9.0) * intensity


def simulate_shot(rng, size):
    """One shot: (image uint16 [size, size] photon counts, labels int16 [11])."""
    q, q2, response, stray_profile = _geometry(size)
    labels = draw_labels(rng)
    mean = np.zeros((size, size), np.float32) if labels[EMPTY] else _hit(rng, labels, q, q2)
    stray = np.exp(rng.uniform(np.log(1.0), np.log(30.0)))
    mean += stray * stray_profile + rng.uniform(0.002, 0.03)
    counts = rng.poisson(mean * response)
    return np.minimum(counts, SATURATION).astype(np.uint16), labels


def simulate(n, seed, size, start=0):
    """Shots start..start+n-1 of the synthetic set `seed`: (images uint16 [n, size, size],
    labels int16 [n, 11]). Shot i depends only on (seed, i), never on n or start."""
    images = np.empty((n, size, size), np.uint16)
    labels = np.empty((n, len(HELIUM_CLASSES)), np.int16)
    for i in range(n):
        images[i], labels[i] = simulate_shot(np.random.default_rng([seed, start + i]), size)
    return images, labels
