"""European XFEL detectors: which source and key hold the images, and how a train's array becomes shots.

Shared by the live classifier (nn/beamline/live.py, Karabo bridge messages), the run-directory reader
(nn/inputs/euxfel.py, EXtra-data trains) and the virtual CXI reader (nn/inputs/cxi.py): the first two hand
over the same {source: {key: value}} dicts.

A train's array becomes float32 frames [N, H, W]; how depends on its Layout, the first of LAYOUTS whose
shape test it passes:
  * a 2D frame (pnCCD, cameras) is one shot;
  * a modular detector (AGIPD1M, LPD1M, DSSC1M, JUNGFRAU, pnCCD) whose array matches its module layout
    is assembled into one image per pulse with EXtra-geom: `--geometry=FILE` (CrystFEL .geom) or
    EXtra-geom's example geometry. Pulse stacks come in the online order (modules, fs, ss, pulses) or
    the file order (pulses, modules, ss, fs); one module stack without pulses is one shot;
  * any other 3D array of an unknown detector is a stack (pulses, H, W).
Gaps between modules (NaN after assembly) become 0, as for photon counts no signal was measured there.

Facility runs keep a modular detector's modules in one source each (`SPB_DET_AGIPD1M-1/CORR/{m}CH0:output`
holding (pulses, 512, 128); JUNGFRAU `.../DET/JNGFR{m}:daqOutput` holding (memory cells, 512, 1024)), and a
TrainMatcher sends them so too, all of a train's modules in one bridge message. Such a source alone is never
taken as shots (its pulses would pass for modules): ModuleSources gathers a train's modules by module number
into the file layout (pulses, modules, ss, fs), which a Detector then assembles; find_modules finds them in a
bridge message by their names. Memory cells are pulses. `--pulses` (parse_pulses) picks a train's frames by
their index in the train.
"""
import collections
import re
from dataclasses import dataclass, replace

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

    def take(self, array, indices):
        """`array` with only its frames `indices` (sorted, as Pulses.pick gives them), in this layout. An
        array without pulses is one frame, and comes back as it is."""
        if not self.has_pulses or len(indices) == self.count(array):
            return array
        return np.take(array, indices, axis=self.axes.index("pulses"))

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
    """(kind, source-name pattern, EXtra-geom class, default geometry factory taking the module count)."""
    import extra_geom as eg
    return [("AGIPD1M", r"AGIPD1M", eg.AGIPD_1MGeometry, lambda n: eg.AGIPD_1MGeometry.example()),
            ("LPD1M", r"LPD1M", eg.LPD_1MGeometry, lambda n: eg.LPD_1MGeometry.example()),
            ("DSSC1M", r"DSSC1M", eg.DSSC_1MGeometry, lambda n: eg.DSSC_1MGeometry.example()),
            ("JUNGFRAU", r"JNGFR|JUNGFRAU|_JF\d", eg.JUNGFRAUGeometry, lambda n: eg.JUNGFRAUGeometry.example(n)),
            ("PNCCD", r"PNCCD", eg.PNCCDGeometry, lambda n: eg.PNCCDGeometry.example())]


def _detector_kind(source):
    """(kind, EXtra-geom class, default geometry factory) of the detector that `source` names, or None."""
    return next(((kind, cls, default) for kind, pattern, cls, default in _geometries() if re.search(pattern, source)),
                None)


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


# ----------------------------------------------------------------------------------------------
# Pulse selection (--pulses)

@dataclass(frozen=True)
class Pulses:
    """Which frames (pulses, memory cells) of each train to classify, by their index in the train as
    EXtra-data's `by_index` counts them: a slice, or a list of indices. Indices past a train's last
    frame select nothing in it. The default is every frame."""
    start: int = 0
    stop: int = None   # None: to the end of the train
    step: int = 1
    indices: tuple = None   # a list given instead of a slice

    def chosen(self, index):
        """Whether each frame of index `index` (an array of indices in their trains) is selected."""
        index = np.asarray(index)
        if self.indices is not None:
            return np.isin(index, self.indices)
        stop = np.inf if self.stop is None else self.stop
        return (index >= self.start) & (index < stop) & ((index - self.start) % self.step == 0)

    def pick(self, count):
        """The indices, in order, of the selected frames of a train of `count` frames."""
        return np.flatnonzero(self.chosen(np.arange(count)))

    def __str__(self):
        if self.indices is not None:
            return "pulses " + ",".join(map(str, self.indices))
        if self == Pulses():
            return "all pulses"
        step = "" if self.step == 1 else f":{self.step}"
        return f"pulses {self.start}:{'' if self.stop is None else self.stop}{step}"


