"""Method families and exact speed switches.

A method owns its settings (critic, critic norm, clamp, w_adv, warm-up); an explicit value
it cannot work with exits 2 naming both keys. The speed switches ``train.fused_critic``,
``train.target_no_grad`` and ``train.foreach_clamp`` never change a loss or a gradient.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from segan.config import from_dict
from segan.config_layers import format_resolved, resolve_config
from segan.errors import UserError
from segan.methods import METHODS, Step, fused_pass_is_exact

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GAN_METHODS = sorted(name for name, cls in METHODS.items() if cls.has_critic)


# ------------------------------------------------------------------ families
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_family_resolves_and_fits_its_own_rules(method):
    resolved = resolve_config(None, [f"method.name={method}"])
    cfg = resolved.config
    for key, value in METHODS[method].family.settings.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value
        assert resolved.source(key) == "method"
    assert resolved.source("method.name") == "--set"


def test_switching_the_method_brings_its_family():
    cfg = resolve_config(CONFIGS / "segan_2d.yaml", ["method.name=bce"]).config
    assert (cfg.model.critic, cfg.method.clamp, cfg.method.w_adv, cfg.model.critic_norm) == (
        "patchgan", None, 0.05, "batch")
    wgan = resolve_config(CONFIGS / "segan_2d.yaml", ["method.name=wgangp"]).config
    assert (wgan.model.critic, wgan.model.critic_norm, wgan.method.clamp) == ("patchgan", "instance", None)
    sup = resolve_config(CONFIGS / "bce_2d.yaml", ["method.name=supervised"]).config
    assert sup.model.critic == "none"
    # What the file and --set say still wins over the family.
    cfg = resolve_config(CONFIGS / "segan_2d.yaml", ["method.w_adv=0.3"]).config
    assert cfg.method.w_adv == 0.3 and cfg.model.critic_channels == [16, 32, 64]


@pytest.mark.parametrize("sets, keys", [
    (["method.name=bce", "model.critic=segan"], ("'method.name' (bce, from --set)", "'model.critic' (segan, from --set)")),
    (["method.name=wgangp", "method.clamp=0.01"], ("'method.name' (wgangp", "'method.clamp' (0.01")),
    (["method.name=wgangp", "model.critic_norm=batch"], ("'method.name' (wgangp", "'model.critic_norm' (batch")),
    (["model.critic=patchgan"], ("'method.name' (segan, from file)", "'model.critic' (patchgan, from --set)")),
    (["method.name=supervised", "model.critic=segan"], ("'method.name' (supervised", "'model.critic' (segan")),
])
def test_incompatible_explicit_combination_names_both_keys(sets, keys):
    with pytest.raises(UserError) as err:
        resolve_config(CONFIGS / "segan_2d.yaml", sets)
    for key in keys:
        assert key in str(err.value)


def test_describe_prints_resolved_config_with_sources():
    text = format_resolved(resolve_config(CONFIGS / "segan_2d.yaml", ["train.epochs=3"]))
    lines = {line.split(":")[0].strip(): line for line in text.splitlines()}
    assert lines["critic"].rstrip().endswith("# method") and "segan" in lines["critic"]
    assert lines["clamp"].rstrip().endswith("# method") and "0.05" in lines["clamp"]
    assert lines["patch_size"].rstrip().endswith("# file")
    assert lines["epochs"].rstrip().endswith("# --set") and ": 3" in lines["epochs"]
    assert "#" not in lines["lr"]  # a default carries no mark


@pytest.mark.slow
def test_cli_baseline_from_a_segan_config_trains_a_patchgan_without_clamp(phantoms_small, tmp_path):
    common = ["-c", CONFIGS / "segan_2d.yaml", "--set", f"data.root={phantoms_small}",
              "--set", f"preprocess.cache_dir={tmp_path / 'cache'}", "--set", "tracking.enabled=false",
              "--set", "method.name=bce"]
    bad = run_cli("train", *common, "--set", "model.critic=segan", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "'method.name'" in bad.stderr and "'model.critic'" in bad.stderr
    assert not (tmp_path / "bad").exists()  # refused before anything was built or written
    small = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set", "train.batch_size=2",
             "--set", "data.patch_size=[32, 32]", "--set", "model.channels=[4, 8]", "--set", "model.strides=[2]",
             "--set", "train.val_max_cases=1", "--set", "train.progress=false", "--set", "train.threads=1"]
    ok = run_cli("train", *common, *small, "--out", tmp_path / "bce")
    assert ok.returncode == 0, ok.stderr
    saved = yaml.safe_load((tmp_path / "bce" / "config.yaml").read_text())
    assert saved["method"]["name"] == "bce"
    assert saved["model"]["critic"] == "patchgan" and saved["method"]["clamp"] is None
    ckpt = torch.load(tmp_path / "bce" / "last.pt", weights_only=True)
    assert any(k.startswith("layers.") for k in ckpt["critic"])  # a PatchGAN, not the SegAN critic


# ------------------------------------------------------------------ exact speed switches
def _method(name: str, critic: str, norm: str, spectral: bool = False, dims: int = 2):
    cfg = from_dict({"method": {"name": name}, "data": {"spatial_dims": dims, "patch_size": [16] * dims},
                     "model": {"critic": critic, "critic_norm": norm, "critic_channels": [4, 8],
                               "spectral_norm": spectral}})
    method = METHODS[name](cfg, in_channels=2, n_regions=2)
    torch.manual_seed(0)
    return cfg, method, method.build_critic().train()


def _batch(dims: int = 2, n: int = 3):
    g = torch.Generator().manual_seed(1)
    shape = (n, 2) + (16,) * dims
    return (torch.randn(shape, generator=g), torch.rand(shape, generator=g),
            (torch.rand(shape, generator=g) > 0.5).float())


def _step(image, prob, target) -> Step:
    """A training iteration with the given prediction (``prob`` stands in for the segmentor's output)."""
    return Step(image=image, target=target, logits=torch.logit(prob), prob=prob, segment=lambda x: x)


def _critic_step(cfg, method, critic, batch, fused: bool):
    cfg.train.fused_critic = fused
    critic = copy.deepcopy(critic)
    torch.manual_seed(2)  # the gradient penalty's interpolation weights
    image, prob, target = batch
    loss = method.critic_loss(critic, _step(image, prob, target))
    loss.backward()
    grads = [p.grad.clone() for p in critic.parameters()]
    return loss.detach(), grads, [b.clone() for b in critic.buffers()]


CASES = [(m, c, n) for m in GAN_METHODS for c in METHODS[m].family.allowed["model.critic"][0]
         for n in ("batch", "instance", "none")]


@pytest.mark.parametrize("spectral", [False, True])
@pytest.mark.parametrize("name, critic, norm", CASES)
def test_fused_critic_pass_equals_two_passes(name, critic, norm, spectral):
    cfg, method, net = _method(name, critic, norm, spectral)
    batch = _batch()
    loss_a, grads_a, bufs_a = _critic_step(cfg, method, net, batch, fused=True)
    loss_b, grads_b, bufs_b = _critic_step(cfg, method, net, batch, fused=False)
    assert torch.isfinite(loss_a)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(bufs_a, bufs_b):  # batch-norm running statistics, spectral-norm vectors
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_pass_is_used_where_exact():
    assert fused_pass_is_exact(_method("segan", "segan", "instance")[2])
    assert fused_pass_is_exact(_method("bce", "patchgan", "none")[2])
    assert not fused_pass_is_exact(_method("segan", "segan", "batch")[2])
    assert not fused_pass_is_exact(_method("bce", "patchgan", "instance", spectral=True)[2])
    assert not fused_pass_is_exact(_method("bce", "attention", "none")[2])  # dropout
    assert fused_pass_is_exact(_method("segan", "segan", "batch")[2].eval())


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_target_no_grad_is_exact(norm):
    cfg, method, critic = _method("segan", "segan", norm, dims=3)
    image, prob, target = _batch(dims=3)
    critic.requires_grad_(False)
    results = []
    for no_grad in (True, False):
        cfg.train.target_no_grad = no_grad
        p = prob.clone().requires_grad_(True)
        net = copy.deepcopy(critic)
        loss = method.segmentor_terms(net, _step(image, p, target), w_adv=1.0)["loss_adv"].value
        loss.backward()
        results.append((loss.detach(), p.grad.clone(), [b.clone() for b in net.buffers()]))
    (la, ga, ba), (lb, gb, bb) = results
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-8)
    for a, b in zip(ba, bb):
        torch.testing.assert_close(a, b)


