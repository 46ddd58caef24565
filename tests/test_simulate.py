"""The helium-droplet simulator: determinism, types, label hierarchy, class shares, detector
geometry, photon statistics and the physical signature of some classes (version 1, frozen), and
version 2's randomised beam and detector."""
import dataclasses
import os

import numpy as np
import pytest

from nn.inputs import simulate, simulate_v1
from nn.config import AiryNetError, HELIUM_CLASSES

C = {name: i for i, name in enumerate(HELIUM_CLASSES)}
MODIFIERS = ["asymmetric", "newton_rings", "double_rings", "layered"]


@pytest.fixture(scope="module")
def shots64():
    """2,000 version-1 shots of 64x64: the crop is the network input itself (1 pixel = 1 network pixel)."""
    return simulate.simulate(2000, seed=5, size=64, version=1)


def radius_map(size):
    """Distance from the pattern centre, in network pixels (the crop spans 64 of them)."""
    crop = 1 << (size.bit_length() - 1)
    u = (np.arange(size) - size // 2) * 64 / crop
    return np.hypot(*np.meshgrid(u, u))


def test_same_seed_same_shots_and_shot_i_independent_of_n_and_start():
    images, labels = simulate.simulate(6, seed=3, size=32)
    again, again_labels = simulate.simulate(6, seed=3, size=32)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)
    tail, tail_labels = simulate.simulate(2, seed=3, size=32, start=4)
    np.testing.assert_array_equal(tail, images[4:])
    np.testing.assert_array_equal(tail_labels, labels[4:])
    one, one_labels = simulate.simulate_shot(np.random.default_rng([3, 5]), 32)
    np.testing.assert_array_equal(one, images[5])
    np.testing.assert_array_equal(one_labels, labels[5])
    other, _ = simulate.simulate(6, seed=4, size=32)
    assert not np.array_equal(other, images)


@pytest.mark.parametrize("size", [40, 259])
def test_dtype_and_shape(size):
    images, labels = simulate.simulate(3, seed=0, size=size)
    assert images.dtype == np.uint16 and images.shape == (3, size, size)
    assert labels.dtype == np.int16 and labels.shape == (3, len(HELIUM_CLASSES))
    image, label = simulate.simulate_shot(np.random.default_rng(0), size)
    assert image.dtype == np.uint16 and image.shape == (size, size)
    assert label.dtype == np.int16 and label.shape == (len(HELIUM_CLASSES),)


def test_label_hierarchy(shots64):
    y = shots64[1][:500].astype(int)
    assert set(np.unique(y)) <= {0, 1}
    so, rnd, ell, pro, empty = (y[:, C[k]] for k in ("spherical_oblate", "round", "elliptical", "prolate", "empty"))
    # Every shot is exactly one of: a spherical/oblate droplet, a prolate droplet, no droplet.
    np.testing.assert_array_equal(so + pro + empty, 1)
    # round and elliptical are the two kinds of spherical_oblate.
    np.testing.assert_array_equal(rnd + ell, so)
    # streak and bent only on prolate droplets (one jet at most).
    assert np.all(y[:, C["streak"]] + y[:, C["bent"]] <= pro)
    # empty stands alone.
    assert np.all(y[empty == 1].sum(1) == 1)
    # The droplet-pair and core-shell flags go with spherical/oblate droplets, one at most.
    assert np.all(y[:, [C[k] for k in MODIFIERS]].sum(1) <= so)
    # Every class occurs at least once in 500 shots.
    assert np.all(y.sum(0) > 0)


def test_class_shares_match_the_documented_ones():
    _, y = simulate.simulate(4000, seed=11, size=16)
    share = y.mean(0)
    tolerance = 4 * np.sqrt(simulate.CLASS_SHARES * (1 - simulate.CLASS_SHARES) / len(y))
    assert np.all(np.abs(share - simulate.CLASS_SHARES) < tolerance), (share, simulate.CLASS_SHARES)
    # Roughly the public data set: mostly round spherical/oblate droplets, rare classes at a few percent.
    assert simulate.CLASS_SHARES[C["spherical_oblate"]] > 0.85 and simulate.CLASS_SHARES[C["round"]] > 0.7
    assert np.all(simulate.CLASS_SHARES[[C["layered"], C["double_rings"], C["empty"]]] >= 0.02)
    assert 2.0 < simulate.CLASS_SHARES.sum() < 2.3   # labels per shot (public data: 2.14)


