"""The pictures, read back from their figures: a gallery from hand-made prediction files of both layouts and
from predict's own, confusion counts and precision-recall curves of hand-made scores with a known
confusion matrix, and of a real eval decided by thresholds."""
import os
import sys

import matplotlib.image
import numpy as np
import pytest

from conftest import make_cfg
from nn import evaluate, predict
from nn.outputs import plots, writers
from nn.config import AiryNetError
from nn.recipe import PAPER
from test_predict import cfg_for, predict_dataset, shots, tiny_model
from test_provenance import trained_run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import plot  # noqa: E402  (scripts/plot.py)

NAMES = ["round", "streak", "empty"]
# Four shots: two classes predicted; none (the top class under its threshold); one; all three.
PROBS = np.float32([[0.9, 0.6, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.8], [0.7, 0.7, 0.7]])
THRESHOLDS = np.float32([0.5, 0.55, 0.6])
PREDS = (PROBS >= THRESHOLDS).astype(np.uint8)


def hand_made_predictions(path, layout):
    """A predictions file written by the writers as predict writes it: 8x8 images whose pixel values are
    the shot's index plus one (so the figure's data tells the shots apart) and 2x2 maps."""
    rng = np.random.default_rng(0)
    images = (np.arange(1, 5)[:, None, None, None] * np.ones((4, 8, 8, 1))).astype(np.float32)
    maps = rng.random((4, 3, 2, 2)).astype(np.float32)
    attrs = {"thresholds": THRESHOLDS}
    if layout == "stacked":
        fields = writers.stacked_fields(3, (8, 8, 1))
        fields["grad_cam"] = ("float16", (3, 2, 2), {})
        w = writers.StackedWriter(path, fields, NAMES, attrs)
    else:
        w = writers.PerShotWriter(path, NAMES, attrs)
    w.write({"bids": np.arange(100, 104), "probs": PROBS, "preds": PREDS, "images": images, "grad_cam": maps})
    w.close()
    os.replace(w.tmp, path)
    return maps


@pytest.mark.parametrize("layout", ["stacked", "per_shot"])
def test_gallery_of_hand_made_predictions(tmp_path, layout):
    maps = hand_made_predictions(str(tmp_path / "p.h5"), layout)
    fig = plots.gallery_figure(str(tmp_path / "p.h5"), count=3, start=1)
    rows = np.array(fig.axes).reshape(3, -1)
    assert rows.shape == (3, 1 + 3)  # shots 101-103; the image, then at most three predicted classes
    assert [ax.get_title() for ax in rows[:, 0]] == ["shot 101 (log scale)\nno class", "shot 102 (log scale)\nempty",
                                                     "shot 103 (log scale)\nround, streak, empty"]
    # Shot 101: no class over its threshold, so its top class is shown and said to be below its threshold.
    assert rows[0, 1].get_title() == "streak  p=0.50\n(top class, not predicted: threshold 0.55)"
    assert [ax.get_title() for ax in rows[2, 1:]] == ["round  p=0.70", "streak  p=0.70", "empty  p=0.70"]
    assert not rows[0, 2].images and not rows[1, 2].images  # one overlay only
    for row, shot in zip(rows, (1, 2, 3)):
        np.testing.assert_array_equal(row[0].images[0].get_array(), np.full((8, 8), shot + 1))
    # The overlay of shot 103's streak map: the image in gray, the map's alpha 0.75 * cam^1.5.
    image, overlay = rows[2, 2].images
    np.testing.assert_array_equal(image.get_array(), np.full((8, 8), 4))
    cam = maps[3, 1].astype(np.float16 if layout == "stacked" else np.float32)  # as each layout stores maps
    np.testing.assert_allclose(overlay.get_array()[..., 3], 0.75 * cam.astype(np.float64) ** 1.5, rtol=1e-6)
    out = str(tmp_path / "gallery.png")
    assert plot.main(["gallery", str(tmp_path / "p.h5"), f"--out={out}", "--shots=3", "--start=1"]) == 0
    assert matplotlib.image.imread(out).shape[:2] == tuple(np.round(fig.get_size_inches()[::-1] * plots.DPI))
    with pytest.raises(AiryNetError, match="exists; pass --overwrite=true"):
        plots.gallery(str(tmp_path / "p.h5"), out)


