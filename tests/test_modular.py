"""Modular EuXFEL detectors whose modules are one source each (AGIPD, LPD, DSSC, JUNGFRAU), in run directories
and EXtra-data's virtual CXI files, checked against EXtra-geom's own assembly of EXtra-data's own arrays of
the same mock runs (written with EXtra-data's test writer)."""
import logging
import os

import extra_data
import extra_geom
import h5py
import numpy as np
import pytest
import tensorflow as tf
from extra_data import by_index
from extra_data.components import AGIPD1M, DSSC1M, JUNGFRAU, LPD1M
from extra_data.tests.mockdata import write_file
from extra_data.tests.mockdata.base import DeviceBase
from extra_data.tests.mockdata.detectors import AGIPDModule, DSSCModule, LPDModule
from extra_data.tests.mockdata.jungfrau import JUNGFRAUModule

from conftest import make_cfg
from test_predict import cfg_for, tiny_model
from nn import inference, predict
from nn.recipe import PAPER
from nn.config import AiryNetError
from nn.inputs import cxi, detectors, euxfel
from nn.inputs.preprocess import preprocess

CELLS = 3  # JUNGFRAU memory cells a train in these runs (the mock's 16 would make large files)

# kind: (detector name, EXtra-data component, mock module class, data key, EXtra-geom geometry)
KINDS = {
    "AGIPD": ("SPB_DET_AGIPD1M-1", AGIPD1M, AGIPDModule, "image.data", extra_geom.AGIPD_1MGeometry.example()),
    "LPD": ("FXE_DET_LPD1M-1", LPD1M, LPDModule, "image.data", extra_geom.LPD_1MGeometry.example()),
    "DSSC": ("SCS_DET_DSSC1M-1", DSSC1M, DSSCModule, "image.data", extra_geom.DSSC_1MGeometry.example()),
    "JUNGFRAU": ("SPB_IRDA_JF4M", JUNGFRAU, None, "data.adc", extra_geom.JUNGFRAUGeometry.example(2)),
}


class FewCellsJungfrau(JUNGFRAUModule):
    @property
    def instrument_keys(self):
        return [(key, dtype, (CELLS,) + dims[1:]) for key, dtype, dims in super().instrument_keys]


def pattern(rng, shape, module, raw):
    """Counts that differ in every module and frame, the module's number in their offset: any module put in
    the wrong place, or pulses taken for modules, changes the frames."""
    values = rng.gamma(0.5, 40.0, shape) + 100 * module
    return values.astype(np.uint16 if raw else np.float32)


def write_xtdf_run(directory, kind, trains=2, pulses=2, raw=False, modules=range(16), late=()):
    """A run as the facility writes it: one file per module, source NAME/CORR/{m}CH0:output holding image.data
    (pulses, ss, fs), or with raw=True NAME/DET/{m}CH0:xtdf holding (pulses, 2 or 1, ss, fs) uint16. Modules
    in `late` have no data in the first train."""
    name, _, module_class, _, _ = KINDS[kind]
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(len(kind))
    for m in modules:
        device = f"{name}/{'DET' if raw else 'CORR'}/{m}CH0"
        channel = "xtdf" if raw else "output"
        path = os.path.join(directory, f"{'RAW' if raw else 'CORR'}-R0042-{kind}{m:02}-S00000.h5")
        first = 1 if m in late else 0
        write_file(path, [module_class(device, channel_name=channel, raw=raw, frames_per_train=pulses)],
                   ntrains=trains - first, firsttrain=10000 + first, chunksize=trains, format_version="1.2")
        with h5py.File(path, "r+") as f:
            data = f[f"INSTRUMENT/{device}:{channel}/image/data"]
            data[...] = pattern(rng, data.shape, m, raw)
    return directory