@pytest.mark.parametrize("size,gap_rows", [(64, [32]), (128, [63, 64, 65]), (259, [127, 128, 129, 130, 131])])
def test_beam_stop_and_module_gaps_are_zero(size, gap_rows):
    images, _ = simulate.simulate(40, seed=2, size=size, version=1)
    assert np.all(images[:, radius_map(size) < simulate_v1.BEAM_STOP] == 0)
    assert np.all(images[:, gap_rows, :] == 0) and np.all(images[:, :, gap_rows] == 0)
    # ... and the detector is live right beside them.
    assert np.all(images[:, gap_rows[-1] + 1, :].sum(1) > 0)


def test_empty_shots_hold_no_droplet_signal(shots64):
    images, labels = shots64
    outside = radius_map(64) >= 12   # beyond the stray light around the beam stop
    mean = images[:, outside].mean(1)
    empty = labels[:, C["empty"]] == 1
    assert empty.sum() > 20
    assert mean[empty].max() < 0.1        # background only
    assert mean[~empty].min() > 0.1       # every hit scatters well beyond the beam stop
    assert np.median(mean[~empty]) > 1.0


def test_hits_span_orders_of_magnitude(shots64):
    images, labels = shots64
    hits = images[labels[:, C["empty"]] == 0].astype(np.int64)
    near = (radius_map(64) >= simulate_v1.BEAM_STOP) & (radius_map(64) < 6)
    edge = (radius_map(64) >= 29) & (radius_map(64) < 32)
    peak = hits[:, near].max(1)
    # Beside the beam stop 10^3-10^5 photons (saturating at 65535), at the crop's edge a few.
    assert 1e3 < np.median(peak) < 6e4 and peak.max() == 65535 and np.mean(peak == 65535) < 0.1
    assert 0.1 < np.median(hits[:, edge].mean(1)) < 10
    ratio = np.array([img.max() / np.median(img[img > 0]) for img in hits])
    assert np.min(ratio) > 20 and np.percentile(ratio, 5) > 100 and np.median(ratio) > 1000


def test_asymmetric_shots_break_centrosymmetry(shots64):
    # Odd size so that a 180-degree rotation maps the pattern centre onto itself.
    images, labels = simulate.simulate(600, seed=9, size=65, version=1)
    live = np.log1p(images.astype(np.float32))
    both = (images > 0) & (images[:, ::-1, ::-1] > 0)
    score = (np.abs(live - live[:, ::-1, ::-1]) * both).sum((1, 2)) / both.sum((1, 2))
    asym = labels[:, C["asymmetric"]] == 1
    plain_round = (labels[:, C["round"]] == 1) & (labels[:, [C[k] for k in MODIFIERS]].sum(1) == 0)
    newton = labels[:, C["newton_rings"]] == 1
    assert asym.sum() > 10 and newton.sum() > 10
    # A pair along the beam keeps the pattern centrosymmetric, an oblique pair breaks it.
    assert np.median(score[asym]) > 1.5 * max(np.median(score[plain_round]), np.median(score[newton]))


def test_prolate_and_elliptical_patterns_are_elongated(shots64):
    images, labels = shots64
    r = radius_map(64)
    yy, xx = np.mgrid[-32:32, -32:32].astype(np.float64)
    weights = np.log1p(images.astype(np.float64)) * (r < 28)
    m = weights.sum((1, 2))
    cxx = (weights * xx * xx).sum((1, 2)) / m
    cyy = (weights * yy * yy).sum((1, 2)) / m
    cxy = (weights * xx * yy).sum((1, 2)) / m
    root = np.sqrt(((cxx - cyy) / 2) ** 2 + cxy ** 2)
    ratio = ((cxx + cyy) / 2 + root) / ((cxx + cyy) / 2 - root)   # principal second moments
    rnd = (labels[:, C["round"]] == 1) & (labels[:, [C[k] for k in MODIFIERS]].sum(1) == 0)
    ell = (labels[:, C["elliptical"]] == 1) & (labels[:, [C[k] for k in MODIFIERS]].sum(1) == 0)
    pro = labels[:, C["prolate"]] == 1
    assert np.median(ratio[rnd]) < np.median(ratio[ell]) < np.median(ratio[pro])
    assert np.percentile(ratio[rnd], 90) < np.percentile(ratio[pro], 10)