def parse_pulses(text):
    """Pulses from the text of --pulses: '' (every frame), START:STOP[:STEP] (either end may be left
    out) or a comma list of indices such as 0,2,5."""
    text = text.strip()
    flag = f"--pulses={text}"
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) > 3:
                raise ValueError
            start, stop, step = (int(part) if part.strip() else None for part in parts + [""] * (3 - len(parts)))
            pulses = Pulses(start or 0, stop, 1 if step is None else step)
        else:
            pulses = Pulses(indices=tuple(sorted({int(part) for part in text.split(",")}))) if text else Pulses()
    except ValueError:
        raise AiryNetError(f"{flag}: expected START:STOP[:STEP] or a comma list of pulse indices, "
                           f"e.g. 0:64:2 or 0,5,9") from None
    numbers = pulses.indices or (pulses.start, pulses.stop or 0)
    if min(numbers) < 0:
        raise AiryNetError(f"{flag}: pulse indices count from 0 in each train; negative ones are not supported")
    if pulses.step < 1:
        raise AiryNetError(f"{flag}: the step must be at least 1")
    if pulses.stop is not None and pulses.stop <= pulses.start:
        raise AiryNetError(f"{flag}: selects no pulse (STOP must be greater than START)")
    return pulses


# ----------------------------------------------------------------------------------------------
# Detectors whose modules come as one source each

# The modular detectors whose modules come as one source each, as EXtra-data's components name them.
MODULE_KINDS = ("AGIPD1M", "LPD1M", "DSSC1M", "JUNGFRAU")

# A module's source, as the facility names them (EXtra-data's components read the same names): AGIPD, LPD
# and DSSC `NAME/CORR/{m}CH0:output` (corrected) or `NAME/DET/{m}CH0:xtdf` (raw, and corrected data before
# 2026), JUNGFRAU `NAME/DET/JNGFR{m}:daqOutput` (or MODULE_{m}, RECEIVER-{m}); `module` and `jf_module` hold
# the module number of the two, `output` the output channel.
MODULE_SOURCE = re.compile(r"(?P<detector>[^/]+)/(?P<stage>DET|CORR)/"
                           r"(?:(?P<module>\d+)CH\d+|(?:MODULE_|RECEIVER-|JNGFR)(?P<jf_module>\d+))(?::(?P<output>.*)|$)")
# The output channels that carry a module's frames. A TrainMatcher may send other channels of the same
# devices too (the correction's previews), and a run holds their control sources (no channel).
MODULE_OUTPUTS = ("output", "xtdf", "daqOutput")

Module = collections.namedtuple("Module", "detector stage kind index")


def module_of(source):
    """The Module whose frames `source` carries, or None: its detector, stage (CORR or DET), kind and index in
    the detector's module stack. AGIPD, LPD and DSSC number their modules from 0 in the source names, JUNGFRAU
    from 1 (JNGFR01); EXtra-geom counts from 0."""
    match = MODULE_SOURCE.match(source)
    known = _detector_kind(match["detector"]) if match and match["output"] in MODULE_OUTPUTS else None
    if known is None or known[0] not in MODULE_KINDS:
        return None
    kind = known[0]
    jungfrau = kind == "JUNGFRAU"
    number = match["jf_module"] if jungfrau else match["module"]
    return None if number is None else Module(match["detector"], match["stage"], kind, int(number) - jungfrau)


def module_key(kind, key=""):
    """The key of a modular detector's images: `key` where given, else image.data (data.adc for JUNGFRAU)."""
    return key or ("data.adc" if kind == "JUNGFRAU" else "image.data")


