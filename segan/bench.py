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
from pathlib import Path

import torch

from segan.bench_hw import device_info, host_peak_gb, load_avg, reset_host_peak, ru_maxrss_gb
from segan.bench_modes import MODES, ModeRunner, switches, sync
from segan.bench_summary import summarize
from segan.config import Config, load_config, to_dict
from segan.errors import UserError

BRATS_SHAPE = (240, 240, 155)
PHANTOM_SHAPE = (96, 96, 96)


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
        sync(device)
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
        sync(device)
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
    sync(runner.trainer.device)
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
        sync(device)
        start = time.perf_counter()
        predict_volume(model, volume, dims, roi_size=list(cfg.data.patch_size), sw_batch_size=cfg.post.sw_batch_size,
                       overlap=cfg.post.overlap, amp=trainer.amp)
        sync(device)
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
