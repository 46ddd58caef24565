"""The pictures: a gallery from both prediction layouts, confusion counts and precision-recall curves."""
import os
import sys

import h5py
import matplotlib.image
import numpy as np
import pytest

from nn import metrics, predict
from nn.outputs import plots
from nn.config import AiryNetError
from nn.recipe import PAPER
from test_predict import CLASSES, cfg_for, predict_dataset, shots, tiny_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import plot  # noqa: E402  (scripts/plot.py)


def png_shape(path):
    assert os.path.getsize(path) > 10_000  # a real picture, not an empty canvas
    return matplotlib.image.imread(path).shape[:2]


@pytest.mark.parametrize("layout", ["stacked", "per_shot"])
def test_gallery_from_both_layouts(tmp_path, layout):
    images, bids = shots(6)
    predict.run(cfg_for(tmp_path, f"--h5_layout={layout}"), PAPER, tiny_model(), predict_dataset(images, bids))
    h5 = str(tmp_path / "pred" / "helium.h5")
    names, selected = plots.read_shots(h5, count=3, start=2)
    assert names == ["0", "1", "2"] and [s["name"] for s in selected] == [str(b) for b in bids[2:5]]
    assert selected[0]["image"].shape == (16, 16)
    maps = selected[0]["maps"]
    assert maps.shape[0] == CLASSES and 0 <= maps.min() <= maps.max() <= 1
    out = str(tmp_path / "gallery.png")
    assert plot.main(["gallery", h5, f"--out={out}", "--shots=3", "--start=2"]) == 0
    # One row per shot; the image plus one column per predicted class (the top class when none is).
    overlays = max(min(max(int(s["preds"].sum()), 1), plots.MAX_OVERLAYS) for s in selected)
    assert png_shape(out) == (round(3 * (plots.PANEL_INCHES + 0.5) * plots.DPI),
                              round((1 + overlays) * plots.PANEL_INCHES * plots.DPI))
    with pytest.raises(AiryNetError, match="exists; pass --overwrite=true"):
        plots.gallery(h5, out)


def test_gallery_of_one_class_and_errors(tmp_path):
    images, bids = shots(8)
    predict.run(cfg_for(tmp_path, "--gradcam=false"), PAPER, tiny_model(), predict_dataset(images, bids))
    h5 = str(tmp_path / "pred" / "helium.h5")
    with h5py.File(h5, "r") as f:
        wanted = int(np.argmax(f["preds"][:].sum(axis=0)))
        expected = [str(b) for b, p in zip(f["bids"][:], f["preds"][:]) if p[wanted]][:2]
    _, selected = plots.read_shots(h5, count=2, class_name=str(wanted))
    assert [s["name"] for s in selected] == expected and selected[0]["maps"] is None
    out = plots.gallery(h5, str(tmp_path / "images_only.png"), count=2)
    assert png_shape(out)[1] == round(plots.PANEL_INCHES * plots.DPI)  # no maps: the image column only
    with pytest.raises(AiryNetError, match="--class=nope: not one of 0, 1, 2"):
        plots.read_shots(h5, class_name="nope")
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


def test_eval_pictures(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 11)) < 0.3).astype(np.float32)
    labels[:, 4] = 0  # a class without positives must not break the curves
    probs = np.clip(labels * 0.6 + rng.random((200, 11)) * 0.5, 0, 1).astype(np.float32)
    os.makedirs(tmp_path / "run" / "eval")
    np.savez(tmp_path / "run" / "eval" / "scores.npz", probabilities=probs, labels=labels,
             class_names=np.array([f"class_{i}" for i in range(11)]))
    tp, fp, fn, tn = metrics.confusion_counts(labels, probs >= 0.5).T
    assert tp[0] == np.sum((probs[:, 0] >= 0.5) & (labels[:, 0] == 1)) and (tp + fn + fp + tn == 200).all()
    assert plot.main(["eval", str(tmp_path / "run")]) == 0
    assert png_shape(tmp_path / "run" / "eval" / "confusion.png") == (round((0.42 * 11 + 1.6) * plots.DPI), 850)
    assert png_shape(tmp_path / "run" / "eval" / "pr_curves.png") == (600, 1000)
    with pytest.raises(AiryNetError, match="scores.npz: missing; run --mode=eval"):
        plots.eval_plots(str(tmp_path / "elsewhere"))


def test_simulated_shots_of_every_class(tmp_path):
    out = str(tmp_path / "simulated.png")
    assert plot.main(["simulated", f"--out={out}", "--size=32", "--per_class=2", "--shifted"]) == 0
    # One row per class, one column per shot.
    assert png_shape(out) == (round(11 * (plots.PANEL_INCHES + 0.3) * plots.DPI),
                              round(2 * plots.PANEL_INCHES * plots.DPI))
    with pytest.raises(AiryNetError, match="exists; pass --overwrite=true"):
        plots.class_gallery(out, plots.Simulation(size=32), per_class=2)
