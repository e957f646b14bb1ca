"""Process-level set-up: device, distributed (torchrun) context and loaders, seeding and RNG state."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from segan.errors import UserError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA (this rank's GPU) when available, else CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use --set train.device=cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def amp_enabled(amp: bool, amp_cpu: bool, device: torch.device) -> bool:
    """bf16 autocast on CUDA when ``amp``; on CPU only when ``amp_cpu`` is also set.

    CPU bf16 pays where the CPU has native bf16 (AVX512-BF16 / AMX: 1.4x per 2D step on
    Zen 4, README); elsewhere it is emulated, so it is opt-in and fp32 stays the default.
    """
    return bool(amp and (device.type == "cuda" or (device.type == "cpu" and amp_cpu)))


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def init_distributed(device_name: str) -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(rank, world, local)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict:
    """All RNG states as tensors/lists only (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    gauss = None if py[-1] == -1 else py[-1]
    random.setstate((3, tuple(int(v) for v in py[:-1]), gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def allreduce_grads(module: nn.Module) -> None:
    """Average gradients across ranks (the critic is not DDP-wrapped: it runs several
    forwards per step, and WGAN-GP needs double backward, which DDP does not support)."""
    import torch.distributed as dist

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def sharded_loader(dataset, batch_size: int, num_workers: int, dist: DistContext, seed: int,
                   pin_memory: bool = False):
    """``(loader, sampler)``: a loader over ``dataset`` in index order (:func:`segan.data.make_loader`)
    and, under DDP, the sampler that gives each rank its share (``None`` on one process)."""
    from segan.data import make_loader

    sampler = None
    if dist.enabled:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=False)
    loader = make_loader(dataset, batch_size, num_workers, sampler=sampler, seed=seed, pin_memory=pin_memory)
    return loader, sampler


def cycle(loader):
    """The loader's batches, starting over when it runs out (``train.steps_per_epoch`` may ask
    for more batches than one pass holds; the items of an epoch are fixed, so a restart
    repeats them)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return
