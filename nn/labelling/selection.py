"""The order in which --mode=label offers the shots (--select), reproducible from a seed:

  * uncertain: closest to the decision thresholds first, with a diversity step: the shots are taken in
    batches of BATCH, each picked from the CANDIDATES x BATCH most uncertain shots left by farthest-first
    traversal of the network's features, starting from the most uncertain, so that a batch is not twenty
    copies of one shot;
  * diverse: farthest-first traversal of the features from a seeded random shot (for the first
    DIVERSE_LIMIT shots, which bounds its cost at DIVERSE_LIMIT x N distances; the rest follow at random);
  * random: a seeded permutation.

Uncertainty is the smallest distance over the classes between a shot's logit and its class's threshold
logit: a shot is uncertain when any of its decisions is.
"""
import numpy as np

BATCH = 20
CANDIDATES = 4
DIVERSE_LIMIT = 1000
EPS = 1e-6


def order(method, probabilities, thresholds, features, seed):
    """-> indices of the shots [N] in the order `method` offers them. probabilities [N, C]; thresholds [C]
    (0.5 for the original rule); features [N, K] (the network's pooled last-block activations)."""
    features = normalised(features)
    if method == "uncertain":
        return uncertain_order(uncertainty(probabilities, thresholds), features)
    if method == "diverse":
        return diverse_order(features, seed)
    if method == "random":
        return np.random.default_rng(seed).permutation(len(features))
    raise ValueError(f"unknown selection {method!r}")


def logit(p):
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def uncertainty(probabilities, thresholds):
    """[N]: min over the classes of |logit(p) - logit(threshold)|; smaller is more uncertain."""
    return np.min(np.abs(logit(probabilities) - logit(thresholds)[None, :]), axis=1)


def normalised(features):
    """Features [N, K] scaled to unit length, so that distances compare what is active, not how strongly."""
    features = np.asarray(features, np.float64).reshape(len(features), -1)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), EPS)


def farthest_first(features, count, first=0):
    """-> `count` row indices of `features`: `first`, then each time the row farthest from those taken
    (ties: the lowest index)."""
    taken = [first]
    distance = np.linalg.norm(features - features[first], axis=1)
    distance[first] = -1.0
    while len(taken) < min(count, len(features)):
        nxt = int(np.argmax(distance))
        taken.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(features - features[nxt], axis=1))
        distance[taken] = -1.0
    return np.array(taken, np.int64)


def uncertain_order(margin, features):
    remaining = np.argsort(margin, kind="stable")
    result = []
    while len(remaining):
        candidates = remaining[:CANDIDATES * BATCH]
        picked = candidates[farthest_first(features[candidates], BATCH)]
        result.extend(picked)
        remaining = remaining[~np.isin(remaining, picked)]
    return np.array(result, np.int64)


def diverse_order(features, seed):
    rng = np.random.default_rng(seed)
    n = len(features)
    if n == 0:
        return np.zeros(0, np.int64)
    head = farthest_first(features, DIVERSE_LIMIT, first=int(rng.integers(n)))
    rest = np.setdiff1d(np.arange(n), head)
    return np.concatenate([head, rng.permutation(rest)]).astype(np.int64)
