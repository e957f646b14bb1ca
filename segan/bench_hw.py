"""Facts about the machine ``segan bench`` measures on: peak TFLOP/s (CUDA datasheets, a CPU
estimate from ``/proc/cpuinfo``), the process's peak memory, and how loaded the host was."""

from __future__ import annotations

import os
import platform
import re
import resource
import sys
from pathlib import Path

import torch

# Dense (no sparsity) datasheet peaks in TFLOP/s, matched by substring of
# torch.cuda.get_device_name(), most specific first.
CUDA_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM ("H100 80GB HBM3")
    ("H800", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("B200", {"bf16": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    ("RTX 3090", {"bf16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]


def cuda_peak(name: str) -> dict[str, float] | None:
    """Datasheet dense TFLOP/s per dtype for a CUDA device name, or None when unknown."""
    for key, peaks in CUDA_PEAKS:
        if key.lower() in name.lower():
            return dict(peaks)
    return None


def cpu_peak(cpuinfo: str, threads: int, cpus: set[int] | None = None) -> dict:
    """Estimated fp32 peak of the cores this process computes on, from ``/proc/cpuinfo`` text.

    ``physical cores used x GHz x FLOP/cycle``: cores = distinct (socket, core) pairs among
    the CPUs we may run on (``cpus``, default all), capped at ``threads``; GHz = the highest
    ``cpu MHz`` listed (often the base clock: turbo can exceed it, wide vector load can drop
    below it); FLOP/cycle (fp32, two FMA units): AVX-512 64, AVX2+FMA 32, AVX 16, else 8,
    except AMD family 25 (Zen 4), which runs AVX-512 as two 256-bit halves: 32. Intel parts
    with a single AVX-512 FMA unit reach half the estimate. bf16: AMX tiles 2048 FLOP/cycle,
    AVX512-BF16 dot products twice the fp32 rate; without either, no bf16 peak. Returns
    ``{"tflops": {"fp32": x[, "bf16": y]}, "cores", "ghz", "flop_per_cycle", "model", "note"}``.
    """
    blocks = [b for b in cpuinfo.strip().split("\n\n") if b.strip()]
    cores: set[tuple[str, str]] = set()
    mhz, flags, model, vendor, family = 0.0, set(), "unknown CPU", "", ""
    for block in blocks:
        fields = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        proc = int(fields.get("processor", "-1") or -1)
        if cpus is not None and proc not in cpus:
            continue
        cores.add((fields.get("physical id", "0"), fields.get("core id", str(proc))))
        try:
            mhz = max(mhz, float(fields.get("cpu MHz", "0")))
        except ValueError:
            pass
        flags |= set(fields.get("flags", "").split())
        model = fields.get("model name", model)
        vendor, family = fields.get("vendor_id", vendor), fields.get("cpu family", family)
    n = max(1, min(len(cores) or 1, max(threads, 1)))
    if "avx512f" in flags and vendor == "AuthenticAMD" and family == "25":
        per_cycle, isa = 32, "AVX-512 on AMD Zen 4, two 256-bit halves"
    elif "avx512f" in flags:
        per_cycle, isa = 64, "AVX-512"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, isa = 32, "AVX2+FMA"
    elif "avx" in flags:
        per_cycle, isa = 16, "AVX"
    else:
        per_cycle, isa = 8, "SSE"
    ghz = mhz / 1000 if mhz > 0 else 2.0
    tflops = {"fp32": n * ghz * per_cycle / 1000}
    bf16_per_cycle = 2048 if "amx_bf16" in flags else 2 * per_cycle if "avx512_bf16" in flags else 0
    if bf16_per_cycle:
        tflops["bf16"] = n * ghz * bf16_per_cycle / 1000
    note = (f"estimate: {n} cores x {ghz:.2f} GHz x {per_cycle} fp32 FLOP/cycle ({isa}, 2 FMA units)"
            + (f", {bf16_per_cycle} bf16" if bf16_per_cycle else "")
            + ("" if mhz > 0 else "; clock unknown, 2 GHz assumed"))
    return {"tflops": tflops, "cores": n, "ghz": ghz, "flop_per_cycle": per_cycle, "model": model,
            "note": note}


def device_info(device: torch.device) -> dict:
    """Name, peak TFLOP/s per dtype (or None) and where the peak comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = cuda_peak(name)
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": name, "memory_gb": props.total_memory / 1e9,
                "peak_tflops": peaks, "peak_note": "datasheet dense peak" if peaks else
                f"unknown device {name!r}: no MFU (add it to segan.bench_hw.CUDA_PEAKS)"}
    threads = torch.get_num_threads()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    except OSError:
        text, cpus = "", None
    est = cpu_peak(text, threads, cpus)
    name = est["model"] if est["model"] != "unknown CPU" else (platform.processor() or "CPU")
    return {"type": "cpu", "name": name, "threads": threads, "peak_tflops": est["tflops"], "peak_note": est["note"]}


def reset_host_peak() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def host_peak_gb() -> float:
    """VmHWM (peak RSS since the last reset) where readable, else ru_maxrss (whole run)."""
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) * 1024 / 1e9
    except OSError:
        pass
    return ru_maxrss_gb()


def ru_maxrss_gb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def load_avg() -> float | None:
    """1-minute load average: how busy the machine was (other processes skew CPU figures)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None
