"""Config loading: YAML, --set overrides, and one-line errors naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from segan.config import Config, flatten, load_config, to_dict
from segan.errors import UserError, did_you_mean

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.data.root == "data/phantoms"  # all default to `segan prepare phantoms`' folder


def test_overrides_types_and_nesting():
    cfg = load_config(CONFIGS[0], ["train.epochs=3", "optim.lr=2e-4", "method.clamp=null",
                                   "data.patch_size=[64, 64]", "data.regions={wt: [1, 2]}", "seed=7"])
    assert (cfg.train.epochs, cfg.optim.lr, cfg.method.clamp, cfg.seed) == (3, 2e-4, None, 7)
    assert cfg.data.patch_size == [64, 64] and cfg.data.regions == {"wt": [1, 2]}
    assert isinstance(cfg.optim.lr, float)
    flat = flatten(to_dict(cfg))
    assert flat["train.epochs"] == 3 and flat["data.regions"] == {"wt": [1, 2]}


@pytest.mark.parametrize("override, needle", [
    ("train.epoch=3", "unknown config key 'train.epoch' (did you mean 'train.epochs'?); allowed keys here: epochs, "
                      "batch_size"),
    ("trian.epochs=3", "unknown config key 'trian' (did you mean 'train'?); allowed keys here: seed"),
    ("train.epochs=abc", "config key 'train.epochs' expects int, got 'abc'"),
    ("method.name=pix2pix", "config key 'method.name' is 'pix2pix'; allowed values: "),
    ("optim.name=sgd", "allowed values: adam, adamw, rmsprop"),
    ("data.patch_size=[64]", "data.patch_size"),
    ("train.batch_size=0", "train.batch_size' must be at least 1"),
    ("nonsense", "expected KEY=VALUE"),
])
def test_bad_keys_name_the_key(override, needle):
    with pytest.raises(UserError) as exc:
        load_config(CONFIGS[0], [override])
    assert needle in str(exc.value)


def _segan(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "segan", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["train", "-c", "configs/segan_2d.yaml", "--set", "train.max_minute=1"],
     "unknown config key 'train.max_minute' (did you mean 'train.max_minutes'?); allowed keys here:"),
    (["train", "-c", "configs/segan_2d.yaml", "--set", "method.name=segn"],
     "'method.name' is 'segn' (did you mean 'segan'?); allowed values: "),
    (["describe", "-c", "configs/segan_2d.yaml", "--set", "model.critic=patchgn"],
     "'model.critic' is 'patchgn' (did you mean 'patchgan'?); allowed values: segan, patchgan, attention"),
    (["train", "-c", "missing.yaml"], "config file missing.yaml not found"),
    (["train", "-c", "configs/segan_2d.yaml", "--set", "data.root=/nonexistent/folder"], "/nonexistent/folder"),
])
def test_cli_bad_config_exit_2_one_line(args, needle):
    root = Path(__file__).resolve().parents[1]
    proc = _segan(*args, cwd=root)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_cli_choice_typo_suggests_the_value():
    """click suggests mistyped options and commands; segan's Choice adds the closest value."""
    proc = _segan("compare", "--format", "tabel")
    assert proc.returncode == 2
    assert "'tabel' is not one of 'table', 'csv', 'json', 'markdown' (did you mean 'table'?)" in proc.stderr
    proc = _segan("trian")
    assert proc.returncode == 2 and "Did you mean 'train'?" in proc.stderr


def test_did_you_mean_names_only_close_candidates():
    assert did_you_mean("trian", ["seed", "train", "tracking"]) == " (did you mean 'train'?)"
    assert did_you_mean("adm", ["adam", "adamw", "rmsprop"]) == " (did you mean 'adam' or 'adamw'?)"
    assert did_you_mean("max_minute", ["epochs", "max_minutes"], prefix="train.") == \
        " (did you mean 'train.max_minutes'?)"
    assert did_you_mean("pix2pix", ["segan", "bce", "lsgan"]) == ""


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1,\n")
    proc = _segan("train", "-c", str(bad))
    assert proc.returncode == 2 and "is not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from segan.cli import cli; "
            "import click.testing as t; r = t.CliRunner().invoke(cli, ['train', '--help']); "
            "assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'monai', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
