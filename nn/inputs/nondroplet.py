"""Shots that are not helium droplets, for testing the out-of-distribution score (nn/ood.py); never for
training. They go through the detector of simulator version 2 (nn/inputs/simulate.py: geometry, stray
light and background, beam stop and gaps, gain, noise, hot and dead pixels, saturation, DEFAULT
settings), so that only what scattered differs from a droplet shot. Kinds:

  crystal   Bragg spots of a small crystal on its zone axis: a 2D reciprocal lattice (spacing 4-14 net px,
            any shear), each spot kept with the excitation error's chance, intensities falling with q;
  ice       powder rings of hexagonal ice (its first seven reflections, the first at 8-20 net px), textured
            along the azimuth;
  speckle   a large irregular particle (a thresholded smooth random field, 10-30% of the stored width across):
            the squared magnitude of its Fourier transform;
  multi     two to four droplets in the beam at once, 2-6 radii apart: their amplitudes interfere;
  faults    an empty shot on a faulty detector: bright stripes along rows or columns (a readout fault), a
            module with a wrong offset, saturated blobs.

`simulate(kind, n, seed, size)` returns (images uint16 [n, size, size] in ADU, labels int16 [n, 11] of
zeros: no class applies). Shot i depends only on (kind, seed, i, size).
"""
import numpy as np

from nn.config import AiryNetError
from nn.inputs import simulate as droplets

KINDS = ("crystal", "ice", "speckle", "multi", "faults")
ICE_D_SPACINGS = np.array([3.90, 3.67, 3.44, 2.67, 2.25, 2.07, 1.92])   # Angstrom, Ih (100)...(103)
ICE_INTENSITIES = np.array([1.0, 0.6, 0.55, 0.2, 0.35, 0.3, 0.15])


def _gaussians(g, centres, widths, heights):
    """Sum of 2D Gaussians (centres [M, 2] in net px from the beam) on the detector grid."""
    image = np.zeros((g.y.shape[0], g.x.shape[1]), np.float32)
    for (cx, cy), w, h in zip(centres, widths, heights):
        gx = np.exp(-0.5 * ((g.x - cx) / w) ** 2)
        gy = np.exp(-0.5 * ((g.y - cy) / w) ** 2)
        image += np.float32(h) * gy * gx
    return image


def _crystal(rng, g, size):
    spacing = rng.uniform(4.0, 14.0)
    angle, shear = rng.uniform(0, np.pi), rng.uniform(np.pi / 3, 2 * np.pi / 3)
    b1 = spacing * np.array([np.cos(angle), np.sin(angle)])
    b2 = spacing * rng.uniform(0.8, 1.25) * np.array([np.cos(angle + shear), np.sin(angle + shear)])
    n = int(droplets.NET_PIXELS / spacing) + 2
    hk = np.array([(h, k) for h in range(-n, n + 1) for k in range(-n, n + 1) if (h, k) != (0, 0)])
    centres = hk @ np.stack([b1, b2])
    centres = centres[np.all(np.abs(centres) < droplets.NET_PIXELS / 2 + 2, axis=1)]
    centres = centres[rng.random(len(centres)) < rng.uniform(0.2, 0.6)]   # on the Ewald sphere, or not
    falloff = rng.uniform(10.0, 30.0)
    heights = rng.exponential(1.0, len(centres)) * np.exp(-np.sum(centres ** 2, 1) / (2 * falloff ** 2))
    heights *= droplets._log_uniform(rng, (5.0, 500.0))
    return _gaussians(g, centres, np.full(len(centres), rng.uniform(0.4, 1.0)), heights)


def _ice(rng, g, size):
    first = rng.uniform(8.0, 20.0)
    width = rng.uniform(0.3, 0.9)
    phi = np.arctan2(g.y, g.x)
    texture = np.ones_like(phi)
    for order in rng.integers(1, 13, 4):   # grains and texture: brighter and darker arcs
        texture += rng.uniform(0, 0.5) * np.cos(order * phi + rng.uniform(0, 2 * np.pi))
    image = np.zeros_like(g.radius)
    for d, strength in zip(ICE_D_SPACINGS, ICE_INTENSITIES):
        radius = first * ICE_D_SPACINGS[0] / d
        image += strength * np.exp(-0.5 * ((g.radius - radius) / width) ** 2)
    return image * np.maximum(texture, 0.05) * np.float32(droplets._log_uniform(rng, (2.0, 200.0)))


