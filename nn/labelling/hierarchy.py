"""The helium classes' hierarchy (README, Synthetic data; the simulator draws its labels by it,
nn/inputs/simulate_v1.py: draw_labels), as a check of a labeller's choice.

Every shot is exactly one of spherical_oblate, prolate and empty; a spherical_oblate droplet is either
round or elliptical; a jet (streak or bent, at most one) belongs to a prolate droplet; asymmetric,
newton_rings, double_rings and layered (at most one) to a spherical_oblate one; empty stands alone.
"""
import numpy as np

from nn.config import HELIUM_CLASSES

C = {name: i for i, name in enumerate(HELIUM_CLASSES)}
KINDS = ("spherical_oblate", "prolate", "empty")
SHAPES = ("round", "elliptical")
JETS = ("streak", "bent")
MODIFIERS = ("asymmetric", "newton_rings", "double_rings", "layered")


def violation(classes):
    """-> None where the 0/1 vector `classes` [11] keeps the hierarchy, else a sentence saying why not.
    Vectors of any other length (datasets with other classes) have no hierarchy to keep."""
    classes = np.asarray(classes).astype(bool)
    if len(classes) != len(HELIUM_CLASSES):
        return None
    on = lambda names: [n for n in names if classes[C[n]]]
    kinds = on(KINDS)
    if len(kinds) != 1:
        return (f"choose exactly one of {', '.join(KINDS)} (chosen: {', '.join(kinds) or 'none'})")
    kind = kinds[0]
    if kind == "empty" and classes.sum() > 1:
        return "empty stands alone: no other class goes with it"
    shapes, jets, modifiers = on(SHAPES), on(JETS), on(MODIFIERS)
    if kind == "spherical_oblate" and len(shapes) != 1:
        return f"a spherical_oblate droplet is either round or elliptical (chosen: {', '.join(shapes) or 'neither'})"
    if kind != "spherical_oblate" and shapes:
        return f"{', '.join(shapes)} only with spherical_oblate"
    if jets and kind != "prolate" or len(jets) > 1:
        return f"one jet at most ({' or '.join(JETS)}), and only with prolate"
    if modifiers and kind != "spherical_oblate" or len(modifiers) > 1:
        return f"one of {', '.join(MODIFIERS)} at most, and only with spherical_oblate"
    return None