def find_modules(data, source="", key="", pulses=Pulses()):
    """The ModuleSources of a modular detector whose modules are sources of `data` (one Karabo bridge message),
    or None where there is none: the one `source` names (the detector, or one of its modules' sources), else
    the first by name. Its corrected (CORR) module sources are taken where the message has them, else its DET
    ones, as EXtra-data prefers corrected data; JUNGFRAU has as many modules as the highest number found."""
    modules = [module for module in map(module_of, data) if module]
    if source:
        named = MODULE_SOURCE.match(source)
        modules = [m for m in modules if m.detector == (named["detector"] if named else source)]
    if not modules:
        return None
    detector = min(m.detector for m in modules)
    modules = [m for m in modules if m.detector == detector]
    stage = "CORR" if any(m.stage == "CORR" for m in modules) else "DET"
    kind, cls, _ = _detector_kind(detector)
    n_modules, *module_shape = cls.expected_data_shape
    n_modules = n_modules or 1 + max(m.index for m in modules if m.stage == stage)
    positions = _module_positions(data, detector, stage, n_modules)
    if not positions:  # module numbers beyond the detector's
        return None
    return ModuleSources(detector, kind, module_key(kind, key), positions, n_modules, tuple(module_shape), pulses)


def _module_positions(data, detector, stage, n_modules):
    """(source, index) of the module sources of `detector` and `stage` in `data`, by index; indices past
    `n_modules` are left out (its geometry has no place for them)."""
    modules = ((source, module_of(source)) for source in data)
    return tuple(sorted(((source, m.index) for source, m in modules
                         if m and (m.detector, m.stage) == (detector, stage) and m.index < n_modules),
                        key=lambda position: position[1]))


class RawData(AiryNetError):
    """A detector's RAW data, which must be corrected before it can be classified."""


@dataclass(frozen=True)
class ModuleSources:
    """One modular detector whose modules come as one source each, as one EXtra-data train and one Karabo
    bridge message hold them: {source: {key: array}}. `stack` gathers a train's modules by module number.
    nn/inputs/euxfel.py finds the module sources of a run with EXtra-data, live mode those of each message
    by their names (find_modules, found_in).

    AGIPD, LPD and DSSC store a train's frames along the first axis, (pulses, ss, fs); their RAW data has
    one more axis, data and gain (AGIPD) or a single one (LPD, DSSC), before ss. JUNGFRAU stores its memory
    cells in one entry per train, (cells, ss, fs); each cell is a pulse."""
    detector: str       # e.g. SPB_DET_AGIPD1M-1
    kind: str           # the EXtra-data component: AGIPD1M, LPD1M, DSSC1M or JUNGFRAU
    key: str            # image.data (AGIPD, LPD, DSSC) or data.adc (JUNGFRAU)
    positions: tuple    # (source, index in the detector's module stack) of each module found
    n_modules: int      # the detector's; a module without data stays NaN, as EXtra-data fills it
    module_shape: tuple  # (ss, fs)
    pulses: Pulses = Pulses()

    def stack(self, train):
        """(frames [pulses, modules, ss, fs] float32, NaN where a module sent nothing; pulse IDs [pulses])
        of the pulses chosen by self.pulses. Raises an AiryNetError naming the source of a wrong array."""
        found = [(source, index, self._frames(source, train[source][self.key]))
                 for source, index in self.positions if self.key in train.get(source, {})]
        if not found:
            raise AiryNetError(f"{self.detector}: none of its {len(self.positions)} module sources holds {self.key}")
        counts = sorted({len(frames) for _, _, frames in found})
        if len(counts) > 1:
            raise AiryNetError(f"{self.detector} {self.key}: its modules hold different numbers of frames {counts}")
        picked = self.pulses.pick(counts[0])
        stacked = np.full((len(picked), self.n_modules, *self.module_shape), np.nan, np.float32)
        for _, index, frames in found:
            stacked[:, index] = frames[picked]
        return stacked, pulse_ids(train[found[0][0]], counts[0])[picked]

    def found_in(self, data):
        """The detector as one Karabo bridge message holds it: its module sources there, of the stage (CORR
        or DET) of self's. A module that comes late can be missing in one message and there in the next."""
        stage = module_of(self.positions[0][0]).stage
        return replace(self, positions=_module_positions(data, self.detector, stage, self.n_modules))

    def _frames(self, source, array):
        """A module's array of one train as frames (n, ss, fs); RAW data raises RawData."""
        array = np.asarray(array)
        if not _is_real(array.dtype):
            raise AiryNetError(f"{source} {self.key}: dtype {array.dtype} is not a real number")
        raw = self._raw(source, array)
        if raw:
            raise RawData(f"{source} {self.key}: RAW data ({raw}); the run must be corrected first: "
                          f"classify its CORR files (the proposal's proc/ folder)")
        if array.shape[-2:] == self.module_shape and (array.ndim == 3 or self.kind == "JUNGFRAU"):
            return array.reshape(-1, *self.module_shape)
        if array.shape == self.module_shape:  # a train of one frame, as a bridge may send it
            return array[None]
        raise AiryNetError(f"{source} {self.key}: shape {array.shape}, expected frames of {self.kind} modules "
                           f"(pulses, {self.module_shape[0]}, {self.module_shape[1]})")

    def _raw(self, source, array):
        """Why `array` is RAW data, as EXtra-data tells it, or ''."""
        if self.key.endswith(".mask"):  # CORR data's own mask (nn/inputs/euxfel.py): integer flags, not ADC values
            return ""
        if self.kind != "JUNGFRAU" and array.ndim == 4 and array.shape[-2:] == self.module_shape:
            return f"shape {array.shape}: " + ("data and gain interleaved" if array.shape[1] == 2 else
                                              "the extra axis of raw frames")
        if self.kind == "JUNGFRAU" and np.issubdtype(array.dtype, np.integer) and "/CORR/" not in source:
            return f"{array.dtype} ADC values"
        return ""

    def describe(self):
        return (f"{self.kind} {self.detector}, {len(self.positions)} of {self.n_modules} modules "
                f"({self.key}), {self.pulses}")