def _speckle(rng, g, size):
    field = rng.standard_normal((size, size))
    freq = np.fft.fftfreq(size)
    smooth = np.exp(-0.5 * (freq[:, None] ** 2 + freq[None, :] ** 2) / (rng.uniform(0.01, 0.03) ** 2))
    field = np.real(np.fft.ifft2(np.fft.fft2(field) * smooth))
    yy, xx = np.mgrid[:size, :size] - size / 2
    extent = rng.uniform(0.05, 0.15) * size
    envelope = 1 - np.hypot(xx, yy) / extent
    particle = (field / field.std() + 2.5 * envelope > rng.uniform(0.5, 1.5)) & (envelope > 0)
    pattern = np.abs(np.fft.fftshift(np.fft.fft2(particle * rng.uniform(0.7, 1.0, particle.shape)))) ** 2
    edge = pattern[np.abs(g.radius - droplets.NET_PIXELS / 2) < 1].mean()
    return (pattern / max(edge, 1e-12) * droplets._log_uniform(rng, (0.1, 30.0))).astype(np.float32)


def _multi(rng, g, size):
    count = rng.integers(2, 5)
    radii = np.array([droplets._log_uniform(rng, droplets.DEFAULT.radius) for _ in range(count)])
    amplitude = np.zeros(g.q2.shape, np.complex64)
    q = np.sqrt(g.q2)
    for radius in radii:
        offset = radii.max() * rng.uniform(2.0, 6.0) * droplets.unit(0.0, rng.uniform(0, 2 * np.pi))
        phase = np.tensordot(offset.astype(np.float32), g.q, 1)
        amplitude += (radius / radii.max()) ** 3 * droplets.sphere(q * radius) * np.exp(1j * phase)
    photons = droplets._log_uniform(rng, (0.5, 60.0)) * (g.q_edge * radii.max()) ** 4 / 9.0
    return (photons * np.abs(amplitude) ** 2).astype(np.float32)


def _faults(rng, image, live, full):
    """Readout stripes, a module with a wrong offset and saturated blobs on the ADU image (float32)."""
    size = image.shape[0]
    for _ in range(rng.integers(1, 6)):
        start, width = rng.integers(0, size), rng.integers(1, 6)
        stripe = np.s_[start:start + width, :] if rng.random() < 0.5 else np.s_[:, start:start + width]
        image[stripe] += rng.uniform(0.05, 0.6) * full
    if rng.random() < 0.5:
        half = size // 2
        rows, cols = rng.integers(0, 2, 2) * half
        image[rows:rows + half, cols:cols + half] += rng.uniform(0.01, 0.1) * full
    yy, xx = np.mgrid[:size, :size]
    for _ in range(rng.integers(1, 5)):
        cy, cx = rng.integers(0, size, 2)
        blob = np.hypot(yy - cy, xx - cx) < rng.uniform(2, 0.06 * size)
        image[blob] = full
    return image * live


def simulate_shot(rng, kind, size):
    """One shot of `kind`: (image uint16 [size, size] in ADU, labels int16 [11] of zeros)."""
    s = droplets.DEFAULT
    g = droplets._geometry(rng, size, s)
    scatter = {"crystal": _crystal, "ice": _ice, "speckle": _speckle, "multi": _multi}
    mean = scatter[kind](rng, g, size) if kind in scatter else np.zeros((size, size), np.float32)
    length = rng.uniform(*s.stray_length)
    stray = droplets._log_uniform(rng, s.stray) * float(np.exp(s.beam_stop[0] / length))
    background = np.float32(droplets._log_uniform(rng, s.background))
    mean = mean + stray * np.exp(g.radius * np.float32(-1 / length)) + background
    live = droplets._live(rng, g, s, size)
    mean = (mean * g.cos3 * live).astype(np.float32)
    image = droplets._detector(rng, mean, live, s)
    if kind == "faults":
        full = float(np.floor(droplets._log_uniform(rng, s.saturation)))
        image = np.clip(_faults(rng, image.astype(np.float32), live, full), 0, 65535).astype(np.uint16)
    return image, np.zeros(len(droplets.CLASS_SHARES), np.int16)


def simulate(kind, n, seed, size, start=0):
    """Shots start..start+n-1 of `kind` for set `seed`: (images uint16 [n, size, size], labels int16 [n, 11])."""
    if kind not in KINDS:
        raise AiryNetError(f"--kind={kind}: must be one of {', '.join(KINDS)}")
    images = np.empty((n, size, size), np.uint16)
    labels = np.zeros((n, len(droplets.CLASS_SHARES)), np.int16)
    for i in range(n):
        rng = np.random.default_rng([seed, KINDS.index(kind) + 1, start + i])
        images[i], labels[i] = simulate_shot(rng, kind, size)
    return images, labels
