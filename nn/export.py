"""--mode=save: export the trained network as a TensorFlow SavedModel for serving.

Its `serving_default` signature takes `images`, float32 [N, ori_height, ori_width, ori_depth] raw
detector images (photon counts, as stored in the data files), applies the same preprocessing as
--mode=predict (nn.inputs.preprocess.preprocess: scaling, centre crop, resize, gray/RGB) and returns
`probabilities` float32 [N, num_classes] and `classes` int32 [N, num_classes] (0/1 flags).

    loaded = tf.saved_model.load(save_dir)
    out = loaded.signatures["serving_default"](images=tf.constant(batch, tf.float32))

A plain tf.Module with a tf.function is exported rather than keras' Model.export, so that the
preprocessing sits inside the signature and the loaded model needs neither Keras nor AiryNet.
"""
import logging
import os
import shutil
import tempfile

import tensorflow as tf

from nn import checkpoints
from nn.models import networks
from nn.config import AiryNetError, first_line
from nn.inputs import masks
from nn.inputs.preprocess import preprocess

log = logging.getLogger("airynet")


class Serving(tf.Module):
    def __init__(self, cfg, recipe, model):
        super().__init__(name="airynet")
        self.model = model
        spec = tf.TensorSpec([None, cfg.ori_height, cfg.ori_width, cfg.ori_depth], tf.float32, name="images")
        thresholds = checkpoints.decision_thresholds(cfg)
        mask = masks.load(cfg.mask, cfg.mask_good, (cfg.ori_height, cfg.ori_width))  # kept in the SavedModel

        @tf.function(input_signature=[spec])
        def serve(images):
            logits = model(preprocess(images, cfg, recipe, training=False, mask=mask), training=False)
            return {"probabilities": networks.probabilities(logits, cfg.single_label),
                    "classes": tf.cast(networks.predicted_classes(logits, cfg.single_label, thresholds), tf.int32)}

        self.serve = serve


def save(cfg, recipe, model):
    """Write the SavedModel to cfg.save_dir, which must not exist or be empty. The export goes to a
    temporary directory beside it that is renamed when complete, so the SavedModel appears whole or
    not at all."""
    target = os.path.abspath(cfg.save_dir)
    if os.path.exists(target) and not (os.path.isdir(target) and not os.listdir(target)):
        raise AiryNetError(f"--save_dir={cfg.save_dir}: exists and is not an empty directory; choose a new "
                           f"directory")
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".", suffix=".partial", dir=parent)
    except OSError as e:
        raise AiryNetError(f"--save_dir={cfg.save_dir}: cannot write there ({e.strerror})") from e
    try:
        module = Serving(cfg, recipe, model)
        tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve})
        os.replace(tmp, target)  # rename(2) may replace an empty directory
    except (OSError, tf.errors.OpError) as e:  # disk full, permissions (TensorFlow's file system raises OpError)
        reason = getattr(e, "strerror", None) or first_line(e)
        raise AiryNetError(f"--save_dir={cfg.save_dir}: writing the SavedModel failed ({reason})") from e
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    log.info("Saved the model to %s (signature serving_default: images [N, %d, %d, %d] raw counts -> "
             "probabilities, classes)", cfg.save_dir, cfg.ori_height, cfg.ori_width, cfg.ori_depth)