def pulse_ids(values, n):
    """The pulse IDs of a train of `n` frames if its source sends them (one per frame), else 0..n-1."""
    for k in PULSE_KEYS:
        ids = values.get(k)
        if isinstance(ids, np.ndarray) and ids.size == n:
            return ids.astype(np.int64).reshape(n)
    return np.arange(n, dtype=np.int64)


class Detector:
    """Turns one source's image array into float32 frames [N, H, W] and pulse IDs [N].

    Built from the first good train, whose shape chooses the Layout; later trains must have the same
    shape but for the pulse count."""

    def __init__(self, source, key, array, geometry_file=""):
        module = MODULE_SOURCE.match(source)
        if module:
            raise AiryNetError(f"{source} is one module of {module['detector']}: alone, its pulses would be taken "
                               f"for the detector's modules; a modular detector is read from all its module sources "
                               f"together (EuXFEL run directories, virtual CXI files, bridge messages)")
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
        return f"{self.source} {self.key}: {self.layout.name} layout {self.fixed_shape}, {self.describe_frames()}"

    def describe_frames(self):
        how = (f"assembled with EXtra-geom {type(self.geometry).__name__}" if self.geometry is not None
               else "as stored")
        return f"frames {self.frame_shape[0]}x{self.frame_shape[1]} {how}"

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

    def take(self, array, indices):
        """`array` with only its frames `indices` (--pulses), as Layout.take."""
        return self.layout.take(array, indices)

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
        return pulse_ids(values, self.count(array))


def _is_real(dtype):
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == np.bool_


def _layout(source, shape, geometry_file):
    """(Layout, EXtra-geom geometry or None) for an array of `shape` from `source`."""
    kind = _detector_kind(source)
    if geometry_file and kind is None:
        raise AiryNetError(f"--geometry={geometry_file}: cannot tell which detector {source} is "
                           f"(known: AGIPD1M, LPD1M, DSSC1M, JUNGFRAU, PNCCD in the source name)")
    _, cls, default = kind or (None, None, None)
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