@pytest.mark.parametrize("layout", ["stacked", "per_shot"])
def test_gallery_of_predict_output(tmp_path, layout):
    images, bids = shots(6)
    predict.run(cfg_for(tmp_path, f"--h5_layout={layout}"), PAPER, tiny_model(), predict_dataset(images, bids))
    h5 = str(tmp_path / "pred" / "helium.h5")
    names, selected, thresholds = plots.read_shots(h5, count=3, start=2)
    assert names == ["0", "1", "2"] and [s["name"] for s in selected] == [str(b) for b in bids[2:5]]
    np.testing.assert_array_equal(thresholds, np.full(3, 0.5, np.float32))  # the original rule
    for shot, image in zip(selected, images[2:5]):
        np.testing.assert_array_equal(shot["image"], image[..., 0])
        assert shot["maps"].shape == ((3, 8, 8) if layout == "stacked" else (3, 16, 16))
    fig = plots.gallery_figure(h5, count=3, start=2)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), images[2, ..., 0])


def test_gallery_of_one_class_and_errors(tmp_path):
    hand_made_predictions(str(tmp_path / "p.h5"), "stacked")
    _, selected, _ = plots.read_shots(str(tmp_path / "p.h5"), count=5, class_name="empty")
    assert [s["name"] for s in selected] == ["102", "103"]
    with pytest.raises(AiryNetError, match="--class=nope: not one of round, streak, empty"):
        plots.read_shots(str(tmp_path / "p.h5"), class_name="nope")
    with pytest.raises(AiryNetError, match="no shots to show from record 4"):
        plots.read_shots(str(tmp_path / "p.h5"), start=4)
    (tmp_path / "other.h5").write_bytes(b"")
    assert plot.main(["gallery", str(tmp_path / "other.h5")]) == 2


