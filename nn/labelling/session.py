"""A labelling session: the pool of shots, the network's view of them, the order they are offered in,
the label file, and what the page asks of them (nn/labelling/app.py serves it).

A shot's choice is the labeller's alone: the page starts it empty and shows the network's classes beside
it. The order is computed once, from the loaded run's network, at start: restarting with a fine-tuned
run (--load_dir) recomputes it; the shots already in the label file (or marked not a droplet) are never
offered again.
"""
import os
import threading

import numpy as np
import tensorflow as tf

from nn import checkpoints, config, inference
from nn.config import AiryNetError
from nn.inputs.preprocess import preprocess
from nn.labelling import hierarchy, selection
from nn.labelling.labelfile import RejectList, open_label_file
from nn.labelling.pool import load_pool
from nn.web import render


class LabelError(Exception):
    """A request the session refuses: `status` is the HTTP status, the message says why."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def scores(cfg, recipe, model, images):
    """-> (probabilities [N, C], features [N, K]: the Grad-CAM layer's activations averaged over the map,
    {"ood_score": [N], "unknown": [N]}, or None where the run has no out-of-distribution fit (nn/ood.py))."""
    step = inference.make_step(cfg, model, maps=None, conv=True, jit="none")
    probabilities, features, ood = [], [], {"ood_score": [], "unknown": []}
    for start in range(0, len(images), cfg.batch_size):
        batch = preprocess(tf.constant(images[start:start + cfg.batch_size], tf.float32), cfg, recipe)
        out = step(batch)
        probabilities.append(out["probabilities"].numpy())
        features.append(out["conv"].numpy().mean(axis=(1, 2)))
        for key, parts in ood.items():
            if key in out:
                parts.append(out[key].numpy())
    if not probabilities:
        return np.zeros((0, cfg.num_classes), np.float32), np.zeros((0, 1), np.float32), None
    ood = {key: np.concatenate(parts) for key, parts in ood.items() if parts} or None
    return np.concatenate(probabilities), np.concatenate(features), ood


class Session:
    def __init__(self, cfg, recipe, model):
        self.cfg, self.recipe, self.model = cfg, recipe, model
        self.names = config.class_names(cfg)
        self.pool = load_pool(cfg, cfg.label_pool)
        self.index = {shot_id: i for i, shot_id in enumerate(self.pool.ids)}
        self.probabilities, features, self.ood = scores(cfg, recipe, model, self.pool.images)
        rule = checkpoints.decision_thresholds(cfg)
        self.thresholds = np.full(cfg.num_classes, 0.5, np.float32) if rule is None else rule
        self.order = selection.order(cfg.select, self.probabilities, self.thresholds, features, cfg.random_seed)
        folder = os.path.dirname(os.path.abspath(cfg.labels))
        if not os.path.isdir(folder):
            raise AiryNetError(f"--labels={cfg.labels}: the folder {folder} does not exist")
        self.file = open_label_file(cfg.labels, cfg.num_classes)
        self.rejects = RejectList(cfg.labels)
        self.done = set(self.file.ids) | set(self.rejects.ids)
        self.history, self.skipped = [], set()
        self.lock = threading.Lock()
        self._cam_step = None

    def next(self):
        with self.lock:
            remaining = [i for i in self.order if self.pool.ids[i] not in self.done]
            offered = [i for i in remaining if self.pool.ids[i] not in self.skipped]
            if not offered:
                return {"id": None, "remaining": len(remaining)}
            i = offered[0]
            shot = {"id": self.pool.ids[i], "bunch_id": int(self.pool.bunch_ids[i]), "pulse": int(self.pool.pulses[i]),
                    "probabilities": [float(p) for p in self.probabilities[i]],
                    "thresholds": [float(t) for t in self.thresholds], "remaining": len(remaining)}
            if self.ood is not None:  # how unlike the training shots it is (a hint for "not a droplet")
                shot.update(ood_score=float(self.ood["ood_score"][i]), unknown=int(self.ood["unknown"][i]))
            return shot

    def _shot(self, shot_id):
        if shot_id not in self.index:
            raise LabelError(404, f"no shot {shot_id!r} in this source")
        return self.index[shot_id]

    def label(self, shot_id, classes=None, not_a_droplet=False):
        """Write the shot's label (or its "not a droplet" mark) to disk; -> progress()."""
        with self.lock:
            i = self._shot(shot_id)
            if shot_id in self.done:
                raise LabelError(409, f"shot {shot_id} is already labelled")
            if not_a_droplet:
                self.rejects.append(self.pool.shot(i))
                self.history.append(self.rejects)
            else:
                classes = self._checked(classes)
                try:
                    self.file.append(self.pool.shot(i), classes)
                except AiryNetError as e:
                    raise LabelError(422, str(e)) from e
                self.history.append(self.file)
            self.done.add(shot_id)
            self.skipped.discard(shot_id)
        return self.progress()

    def _checked(self, classes):
        if (not isinstance(classes, list) or len(classes) != self.cfg.num_classes
                or any(c not in (0, 1) or isinstance(c, bool) for c in classes)):
            raise LabelError(400, f"\"classes\" must be a list of {self.cfg.num_classes} zeros and ones")
        problem = hierarchy.violation(classes)
        if problem:
            raise LabelError(422, problem)
        return classes

    def undo(self):
        """Take back the last label saved in this session: -> {"id": that shot's id} (None: nothing to take back)."""
        with self.lock:
            if not self.history:
                return {"id": None}
            shot_id = self.history.pop().remove_last()
            self.done.discard(shot_id)
            return {"id": shot_id}

    def skip(self, shot_id):
        with self.lock:
            self._shot(shot_id)
            self.skipped.add(shot_id)

    def progress(self):
        counts = np.sum(self.file.labels, axis=0) if self.file.labels else np.zeros(self.cfg.num_classes)
        return {"labelled": len(self.file.ids), "total": len(self.pool.ids), "not_a_droplet": len(self.rejects.ids),
                "classes": {name: int(c) for name, c in zip(self.names, counts)}}

    def image_png(self, shot_id):
        return render.png(self.pool.images[self._shot(shot_id)])

    def cam_png(self, shot_id, cls):
        """The network's input with the Grad-CAM++ map of class `cls` over it."""
        if not 0 <= cls < self.cfg.num_classes:
            raise LabelError(400, f"class must be 0..{self.cfg.num_classes - 1}")
        image = tf.constant(self.pool.images[self._shot(shot_id)][None], tf.float32)
        with self.lock:
            if self._cam_step is None:
                self._cam_step = inference.make_step(self.cfg, self.model, maps="resized", jit="none")
            network_input = preprocess(image, self.cfg, self.recipe)
            maps = self._cam_step(network_input)["grad_cam"].numpy()
        return render.png(network_input.numpy()[0], maps[0, cls])
