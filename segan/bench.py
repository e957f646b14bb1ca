"""``segan bench``: eager vs fast training throughput, memory, loader rate, FLOPs/MFU, inference time.

Everything is measured in one process on one device:

- **train**: the same model (config's method, segmentor, critic, batch size, patch size)
  in two modes. ``eager`` is how the reference code works: fp32, contiguous tensors,
  separate critic passes for fake and real, weight clamp in a Python loop, the target
  branch recorded by autograd, plain (foreach) Adam, no ``cudnn.benchmark``, no compile.
  ``fast`` takes the config's switches (all on by default): bf16 autocast, channels-last,
  one critic pass over ``[fake; real]`` (only where it equals two passes: no batch norm,
  dropout or spectral norm in the critic), foreach clamp, target branch under ``no_grad``,
  fused Adam, ``cudnn.benchmark`` and ``torch.compile`` when ``train.compile`` is set
  (AMP, channels-last and fused Adam act on CUDA only; the Trainer ignores them on CPU).
  Batches are synthetic (random image, nested random 0/1 regions) and already on the
  device, so the loader is excluded; warm-up steps are excluded. The two modes alternate
  step by step on CPU (in 5 blocks on CUDA, synchronised at block edges only) so that
  load from other processes hits both alike; the per-step time is the median over blocks
  and the speedup the median of eager/fast over neighbouring blocks.
- **FLOPs** of one training step (``torch.utils.flop_counter``: convolutions and matrix
  products, forward and backward), achieved TFLOP/s and MFU against the device's peak
  (CUDA: a table of datasheet dense peaks; CPU: an estimate, see :func:`segan.bench_hw.cpu_peak`).
- **memory**: CUDA ``max_memory_allocated`` of each mode's step; on CPU the process's
  peak resident set (VmHWM, reset per mode) and ``ru_maxrss`` for the whole run.
- **loader**: samples/s of the real training loader on the config's data (``data.root``),
  or on a small generated phantom set when that folder does not exist.
- **inference**: seconds per volume through :func:`segan.sliding.predict_volume` (2D slice
  by slice, 3D sliding window at ``post.overlap``) for a BraTS-sized ``C x 240 x 240 x 155``
  and a phantom-sized ``C x 96 x 96 x 96`` random volume, with the fast-mode segmentor.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from segan.bench_hw import device_info, host_peak_gb, load_avg, reset_host_peak, ru_maxrss_gb
from segan.bench_summary import summarize
from segan.config import Config, load_config, to_dict
from segan.errors import UserError

MODES = ("eager", "fast")
BRATS_SHAPE = (240, 240, 155)
PHANTOM_SHAPE = (96, 96, 96)
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


def _sync(device: torch.device) -> None:
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
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            self.step()
        _sync(device)
        return (time.perf_counter() - start) / max(n, 1)


def _blocks(steps: int, rounds: int = 5) -> list[int]:
    """Split ``steps`` into at most ``rounds`` nearly equal blocks."""
    rounds = max(1, min(rounds, steps))
    return [steps // rounds + (1 if i < steps % rounds else 0) for i in range(rounds)]


def _build_and_warm(cfg: Config, mode: str, device: torch.device, out_dir: Path,
                    warmup: int) -> tuple[ModeRunner, dict]:
    """Build one mode, warm it up and measure its peak memory over one more step.

    With ``train.compile`` a failure at the first compiled step (where torch.compile really
    runs) falls back to eager execution of that mode and is reported.
    """
    info: dict = {}
    base = 0
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
    runner = ModeRunner.build(cfg, mode, device, out_dir)
    try:
        runner.run(warmup)
    except Exception as exc:  # noqa: BLE001 - any compiler/backend failure -> eager fallback
        if not runner.cfg.train.compile:
            raise
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        print(f"warning: torch.compile failed in {mode} mode ({msg}); measuring it without compile", file=sys.stderr)
        info["compile_error"] = msg
        fallback = copy.deepcopy(cfg)
        fallback.train.compile = False
        del runner
        gc.collect()  # free the failed attempt's tensors before the memory measurement
        runner = ModeRunner.build(fallback, mode, device, out_dir)
        runner.run(warmup)
    # peak memory of one steady-state step
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.run(1)
        info["peak_mem_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 1e9
        info["peak_mem_kind"] = "cuda max_memory_allocated of one step, this mode's tensors only"
    else:
        exact = reset_host_peak()
        runner.run(1)
        info["peak_mem_gb"] = host_peak_gb()
        info["peak_mem_kind"] = ("host peak RSS of one step (whole process)" if exact
                                 else "host peak RSS of the process so far (ru_maxrss)")
    return runner, info


def count_flops(runner: ModeRunner) -> int:
    """FLOPs of one training step (conv / matmul, forward + backward) via FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    runner.activate()
    with FlopCounterMode(display=False) as counter:
        runner.step()
    _sync(runner.trainer.device)
    return int(counter.get_total_flops())


