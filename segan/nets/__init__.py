"""Networks: the U-Net segmentor, the SegAN multi-scale critic and the baselines' discriminators."""

from segan.nets.critic import build_critic
from segan.nets.segmentor import build_segmentor

__all__ = ["build_critic", "build_segmentor"]
