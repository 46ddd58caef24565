"""build_model(cfg): the network named by --airynet_type, and the layer Grad-CAM looks at."""
from nn import resnet, vgg
from nn.config import AiryNetError

GRADCAM_LAYER = "last_block_before_fc"


def build_model(cfg):
    """A keras.Model from NHWC float32 images [B, target_height, target_width, target_depth] to
    float32 logits [B, num_classes] (layer `final_dense`)."""
    if cfg.airynet_type == "resnet":
        if cfg.resnet_size not in resnet.SIZES:
            raise AiryNetError(f"--resnet_size={cfg.resnet_size}: must be one of {sorted(resnet.SIZES)}")
        return resnet.build(cfg)
    if cfg.airynet_type == "vgg":
        if cfg.vgg_size not in vgg.SIZES:
            raise AiryNetError(f"--vgg_size={cfg.vgg_size}: must be one of {sorted(vgg.SIZES)}")
        for side in ("height", "width"):
            if getattr(cfg, f"target_{side}") < vgg.MIN_SIZE:
                raise AiryNetError(f"--target_{side}={getattr(cfg, f'target_{side}')}: the VGG needs at "
                                   f"least {vgg.MIN_SIZE} px (five 2x2 pools)")
        return vgg.build(cfg)
    raise AiryNetError(f"--airynet_type={cfg.airynet_type}: must be resnet or vgg")


def gradcam_layer_name(cfg):
    """Both architectures name their Grad-CAM target the same; its output is channels_first when
    cfg.use_nchw."""
    return GRADCAM_LAYER