def write_jungfrau_run(directory, trains=2, raw=False, modules=(1, 2)):
    """JUNGFRAU modules as one source each, NAME/DET/JNGFR{m}:daqOutput holding data.adc (cells, 512, 1024)
    per train, float32 (corrected) or uint16 (raw)."""
    name = KINDS["JUNGFRAU"][0]
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(4)
    for m in modules:
        device = f"{name}/DET/JNGFR{m:02}"
        path = os.path.join(directory, f"{'RAW' if raw else 'CORR'}-R0042-JNGFR{m:02}-S00000.h5")
        write_file(path, [FewCellsJungfrau(device, raw=raw)], ntrains=trains, chunksize=trains, format_version="1.2")
        with h5py.File(path, "r+") as f:
            data = f[f"INSTRUMENT/{device}:daqOutput/data/adc"]
            data[...] = pattern(rng, data.shape, m, raw)
    return directory


def extra_geom_frames(directory, kind, pulses=np.s_[:]):
    """(frames [N, H, W], train IDs [N], pulse IDs [N]): EXtra-data's array of the run, assembled by EXtra-geom
    (NaN, where modules have no data, 0)."""
    name, component, _, key, geometry = KINDS[kind]
    det = component(extra_data.RunDirectory(directory))
    if kind == "JUNGFRAU":  # memory cells are pulses (EXtra-geom takes EXtra-data's module numbers from 1)
        array = det.get_array(key).isel(cell=pulses).rename(cell="pulse")
        ids = np.arange(CELLS)[pulses]
    else:
        array = det.get_array(key, pulses=by_index[pulses])
        ids = array.pulse.values
    frames, _ = geometry.position_modules(array.transpose("module", "train", "pulse", ...))
    return (np.nan_to_num(frames.reshape(-1, *frames.shape[-2:]), nan=0.0),
            np.repeat(array.train.values, len(ids)).astype(np.int64), np.tile(ids, len(array.train)).astype(np.int64))


def our_shots(directory, *flags):
    """(frames [N, H, W], train IDs [N], pulse IDs [N]) as the run reader yields them."""
    cfg = make_cfg(f"--data_dir={os.path.dirname(directory)}/", f"--dataset={os.path.basename(directory)}", *flags)
    shots = list(euxfel.records(cfg, directory).as_numpy_iterator())
    return (np.stack([s["image"][..., 0] for s in shots]), np.array([s["bunch_id"] for s in shots]),
            np.array([s["pulse"] for s in shots]))


def assert_same_shots(ours, expected):
    for got, want in zip(ours, expected):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def agipd_run(tmp_path_factory):
    """AGIPD-1M CORR run: 16 module sources, 2 trains of 16 pulses (as many pulses as modules)."""
    return write_xtdf_run(str(tmp_path_factory.mktemp("agipd") / "r0042"), "AGIPD", pulses=16)


def test_agipd_corr_run_gives_one_assembled_shot_per_pulse(agipd_run, caplog):
    with caplog.at_level(logging.INFO, logger="airynet"):
        ours = our_shots(agipd_run)
    expected = extra_geom_frames(agipd_run, "AGIPD")
    assert len(ours[0]) == 2 * 16 and ours[0].shape[1:] == (1256, 1092)
    assert_same_shots(ours, expected)
    np.testing.assert_array_equal(ours[1], np.repeat([10000, 10001], 16))
    np.testing.assert_array_equal(ours[2], np.tile(np.arange(16), 2))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("EuXFEL run"))
    assert "AGIPD1M SPB_DET_AGIPD1M-1, 16 of 16 modules" in line and "frames 1256x1092" in line


@pytest.mark.parametrize("kind", ["LPD", "DSSC", "JUNGFRAU"])
def test_other_detectors_match_extra_geom(tmp_path, kind, caplog):
    directory = str(tmp_path / "r0042")
    if kind == "JUNGFRAU":  # memory cells come out as shots, never as modules
        write_jungfrau_run(directory)
    else:
        write_xtdf_run(directory, kind, pulses=3)
    with caplog.at_level(logging.INFO, logger="airynet"):
        ours = our_shots(directory)
    assert len(ours[0]) == 2 * 3
    assert_same_shots(ours, extra_geom_frames(directory, kind))
    modules = "2 of 2" if kind == "JUNGFRAU" else "16 of 16"
    assert f"{modules} modules" in caplog.text


