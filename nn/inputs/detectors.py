"""European XFEL detectors: which source and key hold the images, and how a train's array becomes shots.

Shared by the live classifier (nn/beamline/live.py, Karabo bridge messages) and the run-directory reader
(nn/inputs/euxfel.py, EXtra-data trains): both hand over the same {source: {key: value}} dicts.

A train's array becomes float32 frames [N, H, W]:
  * a 2D frame (pnCCD, cameras) is one shot;
  * a modular detector (AGIPD1M, LPD1M, DSSC1M, JUNGFRAU, pnCCD) whose array matches its module layout
    is assembled into one image per pulse with EXtra-geom: `--geometry=FILE` (CrystFEL .geom) or
    EXtra-geom's example geometry. Pulse stacks come in the online order (modules, fs, ss, pulses) or
    the file order (pulses, modules, ss, fs); one module stack without pulses is one shot;
  * any other 3D array of an unknown detector is a stack (pulses, H, W).
Gaps between modules (NaN after assembly) become 0, as for photon counts no signal was measured there.
"""
import logging
import re

import numpy as np

from nn.config import AiryNetError, first_line

log = logging.getLogger("airynet")

IMAGE_KEYS = ("data.image", "image.data")  # pnCCD (SQS) and the XTDF detectors' corrected images
PULSE_KEYS = ("image.pulseId", "data.pulseId")


def _geometries():
    """(source-name pattern, EXtra-geom class, default geometry factory taking the module count)."""
    import extra_geom as eg
    return [(r"AGIPD1M", eg.AGIPD_1MGeometry, lambda n: eg.AGIPD_1MGeometry.example()),
            (r"LPD1M", eg.LPD_1MGeometry, lambda n: eg.LPD_1MGeometry.example()),
            (r"DSSC1M", eg.DSSC_1MGeometry, lambda n: eg.DSSC_1MGeometry.example()),
            (r"JNGFR|JUNGFRAU|_JF\d", eg.JUNGFRAUGeometry, lambda n: eg.JUNGFRAUGeometry.example(n)),
            (r"PNCCD", eg.PNCCDGeometry, lambda n: eg.PNCCDGeometry.example())]


def pick_source(data, source="", key=""):
    """(source, key) of the images in one train's `data`, or None where it has none.

    With both given they are taken as they are; otherwise the first source (sorted by name) with one of
    IMAGE_KEYS (or with `key`) is chosen."""
    if source and key:
        return (source, key) if key in data.get(source, {}) else None
    keys = (key,) if key else IMAGE_KEYS
    for name in ([source] if source else sorted(data)):
        for k in keys:
            if k in data.get(name, {}):
                return name, k
    return None


class Detector:
    """Turns one source's image array into float32 frames [N, H, W] and pulse IDs [N].

    Built from the first good train; later trains must have the same shape but for the pulse count."""

    def __init__(self, source, key, array, geometry_file=""):
        self.source, self.key = source, key
        array = np.asarray(array)
        if not _is_real(array.dtype):
            raise AiryNetError(f"{source} {key}: dtype {array.dtype} is not a real number")
        self.geometry, self.layout = _layout(source, array.shape, geometry_file)
        if self.geometry is not None:  # (H, W) of an assembled image
            self.assembled_shape = self.geometry.output_array_for_position().shape
        self.pulse_axis = {"frame": None, "modules": None, "online": -1, "file": 0, "stack": 0}[self.layout]
        self.fixed_shape = _without(array.shape, self.pulse_axis)
        frames = self.frames(array)
        self.frame_shape = frames.shape[1:]  # (H, W): the run's ori_height, ori_width

    def describe(self):
        how = (f"assembled with EXtra-geom {type(self.geometry).__name__}" if self.geometry is not None
               else "as stored")
        return (f"{self.source} {self.key}: {self.layout} layout {self.fixed_shape}, frames "
                f"{self.frame_shape[0]}x{self.frame_shape[1]} {how}")

    def problem(self, array):
        """A short description of what is wrong with `array` (the kind logged once), or None."""
        if not isinstance(array, np.ndarray):
            return f"{self.key} is not an array"
        if not _is_real(array.dtype):
            return f"dtype {array.dtype}"
        if array.ndim != len(self.fixed_shape) + (self.pulse_axis is not None) or \
                _without(array.shape, self.pulse_axis) != self.fixed_shape:
            return f"shape {array.shape} (expected {self.fixed_shape} plus pulses)" if self.pulse_axis is not None \
                else f"shape {array.shape} (expected {self.fixed_shape})"
        return None

    def count(self, array):
        return 1 if self.pulse_axis is None else array.shape[self.pulse_axis]

    def frames(self, array, out=None):
        """float32 [N, H, W] (NaN, as in the gaps of an assembled image, becomes 0); written into `out`
        where given, N frames of a buffer whose gap pixels hold 0 (assembly writes the modules only)."""
        array = np.asarray(array, dtype=np.float32)
        if self.layout == "online":  # (modules, fs, ss, pulses) -> (pulses, modules, ss, fs)
            array = array.transpose(3, 0, 2, 1)
        elif self.layout in ("frame", "modules"):
            array = array[None]
        if self.geometry is not None:
            # Into zeros (EXtra-geom leaves the gaps as they are): cheaper than a NaN-filled image made
            # anew and cleaned after, which took most of the live receiving CPU for 1-megapixel frames.
            if out is None:
                out = np.zeros((len(array), *self.assembled_shape), np.float32)
            self.geometry.position_modules(array, out=out)
        elif out is not None:
            out[...] = array
        else:
            out = array
        masked = np.isnan(out)
        if not masked.any():
            return out
        if out is array:  # the caller's array, which may be read-only (a bridge message's buffer)
            return np.where(masked, np.float32(0), out)
        out[masked] = 0
        return out

    def pulse_ids(self, values, array):
        """The pulse IDs of the train if the source sends them (one per frame), else 0..N-1."""
        n = self.count(array)
        for k in PULSE_KEYS:
            ids = values.get(k)
            if isinstance(ids, np.ndarray) and ids.size == n:
                return ids.astype(np.int64).reshape(n)
        return np.arange(n, dtype=np.int64)


