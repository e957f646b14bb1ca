"""The readable table ``segan bench`` prints from its result dict (also written as JSON)."""

from __future__ import annotations

from segan.bench_modes import MODES


def _fmt(value, spec: str = ".3g", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def summarize(result: dict) -> str:
    """A readable table of a bench result (the dict :func:`run_bench` writes as JSON)."""
    t, inf, ld, hw = result["train"], result["inference"], result["loader"], result["hardware"]
    peak = hw.get("peak_tflops") or {}
    peak_txt = ", ".join(f"{k} {v:g} TFLOP/s" for k, v in peak.items()) or "unknown"
    spatial = "x".join(map(str, t["patch_size"]))
    rows = [
        ("s/step", "step_s", ".3g"), ("samples/s", "samples_per_s", ".4g"), ("Mvoxel/s", "voxels_per_s", None),
        ("TFLOP/s", "tflops", ".3g"), ("MFU", "mfu", ".1%"), ("peak mem GB", "peak_mem_gb", ".3g"),
        ("dtype", "compute_dtype", "s"),
    ]
    lines = [
        f"segan bench {result['config']} on {result['device']}",
        f"  peak: {peak_txt} ({hw.get('peak_note', '')})",
        f"  model: {t['method']} {t['spatial_dims']}D, batch {t['batch_size']} x {t['channels']}x{spatial}, "
        f"segmentor {t['segmentor_params'] / 1e6:.2f} M params, critic {t['critic_params'] / 1e6:.2f} M params, "
        f"{t['flops_per_step'] / 1e9:.1f} GFLOP/step",
        f"  {'train step':<14}{'eager':>12}{'fast':>12}",
    ]
    for label, key, spec in rows:
        vals = []
        for mode in MODES:
            v = t[mode].get(key)
            if key == "voxels_per_s":
                vals.append(f"{v / 1e6:.3g}")
            else:
                vals.append(_fmt(v, spec))
        lines.append(f"  {label:<14}{vals[0]:>12}{vals[1]:>12}")
    notes = [f"{m}: {t[m]['compile_error']}" for m in MODES if t[m].get("compile_error")]
    lines += [
        f"  speedup fast/eager: {t['speedup']:.2f}x (median over {len(t['blocks'])} pairs of alternating blocks, "
        f"{t['steps']} steps per mode, {t['warmup']} warm-up)" + (f"; compile failed: {'; '.join(notes)}" if notes
                                                                  else ""),
        f"  loader: {ld['samples_per_s']:.4g} samples/s ({ld['num_workers']} workers, {ld['source']}) = "
        f"{ld['vs_train_fast']:.3g}x the fast step's consumption",
        f"  inference ({inf['method']}): BraTS-sized {'x'.join(map(str, inf['brats_shape']))} "
        f"{inf['brats_volume_s']:.3g} s; phantom {'x'.join(map(str, inf['phantom_shape']))} "
        f"{inf['phantom_volume_s']:.3g} s",
        f"  host peak RSS {result['host']['peak_rss_gb']:.2f} GB; load average "
        f"{_fmt(result['host']['load_avg_1min_start'], '.1f')} -> {_fmt(result['host']['load_avg_1min_end'], '.1f')}; "
        f"bench took {result['wall_s']:.0f} s",
    ]
    if result.get("warning"):
        lines.append(f"  warning: {result['warning']}")
    return "\n".join(lines)
