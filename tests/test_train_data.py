"""`segan train --data`: plan on the fly, keep the plan and the fingerprint with the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from segan.errors import UserError
from segan.train_setup import resolve_train_setup

FAST = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set", "train.progress=false",
        "--set", "train.val_max_cases=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_data") / "ph"
    res = run_cli("prepare", "phantoms", "--out", root, "--cases", "8", "--size", "32", "--variant", "t1_2mm")
    assert res.returncode == 0, res.stderr
    return root


def test_train_data_plans_and_logs_plan_and_fingerprint(tiny, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    env = {"SEGAN_CACHE": str(tmp_path / "cache")}
    res = run_cli("train", "--data", tiny, "--method", "segan", "--out", out, "--tracking-uri", uri, *FAST,
                  env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "spacing: median spacing 2 x 2 x 2 mm" in res.stderr and "planned from" in res.stderr
    plan_text = (out / "plan.yaml").read_text()
    assert "# spacing:" in plan_text and "name: segan" in plan_text
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["n_cases"] == 6 and fp["summary"]["median_spacing"] == [2.0, 2.0, 2.0]
    cfg = yaml.safe_load((out / "config.yaml").read_text())   # the plan was trained, --set on top
    assert cfg["preprocess"]["spacing"] is None and cfg["data"]["root"] == str(tiny.resolve())
    assert cfg["train"]["epochs"] == 1 and cfg["method"]["name"] == "segan" and cfg["model"]["critic"] == "segan"

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg["experiment"]).experiment_id])
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"plan.yaml", "fingerprint.json", "config.yaml"} <= names
    local = Path(client.download_artifacts(run.info.run_id, "plan.yaml", str(tmp_path / "dl")))
    assert local.read_text() == plan_text


def test_train_needs_config_or_data(tmp_path):
    res = run_cli("train", "--set", "train.epochs=1", cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "--data" in lines[0]
    res = run_cli("train", "--data", tmp_path / "missing", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().startswith("error: ") and "missing" in res.stderr


def test_config_with_data_only_moves_the_data(tiny, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    setup = resolve_train_setup(str(repo / "configs/supervised_2d.yaml"), str(tiny), ["train.epochs=3"])
    cfg = setup.config
    assert not setup.planned and setup.inputs == {}
    assert cfg.data.root == str(tiny.resolve()) and cfg.data.datalist is None
    assert cfg.preprocess.spacing == [1.0, 1.0, 1.0]   # the file's recipe, not a plan (2 mm data)
    assert cfg.train.epochs == 3 and cfg.method.name == "supervised"
    # --set wins over --data; --method replaces the file's method and its family keys.
    cfg = resolve_train_setup(str(repo / "configs/supervised_2d.yaml"), str(tiny), ["data.root=elsewhere"],
                              method="segan", minutes=2).config
    assert cfg.data.root == "elsewhere" and cfg.method.name == "segan" and cfg.model.critic == "segan"
    assert cfg.train.max_minutes == 2
    with pytest.raises(UserError, match="only apply when planning"):
        resolve_train_setup(str(repo / "configs/supervised_2d.yaml"), str(tiny), dims="3")
