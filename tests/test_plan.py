"""`segan plan`: each rule on real phantom variants, the written YAML, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from data_prep.fingerprint import load_fingerprint
from data_prep.io import save_nifti
from data_prep.phantom_spec import resolve_spec
from data_prep.phantoms import generate
from segan.plan import make_plan, trial_step
from segan.plan_rules import rule_batch, rule_budget, rule_dims, rule_normalize, rule_patch, rule_spacing


@pytest.fixture(scope="module")
def fps(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("plan")
    out = {}
    for name in ("t1_2mm", "aniso_1x1x4", "ct_lps_int16"):
        generate(root / name, cases=3, size=32, seed=1, spec=resolve_spec(name))
        out[name] = (root / name, load_fingerprint(root / name, cache_file=root / f"{name}.fp.json")[0])
    return out


def test_spacing_native_2mm_and_anisotropic_axis(fps):
    d = rule_spacing(fps["t1_2mm"][1])
    assert d.values["preprocess.spacing"] is None and "native" in d.reason and "2 x 2 x 2" in d.reason
    fp = fps["aniso_1x1x4"][1]
    d = rule_spacing(fp)
    assert d.values["preprocess.spacing"] is None and "anisotropy" in d.reason
    # Mixed spacings: the median, and the coarse axis from its 10th percentile (never finer than the rest).
    fp = {"summary": {"median_spacing": [1.0, 1.0, 5.0], "spacing_p10": [0.8, 0.8, 3.0], "anisotropy": 5.0},
          "cases": [{"spacing_ras": [1.0, 1.0, 5.0]}, {"spacing_ras": [0.8, 0.8, 3.0]}]}
    assert rule_spacing(fp).values["preprocess.spacing"] == [1.0, 1.0, 3.0]


def test_dims_2d_on_cpu_and_for_anisotropic_data_3d_on_gpu(fps):
    iso, aniso = fps["t1_2mm"][1], fps["aniso_1x1x4"][1]
    assert rule_dims(iso, "auto", "cpu", 4).values["data.spatial_dims"] == 2
    assert rule_dims(aniso, "auto", "cuda", 80).values["data.spatial_dims"] == 2
    assert rule_dims(iso, "auto", "cuda", 80).values["data.spatial_dims"] == 3
    assert rule_dims(iso, "auto", "cuda", 0.5).values["data.spatial_dims"] == 2
    assert rule_dims(aniso, "3", "cpu", 4).values["data.spatial_dims"] == 3


def test_patch_depth_and_batch():
    d = rule_patch([160, 192, 140], 2, "cpu")
    assert d.values["data.patch_size"] == [160, 192] and d.values["model.strides"] == [2] * 5
    assert len(d.values["model.channels"]) == 6
    assert d.values["model.channels"][:2] == [16, 32]     # CPU: a narrower U-Net
    assert d.values["model.critic_channels"] == [16, 32, 64]
    assert rule_patch([160, 192, 140], 2, "cuda").values["model.channels"][:2] == [32, 64]
    d = rule_patch([300, 300, 40], 3, "cuda")         # anisotropic patch: depth from the short axis
    assert d.values["data.patch_size"] == [160, 160, 40] and len(d.values["model.strides"]) == 3
    assert 4 <= 40 // 2 ** 3 <= 8
    assert rule_batch([160, 160, 40], 3, 1).values["train.batch_size"] == 2
    assert rule_batch([64, 64], 2, 8).values["train.batch_size"] == 32
    assert rule_batch([64, 64], 2, 8, "cpu").values["train.batch_size"] == 16


def test_normalisation_ct_with_dataset_stats_and_mr_zscore(fps):
    d = rule_normalize(fps["ct_lps_int16"][1])
    assert d.values["preprocess.normalize"] == "ct"
    low, high, mean, std = d.values["preprocess.ct_stats"][0]
    assert low < mean < high and std > 0 and -200 < low and high < 200   # foreground HU, not air
    assert rule_normalize(fps["t1_2mm"][1]).values == {"preprocess.normalize": "zscore"}


def test_ct_normalisation_is_applied_by_preprocessing():
    from data_prep.preprocess import Preprocessor
    from segan.config import PreprocessConfig
    from data_prep.preprocess import spec_from_config

    pre = Preprocessor(spec_from_config(PreprocessConfig(normalize="ct", ct_stats=[[0.0, 100.0, 50.0, 25.0]])))
    out = pre._normalize(np.array([[[[-1000.0, 50.0, 500.0]]]], np.float32), np.ones((1, 1, 3), bool))
    assert out.ravel().tolist() == [-2.0, 0.0, 2.0]


def test_budget_keeps_validation_under_a_tenth():
    d = rule_budget(4, 0.5, 10, 30.0)            # 24 s of validation allowed in 4 min: one pass is too long
    assert d.values["train.val_max_cases"] < 2 and d.values["train.max_minutes"] == 4
    d = rule_budget(10, 0.2, 10, 3.0)
    passes = d.values["train.epochs"] / d.values["train.val_every"]
    assert passes * 3.0 <= 0.1 * 600 + 3.0 and d.values["train.epochs"] * d.values["train.steps_per_epoch"] * 0.2 <= 600
    assert rule_budget(None, 0.2, 10, 3.0).values == {}


def test_trial_step_times_the_whole_method_step():
    # a critic much wider than the segmentor: SegAN's step is dominated by the critic's passes
    model = {"model.channels": [4, 8], "model.strides": [2], "model.critic_channels": [32, 64, 128]}
    sup = min(trial_step(model, 2, 1, 2, [64, 64], 8, "cpu", "supervised") for _ in range(2))
    segan = min(trial_step(model, 2, 1, 2, [64, 64], 8, "cpu", "segan") for _ in range(2))
    assert 0 < 2 * sup < segan


def test_trial_runs_with_the_runs_threads_and_restores_torchs(fps):
    import torch

    before = torch.get_num_threads()
    plan = make_plan(fps["t1_2mm"][1], method="supervised", minutes=1, threads=1)
    batch = next(d for d in plan.decisions if d.rule == "batch")
    assert "trial supervised step on cpu (1 CPU thread(s))" in batch.reason
    assert torch.get_num_threads() == before


def test_budgeted_adversarial_plan_is_timed_for_the_segmentor_and_starts_the_critic_when_settled(fps):
    fp = fps["t1_2mm"][1]
    sup = make_plan(fp, method="supervised", minutes=2, threads=1)
    for method in ("segan", "bce"):
        adv = make_plan(fp, method=method, minutes=2, threads=1)
        assert adv.values()["method.adv_start"] == "settled"
        batch = next(d for d in adv.decisions if d.rule == "batch")
        assert f"trial segmentor step ({method}'s critic starts later" in batch.reason   # not the critic's step
    # no budget: no steps to plan, the family's fixed warm-up; no critic: nothing to start
    assert "method.adv_start" not in make_plan(fp, method="segan", trial=False).values()
    assert "method.adv_start" not in sup.values()
    # the wsd schedule is planned for a budget; a plan by epochs keeps the default cosine
    assert sup.values()["optim.schedule"] == "wsd"
    assert "optim.schedule" not in make_plan(fp, method="segan", trial=False).values()


def test_plan_for_each_variant_resolves_with_its_method(fps, tmp_path):
    from segan.config_layers import resolve_config
    from segan.plan import render_yaml

    plan = make_plan(fps["ct_lps_int16"][1], method="supervised", minutes=2, trial=False)
    path = tmp_path / "p.yaml"
    path.write_text(render_yaml(plan))
    resolved = resolve_config(path)
    cfg = resolved.config
    assert cfg.preprocess.normalize == "ct" and cfg.method.name == "supervised" and cfg.model.critic == "none"
    assert "# normalize: CT" in path.read_text()


def test_cli_writes_a_commented_config_and_bad_input_exits_2(fps, tmp_path):
    from segan.config_layers import resolve_config

    env = {"SEGAN_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "plan.yaml"
    res = run_cli("plan", fps["t1_2mm"][0], "-o", out, "--minutes", "2", "--method", "segan", "--threads", "1", env=env)
    assert res.returncode == 0, res.stderr
    assert "spacing: median spacing 2 x 2 x 2 mm" in res.stdout and "trial segmentor step (segan's critic" in res.stdout
    assert "critic_start: segan under a budget" in res.stdout
    cfg = resolve_config(out).config
    assert cfg.preprocess.spacing is None and cfg.data.spatial_dims == 2 and cfg.train.max_minutes == 2
    assert cfg.method.name == "segan" and cfg.model.critic == "segan" and cfg.method.adv_start == "settled"
    assert cfg.train.threads == 1 and "(1 CPU thread(s))" in res.stdout   # the run uses what the trial timed
    # a short planned run keeps its full learning rate for 80 % of the budget (rule_schedule)
    assert cfg.optim.schedule == "wsd" and "# schedule: constant learning rate" in out.read_text()

    empty = tmp_path / "empty"
    empty.mkdir()
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(fps["t1_2mm"][0] / "imagesTr", unlabelled / "imagesTr")
    mixed = tmp_path / "mixed"
    for case, shape in (("a", (24, 24, 24, 2)), ("b", (24, 24, 24))):
        label = np.zeros(shape[:3], np.uint8)
        label[8:16, 8:16, 8:16] = 1
        save_nifti(mixed / "imagesTr" / f"{case}.nii.gz", np.random.default_rng(0).normal(100, 10, shape),
                   np.eye(4), dtype=np.float32)
        save_nifti(mixed / "labelsTr" / f"{case}.nii.gz", label, np.eye(4))
    for folder in (empty, unlabelled, mixed, tmp_path / "missing"):
        res = run_cli("plan", folder, "-o", tmp_path / "x.yaml", "--no-trial", env=env)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert not (tmp_path / "x.yaml").exists()
