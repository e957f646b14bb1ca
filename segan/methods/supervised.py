"""The plain supervised U-Net: the segmentation loss only, no critic."""

from __future__ import annotations

from segan.methods.base import Family, Method, register


@register("supervised")
class Supervised(Method):
    """Plain U-Net with the segmentation loss only (the same segmentor as every other method)."""

    family = Family(
        settings={"model.critic": "none"},
        allowed={"model.critic": (("none",), "the supervised method trains no critic")},
    )
