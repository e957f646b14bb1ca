"""Semi-supervised data: the unlabelled stream (``data.unlabeled``, ``data.labeled_cases``)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from segan.config_layers import resolve_config
from segan.data import _split_unlabeled, build_data
from segan.errors import UserError
from segan.methods import METHODS
from segan.runtime import DistContext
from segan.training import Trainer
from tests.conftest import SMOKE, make_phantoms, run_cli, smoke_config


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_phantoms(tmp_path_factory, "semi", size=32, seed=5)


def _cfg(root, tmp_path, *extra):
    return smoke_config(root, tmp_path, "data.patch_size=[32, 32]", "train.epochs=1", "train.steps_per_epoch=2",
                        "train.batch_size=2", "train.val_max_cases=1", *extra)


def _unlabelled_folder(phantoms: Path, tmp_path: Path) -> Path:
    """The phantoms' test scans as an unlabelled folder, a broken label file lying beside them."""
    folder = tmp_path / "unlabelled"
    shutil.copytree(phantoms / "imagesTs", folder / "images")
    (folder / "labels").mkdir()
    for scan in (folder / "images").iterdir():
        (folder / "labels" / scan.name).write_bytes(b"not a NIfTI file")
    return folder / "images"


def test_labeled_cases_keeps_n_and_records_them(phantoms, tmp_path):
    data = build_data(_cfg(phantoms, tmp_path, "data.labeled_cases=1"))
    listing = data.datalist
    assert len(listing["training"]) == 1 and listing["labeled_cases"] == [listing["training"][0]["case"]]
    assert len(listing["unlabeled"]) == 2  # 3 labelled training cases (1 validates), 1 kept
    assert all("label" not in e for e in listing["unlabeled"])
    assert data.unlabeled_set is not None and len(data.unlabeled_set.files) == len(listing["unlabeled"])
    assert listing["validation"]  # validation stays labelled
    data.unlabeled_set.set_epoch(0)
    item = data.unlabeled_set[0]
    assert set(item) == {"image"} and item["image"].shape[1:] == (32, 32)
    assert torch.isfinite(item["image"]).all()
    # The same seed picks the same case.
    again = build_data(_cfg(phantoms, tmp_path, "data.labeled_cases=1"))
    assert again.datalist["labeled_cases"] == listing["labeled_cases"]
    with pytest.raises(UserError, match="data.labeled_cases 99"):
        build_data(_cfg(phantoms, tmp_path, "data.labeled_cases=99"))


def test_labels_beside_unlabelled_scans_are_never_opened(phantoms, tmp_path):
    # A copy whose moved-to-unlabelled cases have broken label files: training still runs.
    root = tmp_path / "data"
    shutil.copytree(phantoms, root)
    cfg = _cfg(root, tmp_path, "data.labeled_cases=1", "method.name=supervised",
               f"data.unlabeled={_unlabelled_folder(phantoms, tmp_path)}")
    from data_prep.datalist import make_datalist
    from data_prep.msd import load_dataset

    listing = make_datalist(load_dataset(root), seed=cfg.seed, val_fraction=cfg.data.val_fraction)
    _, moved = _split_unlabeled(cfg, dict(listing))
    by_case = {e["case"]: e["label"] for e in listing["training"]}
    broken = [by_case[e["case"]] for e in moved if e["case"] in by_case]
    assert broken
    for label in broken:
        Path(label).write_bytes(b"broken")
    trainer = Trainer(cfg, tmp_path / "run", DistContext())
    assert len(trainer.data.datalist["unlabeled"]) == len(moved) == len(broken) + 2  # + the 2 scans of the folder
    assert trainer.fit(None) == "epochs"
    assert np.isfinite(trainer.history[-1]["loss_seg"])


def test_broken_unlabelled_scan_exits_2_naming_it(phantoms, tmp_path):
    folder = _unlabelled_folder(phantoms, tmp_path)
    bad = sorted(folder.iterdir())[0]
    bad.write_bytes(b"\x1f\x8b broken")
    check = run_cli("prepare", "check", phantoms, "--unlabeled", folder)
    assert check.returncode == 2 and str(bad) in check.stdout + check.stderr
    train = run_cli("train", "-c", SMOKE, "--set", f"data.root={phantoms}", "--set", f"data.unlabeled={folder}",
                    "--set", f"preprocess.cache_dir={tmp_path / 'cache'}", "--set", "tracking.enabled=false",
                    cwd=tmp_path)
    assert train.returncode == 2 and str(bad) in train.stderr and "Traceback" not in train.stderr
    ok = _unlabelled_folder(phantoms, tmp_path / "clean")
    listed = run_cli("prepare", "check", phantoms, "--unlabeled", ok)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "unlabeled" in listed.stdout and "2 unlabelled" in listed.stdout