def test_foreach_clamp_is_exact():
    cfg, method, critic = _method("segan", "segan", "instance")
    with torch.no_grad():
        for p in critic.parameters():
            p.mul_(10)
    clamped = []
    for foreach in (True, False):
        cfg.train.foreach_clamp = foreach
        net = copy.deepcopy(critic)
        method.after_critic_step(net)
        clamped.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*clamped):
        assert torch.equal(a, b)
        assert a.abs().max() <= cfg.method.clamp
    assert any((a.abs() == cfg.method.clamp).any() for a in clamped[0])  # the clamp did bite


# ------------------------------------------------------------------ the README's family table
README = CONFIGS.parent / "README.md"
FAMILY_MARKERS = ("<!-- method families: generated from segan.methods.METHODS; tests/test_methods.py checks it -->",
                  "<!-- end of method families -->")


def _yaml_value(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def family_table() -> str:
    """The README's "Method families" table, from every registered method's :class:`Family`."""
    keys = list(dict.fromkeys(k for cls in METHODS.values() for k in cls.family.settings))
    lines = ["| method | " + " | ".join(f"`{k}`" for k in keys) + " | an explicit value must be |",
             "|---|" + "---|" * len(keys) + "---|"]
    for name, cls in METHODS.items():
        settings, allowed = cls.family.settings, cls.family.allowed
        cells = [f"`{_yaml_value(settings[k])}`" if k in settings else "–" for k in keys]
        rules = "; ".join(f"`{k}`: {', '.join(_yaml_value(v) for v in ok)}" for k, (ok, _) in allowed.items())
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {rules} |")
    return "\n".join(lines)


def test_readme_method_family_table_matches_the_families():
    text = README.read_text()
    start, end = (text.index(m) for m in FAMILY_MARKERS)
    shown = text[start + len(FAMILY_MARKERS[0]):end].strip()
    expected = family_table()
    assert shown == expected, f"README's method families table is stale; replace it with:\n{expected}"
    assert all(f"| `{name}` |" in shown for name in METHODS)