def _compute_dtype(runner: ModeRunner) -> str:
    if runner.trainer.amp:
        return "bf16"
    if runner.trainer.device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"  # PyTorch's default for convolutions on Ampere and newer
    return "fp32"


def bench_train(cfg: Config, device: torch.device, steps: int, warmup: int | None = None) -> tuple[dict, ModeRunner]:
    """Eager vs fast training-step figures; returns them and the fast runner (for inference)."""
    warmup = warmup if warmup is not None else (3 if device.type == "cuda" else 1)
    peaks = device_info(device)["peak_tflops"] or {}
    with tempfile.TemporaryDirectory(prefix="segan-bench-") as tmp:
        runners: dict[str, ModeRunner] = {}
        out: dict = {}
        for mode in MODES:
            runners[mode], out[mode] = _build_and_warm(cfg, mode, device, Path(tmp), warmup)
        flops = count_flops(runners["eager"])
        times: dict[str, list[float]] = {m: [] for m in MODES}
        # CPU steps are synchronous: alternate every step (finest interleaving against load
        # from other processes); CUDA: a few blocks, so block-edge syncs do not stall the queue
        blocks = _blocks(steps, rounds=5 if device.type == "cuda" else steps)
        for i, n in enumerate(blocks):
            order = MODES if i % 2 == 0 else MODES[::-1]  # alternate who goes first: drift hits both alike
            for mode in order:
                times[mode].append(runners[mode].run(n))
        for mode in MODES:
            r = runners[mode]
            step_s = statistics.median(times[mode])
            batch = r.cfg.train.batch_size
            losses = (r.losses / max(r.n_steps, 1)).tolist()  # mean over every step run
            tflops = flops / step_s / 1e12
            dtype = _compute_dtype(r)
            peak = peaks.get(dtype)
            out[mode].update(
                step_s=step_s, step_s_blocks=times[mode], samples_per_s=batch / step_s,
                voxels_per_s=batch * math.prod(r.cfg.data.patch_size) / step_s, tflops=tflops,
                compute_dtype=dtype, mfu=(tflops / peak) if peak else None, switches=switches(r.cfg),
                mean_losses={name.removeprefix("loss_"): v for name, v in zip(r.trainer.loss_names, losses)},
                finite=all(math.isfinite(v) for v in losses))
        fast = runners["fast"]
        del runners["eager"]
        info = {"batch_size": cfg.train.batch_size, "patch_size": list(cfg.data.patch_size),
                "spatial_dims": cfg.data.spatial_dims, "method": cfg.method.name,
                "channels": len(fast.trainer.data.channels), "regions": len(fast.trainer.data.region_names),
                "segmentor_params": sum(p.numel() for p in fast.trainer.segmentor.parameters()),
                "critic_params": sum(p.numel() for p in fast.trainer.critic.parameters()) if fast.trainer.critic
                else 0, "steps": steps, "warmup": warmup, "blocks": blocks,
                "flops_per_step": flops}
    # Blocks i of the two modes ran back to back: the median of their ratios cancels load
    # bursts from other processes better than the ratio of the two medians.
    paired = statistics.median(e / f for e, f in zip(times["eager"], times["fast"]))
    return {**info, **out, "speedup": paired,
            "speedup_of_medians": out["eager"]["step_s"] / out["fast"]["step_s"]}, fast


# ---------------------------------------------------------------- inference
def bench_inference(runner: ModeRunner, cfg: Config, repeats: int | None = None) -> dict:
    """Seconds per BraTS-sized and phantom-sized random volume with the fast segmentor."""
    from segan.sliding import predict_volume

    trainer = runner.trainer
    device, dims = trainer.device, cfg.data.spatial_dims
    model = trainer.segmentor.eval()
    n_ch = len(trainer.data.channels)
    runner.activate()

    def once(volume: torch.Tensor) -> float:
        _sync(device)
        start = time.perf_counter()
        predict_volume(model, volume, dims, roi_size=list(cfg.data.patch_size), sw_batch_size=cfg.post.sw_batch_size,
                       overlap=cfg.post.overlap, amp=trainer.amp)
        _sync(device)
        return time.perf_counter() - start

    out: dict = {"mode": "fast", "method": "slice by slice" if dims == 2 else
                 f"sliding window {list(cfg.data.patch_size)} overlap {cfg.post.overlap}",
                 "amp_bf16": trainer.amp}
    g = torch.Generator().manual_seed(0)
    for key, shape in (("phantom", PHANTOM_SHAPE), ("brats", BRATS_SHAPE)):
        volume = torch.randn(n_ch, *shape, generator=g).to(device)
        # CUDA: warm each shape (cudnn.benchmark picks kernels per shape); CPU: the phantom warms
        warm = device.type == "cuda" or key == "phantom"
        if warm:
            once(volume)
        n = repeats or (3 if device.type == "cuda" or key == "phantom" else 1)
        runs = [once(volume) for _ in range(n)]
        out[f"{key}_volume_s"] = statistics.median(runs)
        out[f"{key}_shape"] = [n_ch, *shape]
        out[f"{key}_runs_s"] = runs
        del volume
    model.train()
    return out