def test_modules_missing_in_a_train_or_the_whole_run_are_zero(tmp_path, caplog):
    """EXtra-data's conventions: trains with at least one module are read, missing modules NaN, so 0 after
    assembly; the log line says so."""
    directory = write_xtdf_run(str(tmp_path / "r0042"), "LPD", modules=[m for m in range(16) if m != 9], late=(5,))
    with caplog.at_level(logging.INFO, logger="airynet"):
        ours = our_shots(directory)
    expected = extra_geom_frames(directory, "LPD")
    assert_same_shots(ours, expected)
    assert "15 of 16 modules" in caplog.text and "1 lacking some modules: missing modules are 0" in caplog.text
    assert (ours[0][0] == 0).sum() > (ours[0][-1] == 0).sum()  # module 5 missing in the first train only


@pytest.mark.parametrize("text,selection", [("1:16:5", np.s_[1:16:5]), ("0,3,15", [0, 3, 15]), ("14:", np.s_[14:])])
def test_pulse_selection_picks_extra_datas_pulses(agipd_run, text, selection):
    ours = our_shots(agipd_run, f"--pulses={text}")
    assert_same_shots(ours, extra_geom_frames(agipd_run, "AGIPD", selection))


def test_jungfrau_memory_cells_are_selected_like_pulses(tmp_path):
    directory = write_jungfrau_run(str(tmp_path / "r0042"))
    ours = our_shots(directory, "--pulses=1:")
    assert_same_shots(ours, extra_geom_frames(directory, "JUNGFRAU", np.s_[1:]))
    np.testing.assert_array_equal(ours[2], [1, 2, 1, 2])


def test_pulse_selection_of_a_single_source_stack(tmp_path):
    """--pulses also picks the frames of a stack (pulses, H, W) in one source, as a camera sends it."""

    class Camera(DeviceBase):
        output_channels = ("output/data",)
        instrument_keys = [("image", "f4", (3, 8, 8))]

    directory = tmp_path / "r0042"
    os.makedirs(directory)
    path = str(directory / "CORR-R0042-CAM01-S00000.h5")
    write_file(path, [Camera("SQS_EXP_CAM/DET/CAMERA")], ntrains=2, chunksize=2)
    stacks = np.random.default_rng(5).random((2, 3, 8, 8), np.float32)
    with h5py.File(path, "r+") as f:
        f["INSTRUMENT/SQS_EXP_CAM/DET/CAMERA:output/data/image"][:2] = stacks
    frames, train_ids, pulses = our_shots(str(directory), "--pulses=0,2")
    np.testing.assert_array_equal(frames, stacks[:, [0, 2]].reshape(4, 8, 8))
    assert list(train_ids) == [10000, 10000, 10001, 10001] and list(pulses) == [0, 2, 0, 2]


def cxi_shots(path, *flags):
    cfg = make_cfg(*flags)
    reader = cxi.open_cxi(path, cfg, needs_labels=False)
    shots = list(cxi.records([reader], cfg, None, one_pass=True).as_numpy_iterator())
    return (np.stack([s["image"][..., 0] for s in shots]), np.array([s["bunch_id"] for s in shots]),
            np.array([s["pulse"] for s in shots]))


def test_virtual_cxi_gives_the_runs_shots(agipd_run, tmp_path):
    path = str(tmp_path / "r0042.cxi")
    AGIPD1M(extra_data.RunDirectory(agipd_run)).write_virtual_cxi(path)
    assert_same_shots(cxi_shots(path), our_shots(agipd_run))
    assert_same_shots(cxi_shots(path, "--pulses=0,3,15"), our_shots(agipd_run, "--pulses=0,3,15"))


def test_virtual_cxi_of_jungfrau_and_of_missing_modules(tmp_path):
    jungfrau = write_jungfrau_run(str(tmp_path / "jf"))
    JUNGFRAU(extra_data.RunDirectory(jungfrau)).write_virtual_cxi(str(tmp_path / "jf.cxi"))
    assert_same_shots(cxi_shots(str(tmp_path / "jf.cxi")), extra_geom_frames(jungfrau, "JUNGFRAU"))
    lpd = write_xtdf_run(str(tmp_path / "lpd"), "LPD", late=(2,))
    LPD1M(extra_data.RunDirectory(lpd)).write_virtual_cxi(str(tmp_path / "lpd.cxi"))
    assert_same_shots(cxi_shots(str(tmp_path / "lpd.cxi")), extra_geom_frames(lpd, "LPD"))


