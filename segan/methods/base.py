"""The method contract, the registry, and a method's *family*: the settings it owns.

A method is one small object per training objective, found by name in :data:`METHODS`.
It declares a :class:`Family` (the critic it needs, the critic norms and clamp it works
with, its adversarial weight and warm-up), builds its critic, forms the critic's input,
and, given one training iteration as a :class:`Step`, computes the critic's loss
(:meth:`Method.critic_loss`) and the segmentor's named loss terms
(:meth:`Method.segmentor_terms`). The training loop owns optimizers, autocast, backward,
gradient averaging, logging and the NaN guard, and never branches on the method's name.

Shapes: labelled image ``(N, C, *spatial)``, its targets, logits and probabilities
``(N, K, *spatial)``; the unlabelled batch ``(M, C, *spatial)`` and ``(M, K, *spatial)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.utils import parametrize

from segan.config import Config
from segan.losses import SegmentationLoss
from segan.methods.adversarial import AdversarialSchedule, adaptive_weight


@dataclass(frozen=True)
class Family:
    """What a method owns.

    ``settings``: dotted config key -> value, applied after the dataclass defaults and
    before the YAML file (``segan.config.resolve_config``), so a config that does not set
    a key gets the method's value. ``allowed``: dotted key -> (values the method works
    with, why); an explicit value outside them exits 2 naming both keys.
    """

    settings: Mapping[str, Any] = field(default_factory=dict)
    allowed: Mapping[str, tuple[tuple[Any, ...], str]] = field(default_factory=dict)

    def conflicts(self, values: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
        """``(key, value, why)`` for every value in ``values`` (flat dotted keys) the method cannot use."""
        return [(key, values[key], why) for key, (ok, why) in self.allowed.items()
                if key in values and values[key] not in ok]


METHODS: dict[str, type["Method"]] = {}


def register(name: str) -> Callable[[type["Method"]], type["Method"]]:
    def deco(cls: type["Method"]) -> type["Method"]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def family_keys() -> set[str]:
    """Every config key some method owns (what a sweep drops from a file written for another method)."""
    return {key for cls in METHODS.values() for key in cls.family.settings}


def fused_pass_is_exact(critic: nn.Module) -> bool:
    """True when one forward over ``[a; b]`` equals two forwards over ``a`` and ``b``.

    Not so with batch norm in training mode (statistics over the mixed batch), dropout
    (other random masks) or spectral norm (one power iteration instead of two).
    """
    for m in critic.modules():
        if m.training and isinstance(m, _BatchNorm):
            return False
        if m.training and isinstance(m, _DropoutNd) and m.p > 0:
            return False
        if parametrize.is_parametrized(m):
            return False
    return True


@dataclass
class Step:
    """One training iteration as a method sees it (built by the training loop).

    ``logits`` carry the segmentor's graph; ``prob = sigmoid(logits)`` in float32. A
    method detaches what its critic must not push back into the segmentor. The
    unlabelled fields are set only when the data has an unlabelled stream and the
    method uses it (:attr:`Method.uses_unlabeled`): the loop then segments
    ``[image; image_u]`` in one pass and splits the logits where that equals two passes
    (:func:`fused_pass_is_exact` of the segmentor), else in two passes.
    """

    image: torch.Tensor  # (N, C, *s)
    target: torch.Tensor  # (N, K, *s) 0/1 regions
    logits: torch.Tensor  # (N, K, *s)
    prob: torch.Tensor  # (N, K, *s) float32
    segment: Callable[[torch.Tensor], torch.Tensor]  # segmentor logits of another input (autocast, graph kept)
    epoch: float = 0.0  # schedule position in epochs (follows train.max_minutes too)
    index: int = 0  # optimizer steps done before this one
    image_u: torch.Tensor | None = None  # (M, C, *s)
    logits_u: torch.Tensor | None = None  # (M, K, *s)
    prob_u: torch.Tensor | None = None  # (M, K, *s) float32
    uniform: torch.Tensor | None = None  # (N,) bool: labelled items drawn like the unlabelled ones (not
    #                                       centred on a label), for statistics compared with the unlabelled batch

    @property
    def has_unlabeled(self) -> bool:
        return self.image_u is not None


class Term(NamedTuple):
    """One named term of the segmentor's loss: the segmentor minimises ``sum(weight * value)``;
    ``value`` (a scalar tensor) is what is logged; ``weight`` a number, or a detached scalar
    tensor (:meth:`Method.balance` under ``adv_balance: adaptive``)."""

    value: torch.Tensor
    weight: float | torch.Tensor


def total_loss(terms: Mapping[str, Term]) -> torch.Tensor:
    """``sum(weight * value)`` over the terms: the scalar the segmentor step minimises."""
    total = None
    for term in terms.values():
        weighted = term.weight * term.value
        total = weighted if total is None else total + weighted
    return total


class Method:
    """Supervised base: the segmentation loss only, no critic.

    Contract (called by :class:`segan.training.Trainer`, under autocast):

    - :meth:`critic_loss` ``(critic, step)``: the critic's loss to minimise (predictions detached here);
    - :meth:`segmentor_terms` ``(critic, step, w_adv)``: named :class:`Term` s; ``critic`` is None
      while the adversarial term is off (warm-up, or no critic), and is frozen otherwise;
    - hooks :meth:`prepare` (after the segmentor is built), :meth:`after_critic_step`,
      :meth:`after_segmentor_step`; :meth:`state_dict` / :meth:`load_state_dict` for state
      the method owns (a mean teacher's weights), saved in every checkpoint.
    """

    name: ClassVar[str] = "base"
    has_critic: ClassVar[bool] = False
    family: ClassVar[Family] = Family()
    # Whether the loop draws and segments an unlabelled batch for this method (when the data has one).
    # A method may make this and loss_names properties of its config (segan: only with w_semi_fm > 0).
    uses_unlabeled: ClassVar[bool] = False
    # The segmentor terms logged every epoch, in this order (a term off in a step counts 0). Every method
    # logs loss_seg and loss_adv, so runs of different methods compare alike. A weight-0 term is logged only.
    loss_names: ClassVar[tuple[str, ...]] = ("loss_seg", "loss_adv")
    # The terms that method.adv_balance: adaptive weighs against loss_seg.
    adversarial_terms: ClassVar[tuple[str, ...]] = ("loss_adv",)

    def __init__(self, cfg: Config, in_channels: int, n_regions: int) -> None:
        self.cfg = cfg
        self.in_channels = in_channels
        self.n_regions = n_regions
        self.seg_loss = SegmentationLoss(cfg.method.seg_loss, cfg.method.dice_batch)
        # w_adv(t) and when the critic starts (method.adv_start, warm-up, ramp); its state is saved with the run.
        self.schedule = AdversarialSchedule(cfg.method)
        self._last_layer: torch.Tensor | None = None

    @property
    def draws_unlabeled(self) -> bool:
        """Whether a training step segments an unlabelled batch: the method uses one and the config
        gives the data an unlabelled stream (``data.unlabeled`` or ``data.labeled_cases``)."""
        d = self.cfg.data
        return bool(self.uses_unlabeled) and (d.unlabeled is not None or d.labeled_cases is not None)

    def needs_unlabeled(self, w_adv: float, epoch: float) -> bool:
        """Whether this step's terms use the unlabelled batch at schedule position ``epoch``
        (the loop skips loading and segmenting it otherwise). A method with a critic uses it
        only through the critic, which does not train at ``w_adv`` 0 (a warm-up, or
        ``adv_start: settled`` before the loss settles), so there the batch would be segmented
        for nothing. A method whose unlabelled term starts later says so by overriding this."""
        return bool(self.uses_unlabeled) and (not self.has_critic or w_adv > 0)

    # ---------------------------------------------------------------- adversarial balance
    @property
    def balance_names(self) -> tuple[str, ...]:
        """Extra values :meth:`balance` returns for the epoch logs (``adv_scale``: the adaptive ratio)."""
        return ("adv_scale",) if self.has_critic and self.cfg.method.adv_balance == "adaptive" else ()

    def balance(self, terms: dict[str, Term], segmentor: nn.Module) -> tuple[dict[str, Term], dict[str, torch.Tensor]]:
        """The terms as the segmentor minimises them, and the values named by :attr:`balance_names`.

        ``adv_balance: fixed``: ``terms`` as given (the same objects). ``adaptive``: each
        :attr:`adversarial_terms` entry's weight ``w_adv(t)`` times :func:`adaptive_weight`
        of ``loss_seg`` and that term at the segmentor's output convolution.
        """
        if self.cfg.method.adv_balance == "fixed" or not self.has_critic:
            return terms, {}
        present = [name for name in self.adversarial_terms if name in terms]
        if not present or "loss_seg" not in terms:
            return terms, {"adv_scale": terms["loss_seg"].value.new_zeros(()).detach()}
        if self._last_layer is None:
            from segan.nets.segmentor import output_layer

            self._last_layer = output_layer(getattr(segmentor, "module", segmentor), self.n_regions).weight
        out, scales = dict(terms), []
        for name in present:
            scale = adaptive_weight(terms["loss_seg"].value, terms[name].value, self._last_layer,
                                    self.cfg.method.adv_balance_max)
            out[name] = Term(terms[name].value, terms[name].weight * scale)
            scales.append(scale)
        return out, {"adv_scale": torch.stack(scales).mean()}

    # ---------------------------------------------------------------- critic
    @property
    def critic_in_channels(self) -> int:
        """Channels of :meth:`critic_input`."""
        raise NotImplementedError

    def critic_input(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What the critic sees for an image ``(N, C, *s)`` and a mask ``(N, K, *s)``."""
        raise NotImplementedError

    def build_critic(self) -> nn.Module | None:
        if not self.has_critic:
            return None
        from segan.nets import build_critic

        return build_critic(self.cfg.model, self.cfg.data.spatial_dims, self.critic_in_channels)

    def critic_loss(self, critic: nn.Module, step: Step) -> torch.Tensor:
        """The critic's loss to minimise; the segmentor's outputs enter detached."""
        raise NotImplementedError

    # ---------------------------------------------------------------- segmentor
    def segmentor_terms(self, critic: nn.Module | None, step: Step, w_adv: float) -> dict[str, Term]:
        """The segmentor's loss terms; here the segmentation loss on the labelled batch."""
        return {"loss_seg": Term(self.seg_loss(step.logits, step.target), self.cfg.method.w_seg)}

    # ---------------------------------------------------------------- hooks and state
    def prepare(self, segmentor: nn.Module, device: torch.device) -> None:
        """Called once the segmentor is built and on its device (before any checkpoint is loaded)."""

    @torch.no_grad()
    def after_critic_step(self, critic: nn.Module) -> None:
        """Weight clamp, when configured (SegAN / WGAN style Lipschitz constraint)."""
        c = self.cfg.method.clamp
        if c is None or not self.has_critic:
            return
        params = list(critic.parameters())
        if self.cfg.train.foreach_clamp:  # one kernel per dtype group; same values as the loop
            torch._foreach_clamp_min_(params, -c)
            torch._foreach_clamp_max_(params, c)
        else:  # how the reference code does it
            for p in params:
                p.data.clamp_(-c, c)

    def after_segmentor_step(self, segmentor: nn.Module, step: Step) -> None:
        """Called after every segmentor update (a mean teacher follows the student here)."""

    def state_dict(self) -> dict[str, Any]:
        """Tensors and numbers the method owns besides the networks (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (resume)."""

    def critic_pair(self, critic: nn.Module, fake: torch.Tensor,
                    real: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Critic outputs for the fake and the real input.

        ``train.fused_critic`` runs one pass over ``[fake; real]``, but only where that is
        exactly two passes (:func:`fused_pass_is_exact`): a speed switch never changes the maths.
        """
        if self.cfg.train.fused_critic and fused_pass_is_exact(critic):
            outs = critic(torch.cat([fake, real]))
            n = fake.shape[0]
            return [o[:n] for o in outs], [o[n:] for o in outs]
        return critic(fake), critic(real)
