"""Flags: every original flag and default, the boolean rule, errors, run directories, saved configs."""
import datetime
import json
import os

import pytest

from nn import config
from nn.config import AiryNetError

# The original's flags and defaults (ORIGINAL.md, section 1).
ORIGINAL_DEFAULTS = {
    "resnet_size": 18, "vgg_size": 16, "airynet_type": "resnet", "data_dir": "../datasets/", "dataset": "helium",
    "log_dir": "logs", "load_dir": "", "save_dir": "", "out_dir_name": "", "mode": "train", "batch_size": 24,
    "dataset_size": 7264, "ori_width": 259, "ori_height": 259, "ori_depth": 1, "target_width": 224,
    "target_height": 224, "target_depth": 1, "num_classes": 11, "num_worker": 4, "train_steps": 30000,
    "steps_per_eval": 2500, "lr": 0.1, "gamma": 0.9, "l1_regularization_scale": 1e-5,
    "l2_regularization_scale": 1e-5, "use_weight_decay": False, "weight_decay": 1e-4, "relu_leakiness": 0.2,
    "use_log_act": True, "alpha": 0.2, "beta": 0.0, "use_nchw": True, "log_level": "INFO", "log_step": 100,
    "random_seed": 1612,
    # read but never declared by the original
    "use_ccf": False, "add_noise": 0, "fraction_mode": False, "fraction": 0.25,
}


def test_every_original_flag_has_its_default():
    cfg = config.parse_args([])
    assert {k: getattr(cfg, k) for k in ORIGINAL_DEFAULTS} == ORIGINAL_DEFAULTS
    assert cfg.eval_steps is None  # 100 per training chunk, one full pass in --mode=eval


@pytest.mark.parametrize("name,text,value", [
    ("resnet_size", "50", 50), ("vgg_size", "19", 19), ("airynet_type", "vgg", "vgg"), ("data_dir", "/d/", "/d/"),
    ("dataset", "cxidb", "cxidb"), ("log_dir", "runs", "runs"), ("out_dir_name", "x", "x"),
    ("batch_size", "8", 8), ("dataset_size", "100", 100), ("ori_width", "1035", 1035), ("ori_height", "64", 64),
    ("ori_depth", "3", 3), ("target_width", "64", 64), ("target_height", "32", 32), ("target_depth", "3", 3),
    ("num_classes", "2", 2), ("num_worker", "1", 1), ("train_steps", "5", 5), ("steps_per_eval", "2", 2),
    ("eval_steps", "7", 7), ("lr", "0.5", 0.5), ("gamma", "0.5", 0.5), ("l1_regularization_scale", "0", 0.0),
    ("l2_regularization_scale", "1e-3", 1e-3), ("weight_decay", "0.1", 0.1), ("relu_leakiness", "0", 0.0),
    ("alpha", "1.5", 1.5), ("beta", "-1", -1.0), ("log_level", "DEBUG", "DEBUG"), ("log_step", "3", 3),
    ("random_seed", "0", 0), ("add_noise", "2", 2), ("fraction", "0.25", 0.25), ("predict_dir", "p", "p"),
    ("h5_layout", "per_shot", "per_shot"), ("num_shards", "4", 4), ("shard_index", "1", 1),
    ("eval_every", "5", 5), ("num_cpu_replicas", "2", 2), ("cxi_labels", "a/b", "a/b"),
])
def test_flag_parsing(name, text, value):
    assert getattr(config.parse_args([f"--{name}={text}"]), name) == value


@pytest.mark.parametrize("text,value", [("true", True), ("TRUE", True), ("1", True), ("false", False),
                                        ("0", False), ("yes", False), ("", False)])
@pytest.mark.parametrize("name", ["use_weight_decay", "use_log_act", "use_nchw", "use_ccf", "fraction_mode",
                                  "overwrite", "gradcam", "save_npy", "single_label"])
def test_booleans_follow_the_original_rule(name, text, value):
    assert getattr(config.parse_args([f"--{name}={text}"]), name) is value


