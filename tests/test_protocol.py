"""scripts/protocol.py: arm parsing, collecting the kept eval files, mean +- sd and the table. The
end-to-end run (data, training and eval through the CLI) takes minutes and is run by hand."""
import argparse
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import protocol  # noqa: E402


def write_metrics(run_dir, split, macro, f1s):
    os.makedirs(run_dir, exist_ok=True)
    per_class = [{"name": f"c{i}", "f1": f} for i, f in enumerate(f1s)]
    with open(os.path.join(run_dir, f"eval_{split}.json"), "w") as f:
        json.dump({"macro_f1": macro, "per_class": per_class}, f)


def test_parse_arm():
    assert protocol.parse_arm('no_log=--use_log_act=false --lr=0.05') == ("no_log", ["--use_log_act=false", "--lr=0.05"])
    assert protocol.parse_arm("paper=") == ("paper", [])
    for bad in ("paper", "=--lr=1", "a b=--lr=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            protocol.parse_arm(bad)


def test_collect_summarise_and_table(tmp_path):
    runs = str(tmp_path)
    for seed, macro, f1s in ((0, 0.6, [0.9, 0.3, None]), (1, 0.8, [0.7, 0.9, None])):
        write_metrics(os.path.join(runs, f"train_s{seed}_paper_s{seed}"), "heldout", macro, f1s)
    write_metrics(os.path.join(runs, "train_s0_paper_s0"), "shifted", 0.5, [0.5, 0.5, 0.4])
    found = protocol.collect(runs, ["paper", "modern"], [0, 1])
    assert list(found) == ["paper"] and len(found["paper"]["heldout"]) == 2 and len(found["paper"]["shifted"]) == 1
    held = protocol.summarise(found["paper"]["heldout"])
    assert held["macro_f1"] == pytest.approx(0.7) and held["sd"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert held["per_class"]["c0"] == pytest.approx(0.8) and np.isnan(held["per_class"]["c2"])
    assert protocol.summarise(found["paper"]["shifted"])["sd"] == 0.0
    table = protocol.format_table(found).splitlines()
    assert table[0] == "| class | paper (heldout, 2 seeds) | paper (shifted, 1 seeds) |"
    assert table[2] == "| c0 | 0.800 | 0.500 |" and table[4] == "| c2 | n/a | 0.400 |"
    assert table[-1] == "| **macro-F1** | **0.700 ± 0.141** | **0.500 ± 0.000** |"
    assert protocol.format_table({}) == "no finished evaluations"


def test_per_setting_test_sets_and_table(tmp_path):
    assert protocol.evaluation_sets(False) == ["heldout", "shifted"]
    sets = protocol.evaluation_sets(True)
    assert sets[:2] == ["heldout", "shifted"] and "shift_masks" in sets and len(sets) == 2 + 11
    runs = str(tmp_path)
    for seed, macro in ((0, 0.8), (1, 0.6)):
        write_metrics(os.path.join(runs, f"train_s{seed}_modern_s{seed}"), "heldout", macro, [0.5])
        write_metrics(os.path.join(runs, f"train_s{seed}_modern_s{seed}"), "shift_masks", macro - 0.2, [0.5])
        write_metrics(os.path.join(runs, f"train_s{seed}_modern_s{seed}"), "shifted", macro - 0.3, [0.5])
    write_metrics(os.path.join(runs, "train_s0_paper_s0"), "shift_photons", 0.4, [0.5])
    found = protocol.collect(runs, ["modern", "paper"], [0, 1], sets)
    table = protocol.format_setting_table(found).splitlines()
    assert table[0] == "| test set | modern | paper |"
    assert table[2] == "| held-out (nothing moved) | 0.700 ± 0.141 (2) |  |"
    assert table[3:5] == ["| photons moved |  | 0.400 ± 0.000 (1) |", "| masks moved | 0.500 ± 0.141 (2) |  |"]
    assert table[5] == "| shifted (everything moved) | 0.400 ± 0.141 (2) |  |"


def fake_commands(monkeypatch):
    """protocol.run replaced by a stand-in that records each command and writes what the real one would
    leave behind (the data folder, the final checkpoint, the eval metrics), so that skip and resume
    logic is tested without minutes of training."""
    commands = []

    def fake_run(cmd, log_path):
        commands.append(cmd)
        flags = dict(c.lstrip("-").split("=", 1) for c in cmd if c.startswith("--") and "=" in c)
        if cmd[1] == "scripts/make_dataset.py":
            os.makedirs(cmd[cmd.index("--out") + 1])
        elif "--mode=train" in cmd:
            run_dir = flags.get("load_dir") or os.path.join(flags["log_dir"], "train_" + flags["dataset"].split("_")[-1]
                                                            + "_" + flags["out_dir_name"])
            os.makedirs(run_dir, exist_ok=True)
            open(os.path.join(run_dir, f"model.ckpt-{flags['train_steps']}.index"), "w").close()
        else:
            os.makedirs(os.path.join(flags["load_dir"], "eval"), exist_ok=True)
            with open(os.path.join(flags["load_dir"], "eval", "metrics.json"), "w") as f:
                json.dump({"macro_f1": 0.5, "per_class": [{"name": "c0", "f1": 0.5}]}, f)
    monkeypatch.setattr(protocol, "run", fake_run)
    return commands


def test_a_rerun_skips_finished_data_runs_and_evaluations(tmp_path, monkeypatch, capsys):
    commands = fake_commands(monkeypatch)
    args = [f"--out={tmp_path}", "--seeds=0", "--steps=10", "--arm", "paper="]
    protocol.main(args)
    kinds = [c[1] if "make_dataset" in c[1] else c[2] for c in commands]
    assert kinds == ["scripts/make_dataset.py"] * 3 + ["--mode=train", "--mode=eval", "--mode=eval"]
    run_dir = tmp_path / "runs" / "train_s0_paper_s0"
    assert sorted(os.listdir(run_dir)) == ["eval", "eval_heldout.json", "eval_shifted.json", "model.ckpt-10.index"]
    commands.clear()
    protocol.main(args)
    assert commands == []
    assert "| **macro-F1** | **0.500 ± 0.000** | **0.500 ± 0.000** |" in capsys.readouterr().out
    # An interrupted data set (only its .partial folder), an unfinished run and a missing evaluation are
    # done again; the unfinished run is resumed from its folder, not started anew.
    (tmp_path / "data" / "heldout_s0").rename(tmp_path / "data" / "heldout_s0.partial")
    os.remove(run_dir / "model.ckpt-10.index")
    os.remove(run_dir / "eval_shifted.json")
    protocol.main(args)
    assert [c[c.index("--out") + 1] for c in commands if "--out" in c] == [str(tmp_path / "data" / "heldout_s0")]
    [train] = [c for c in commands if "--mode=train" in c]
    assert f"--load_dir={run_dir}" in train
    [evaluation] = [c for c in commands if "--mode=eval" in c]
    assert "--dataset=shifted_s0" in evaluation


def test_a_rerun_with_other_settings_is_refused(tmp_path, monkeypatch):
    fake_commands(monkeypatch)
    protocol.main([f"--out={tmp_path}", "--seeds=0", "--steps=10", "--arm", "a=--lr=0.1"])
    recorded = json.loads((tmp_path / "protocol.json").read_text())
    assert recorded["steps"] == 10 and recorded["arms"] == {"a": ["--lr=0.1"]}
    with pytest.raises(SystemExit, match=r"records --steps=10; this run asks for --steps=20"):
        protocol.main([f"--out={tmp_path}", "--seeds=0", "--steps=20", "--arm", "a=--lr=0.1"])
    with pytest.raises(SystemExit, match=r"records arm a as '--lr=0.1'"):
        protocol.main([f"--out={tmp_path}", "--seeds=0", "--steps=10", "--arm", "a=--lr=0.2"])
    # More seeds and a new arm are additions, not changes.
    protocol.main([f"--out={tmp_path}", "--seeds=0,1", "--steps=10", "--arm", "a=--lr=0.1", "--arm", "b="])
    assert json.loads((tmp_path / "protocol.json").read_text())["arms"] == {"a": ["--lr=0.1"], "b": []}
    assert (tmp_path / "runs" / "train_s1_b_s1" / "model.ckpt-10.index").exists()


def test_masked_sets_are_made_with_a_fixed_detector_and_scored_with_and_without_their_mask(tmp_path, monkeypatch,
                                                                                            capsys):
    commands = fake_commands(monkeypatch)
    protocol.main([f"--out={tmp_path}", "--seeds=0", "--steps=10", "--arm", "modern=", "--masked"])
    made = {os.path.basename(c[c.index("--out") + 1]): c for c in commands if "make_dataset" in c[1]}
    assert set(made) == {"train_s0", "heldout_s0", "shifted_s0", "fixed_heldout_s0", "fixed_masks_s0",
                         "fixed_bad_pixels_s0"}
    assert "--fixed_detector" in made["fixed_masks_s0"] and made["fixed_masks_s0"][-2:] == ["--shift", "masks"]
    assert "--fixed_detector" not in made["heldout_s0"]
    evals = [c for c in commands if "--mode=eval" in c]
    masked = [c for c in evals if any(f.startswith("--mask=") for f in c)]
    assert len(evals) == 2 + 3 + 3 and len(masked) == 3
    assert f"--mask={tmp_path}/data/fixed_bad_pixels_s0/mask.npy" in masked[-1]
    assert "--dataset=fixed_bad_pixels_s0" in masked[-1]
    runs = str(tmp_path / "runs")
    for name, macro in (("fixed_heldout", 0.7), ("fixed_masks", 0.6), ("fixed_bad_pixels_masked", 0.65),
                        ("fixed_heldout_masked", 0.68)):
        write_metrics(os.path.join(runs, "train_s0_modern_s0"), name, macro, [0.5])
    table = protocol.format_mask_table(protocol.collect(runs, ["modern"], [0], protocol.evaluations(False, True)))
    lines = table.splitlines()
    assert lines[0] == "| one detector per set | modern, no mask | modern, mask |"
    assert lines[2] == "| heldout | 0.700 ± 0.000 (1) | 0.680 ± 0.000 (1) |"
    assert lines[3] == "| masks | 0.600 ± 0.000 (1, -0.100) | 0.500 ± 0.000 (1, -0.180) |"  # the stand-in's 0.5
    assert lines[4] == "| bad_pixels | 0.500 ± 0.000 (1, -0.200) | 0.650 ± 0.000 (1, -0.030) |"