def _is_real(dtype):
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == np.bool_


def _without(shape, axis):
    shape = list(shape)
    if axis is not None:
        del shape[axis]
    return tuple(shape)


def _layout(source, shape, geometry_file):
    """(geometry or None, layout) for an array of `shape` from `source`."""
    kind = next(((cls, default) for pattern, cls, default in _geometries() if re.search(pattern, source)), None)
    if geometry_file and kind is None:
        raise AiryNetError(f"--geometry={geometry_file}: cannot tell which detector {source} is "
                           f"(known: AGIPD1M, LPD1M, DSSC1M, JUNGFRAU, PNCCD in the source name)")
    if kind is not None:
        cls, default = kind
        module = tuple(cls.expected_data_shape[1:])  # (ss, fs) of one module
        layout = _module_layouts(shape, module, cls)
        if layout:
            n_modules = cls.n_modules or (shape[1] if layout == "file" else shape[0])
            return _geometry(cls, default, n_modules, geometry_file), layout
    if geometry_file:
        raise AiryNetError(f"--geometry={geometry_file}: {source} sends arrays of shape {shape}, which do not "
                           f"match the modules of {kind[0].__name__}")
    if len(shape) == 2:
        return None, "frame"
    if len(shape) == 3:
        return None, "stack"
    raise AiryNetError(f"{source}: images of shape {shape} are neither frames (H, W) nor stacks (pulses, H, W), "
                       f"nor the modules of a known detector")


def _module_layouts(shape, module, cls):
    """'modules' (m, ss, fs), 'file' (pulses, m, ss, fs), 'online' (m, fs, ss, pulses) or None."""
    ss, fs = module
    whole = (cls.n_modules * ss, fs) if cls.n_modules else None  # pnCCD stores both modules as one frame
    if len(shape) == 2 and shape == whole:
        return "frame"
    if len(shape) == 3 and shape[1:] == (ss, fs) and (not cls.n_modules or shape[0] == cls.n_modules):
        return "modules"
    if len(shape) == 4 and shape[2:] == (ss, fs) and (not cls.n_modules or shape[1] == cls.n_modules):
        return "file"
    if len(shape) == 4 and shape[1:3] == (fs, ss) and (not cls.n_modules or shape[0] == cls.n_modules):
        return "online"
    return None


def _geometry(cls, default, n_modules, geometry_file):
    if not geometry_file:
        return default(n_modules)
    try:
        return cls.from_crystfel_geom(geometry_file)
    except Exception as e:  # EXtra-geom and cfelpyutils raise many kinds for a bad file
        raise AiryNetError(f"--geometry={geometry_file}: not a CrystFEL geometry of a {cls.__name__[:-8]} "
                           f"({type(e).__name__}: {first_line(e)})") from e