def test_prediction_equals_the_network_on_extra_geoms_frames(agipd_run, tmp_path):
    """The whole offline path (run directory, and its virtual CXI file) against the network fed EXtra-geom's
    frames directly."""
    model = tiny_model()
    cfg = cfg_for(tmp_path, f"--data_dir={os.path.dirname(agipd_run)}/", "--dataset=r0042", "--gradcam=false")
    predict.run(cfg, PAPER, model)
    frames, train_ids, pulse_ids = extra_geom_frames(agipd_run, "AGIPD")
    expected = inference.make_step(cfg, model, maps=None)(preprocess(tf.constant(frames[..., None]), cfg, PAPER))
    os.makedirs(tmp_path / "cxi")
    AGIPD1M(extra_data.RunDirectory(agipd_run)).write_virtual_cxi(str(tmp_path / "cxi" / "r0042.cxi"))
    from_cxi = cfg_for(tmp_path / "cxi", f"--data_dir={tmp_path}/", "--dataset=cxi", "--gradcam=false")
    predict.run(from_cxi, PAPER, model)
    for h5_path in (tmp_path / "pred" / "r0042.h5", tmp_path / "cxi" / "pred" / "cxi.h5"):
        with h5py.File(h5_path, "r") as f:
            np.testing.assert_array_equal(f["bids"][:], train_ids)
            np.testing.assert_array_equal(f["pulses"][:], pulse_ids)
            np.testing.assert_allclose(f["probs"][:], expected["probabilities"].numpy(), atol=1e-4)
            np.testing.assert_array_equal(f["preds"][:], expected["classes"].numpy())