def test_precision_recall_by_hand():
    precision, recall, ap = plots.precision_recall(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0], bool))
    np.testing.assert_allclose(recall, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(precision, [1, 1, 0.5, 2 / 3, 0.5])
    assert ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # Tied scores form one threshold.
    precision, recall, ap = plots.precision_recall(np.array([0.9, 0.9, 0.1]), np.array([1, 0, 1], bool))
    np.testing.assert_allclose(recall, [0, 0.5, 1])
    assert ap == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert plots.precision_recall(np.array([0.3]), np.array([0], bool)) is None


# Ten shots of two classes, to be decided at thresholds 0.3 and 0.7. Class a: called at >= 0.3 are shots 0-2,
# 4 and 5, so TP 3, FN 1, FP 2, TN 4. Class b: no shot reaches 0.7, so TP 0, FN 2, FP 0, TN 8.
SCORES = np.float32([[0.9, 0.8, 0.4, 0.2, 0.6, 0.35, 0.1, 0.1, 0.1, 0.1], [0.1] * 8 + [0.6, 0.2]]).T
LABELS = np.float32([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [0] * 8 + [1, 1]]).T


def hand_made_scores(run_dir, **extra):
    """RUN/eval/scores.npz with SCORES and LABELS; `extra`: what eval of one version or another added."""
    os.makedirs(os.path.join(run_dir, "eval"))
    np.savez(os.path.join(run_dir, "eval", "scores.npz"), probabilities=SCORES, labels=LABELS,
             class_names=np.array(["a", "b"]), **extra)


def confusion_cells(fig):
    """{(row, column): text} of the confusion figure's texts; column 3.6 holds a row's precision etc."""
    return {tuple(np.round(t.get_position(), 1)): t.get_text() for t in fig.axes[0].texts}


def test_confusion_and_pr_of_hand_made_scores(tmp_path):
    run_dir = str(tmp_path / "run")
    hand_made_scores(run_dir, decision_rule="probability >= the run's calibrated thresholds (T)",
                     thresholds=np.float32([0.3, 0.7]), predictions=(SCORES >= [0.3, 0.7]).astype(np.uint8))
    scores = plots.read_scores(run_dir)
    cells = confusion_cells(plots.confusion_figure(scores))
    # Columns TP, FN, FP, TN; then precision, recall, F1 and the threshold.
    assert [cells[(j, 0)] for j in range(4)] == ["3", "1", "2", "4"]
    assert [cells[(j, 1)] for j in range(4)] == ["0", "2", "0", "8"]
    assert cells[(3.6, 0)] == "P 0.60   R 0.75   F1 0.67   t 0.30"
    assert cells[(3.6, 1)] == "P  --    R 0.00   F1 0.00   t 0.70"
    title = plots.confusion_figure(scores).axes[0].get_title()
    assert "(10 shots)\ndecided by probability >= the run's calibrated thresholds (T)" in title
    ax = plots.pr_figure(scores).axes[0]
    # a: positives at ranks 1, 2, 4 and 6, AP (1 + 1 + 3/4 + 4/6) / 4 = 0.85; b: both positives ranked first.
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (AP 0.85, t 0.30)", "b (AP 1.00, t 0.70)"]
    dots = [line.get_xydata()[0] for line in ax.lines if line.get_marker() == "o"]
    np.testing.assert_allclose(dots, [[0.75, 0.6]])  # class a's decisions; b called no shot
    assert plot.main(["eval", run_dir]) == 0
    assert sorted(os.listdir(os.path.join(run_dir, "eval"))) == ["confusion.png", "pr_curves.png", "scores.npz"]
    with pytest.raises(AiryNetError, match="scores.npz: missing; run --mode=eval"):
        plots.eval_plots(str(tmp_path / "elsewhere"))


def test_scores_of_earlier_versions(tmp_path):
    """Without predictions (the first files), the original rule; with predictions but no recorded rule,
    eval's predictions, said to be of an unrecorded rule."""
    hand_made_scores(str(tmp_path / "first"))
    scores = plots.read_scores(str(tmp_path / "first"))
    assert scores.rule == "probability > 0.5, the original rule" and scores.thresholds is None
    np.testing.assert_array_equal(scores.preds[:, 0], [1, 1, 0, 0, 1, 0, 0, 0, 0, 0])
    assert confusion_cells(plots.confusion_figure(scores))[(3.6, 0)] == "P 0.67   R 0.50   F1 0.57"
    predictions = np.zeros((10, 2), np.uint8)
    predictions[:, 1] = 1
    hand_made_scores(str(tmp_path / "later"), predictions=predictions)
    scores = plots.read_scores(str(tmp_path / "later"))
    assert scores.rule == "eval's rule (not recorded in this file)"
    assert [confusion_cells(plots.confusion_figure(scores))[(j, 1)] for j in range(4)] == ["2", "0", "8", "0"]


def test_eval_records_its_thresholds_for_the_pictures(tfrecord_dir, tmp_path):
    """A run with thresholds.json: eval decides by them and scores.npz says so, so the pictures do."""
    run_dir = str(tmp_path / "run")
    cfg = make_cfg(f"--data_dir={tfrecord_dir}", f"--load_dir={run_dir}", "--mode=eval", "--use_nchw=false")
    trained_run(run_dir, cfg, np.linspace(0.2, 0.8, 11))
    assert evaluate.evaluate(cfg, PAPER) == 0
    scores = plots.read_scores(run_dir)
    np.testing.assert_array_equal(scores.thresholds, np.linspace(0.2, 0.8, 11).astype(np.float32))
    np.testing.assert_array_equal(scores.preds, scores.probs >= scores.thresholds.astype(np.float32))
    assert scores.rule == f"probability >= the run's calibrated thresholds ({os.path.abspath(run_dir)}/thresholds.json)"
    assert confusion_cells(plots.confusion_figure(scores))[(3.6, 10)].endswith("t 0.80")


def test_simulated_shots_of_every_class(tmp_path):
    out = str(tmp_path / "simulated.png")
    assert plot.main(["simulated", f"--out={out}", "--size=32", "--per_class=2", "--shifted"]) == 0
    # One row per class, one column per shot.
    assert matplotlib.image.imread(out).shape[:2] == (round(11 * (plots.PANEL_INCHES + 0.3) * plots.DPI),
                                                      round(2 * plots.PANEL_INCHES * plots.DPI))
    with pytest.raises(AiryNetError, match="exists; pass --overwrite=true"):
        plots.class_gallery(out, plots.Simulation(size=32), per_class=2)
