"""European XFEL detectors: which source and key hold the images, and how a train's array becomes shots.

Shared by the live classifier (nn/beamline/live.py, Karabo bridge messages) and the run-directory reader
(nn/inputs/euxfel.py, EXtra-data trains): both hand over the same {source: {key: value}} dicts.

A train's array becomes float32 frames [N, H, W]; how depends on its Layout, the first of LAYOUTS whose
shape test it passes:
  * a 2D frame (pnCCD, cameras) is one shot;
  * a modular detector (AGIPD1M, LPD1M, DSSC1M, JUNGFRAU, pnCCD) whose array matches its module layout
    is assembled into one image per pulse with EXtra-geom: `--geometry=FILE` (CrystFEL .geom) or
    EXtra-geom's example geometry. Pulse stacks come in the online order (modules, fs, ss, pulses) or
    the file order (pulses, modules, ss, fs); one module stack without pulses is one shot;
  * any other 3D array of an unknown detector is a stack (pulses, H, W).
Gaps between modules (NaN after assembly) become 0, as for photon counts no signal was measured there.
"""
import re
from dataclasses import dataclass

import numpy as np

from nn.config import AiryNetError, first_line

IMAGE_KEYS = ("data.image", "image.data")  # pnCCD (SQS) and the XTDF detectors' corrected images
PULSE_KEYS = ("image.pulseId", "data.pulseId")

# The axes a layout may name, in the order frames are built from: EXtra-geom assembles (pulses, modules,
# ss, fs), and an image taken as stored is (pulses, height, width).
AXIS_ORDER = ("pulses", "modules", "rows", "ss", "fs", "height", "width")


@dataclass(frozen=True)
class Layout:
    """How one train's array holds its shots, told by what each of its axes is:

      pulses          the train's shots (absent: the array is one shot)
      modules         a modular detector's modules, each of ss x fs pixels (slow and fast scan)
      rows            the ss rows of all modules one after another (pnCCD stores its two as one image)
      height, width   an image taken as stored
    """
    name: str    # as the log line calls it
    axes: tuple

    @property
    def has_pulses(self):
        return "pulses" in self.axes

    @property
    def modular(self):
        """Whether the array holds a detector's modules, to be assembled with its geometry."""
        return "fs" in self.axes

    def fits(self, shape, sizes):
        """The shape test: whether an array of `shape` is in this layout. `sizes` holds the size of every
        axis the detector's arrays may have (None: any size); an axis it lacks rules the layout out."""
        return len(shape) == len(self.axes) and all(
            axis in sizes and sizes[axis] in (None, n) for axis, n in zip(self.axes, shape))

    def size(self, shape, axis):
        return shape[self.axes.index(axis)]

    def count(self, array):
        """The number of shots (frames) in `array`."""
        return self.size(array.shape, "pulses") if self.has_pulses else 1

    def without_pulses(self, shape):
        """What every train's array of this source shares: its shape less the pulse count."""
        return tuple(n for axis, n in zip(self.axes, shape) if axis != "pulses")

    def pulses_first(self, array):
        """`array` as (pulses, modules, ss, fs), (pulses, rows, fs) or (pulses, height, width): a view."""
        array = array.transpose(sorted(range(array.ndim), key=lambda i: AXIS_ORDER.index(self.axes[i])))
        return array if self.has_pulses else array[None]

    def frames(self, array, out=None, geometry=None):
        """float32 [N, H, W] with NaN (masked pixels, gaps) set to 0, written into `out` where given. A
        modular layout is assembled with the EXtra-geom `geometry`, which writes the modules only: the gap
        pixels of `out` must hold 0 already."""
        array = self.pulses_first(np.asarray(array, dtype=np.float32))
        if self.modular:
            out, _ = geometry.position_modules(array, out=out)
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


# An array that does not match a known detector's modules is taken as stored.
FRAME = Layout("frame", ("height", "width"))                   # one shot: cameras, a pnCCD frame cut small
STACK = Layout("stack", ("pulses", "height", "width"))
WHOLE = Layout("frame", ("rows", "fs"))                        # one shot of all modules as one image (pnCCD)
MODULES = Layout("modules", ("modules", "ss", "fs"))           # one shot's modules
FILE = Layout("file", ("pulses", "modules", "ss", "fs"))       # as EXtra-data reads the run files
ONLINE = Layout("online", ("modules", "fs", "ss", "pulses"))   # as the Karabo bridge sends them

# Tried in this order: a known detector's modules before images taken as stored.
LAYOUTS = (WHOLE, MODULES, FILE, ONLINE, FRAME, STACK)


