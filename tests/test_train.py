"""The training engine: schedule, loss, metrics, a short run, resume, the NaN guard and --mode=eval."""
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import airynet
from conftest import make_cfg
from nn import metrics, train
from nn.recipe import PAPER

TINY = ["--dataset=helium", "--target_width=32", "--target_height=32", "--ori_width=40", "--ori_height=40",
        "--batch_size=4", "--num_worker=2", "--log_step=1", "--dataset_size=16"]


def test_learning_rate_schedule_boundaries():
    cfg = make_cfg("--batch_size=24", "--dataset_size=7264", "--lr=0.1")
    schedule = train.learning_rate(cfg, PAPER)
    base = 0.1 * 24 / 128
    epoch = 7264 / 24
    for boundary, before, after in zip((30, 60, 120, 150), (1, .1, .01, 1e-3), (.1, .01, 1e-3, 1e-4)):
        step = int(round(boundary * epoch))
        assert float(schedule(step)) == pytest.approx(base * before)
        assert float(schedule(step + 1)) == pytest.approx(base * after)
    # Two replicas: the global batch doubles, so the rate doubles and an epoch has half the steps.
    doubled = train.learning_rate(cfg, PAPER, replicas=2)
    assert float(doubled(0)) == pytest.approx(2 * base)
    assert float(doubled(int(round(30 * epoch / 2)) + 1)) == pytest.approx(0.2 * base)


def test_loss_is_cross_entropy_plus_mean_penalty():
    cfg = make_cfg("--num_classes=2")

    class Model:
        losses = [tf.constant(0.3), tf.constant(0.1)]
        trainable_variables = [tf.constant([3.0, 4.0])]

    labels = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    logits = tf.constant([[2.0, -1.0], [0.5, 0.0]])
    terms = train.loss_terms(cfg, Model, labels, logits, global_batch=2)
    p = 1 / (1 + np.exp(-np.array([[2.0, -1.0], [0.5, 0.0]])))
    ce = -np.mean(np.array([[1, 0], [0, 1]]) * np.log(p) + np.array([[0, 1], [1, 0]]) * np.log(1 - p))
    assert float(terms["cross_entropy"]) == pytest.approx(ce, rel=1e-6)
    assert float(terms["regularization"]) == pytest.approx(0.2)
    decayed = train.loss_terms(make_cfg("--num_classes=2", "--use_weight_decay=true", "--weight_decay=0.01"),
                               Model, labels, logits, global_batch=2)
    assert float(decayed["regularization"]) == pytest.approx(0.2 + 0.01 * 25 / 2)


def test_metrics_against_hand_computed_values():
    counts = np.array([[3, 1, 1, 5],    # class a: tp fp fn tn
                       [0, 0, 2, 8],    # class b: never predicted
                       [0, 0, 0, 10]])  # class c: absent and never predicted -> no F1
    m = metrics.metrics_from_counts(counts, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(26 / 30)
    assert m["mean_per_class_accuracy"] == pytest.approx((0.8 + 0.8 + 1.0) / 3)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 6)
    assert (m["true_positives"], m["false_positives"], m["false_negatives"]) == (3, 1, 3)
    assert m["mcc"] == pytest.approx((3 * 23 - 1 * 3) / np.sqrt(4 * 6 * 24 * 26))
    assert m["per_class"][0]["f1"] == pytest.approx(0.75) and m["per_class"][1]["f1"] == 0.0
    assert m["per_class"][2]["f1"] is None and m["macro_f1"] == pytest.approx(0.375)
    assert m["micro_f1"] == pytest.approx(6 / 10)
    assert [c["support"] for c in m["per_class"]] == [4, 2, 0]


def test_confusion_counts_in_numpy_and_in_the_graph_agree():
    labels, predictions = [[1.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [0.0, 1.0]]
    expected = [[1, 0, 1, 0], [1, 1, 0, 0]]  # (tp, fp, fn, tn) per class
    np.testing.assert_array_equal(metrics.confusion_counts(np.array(labels), np.array(predictions)), expected)
    np.testing.assert_array_equal(train.confusion_counts(tf.constant(labels), tf.constant(predictions)).numpy(),
                                  expected)


def scalars(run_dir, tag):
    values = {}
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.tag == tag:
                    values[event.step] = float(tf.make_ndarray(v.tensor))
    return [values[k] for k in sorted(values)]


def test_training_lowers_the_loss_then_resumes_at_the_right_step(tfrecord_dir, tmp_path, caplog):
    run = ["--mode=train", f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}", "--out_dir_name=r",
           "--steps_per_eval=15", "--eval_steps=2", "--lr=0.5"] + TINY
    assert airynet.main(run + ["--train_steps=30"]) == 0
    run_dir = os.path.join(str(tmp_path), "helium_r")
    assert tf.train.latest_checkpoint(run_dir).endswith("model.ckpt-30")
    losses = scalars(run_dir, "cross_entropy")
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    # Resume: the same run, more steps; the optimizer's step counter continues from 30.
    assert airynet.main(["--mode=train", f"--load_dir={run_dir}", "--train_steps=33", "--steps_per_eval=3"]) == 0
    assert "Resuming from" in caplog.text and "(step 30)" in caplog.text
    assert tf.train.latest_checkpoint(run_dir).endswith("model.ckpt-33")
    assert len(scalars(run_dir, "cross_entropy")) == 33
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["train_steps"] == 33