@pytest.mark.parametrize("dims", [2, 3])
def test_meanteacher_trains_with_unlabelled_stream(phantoms, tmp_path, dims):
    patch = "[32, 32]" if dims == 2 else "[16, 16, 16]"
    cfg = _cfg(phantoms, tmp_path, "method.name=meanteacher", "data.labeled_cases=1", f"data.spatial_dims={dims}",
               f"data.patch_size={patch}", "method.consistency_rampup_epochs=0")
    trainer = Trainer(cfg, tmp_path / "run", DistContext())
    teacher = [p.clone() for p in trainer.method.teacher.parameters()]
    assert trainer.fit(None) == "epochs"
    record = trainer.history[-1]
    assert np.isfinite(record["loss_seg"]) and np.isfinite(record["loss_cons"]) and record["loss_cons"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(teacher, trainer.method.teacher.parameters()))
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    teacher_saved = saved["method"]["teacher"]  # the method's state_dict hook puts the teacher in checkpoints
    assert all(torch.equal(teacher_saved[k].cpu(), v.cpu()) for k, v in trainer.method.teacher.state_dict().items())


@pytest.mark.parametrize("method", ["bce", "wgangp"])
def test_patchgan_uses_unlabelled_fakes(phantoms, tmp_path, method):
    cfg = _cfg(phantoms, tmp_path, f"method.name={method}", "data.labeled_cases=1", "method.adv_warmup_epochs=0",
               "method.adv_ramp_epochs=0")
    trainer = Trainer(cfg, tmp_path / "run", DistContext())
    assert trainer.unlabeled_set is not None
    assert trainer.fit(None) == "epochs"
    record = trainer.history[-1]
    assert all(np.isfinite(record[k]) for k in ("loss_seg", "loss_adv", "loss_critic")) and record["loss_adv"] != 0


@pytest.mark.parametrize("method, start, term", [
    # bce's unlabelled terms all go through the critic: none during its 1-epoch warm-up (w_adv 0)
    ("bce", ["method.adv_warmup_epochs=1", "method.adv_ramp_epochs=0"], "loss_adv"),
    # the mean teacher's consistency term from semi_warmup_epochs (0 ramp epochs: full weight at once)
    ("meanteacher", ["method.semi_warmup_epochs=1", "method.consistency_rampup_epochs=0"], "loss_cons"),
    # advsemi's self-training is masked by D's confidence: not before D trains, whatever semi_warmup_epochs
    # says (threshold 0: every voxel confident once D trains, so the term is surely > 0 in epoch 2)
    ("advsemi", ["method.adv_warmup_epochs=1", "method.semi_warmup_epochs=0", "method.semi_threshold=0"],
     "loss_semi"),
])
def test_unlabelled_batch_is_not_drawn_before_its_term_starts(phantoms, tmp_path, method, start, term):
    # epoch 1: the loop neither loads nor segments the unlabelled batch; epoch 2: one batch per step
    cfg = _cfg(phantoms, tmp_path, f"method.name={method}", "data.labeled_cases=1", *start, "train.epochs=2",
               "data.num_workers=0")
    trainer = Trainer(cfg, tmp_path / "run", DistContext())
    # count the unlabelled set's reads (its class is the labelled set's too: count this object's only)
    reads, getitem, stream = [], type(trainer.unlabeled_set).__getitem__, trainer.unlabeled_set
    type(stream).__getitem__ = lambda ds, i: (ds is stream and reads.append(trainer.epoch)) or getitem(ds, i)
    try:
        assert trainer.fit(None) == "epochs"
    finally:
        type(stream).__getitem__ = getitem
    assert reads == [1] * (2 * trainer.unlabeled_batch_size)   # none in epoch 1, one batch per step (2 steps) in epoch 2
    h = trainer.history
    assert h[0][term] == 0 and h[1][term] > 0
    assert trainer.method.needs_unlabeled(0.0, 0.99) is False and trainer.method.needs_unlabeled(0.1, 1.0) is True


def test_mean_teacher_starts_at_once_but_its_recipe_at_half_time():
    # the family keeps the paper's schedule (the unlabelled batch from the first step); the shipped
    # recipe gives it the other semi-supervised recipes' supervised first half (README, Label efficiency)
    family = resolve_config(None, ["method.name=meanteacher"]).config
    mt = METHODS["meanteacher"](family, 1, 2)
    assert mt.needs_unlabeled(0.0, 0.0) is True
    recipe = resolve_config(SMOKE.parent / "meanteacher_2d.yaml").config.method
    assert (family.method.semi_warmup_epochs, recipe.semi_warmup_epochs) == (0.0, 20.0)
