"""--mask: the pixels of a detector that record nothing useful (beam stop, module gaps, dead and hot pixels),
for the frame as the network's preprocessing receives it (assembled, before the crop).

    bad = masks.load(cfg.mask, cfg.mask_good, (cfg.ori_height, cfg.ori_width))   # bool [H, W] or None
    images = preprocess(images, cfg, recipe, mask=bad)   # masked pixels read MASKED_VALUE

FILE.npy holds the mask; FILE.h5:/path (or .hdf5, .cxi) a dataset in an HDF5 file. Nonzero is bad, as
CXI pixel masks and EuXFEL's CORR image.mask have it; with --mask_good nonzero is good (1 = good, 0 = bad),
as Cheetah and CrystFEL write their masks. The mask belongs to the data, not to the run: it is given per
invocation, never taken from a run's config.json.
"""
import functools
import logging
import os

import h5py
import numpy as np

from nn.config import AiryNetError

log = logging.getLogger("airynet")

# What masked pixels read: what the simulator's beam stop, gaps and dead pixels, the CXI readers' masked
# pixels and EuXFEL's missing modules read too, so that a mask turns bad pixels into what the network has
# always seen where a detector records nothing. The recipe's area downsampling leaves them out of each
# area's mean (nn/inputs/preprocess.py: area_resize), which needs this to be 0.
MASKED_VALUE = 0
HDF5_SUFFIXES = (".h5", ".hdf5", ".cxi", ".nxs")


def _split(spec):
    """'FILE.h5:/path' -> (FILE.h5, /path); 'FILE.npy' -> (FILE.npy, None)."""
    for suffix in HDF5_SUFFIXES:
        head, sep, inner = spec.partition(suffix + ":")
        if sep:
            return head + suffix, inner
    return spec, None


def _read(spec):
    path, inner = _split(spec)
    if not os.path.isfile(path):
        raise AiryNetError(f"--mask={spec}: {path} does not exist")
    try:
        if inner is None:
            if not path.endswith(".npy"):
                raise AiryNetError(f"--mask={spec}: expected FILE.npy or FILE.h5:/path/to/dataset")
            return np.load(path, allow_pickle=False)
        with h5py.File(path, "r") as h5:
            if not isinstance(h5.get(inner), h5py.Dataset):
                raise AiryNetError(f"--mask={spec}: {path} has no dataset {inner}")
            return h5[inner][()]
    except (OSError, ValueError) as e:
        raise AiryNetError(f"--mask={spec}: cannot read {path} ({e})") from None


@functools.lru_cache(maxsize=4)  # each mode asks once per data set; the log says it once
def load(spec, good, shape):
    """The mask of `spec` (--mask) as a read-only bool array [H, W], True = masked; None without one.
    good: nonzero marks good pixels (--mask_good). shape: (H, W) of the frames the mask must fit."""
    if not spec:
        return None
    values = _read(spec)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim != 2 or values.dtype.kind not in "biuf":
        raise AiryNetError(f"--mask={spec}: expected a 2-D array of numbers, got {values.dtype} {values.shape}")
    if tuple(values.shape) != tuple(shape):
        raise AiryNetError(f"--mask={spec}: the mask is {values.shape[0]}x{values.shape[1]}, the frames are "
                           f"{shape[0]}x{shape[1]} (assembled, before the crop)")
    bad = (values == 0) if good else (values != 0)
    bad.setflags(write=False)
    log.info("--mask=%s: %d of %d pixels (%.2f%%) masked (%s): set to %s before the crop, left out of area "
             "downsampling", spec, bad.sum(), bad.size, 100 * bad.mean(), "zero = bad" if good else "nonzero = bad",
             MASKED_VALUE)
    return bad


def record(spec, good):
    """The mask as outputs record it (metrics.json, h5 attributes): {} without one."""
    if not spec:
        return {}
    path, inner = _split(spec)
    return {"mask": os.path.abspath(path) + (f":{inner}" if inner else ""),
            "mask_polarity": "nonzero = good" if good else "nonzero = bad"}