# ----------------------------------------------------------------------------------------------
# Version 2 (the default) and the frozen version 1

def test_version_1_reproduces_the_first_release_bit_for_bit():
    # Shots of the first release (one of each class, seed 0, 32 px), saved before version 2 existed.
    ref = np.load(os.path.join(os.path.dirname(__file__), "data", "simulate_v1_seed0_32px.npz"))
    assert ref["labels"].sum(0).min() >= 1   # every class is in the reference
    for k, i in enumerate(ref["indices"]):
        images, labels = simulate.simulate(1, int(ref["seed"]), 32, start=int(i), version=1)
        np.testing.assert_array_equal(images[0], ref["images"][k])
        np.testing.assert_array_equal(labels[0], ref["labels"][k])


def test_default_is_version_2_with_the_same_labels_as_version_1():
    assert simulate.VERSION == 2
    images, labels = simulate.simulate(20, seed=3, size=32)
    v2, v2_labels = simulate.simulate(20, seed=3, size=32, version=2, settings=simulate.DEFAULT)
    v1, v1_labels = simulate.simulate(20, seed=3, size=32, version=1)
    np.testing.assert_array_equal(images, v2)
    np.testing.assert_array_equal(labels, v1_labels)
    assert not np.array_equal(images, v1)
    shifted, shifted_labels = simulate.simulate(20, seed=3, size=32, settings=simulate.SHIFTED)
    np.testing.assert_array_equal(shifted_labels, labels)
    assert not np.array_equal(shifted, images)


def test_each_shift_group_moves_only_its_own_settings():
    images, labels = simulate.simulate(8, seed=3, size=32)
    moved_anywhere = set()
    for group, names in simulate.SHIFT_GROUPS.items():
        settings = simulate.shifted_in(group)
        for field in dataclasses.fields(simulate.Settings):
            expected = simulate.SHIFTED if field.name in names else simulate.DEFAULT
            assert getattr(settings, field.name) == getattr(expected, field.name), (group, field.name)
        moved_anywhere.update(names)
        shifted, shifted_labels = simulate.simulate(8, seed=3, size=32, settings=settings)
        np.testing.assert_array_equal(shifted_labels, labels)
        assert not np.array_equal(shifted, images), group
    # Together the groups move every setting that SHIFTED moves.
    assert moved_anywhere == {f.name for f in dataclasses.fields(simulate.Settings)
                              if getattr(simulate.SHIFTED, f.name) != getattr(simulate.DEFAULT, f.name)}


def test_unknown_version_and_settings_for_version_1_are_errors():
    with pytest.raises(AiryNetError, match="--sim_version=3"):
        simulate.simulate(1, 0, 16, version=3)
    with pytest.raises(AiryNetError, match="version 1"):
        simulate.simulate(1, 0, 16, version=1, settings=simulate.SHIFTED)


@pytest.fixture(scope="module")
def v2_shots():
    """400 version-2 shots of 64x64."""
    return simulate.simulate(400, seed=21, size=64)


def test_v2_shares_and_hierarchy(v2_shots):
    _, y = v2_shots
    y = y.astype(int)
    share = y.mean(0)
    tolerance = 4 * np.sqrt(simulate.CLASS_SHARES * (1 - simulate.CLASS_SHARES) / len(y))
    assert np.all(np.abs(share - simulate.CLASS_SHARES) < tolerance), (share, simulate.CLASS_SHARES)
    so, rnd, ell, pro, empty = (y[:, C[k]] for k in ("spherical_oblate", "round", "elliptical", "prolate", "empty"))
    np.testing.assert_array_equal(so + pro + empty, 1)
    np.testing.assert_array_equal(rnd + ell, so)
    assert np.all(y[:, C["streak"]] + y[:, C["bent"]] <= pro)
    assert np.all(y[:, [C[k] for k in MODIFIERS]].sum(1) <= so)