def one_line_error(call):
    with pytest.raises(AiryNetError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_raw_data_must_be_corrected_first(tmp_path):
    agipd = write_xtdf_run(str(tmp_path / "agipd"), "AGIPD", trains=1, raw=True, modules=range(2))
    message = one_line_error(lambda: our_shots(agipd))
    assert "SPB_DET_AGIPD1M-1/DET/0CH0:xtdf" in message and "RAW" in message and "data and gain" in message
    assert "must be corrected first" in message and "CORR" in message
    AGIPD1M(extra_data.RunDirectory(agipd), raw=True).write_virtual_cxi(str(tmp_path / "agipd.cxi"))
    message = one_line_error(lambda: cxi.open_cxi(str(tmp_path / "agipd.cxi"), make_cfg(), needs_labels=False))
    assert "agipd.cxi: RAW SPB_DET_AGIPD1M-1 data" in message and "must be corrected first" in message
    jungfrau = write_jungfrau_run(str(tmp_path / "jf"), trains=1, raw=True, modules=(1,))
    message = one_line_error(lambda: our_shots(jungfrau))
    assert "JNGFR01:daqOutput data.adc: RAW data (uint16 ADC values)" in message


def test_a_module_source_alone_is_refused():
    """What live would do with one module's source: its 16 pulses would pass for AGIPD's 16 modules."""
    message = one_line_error(lambda: detectors.Detector("SPB_DET_AGIPD1M-1/CORR/0CH0:output", "image.data",
                                                        np.zeros((16, 512, 128), np.float32)))
    assert "one module of SPB_DET_AGIPD1M-1" in message
    assert detectors.MODULE_SOURCE.match("SPB_IRDA_JF4M/DET/JNGFR03:daqOutput")
    assert not detectors.MODULE_SOURCE.match("SPB_DET_AGIPD1M-1/CAL/APPEND_CORRECTED")


def test_module_sources_gather_a_bridge_message():
    """A Karabo bridge message is the same {source: {key: array}} dict as an EXtra-data train: modules go
    to their numbers, a missing one is NaN, the pulse IDs come along, RAW data raises."""
    sources = tuple((f"DET/CORR/{m}CH0:output", m) for m in (0, 2, 3))
    modules = detectors.ModuleSources("DET", "AGIPD1M", "image.data", sources, 4, (5, 3),
                                      detectors.parse_pulses("1:"))
    message = {source: {"image.data": np.full((3, 5, 3), m, np.uint16), "image.pulseId": np.array([8, 9, 10])}
               for source, m in sources[:2]}
    stacked, ids = modules.stack(message)
    assert stacked.shape == (2, 4, 5, 3) and stacked.dtype == np.float32 and list(ids) == [9, 10]
    assert (stacked[:, 0] == 0).all() and (stacked[:, 2] == 2).all() and np.isnan(stacked[:, [1, 3]]).all()
    message[sources[0][0]]["image.data"] = np.zeros((3, 2, 5, 3), np.uint16)
    assert "RAW data (shape (3, 2, 5, 3): data and gain interleaved)" in one_line_error(lambda: modules.stack(message))


def test_module_sources_are_found_by_their_names():
    """What live mode finds in one bridge message: a detector's modules by the numbers in their source names
    (JUNGFRAU's from 1), corrected (CORR) sources over DET ones, only the channels that carry frames."""
    agipd, jungfrau = "SPB_DET_AGIPD1M-1", "SPB_IRDA_JF4M"
    message = {**{f"{agipd}/CORR/{m}CH0:output": {} for m in (2, 0, 11)},
               **{f"{agipd}/DET/{m}CH0:xtdf": {} for m in range(16)},
               f"{agipd}/CORR/5CH0:preview": {}, f"{agipd}/CORR/5CH0": {},
               f"{jungfrau}/DET/JNGFR01:daqOutput": {}, f"{jungfrau}/DET/JNGFR03:daqOutput": {},
               "SQS_NQS_PNCCD1MP/CAL/PNCCD_FMT-0:output": {}}
    found = detectors.find_modules(message)
    assert (found.detector, found.kind, found.key, found.n_modules, found.module_shape) == (
        agipd, "AGIPD1M", "image.data", 16, (512, 128))
    assert found.positions == tuple((f"{agipd}/CORR/{m}CH0:output", m) for m in (0, 2, 11))
    for name in (jungfrau, f"{jungfrau}/DET/JNGFR03:daqOutput"):
        found = detectors.find_modules(message, source=name, pulses=detectors.parse_pulses("1:"))
        assert (found.kind, found.key, found.n_modules, found.module_shape) == ("JUNGFRAU", "data.adc", 3, (512, 1024))
        assert found.positions == ((f"{jungfrau}/DET/JNGFR01:daqOutput", 0), (f"{jungfrau}/DET/JNGFR03:daqOutput", 2))
        assert found.pulses == detectors.parse_pulses("1:")
    raw = {source: {} for source in message if "/DET/" in source}
    assert [index for _, index in detectors.find_modules(raw, source=agipd).positions] == list(range(16))
    assert detectors.find_modules(message, source="SQS_NQS_PNCCD1MP/CAL/PNCCD_FMT-0:output") is None
    assert detectors.find_modules({"SQS_NQS_PNCCD1MP/CAL/PNCCD_FMT-0:output": {}}) is None


def test_parse_pulses():
    pick = lambda text, n=10: list(detectors.parse_pulses(text).pick(n))
    assert pick("") == pick(":") == pick("::") == list(range(10))
    assert pick("1:16:5", 16) == [1, 6, 11] and pick("::4") == [0, 4, 8] and pick("7:") == [7, 8, 9]
    assert pick("3,1,3,12") == [1, 3] and pick("2") == [2]
    assert str(detectors.parse_pulses("0:64:2")) == "pulses 0:64:2" and str(detectors.parse_pulses("")) == "all pulses"
    for text, expected in [("a", "START:STOP[:STEP]"), ("1:2:3:4", "START:STOP"), ("1,,2", "comma list"),
                           ("-1", "negative"), ("2:-1", "negative"), ("0:4:0", "step"), ("5:2", "selects no pulse")]:
        assert expected in one_line_error(lambda: detectors.parse_pulses(text))
    assert one_line_error(lambda: make_cfg("--pulses=1:x")).startswith("--pulses=1:x: expected")