def axis_sizes(geometry_class=None):
    """The size of every axis a detector's arrays may have (None: any size): those of an image taken as
    stored, and with the EXtra-geom class of a modular detector, those of its modules."""
    sizes = {"pulses": None, "height": None, "width": None}
    if geometry_class is not None:
        n_modules, ss, fs = geometry_class.expected_data_shape  # n_modules 0: any number (JUNGFRAU)
        sizes.update(modules=n_modules or None, ss=ss, fs=fs)
        if n_modules:  # one image of all modules can be cut into them only where their number is known
            sizes["rows"] = n_modules * ss
    return sizes


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

    Built from the first good train, whose shape chooses the Layout; later trains must have the same
    shape but for the pulse count."""

    def __init__(self, source, key, array, geometry_file=""):
        self.source, self.key = source, key
        array = np.asarray(array)
        if not _is_real(array.dtype):
            raise AiryNetError(f"{source} {key}: dtype {array.dtype} is not a real number")
        self.layout, self.geometry = _layout(source, array.shape, geometry_file)
        if self.geometry is not None:  # (H, W) of an assembled image
            self.assembled_shape = self.geometry.output_array_for_position().shape
        self.fixed_shape = self.layout.without_pulses(array.shape)
        self.frame_shape = self.frames(array).shape[1:]  # (H, W): the run's ori_height, ori_width

    def describe(self):
        how = (f"assembled with EXtra-geom {type(self.geometry).__name__}" if self.geometry is not None
               else "as stored")
        return (f"{self.source} {self.key}: {self.layout.name} layout {self.fixed_shape}, frames "
                f"{self.frame_shape[0]}x{self.frame_shape[1]} {how}")

    def problem(self, array):
        """A short description of what is wrong with `array` (the kind logged once), or None."""
        if not isinstance(array, np.ndarray):
            return f"{self.key} is not an array"
        if not _is_real(array.dtype):
            return f"dtype {array.dtype}"
        if array.ndim != len(self.layout.axes) or self.layout.without_pulses(array.shape) != self.fixed_shape:
            pulses = " plus pulses" if self.layout.has_pulses else ""
            return f"shape {array.shape} (expected {self.fixed_shape}{pulses})"
        return None

    def count(self, array):
        return self.layout.count(array)

    def frames(self, array, out=None):
        """float32 [N, H, W] (NaN, as in the gaps of an assembled image, becomes 0); written into `out`
        where given, N frames of a buffer whose gap pixels hold 0 (assembly writes the modules only)."""
        if out is None and self.geometry is not None:
            # Into zeros (EXtra-geom leaves the gaps as they are): cheaper than a NaN-filled image made
            # anew and cleaned after, which took most of the live receiving CPU for 1-megapixel frames.
            out = np.zeros((self.count(array), *self.assembled_shape), np.float32)
        return self.layout.frames(array, out, self.geometry)

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


def _layout(source, shape, geometry_file):
    """(Layout, EXtra-geom geometry or None) for an array of `shape` from `source`."""
    kind = next(((cls, default) for pattern, cls, default in _geometries() if re.search(pattern, source)), None)
    if geometry_file and kind is None:
        raise AiryNetError(f"--geometry={geometry_file}: cannot tell which detector {source} is "
                           f"(known: AGIPD1M, LPD1M, DSSC1M, JUNGFRAU, PNCCD in the source name)")
    cls, default = kind or (None, None)
    layout = next((candidate for candidate in LAYOUTS if candidate.fits(shape, axis_sizes(cls))), None)
    if geometry_file and not (layout and layout.modular):
        raise AiryNetError(f"--geometry={geometry_file}: {source} sends arrays of shape {shape}, which do not "
                           f"match the modules of {cls.__name__}")
    if layout is None:
        raise AiryNetError(f"{source}: images of shape {shape} are neither frames (H, W) nor stacks (pulses, H, W), "
                           f"nor the modules of a known detector")
    if not layout.modular:
        return layout, None
    n_modules = cls.n_modules or layout.size(shape, "modules")
    return layout, _geometry(cls, default, n_modules, geometry_file)


def _geometry(cls, default, n_modules, geometry_file):
    if not geometry_file:
        return default(n_modules)
    try:
        return cls.from_crystfel_geom(geometry_file)
    except Exception as e:  # EXtra-geom and cfelpyutils raise many kinds for a bad file
        raise AiryNetError(f"--geometry={geometry_file}: not a CrystFEL geometry of a {cls.__name__[:-8]} "
                           f"({type(e).__name__}: {first_line(e)})") from e
