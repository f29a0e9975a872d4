"""The M2D network: ViT encoder, predictor, EMA target."""
from .ema import EMA, ema_tau
from .m2d import M2D
from .vit import DEFAULT_NORM_STATS, ViTEncoder

__all__ = ["M2D", "ViTEncoder", "EMA", "ema_tau", "DEFAULT_NORM_STATS"]