def test_nan_guard_stops_before_saving(tfrecord_dir, tmp_path, capsys):
    run = ["--mode=train", f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}", "--out_dir_name=n",
           "--steps_per_eval=2", "--eval_steps=1"] + TINY
    assert airynet.main(run + ["--train_steps=2"]) == 0
    run_dir = os.path.join(str(tmp_path), "helium_n")
    assert airynet.main(["--mode=train", f"--load_dir={run_dir}", "--train_steps=40", "--lr=1e30"]) == 2
    message = capsys.readouterr().err
    assert "NaN or Inf" in message and "model.ckpt-2" in message
    assert tf.train.latest_checkpoint(run_dir).endswith("model.ckpt-2")
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "*.index"))) == ["model.ckpt-2.index"]


def test_eval_mode_writes_metrics(tfrecord_dir, tmp_path, shots):
    run = ["--mode=train", f"--data_dir={tfrecord_dir}", f"--log_dir={tmp_path}", "--out_dir_name=e",
           "--steps_per_eval=2", "--eval_steps=1", "--train_steps=2"] + TINY
    assert airynet.main(run) == 0
    run_dir = os.path.join(str(tmp_path), "helium_e")
    assert airynet.main(["--mode=eval", f"--load_dir={run_dir}"]) == 0
    with open(os.path.join(run_dir, "eval", "metrics.json")) as f:
        m = json.load(f)
    assert m["step"] == 2 and m["shots"] == 8
    for key in ("accuracy", "mean_per_class_accuracy", "precision", "recall", "true_positives", "false_positives",
                "false_negatives", "mcc", "macro_f1", "micro_f1"):
        assert key in m
    assert [c["name"] for c in m["per_class"]][:2] == ["spherical_oblate", "round"]
    scores = np.load(os.path.join(run_dir, "eval", "scores.npz"))
    assert scores["probabilities"].shape == (8, 11) and 0 <= scores["probabilities"].min() <= 1
    # The counts, recomputed here from the stored probabilities (the original rule: above 0.5) and the
    # labels the fixture wrote into the eval file, in file order.
    truth = shots[1][16:] > 0.5
    np.testing.assert_array_equal(scores["labels"], shots[1][16:])
    called = scores["probabilities"] > 0.5
    np.testing.assert_array_equal(scores["predictions"], called)
    assert [c["support"] for c in m["per_class"]] == truth.sum(axis=0).tolist()
    assert m["true_positives"] == int((called & truth).sum())
    assert m["false_positives"] == int((called & ~truth).sum())
    assert m["false_negatives"] == int((~called & truth).sum())


def test_eval_without_checkpoint_is_an_error(tmp_path, capsys):
    assert airynet.main(["--mode=eval", f"--load_dir={tmp_path}"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["shots", "stacked"])
def test_training_on_cxi_files_writes_step_numbered_checkpoints(cxi_dir, tmp_path, dataset, shots):
    """CXIDB-94 per-shot files split by mode, and one stacked file split by --eval_every."""
    assert airynet.main(["--mode=train", f"--data_dir={cxi_dir}", f"--dataset={dataset}", f"--log_dir={tmp_path}",
                         "--out_dir_name=c", "--train_steps=2", "--steps_per_eval=2", "--eval_steps=1"] + TINY[1:]) == 0
    run_dir = os.path.join(str(tmp_path), f"{dataset}_c")
    assert tf.train.latest_checkpoint(run_dir).endswith("model.ckpt-2")
    losses = scalars(run_dir, "cross_entropy")
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    # The eval split of each layout, read back through the trained run: the per-shot eval file holds
    # shots 16-23; the stacked file holds all 24, of which every 10th (shots 9 and 19) is held out.
    assert airynet.main(["--mode=eval", f"--load_dir={run_dir}"]) == 0
    held_out = [9, 19] if dataset == "stacked" else list(range(16, 24))
    np.testing.assert_array_equal(np.load(os.path.join(run_dir, "eval", "scores.npz"))["labels"], shots[1][held_out])
