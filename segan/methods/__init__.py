"""Training methods, one small object each, found by name in :data:`METHODS`.

``base`` holds the contract and :class:`Family` (the settings a method owns); one module
per family registers its methods: ``supervised``, ``segan``, ``patchgan`` (bce, lsgan,
hinge, wgangp), ``meanteacher``, ``advsemi``.
"""

# Registration order is the order users see in messages and help: SegAN first.
from segan.methods import segan, patchgan, supervised, meanteacher, advsemi  # noqa: F401,I001  (registers the methods)
from segan.methods.base import (METHODS, Family, Method, Step, Term, family_keys, fused_pass_is_exact, register,
                                total_loss)
from segan.methods.segan import masked_images

__all__ = ["METHODS", "Family", "Method", "Step", "Term", "family_keys", "fused_pass_is_exact", "masked_images",
           "register", "total_loss"]
