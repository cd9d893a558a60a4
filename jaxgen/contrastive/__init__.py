"""Contrastive learning: on-device augmentations and NT-Xent / CLIP / SigLIP losses."""
from jaxgen.contrastive.augment import (
    batch_apply,
    color_jitter,
    gaussian_blur,
    horizontal_flip,
    random_grayscale,
    random_resized_crop,
    simclr_augment,
    two_views,
)
from jaxgen.contrastive.losses import MAX_LOGIT_SCALE, clip_loss, l2_normalize, nt_xent, siglip_loss

__all__ = [
    "MAX_LOGIT_SCALE", "batch_apply", "clip_loss", "color_jitter", "gaussian_blur",
    "horizontal_flip", "l2_normalize", "nt_xent", "random_grayscale", "random_resized_crop",
    "siglip_loss", "simclr_augment", "two_views",
]
