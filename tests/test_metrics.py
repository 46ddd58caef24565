"""nn/metrics.py: decision thresholds that a run's thresholds file can hold."""
import json

import numpy as np

from nn import checkpoints, config, metrics


def test_thresholds_stay_inside_zero_and_one_in_float32(tmp_path):
    # Class 0: every shot positive, the lowest scored exactly 0 (a sigmoid that underflowed): halving it
    # gave a threshold of 0. Class 1: the best cut lies between 1 - 1e-9 and 1, which is 1 in float32
    # (where the two scores are one and the same).
    scores = np.array([[0.9, 1.0], [0.0, 1 - 1e-9], [0.5, 0.2]])
    labels = np.array([[1, 1], [1, 0], [1, 0]])
    thresholds = metrics.best_f1_thresholds(scores, labels)
    as_stored = thresholds.astype(np.float32)
    assert np.all((as_stored > 0) & (as_stored < 1))
    called = scores.astype(np.float32) >= as_stored
    assert called[0, 1] and not called[2, 1]
    assert called[:, 0].tolist() == [True, False, True]      # all but the score of exactly 0
    names = config.HELIUM_CLASSES[:2]
    checkpoints.save_thresholds(str(tmp_path), thresholds, names, step=1, shots=3)
    cfg = config.parse_args([f"--load_dir={tmp_path}", "--num_classes=2"])
    np.testing.assert_array_equal(checkpoints.decision_thresholds(cfg), as_stored)
    assert json.loads((tmp_path / checkpoints.THRESHOLDS_FILE).read_text())["thresholds"][names[0]] > 0