# ---------------------------------------------------------------- loader
def _has_data(cfg: Config) -> bool:
    return bool(cfg.data.datalist and Path(cfg.data.datalist).is_file()) or Path(cfg.data.root).is_dir()


def bench_loader(cfg: Config, device: torch.device, batches: int = 10, phantom_cases: int = 4,
                 phantom_size: int = 96) -> dict:
    """Samples/s of the training loader (``make_loader`` over ``PatchDataset``).

    Uses the config's data when ``data.root`` (or ``data.datalist``) exists, else a small
    phantom set generated in a temporary folder. Preprocessing (cached) and the first
    batch (worker start-up) are not timed; ``batches`` batches after it are.
    """
    from segan.data import build_data, make_loader

    c = copy.deepcopy(cfg)
    with tempfile.TemporaryDirectory(prefix="segan-bench-data-") as tmp:
        if _has_data(c):
            source = f"config data ({c.data.datalist or c.data.root})"
        else:
            from data_prep.phantoms import generate

            root = Path(tmp) / "phantoms"
            generate(root, cases=phantom_cases, size=phantom_size, seed=c.seed, test_fraction=0.0)
            c.data.root, c.data.datalist = str(root), None
            c.preprocess.cache_dir = str(Path(tmp) / "cache")
            c.data.val_fraction = max(c.data.val_fraction, 1 / phantom_cases)
            source = (f"generated phantoms ({phantom_cases} cases of {phantom_size}^3; "
                      f"{cfg.data.root} not found)")
        data = build_data(c)
        batch = c.train.batch_size
        loader = make_loader(data.train_set, batch, c.data.num_workers, seed=c.seed,
                             pin_memory=device.type == "cuda")
        data.train_set.set_epoch(0)
        start = time.perf_counter()
        it = iter(loader)
        next(it)
        first = time.perf_counter() - start
        n, seen = 0, 0
        start = time.perf_counter()
        while n < batches:
            try:
                b = next(it)
            except StopIteration:
                data.train_set.set_epoch(data.train_set.epoch + 1)
                it = iter(loader)
                continue
            seen += b["image"].shape[0]
            n += 1
        elapsed = time.perf_counter() - start
        del it, loader
    return {"samples_per_s": seen / max(elapsed, 1e-9), "batches": n, "batch_size": batch,
            "num_workers": c.data.num_workers, "first_batch_s": first, "source": source}


# ---------------------------------------------------------------- entry point
def _resolve(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


def run_bench(config: str, overrides: list[str] | None = None, device: str = "auto", steps: int = 20,
              json_out: Path | None = None) -> str:
    """Run every measurement for ``config`` on ``device``; write JSON to ``json_out``; return a summary."""
    if steps < 1:
        raise UserError(f"--steps {steps}: need at least 1 timed step per mode")
    cfg = load_config(config, list(overrides or []))
    dev = _resolve(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    hw = device_info(dev)
    load_start = load_avg()
    started = time.perf_counter()
    train, fast = bench_train(cfg, dev, steps)
    inference = bench_inference(fast, cfg)
    del fast
    loader = bench_loader(cfg, dev)
    loader["vs_train_fast"] = loader["samples_per_s"] / train["fast"]["samples_per_s"]
    result = {
        "device": f"{dev.type}: {hw['name']}" + (f" ({hw['threads']} threads)" if dev.type == "cpu" else ""),
        "config": str(config),
        "overrides": list(overrides or []),
        "hardware": hw,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": {"platform": platform.platform(), "python": platform.python_version(),
                 "peak_rss_gb": ru_maxrss_gb(), "load_avg_1min_start": load_start, "load_avg_1min_end": load_avg()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": time.perf_counter() - started,
        "train": train,
        "inference": inference,
        "loader": loader,
        "resolved_config": to_dict(cfg),
    }
    busy = [v for v in (load_start, result["host"]["load_avg_1min_end"]) if v is not None and v > (os.cpu_count() or 1)]
    if dev.type == "cpu" and busy:
        result["warning"] = (f"the machine was busy (load average {max(busy):.1f} on {os.cpu_count()} CPUs): CPU "
                             "figures are noisy; repeat, or run with OMP_WAIT_POLICY=PASSIVE or --set train.threads=1")
    if json_out is not None:
        from segan.io_utils import atomic_write_text

        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(json_out), json.dumps(result, indent=1, default=str) + "\n")
    return summarize(result) + (f"\nJSON: {json_out}" if json_out is not None else "")
