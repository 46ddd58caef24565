"""nn/labelling/selection.py: the orders --mode=label offers the shots in."""
import math

import numpy as np
import pytest

from nn.labelling import selection


def pool(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 11)), rng.uniform(0.2, 0.8, 11), rng.normal(size=(n, 16))


@pytest.mark.parametrize("method", ["uncertain", "diverse", "random"])
def test_every_order_is_a_permutation_reproducible_from_its_seed(method):
    p, t, f = pool()
    first = selection.order(method, p, t, f, seed=5)
    assert sorted(first) == list(range(len(p)))
    np.testing.assert_array_equal(first, selection.order(method, p, t, f, seed=5))
    if method != "uncertain":  # uncertain does not draw at random
        assert not np.array_equal(first, selection.order(method, p, t, f, seed=6))


def test_uncertainty_against_a_plain_python_computation():
    p, t, _ = pool(20)
    logit = lambda x: math.log(x / (1 - x))
    expected = [min(abs(logit(p[i, c]) - logit(t[c])) for c in range(11)) for i in range(20)]
    np.testing.assert_allclose(selection.uncertainty(p, t), expected, rtol=1e-9)


def test_farthest_first_against_brute_force():
    _, _, f = pool(60)
    f = selection.normalised(f)
    taken = [0]
    while len(taken) < 10:
        far = max((i for i in range(60) if i not in taken),
                  key=lambda i: (min(np.linalg.norm(f[i] - f[j]) for j in taken), -i))
        taken.append(far)
    assert list(selection.farthest_first(f, 10)) == taken


def test_uncertain_starts_with_the_most_uncertain_and_a_batch_is_not_copies_of_one_shot():
    p, t, f = pool(300)
    margin = selection.uncertainty(p, t)
    # 30 copies of one shot, all more uncertain than every other shot: exactly at the thresholds.
    p[:30], f[:30] = t, f[0]
    result = selection.order("uncertain", p, t, f, seed=0)
    assert result[0] == 0
    first_batch = result[:selection.BATCH]
    assert np.sum(first_batch < 30) == 1
    # Every shot of the first batch is among the CANDIDATES x BATCH most uncertain.
    margin[:30] = 0
    top = set(np.argsort(margin, kind="stable")[:selection.CANDIDATES * selection.BATCH])
    assert set(first_batch) <= top


def test_diverse_takes_next_the_shot_farthest_from_the_first():
    _, _, f = pool(100)
    result = selection.order("diverse", None, None, f, seed=3)
    unit = selection.normalised(f)
    distances = np.linalg.norm(unit - unit[result[0]], axis=1)
    assert result[1] == int(np.argmax(distances))
