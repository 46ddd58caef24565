"""--mode=live's classifier: trains -> assembled, preprocessed frames -> probabilities, 0/1 classes and,
for every --gradcam_every-th shot, Grad-CAM++ maps.

The frames take the training path (nn/inputs/preprocess.py) and the network step of --mode=predict
(nn/inference.py). Assembling, preprocessing and classifying run one after the other, not overlapped:
on few cores, preparing the next batch beside the network slows the network by more than the preparing
costs (docs/performance.md).
"""
import collections
import time

import numpy as np
import tensorflow as tf

from nn.config import AiryNetError, first_line
from nn.inference import make_step
from nn.inputs import masks
from nn.inputs.preprocess import preprocess

# Batches are sized once, from a batch timed at set-up, so that preprocessing and classifying one takes
# at most this long and latency stays under a second on any machine: a requested (REQ) frame waits for its
# own batch to be fetched, assembled, preprocessed and classified; a pushed one (SUB, PULL) may also wait
# while the batch before it is classified. Fetching and assembling, which the set-up cannot time, come on
# top (docs/performance.md).
BATCH_SECONDS = {"REQ": 0.45, "SUB": 0.3, "PULL": 0.3}
TENSOR_ALIGNMENT = 64  # bytes: TensorFlow's CPU kernels need this alignment of the memory they read


class Classifier:
    """Trains -> the network's input (`prepare`) -> probabilities, classes and optional maps (`__call__`);
    `classify` does both and picks the shots that get maps.

    Frames are assembled into one buffer kept for the whole run, because a new multi-megabyte image per
    frame costs page faults on every frame; the buffer enters TensorFlow without a copy (`_tensor`). The
    network sees few batch shapes: a batch is padded to the next of 1, 2, 4, ... frames, `batch_frames` or
    --batch_size, because oneDNN builds its kernels per input shape and keeps a bounded number, and a
    batch size it no longer holds kernels for runs slowly (docs/performance.md)."""

    def __init__(self, cfg, recipe, model, detector, socket):
        """`socket`: the bridge's (REQ, SUB, PULL), which sets the time a batch may take (BATCH_SECONDS)."""
        self.detector, self.batch_size = detector, cfg.batch_size
        self.gradcam_every, self.shots = cfg.gradcam_every, 0  # shots classified so far, for --gradcam_every
        self.buffer = _aligned_zeros((cfg.batch_size, *detector.frame_shape))
        spec = tf.TensorSpec([None, *detector.frame_shape, 1], tf.float32)
        mask = masks.load(cfg.mask, cfg.mask_good, tuple(detector.frame_shape))  # the assembled frame's
        self._prepare = tf.function(lambda raw: preprocess(raw, cfg, recipe, training=False, mask=mask),
                                    input_signature=[spec])
        self.step = make_step(cfg, model, maps=None)
        self.maps_step = make_step(cfg, model, maps="layer") if cfg.gradcam_every else None
        self.shapes = [cfg.batch_size]
        try:  # trace now, so that the first train waits for no tracing; and fail early on a mismatch
            full = self._prepared_buffer(self.batch_size)
            self(full[:1], np.ones(1, bool))
            # A timed full batch sizes the batches (timed the second time: the first builds its kernels).
            self(full, np.zeros(self.batch_size, bool))
            started = time.monotonic()
            self(full, np.zeros(self.batch_size, bool))
            seconds_per_frame = (time.monotonic() - started) / self.batch_size
        except Exception as e:
            raise AiryNetError(f"--load_dir={cfg.load_dir}: the run's model cannot take frames of "
                               f"{detector.frame_shape[0]}x{detector.frame_shape[1]} ({type(e).__name__}: "
                               f"{first_line(e)})") from e
        self.batch_frames = int(np.clip(BATCH_SECONDS[socket] / seconds_per_frame, 1, self.batch_size))
        self.shapes = sorted({2 ** k for k in range(self.batch_frames.bit_length())}
                             | {self.batch_frames, self.batch_size})
        self(full[:self.batch_frames], np.zeros(self.batch_frames, bool))  # its kernels

    def classify(self, trains):
        """The shots of `trains`, oldest first: (images [N, h, w, d] as fed, with_maps [N] bool, result),
        result as __call__ returns it; every --gradcam_every-th shot of the run gets maps."""
        images = self.prepare(trains)
        with_maps = np.zeros(len(images), bool)
        if self.gradcam_every:
            with_maps = (self.shots + np.arange(len(images))) % self.gradcam_every == 0
        self.shots += len(images)
        return images, with_maps, self(images, with_maps)

    def prepare(self, trains):
        """The frames of `trains`, assembled and preprocessed: the network's input [N, h, w, d]."""
        n = sum(self.detector.count(t.array) for t in trains)
        if n > len(self.buffer):  # a train of many pulses
            self.buffer = _aligned_zeros((n, *self.buffer.shape[1:]))
        first = 0
        for t in trains:
            count = self.detector.count(t.array)
            self.detector.frames(t.array, out=self.buffer[first:first + count])
            first += count
        return self._prepared_buffer(n)

    def _prepared_buffer(self, n):
        frames = self.buffer[:n, ..., None]
        # Each part is preprocessed before the buffer is written again: the tensor shares its memory.
        return np.concatenate([self._prepare(_tensor(frames[start:start + self.batch_size])).numpy()
                               for start in range(0, n, self.batch_size)])

    def __call__(self, images, with_maps):
        """-> {"probabilities", "classes"[, "ood_score", "unknown"][, "gradcam" [M, ...] for the rows where
        with_maps]}."""
        parts = collections.defaultdict(list)
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            n = len(batch)
            padded = next(size for size in self.shapes if size >= n)
            out = self.step(np.concatenate([batch, np.zeros((padded - n, *batch.shape[1:]), batch.dtype)])
                            if padded > n else batch)
            parts["probabilities"].append(out["probabilities"].numpy()[:n])
            parts["classes"].append(out["classes"].numpy()[:n])
            for name in ("ood_score", "unknown"):  # where the run has an out-of-distribution fit
                if name in out:
                    parts[name].append(out[name].numpy()[:n])
            chosen = np.flatnonzero(with_maps[start:start + self.batch_size])
            if self.maps_step is not None and len(chosen):
                parts["gradcam"].append(self.maps_step(batch[chosen])["grad_cam"].numpy())
        return {name: np.concatenate(values) for name, values in parts.items()}


def _aligned_zeros(shape):
    """float32 zeros starting at a TENSOR_ALIGNMENT boundary (numpy only promises 16 bytes)."""
    size = int(np.prod(shape)) * 4
    raw = np.zeros(size + TENSOR_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % TENSOR_ALIGNMENT
    return raw[start:start + size].view(np.float32).reshape(shape)


def _tensor(frames):
    """`frames` as a tensor that shares their memory (DLPack) where TensorFlow can use it in place: a
    C-ordered, aligned array. Copying assembled detector frames into TensorFlow costs more than
    preprocessing them (docs/performance.md)."""
    if frames.flags.c_contiguous and frames.ctypes.data % TENSOR_ALIGNMENT == 0:
        return tf.experimental.dlpack.from_dlpack(frames.__dlpack__())
    return tf.convert_to_tensor(frames)
