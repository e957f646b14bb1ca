"""`segan bench`: one real run on the smoke config, plus the pieces it is made of."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import REPO, run_cli
from segan.bench import _resolve, bench_loader
from segan.bench_modes import MODES, mode_config, switches, synthetic_batch
from segan.bench_hw import cpu_peak, cuda_peak
from segan.config import load_config
from segan.errors import UserError

SMOKE = REPO / "configs" / "smoke.yaml"

CPUINFO_2 = """processor\t: {p}
vendor_id\t: {vendor}
cpu family\t: {family}
model name\t: Test CPU
physical id\t: 0
core id\t: {core}
cpu MHz\t\t: 2500.000
flags\t\t: fpu sse sse2 avx fma avx2 {extra}
"""


def _cpuinfo(cores: list[int], extra: str = "", vendor: str = "GenuineIntel", family: int = 6) -> str:
    return "\n".join(CPUINFO_2.format(p=i, core=c, extra=extra, vendor=vendor, family=family)
                     for i, c in enumerate(cores))


def test_cli_bench_smoke_writes_every_field(phantoms_small, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "-c", SMOKE, "--device", "cpu", "--steps", "2", "--json", out,
                   "--set", f"data.root={phantoms_small}", "--set", f"preprocess.cache_dir={tmp_path / 'cache'}",
                   "--set", "train.threads=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "speedup fast/eager" in proc.stdout and str(out) in proc.stdout
    r = json.loads(out.read_text())
    assert r["device"].startswith("cpu: ") and r["config"] == str(SMOKE)
    t = r["train"]
    for mode in MODES:
        m = t[mode]
        assert m["samples_per_s"] > 0 and math.isfinite(m["samples_per_s"])
        assert m["samples_per_s"] == pytest.approx(4 / m["step_s"])  # smoke batch size 4
        assert m["voxels_per_s"] == pytest.approx(m["samples_per_s"] * 48 * 48)
        assert len(m["step_s_blocks"]) == 2 and m["finite"]
        assert 0 < m["mfu"] < 1 and m["compute_dtype"] == "fp32"
        assert m["peak_mem_gb"] > 0
        assert m["tflops"] * 1e12 * m["step_s"] == pytest.approx(t["flops_per_step"], rel=1e-6)
    assert not any(t["eager"]["switches"].values())
    assert all(t["fast"]["switches"][k] for k in ("fused_critic", "foreach_clamp", "target_no_grad"))
    assert math.isfinite(t["speedup"]) and t["speedup"] > 0
    pairs = sorted(e / f for e, f in zip(t["eager"]["step_s_blocks"], t["fast"]["step_s_blocks"]))
    assert t["speedup"] == pytest.approx((pairs[0] + pairs[1]) / 2)  # median of the 2 paired ratios
    assert t["speedup_of_medians"] == pytest.approx(t["eager"]["step_s"] / t["fast"]["step_s"])
    assert t["flops_per_step"] > 0 and t["batch_size"] == 4 and t["patch_size"] == [48, 48]
    inf = r["inference"]
    assert inf["brats_volume_s"] > 0 and inf["phantom_volume_s"] > 0
    assert inf["brats_shape"] == [4, 240, 240, 155] and inf["phantom_shape"] == [4, 96, 96, 96]
    assert r["loader"]["samples_per_s"] > 0 and r["loader"]["source"].startswith("config data")
    assert r["host"]["peak_rss_gb"] > 0 and r["hardware"]["threads"] == 1


def test_cuda_requested_without_cuda_is_a_user_error():
    if torch.cuda.is_available():
        assert _resolve("cuda").type == "cuda"
    else:
        with pytest.raises(UserError, match="--device cuda: CUDA is not available"):
            _resolve("cuda")
    assert _resolve("cpu") == torch.device("cpu")


def test_modes_switch_everything_off_for_eager_and_keep_the_config_for_fast():
    cfg = load_config(SMOKE, ["train.channels_last=false", "train.compile=true"])
    eager, fast = mode_config(cfg, "eager"), mode_config(cfg, "fast")
    assert not any(switches(eager).values())
    s = switches(fast)
    assert s["channels_last"] is False and s["compile"] is True and s["fused_critic"] and s["amp_bf16"]
    assert cfg.train.fused_critic is True and cfg.optim.fused is True  # the caller's config is untouched


def test_synthetic_batch_has_nested_regions_with_realistic_foreground():
    image, target = synthetic_batch(3, 4, 3, [32, 40], torch.device("cpu"))
    assert image.shape == (3, 4, 32, 40) and target.shape == (3, 3, 32, 40)
    assert set(target.unique().tolist()) == {0.0, 1.0}
    assert bool((target[:, 1] <= target[:, 0]).all()) and bool((target[:, 2] <= target[:, 1]).all())
    share = target.mean(dim=(0, 2, 3))
    assert share.tolist() == pytest.approx([0.1, 0.05, 0.025], abs=0.005)
    image3, target3 = synthetic_batch(2, 1, 1, [16, 16, 16], torch.device("cpu"))
    assert image3.shape == (2, 1, 16, 16, 16) and target3.mean().item() == pytest.approx(0.1, abs=0.01)


def test_cpu_peak_counts_physical_cores_and_vector_width():
    avx512 = cpu_peak(_cpuinfo([0, 1], "avx512f"), threads=2)
    assert avx512["cores"] == 2 and avx512["flop_per_cycle"] == 64
    assert avx512["tflops"]["fp32"] == pytest.approx(2 * 2.5 * 64 / 1000)
    assert "estimate" in avx512["note"] and avx512["model"] == "Test CPU"
    assert cpu_peak(_cpuinfo([0, 1], "avx512f"), threads=1)["cores"] == 1  # capped at torch's threads
    smt = cpu_peak(_cpuinfo([0, 0, 1, 1]), threads=4)  # two hyper-threads per core
    assert smt["cores"] == 2 and smt["flop_per_cycle"] == 32
    assert cpu_peak(_cpuinfo([0, 1, 2, 3]), threads=4, cpus={2, 3})["cores"] == 2  # affinity
    zen4 = cpu_peak(_cpuinfo([0, 1], "avx512f", vendor="AuthenticAMD", family=25), threads=2)
    assert zen4["flop_per_cycle"] == 32 and "Zen 4" in zen4["note"]  # AVX-512 double-pumped
    assert cpu_peak(_cpuinfo([0, 1], "avx512f", vendor="AuthenticAMD", family=26), threads=2)["flop_per_cycle"] == 64
    assert cpu_peak("", threads=2)["tflops"]["fp32"] > 0  # unreadable: still a (noted) guess
    assert "bf16" not in avx512["tflops"]  # no native bf16: emulated, no peak to compare with
    bf16 = cpu_peak(_cpuinfo([0, 1], "avx512f avx512_bf16", vendor="AuthenticAMD", family=25), threads=2)
    assert bf16["tflops"]["bf16"] == pytest.approx(2 * bf16["tflops"]["fp32"])
    amx = cpu_peak(_cpuinfo([0, 1], "avx512f avx512_bf16 amx_bf16"), threads=2)
    assert amx["tflops"]["bf16"] == pytest.approx(2 * 2.5 * 2048 / 1000)


def test_cuda_peaks_by_device_name():
    assert cuda_peak("NVIDIA H100 80GB HBM3")["bf16"] == 989.4
    assert cuda_peak("NVIDIA H100 PCIe")["bf16"] == 756.0
    assert cuda_peak("NVIDIA H200")["bf16"] == 989.4
    assert cuda_peak("NVIDIA A100-SXM4-80GB")["bf16"] == 312.0
    assert cuda_peak("Some Future GPU") is None


def test_loader_falls_back_to_generated_phantoms(tmp_path):
    cfg = load_config(SMOKE, [f"data.root={tmp_path / 'missing'}", "data.samples_per_epoch=8"])
    res = bench_loader(cfg, torch.device("cpu"), batches=3, phantom_cases=2, phantom_size=32)
    assert res["source"].startswith("generated phantoms (2 cases of 32^3")
    assert res["batches"] == 3 and res["batch_size"] == 4 and res["samples_per_s"] > 0
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("method,sets,draws", [("segan", [], False), ("bce", [], False), ("supervised", [], False),
                                                ("meanteacher", ["data.labeled_cases=2"], True),
                                                ("segan", ["data.labeled_cases=2"], True)])
def test_runner_segments_an_unlabelled_batch_only_when_the_loop_would(tmp_path, method, sets, draws):
    """The bench (and segan plan's trial) time the step the loop runs: an unlabelled batch only for a
    method that uses one on data that has one (segan and bce use it, but not without a stream)."""
    import torch

    from segan.bench_modes import ModeRunner
    from segan.config_layers import resolve_config

    cfg = resolve_config(None, [f"method.name={method}", "data.patch_size=[32, 32]", "train.batch_size=2",
                                "model.channels=[4, 8]", "model.strides=[2]", "model.critic_channels=[4, 8]",
                                *sets]).config
    runner = ModeRunner.build(cfg, "fast", torch.device("cpu"), tmp_path)
    assert (runner.image_u is not None) == draws == runner.trainer.method.draws_unlabeled
    runner.run(1)
    assert runner.n_steps == 1 and torch.isfinite(runner.losses).all()