@pytest.mark.parametrize("argv,culprit", [
    (["--resnet-size=18"], "--resnet-size=18"),        # misspelt: the original silently ignored it
    (["--resnet_siz=18"], "--resnet_siz=18"),          # no abbreviations either
    (["--resnet_size=19"], "--resnet_size"),
    (["--vgg_size=11"], "--vgg_size"),
    (["--mode=serve"], "--mode"),
    (["--batch_size=0"], "--batch_size"),
    (["--batch_size=x"], "--batch_size"),
    (["--target_depth=2"], "--target_depth"),
    (["--mode=predict"], "--load_dir"),
    (["--mode=save", "--load_dir=r"], "--save_dir"),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(argv, culprit):
    with pytest.raises(AiryNetError) as e:
        config.parse_args(argv)
    assert culprit in str(e.value) and "\n" not in str(e.value)


def test_run_dir_name_and_refusal_to_reuse(tmp_path):
    cfg = config.parse_args([f"--log_dir={tmp_path}", "--dataset=synthetic"])
    when = datetime.datetime(2026, 3, 4, 5, 6, 7)
    assert config.new_run_dir(cfg, when) == os.path.join(str(tmp_path), "synthetic_0304_050607")
    tagged = config.parse_args([f"--log_dir={tmp_path}", "--out_dir_name=first"])
    run_dir = config.new_run_dir(tagged)
    assert run_dir == os.path.join(str(tmp_path), "helium_first")
    os.makedirs(run_dir)
    config.save_config(tagged, run_dir)
    with pytest.raises(AiryNetError, match="already holds a run"):
        config.new_run_dir(tagged)


def test_saved_config_fills_flags_not_given_and_explicit_flags_win(tmp_path):
    trained = config.parse_args(["--resnet_size=34", "--target_width=64", "--dataset=synthetic", "--batch_size=8"])
    config.save_config(trained, str(tmp_path))
    saved = json.loads((tmp_path / config.CONFIG_FILE).read_text())
    assert saved["resnet_size"] == 34 and "explicit" not in saved
    cfg = config.parse_args(["--mode=predict", f"--load_dir={tmp_path}", "--batch_size=64", "--predict_dir=p"])
    differing = config.merge_run_config(cfg, str(tmp_path))
    assert (cfg.resnet_size, cfg.target_width, cfg.dataset) == (34, 64, "synthetic")
    assert cfg.batch_size == 64 and differing == ["batch_size"]
    assert (cfg.mode, cfg.predict_dir) == ("predict", "p")  # per-invocation flags are never taken from the run


def test_class_names():
    assert config.class_names(config.parse_args([]))[7] == "newton_rings"
    assert config.class_names(config.parse_args(["--num_classes=3"])) == ["0", "1", "2"]


@pytest.mark.parametrize("key,value", [
    ("batch_size", 0), ("batch_size", "8"), ("train_steps", 2.5), ("resnet_size", 19), ("airynet_type", "alexnet"),
    ("target_depth", 2), ("lr", -1.0), ("use_log_act", "yes"), ("dataset", 5), ("steps_per_eval", 0),
])
def test_values_taken_from_a_saved_config_are_validated(tmp_path, key, value):
    config.save_config(config.parse_args(["--lr=1"]), str(tmp_path))
    path = tmp_path / config.CONFIG_FILE
    saved = json.loads(path.read_text())
    assert saved["lr"] == 1
    saved[key] = value
    path.write_text(json.dumps(saved))
    cfg = config.parse_args(["--mode=predict", f"--load_dir={tmp_path}"])
    with pytest.raises(AiryNetError) as e:
        config.merge_run_config(cfg, str(tmp_path))
    message = str(e.value)
    assert message.startswith(f"{path}: \"{key}\": {json.dumps(value)} is not valid") and "\n" not in message
    # A valid value on the command line overrides the broken one; the file's other values are taken.
    given = getattr(cfg, key)
    cfg = config.parse_args(["--mode=predict", f"--load_dir={tmp_path}", f"--{key}={given}"])
    config.merge_run_config(cfg, str(tmp_path))
    assert getattr(cfg, key) == given and (key == "lr" or cfg.lr == 1)


def test_save_conv_is_per_invocation(tmp_path):
    config.save_config(config.parse_args(["--save_conv=true"]), str(tmp_path))
    cfg = config.parse_args(["--mode=predict", f"--load_dir={tmp_path}"])
    config.merge_run_config(cfg, str(tmp_path))
    assert cfg.save_conv is False and "save_conv" in config.PER_INVOCATION


def test_a_run_saved_by_an_earlier_version_still_loads(tmp_path):
    """Runs saved before --sim_version and the original's --fraction choices: their simulator was the
    first, and their fraction (1.0, the earlier default) was read by nothing without --fraction_mode."""
    saved = {k: v for k, v in vars(config.parse_args([])).items() if k not in ("explicit", "sim_version")}
    saved["fraction"] = 1.0
    (tmp_path / config.CONFIG_FILE).write_text(json.dumps(saved))
    cfg = config.parse_args(["--mode=predict", f"--load_dir={tmp_path}"])
    config.merge_run_config(cfg, str(tmp_path))
    assert cfg.sim_version == 1 and cfg.fraction == 0.25
    saved["fraction_mode"] = True  # a fraction that was used must be one the original knew
    (tmp_path / config.CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(AiryNetError, match='"fraction": 1.0 is not valid'):
        config.merge_run_config(config.parse_args(["--mode=predict", f"--load_dir={tmp_path}"]), str(tmp_path))


def test_a_data_dir_that_a_synthetic_run_would_ignore_is_refused(tmp_path, capsys):
    """A run trained on --dataset=synthetic predicts simulated shots: an explicit --data_dir without --dataset
    would be silently ignored, so it is refused with a line saying how to ask for either."""
    import airynet
    run = tmp_path / "run"
    os.makedirs(run)
    config.save_config(config.parse_args(["--dataset=synthetic"]), str(run))
    os.makedirs(tmp_path / "mine" / "helium")
    argv = ["--mode=predict", f"--load_dir={run}", f"--data_dir={tmp_path}/mine/"]
    assert airynet.main(argv) == 2
    assert capsys.readouterr().err == (
        f"airynet: error: --data_dir={tmp_path}/mine/: the run in {run} was trained on --dataset=synthetic "
        f"(simulated shots, no files), so this --data_dir would be ignored; pass --dataset=NAME to read "
        f"{tmp_path}/mine/NAME/, or --dataset=synthetic for simulated shots\n")
    mine = f"--data_dir={tmp_path}/mine/"
    for extra, dataset in (([], "synthetic"), ([mine, "--dataset=helium"], "helium"),
                           ([mine, "--dataset=synthetic"], "synthetic")):
        cfg = config.parse_args(["--mode=predict", f"--load_dir={run}", *extra])
        config.merge_run_config(cfg, str(run))  # the run's data, or what the user asked for explicitly
        assert cfg.dataset == dataset
    os.makedirs(tmp_path / "mine" / "synthetic")  # files of the synthetic set written out: they are read
    cfg = config.parse_args(argv)
    config.merge_run_config(cfg, str(run))
    assert (cfg.dataset, cfg.data_dir) == ("synthetic", f"{tmp_path}/mine/")