@pytest.mark.parametrize("size", [40, 259])
def test_v2_dtype_shape_and_deterministic_per_seed_and_index(size):
    images, labels = simulate.simulate(3, seed=8, size=size)
    assert images.dtype == np.uint16 and images.shape == (3, size, size)
    assert labels.dtype == np.int16 and labels.shape == (3, len(HELIUM_CLASSES))
    one, one_labels = simulate.simulate_shot(np.random.default_rng([8, 2]), size)
    np.testing.assert_array_equal(one, images[2])
    np.testing.assert_array_equal(one_labels, labels[2])


def test_v2_photons_span_over_three_decades_and_saturation_varies(v2_shots):
    images, labels = v2_shots
    hits = labels[:, C["empty"]] == 0
    total = images[hits].reshape(hits.sum(), -1).sum(1, dtype=np.int64)
    assert total.max() / total.min() > 1e3
    # Saturated shots plateau at their own detector's level, not all at 65535.
    peaks = images.reshape(len(images), -1).max(1)
    plateaus = [p for p, img in zip(peaks, images) if (img == p).sum() >= 5]
    assert len(plateaus) >= 10 and len(set(plateaus)) >= 5 and max(plateaus) <= 65535


def test_v2_beam_centre_detector_distance_and_masks_vary():
    rng = np.random.default_rng(0)
    geometries = [simulate._geometry(rng, 64, simulate.DEFAULT) for _ in range(50)]
    centres = np.array([(-g.x[0, 32], -g.y[32, 0]) for g in geometries])   # beam position on the crop
    assert np.all(np.abs(centres) <= simulate.DEFAULT.centre_offset + 1e-6) and centres.std(0).min() > 1.0
    distances = np.array([g.distance for g in geometries])
    assert distances.max() / distances.min() > 1.3
    images, _ = simulate.simulate(30, seed=4, size=64)
    masks = images == 0
    assert len({m.tobytes() for m in masks}) == len(masks)   # beam stop, holder, gaps, dead pixels differ
    # Not only the old cross of gaps through the centre: some shots record the central row or column.
    assert np.mean(masks[:, 32, :].mean(1) < 0.5) > 0.2


def test_v2_detector_gain_noise_hot_pixels_and_saturation():
    exact = dataclasses.replace(simulate.DEFAULT, gain=(4.0, 4.0), read_noise=(0.0, 0.0), hot=(1e-9, 1e-9),
                                saturation=(30000.0, 30000.0))
    live = np.ones((64, 64), bool)
    live[:4] = False
    rng = np.random.default_rng(1)
    adu = simulate._detector(rng, np.full((64, 64), 10.0, np.float32), live, exact)
    assert adu.dtype == np.uint16 and np.all(adu[:4] == 0)
    assert np.all(adu[4:] % 4 == 0) and abs(adu[4:].mean() / 4 - 10) < 0.3   # ADU = gain x photons
    assert np.all(simulate._detector(rng, np.full((64, 64), 1e5, np.float32), live, exact)[4:] == 30000)
    noisy = dataclasses.replace(exact, read_noise=(0.5, 0.5), hot=(0.01, 0.01))
    adu = simulate._detector(rng, np.zeros((64, 64), np.float32), live, noisy).astype(float)
    assert 5 < (adu[4:] > 6).sum() < 120   # hot pixels, at 20-100% of the saturation level
    assert 0.3 < np.mean((adu[4:] > 0) & (adu[4:] < 10)) < 0.7   # readout noise of 2 ADU rms, clipped at 0


@pytest.mark.parametrize("size", [64, 259])
def test_v2_newton_fringes_span_the_range_the_stored_size_resolves(size):
    g = simulate._geometry(np.random.default_rng(3), size, simulate.DEFAULT)
    low, high = simulate.newton_kdz_range(g)
    qz = g.q[2][size // 2]   # along the row through the crop centre (near the beam)
    step = np.abs(np.diff(qz[:8]))   # per stored pixel at the crop's edge
    assert high * step.max() <= 2 * np.pi / 2.4   # the finest fringes: >= 2.4 stored pixels apart
    assert high * step.max() >= 2 * np.pi / 3.5   # ... and not much coarser: the whole range is used
    assert 2.5 * np.pi < low * abs(g.q[2][size // 2, 0]) < 4 * np.pi   # the coarsest: ~1.5 dark fringes
