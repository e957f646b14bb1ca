"""The two modes ``segan bench`` compares and the step runner it times (also ``segan plan``'s trial).

- :func:`synthetic_batch` / :func:`synthetic_bundle`: random images with nested random
  regions, already on the device, so the loader is excluded from a step's time;
- :func:`mode_config`: ``eager`` (every speed switch off, the reference code's way) or
  ``fast`` (the config's switches);
- :class:`ModeRunner`: a :class:`segan.training.Trainer` in one mode plus its batch; ``run(n)``
  returns seconds per step of the loop's own ``train_step``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from segan.config import Config

MODES = ("eager", "fast")
# Used when the config does not name its channels / regions: BraTS-like inputs.
DEFAULT_CHANNELS = ["T1", "T1ce", "T2", "FLAIR"]
DEFAULT_REGIONS = {"whole_tumour": [1, 2, 3], "tumour_core": [2, 3], "enhancing": [3]}


# ---------------------------------------------------------------- synthetic data
def synthetic_batch(batch_size: int, channels: int, regions: int, patch_size: list[int], device: torch.device,
                    foreground: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random image ``(N, C, *patch)`` and nested 0/1 regions ``(N, K, *patch)``, both float32.

    Each sample thresholds one smooth random field: region k covers ``foreground / 2**k`` of
    the patch in a few blobs, inside region k-1 (like whole tumour > core > enhancing).
    """
    g = torch.Generator().manual_seed(seed)
    dims = len(patch_size)
    image = torch.randn(batch_size, channels, *patch_size, generator=g)
    low = [max(4, p // 16) for p in patch_size]
    field = torch.nn.functional.interpolate(torch.rand(batch_size, 1, *low, generator=g), size=list(patch_size),
                                            mode="bilinear" if dims == 2 else "trilinear", align_corners=False)
    field += 1e-4 * torch.rand(field.shape, generator=g)  # no ties on the flat borders of the upsampling
    flat = field.flatten(1)
    masks = []
    for k in range(regions):
        share = foreground / 2 ** k
        kth = max(1, min(flat.shape[1], int(round(flat.shape[1] * (1 - share)))))
        threshold = flat.kthvalue(kth, dim=1).values.view(-1, *([1] * (dims + 1)))
        masks.append((field > threshold).float())
    target = torch.cat(masks, 1)
    return image.to(device), target.to(device)


def synthetic_bundle(cfg: Config):
    """A :class:`segan.data.DataBundle` describing synthetic batches (no training set, no validation)."""
    from segan.data import DataBundle

    channels = list(cfg.data.channels or DEFAULT_CHANNELS)
    regions = dict(cfg.data.regions or DEFAULT_REGIONS)
    labels = sorted({i for ids in regions.values() for i in ids})
    return DataBundle(train_set=None, val_cases=[], channels=channels, region_names=list(regions),
                      region_labels=[list(v) for v in regions.values()],
                      label_names={0: "background", **{i: f"label_{i}" for i in labels}},
                      preprocess_spec={}, datalist={}, dataset_name="synthetic")


# ---------------------------------------------------------------- modes
def mode_config(cfg: Config, mode: str) -> Config:
    """The config of one mode: ``eager`` turns every speed switch off, ``fast`` keeps the config's."""
    c = copy.deepcopy(cfg)
    c.train.progress = False
    c.train.deterministic = False
    if mode == "eager":
        t = c.train
        t.amp = t.amp_cpu = t.channels_last = t.compile = t.cudnn_benchmark = False
        t.fused_critic = t.foreach_clamp = t.target_no_grad = False
        c.optim.fused = False
    return c


def switches(cfg: Config) -> dict:
    t = cfg.train
    return {"amp_bf16": t.amp, "amp_cpu": t.amp_cpu, "channels_last": t.channels_last, "fused_critic": t.fused_critic,
            "foreach_clamp": t.foreach_clamp, "target_no_grad": t.target_no_grad, "fused_optim": cfg.optim.fused,
            "cudnn_benchmark": t.cudnn_benchmark, "compile": t.compile}


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class ModeRunner:
    """A Trainer in one mode plus its synthetic batch on the device."""

    mode: str
    cfg: Config
    trainer: object
    image: torch.Tensor
    target: torch.Tensor
    w_adv: float
    losses: torch.Tensor
    image_u: torch.Tensor | None = None  # the unlabelled batch, when the method draws one (Method.draws_unlabeled)
    n_steps: int = 0

    @classmethod
    def build(cls, cfg: Config, mode: str, device: torch.device, out_dir: Path) -> "ModeRunner":
        from segan.runtime import DistContext
        from segan.training import Trainer

        c = mode_config(cfg, mode)
        c.train.device = str(device)
        torch.manual_seed(cfg.seed)  # both modes start from the same weights
        trainer = Trainer(c, out_dir, DistContext(), data=synthetic_bundle(c))
        image, target = synthetic_batch(c.train.batch_size, len(trainer.data.channels),
                                        len(trainer.data.region_names), c.data.patch_size, trainer.device,
                                        seed=cfg.seed)
        image_u = None
        if trainer.method.draws_unlabeled:  # a semi-supervised step segments an unlabelled batch as well
            image_u, _ = synthetic_batch(trainer.unlabeled_batch_size, len(trainer.data.channels),
                                         len(trainer.data.region_names), c.data.patch_size, trainer.device,
                                         seed=cfg.seed + 1)
        # the adversarial term on, so both critic passes of SegAN's step run
        w_adv = c.method.w_adv if c.method.w_adv > 0 else 0.1
        return cls(mode, c, trainer, image, target, w_adv, torch.zeros(len(trainer.loss_names), device=trainer.device),
                   image_u)

    def activate(self) -> None:
        """Global flags are per mode (the Trainer sets them at construction)."""
        if self.trainer.device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(self.cfg.train.cudnn_benchmark)

    def step(self) -> None:
        image, target, image_u = self.image, self.target, self.image_u
        fmt = self.trainer.memory_format
        if fmt is not None:  # as train_epoch does with each loaded batch
            image, target = image.contiguous(memory_format=fmt), target.contiguous(memory_format=fmt)
            image_u = image_u.contiguous(memory_format=fmt) if image_u is not None else None
        self.losses += self.trainer.train_step(image, target, self.w_adv, image_u=image_u)
        self.n_steps += 1

    def run(self, n: int) -> float:
        """Seconds per step over ``n`` steps (device synchronised at both ends)."""
        self.activate()
        device = self.trainer.device
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            self.step()
        sync(device)
        return (time.perf_counter() - start) / max(n, 1)
