"""QC reports rendered by a real browser: ``segan predict --report``, ``segan report -p`` and ``-e``.

One smoke training (1 epoch, real SQLite MLflow store) predicts 6 phantom test cases plus a
1-channel scan the 4-channel model cannot take (a failed case). Debian's ``chromium --headless``
renders each page (``--dump-dom`` for the DOM, ``--screenshot`` for the pixels); the test fails,
never skips, without chromium (``.ci/run`` installs it).
"""

from __future__ import annotations

import base64
import csv
import io
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import run_cli
from segan import tracking

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
EXPERIMENT = "report-test"
REGIONS = {"whole_tumour": [1, 2, 3], "tumour_core": [2, 3], "enhancing": [3]}


# ---------------------------------------------------------------- browser
def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (Debian; .ci/run installs it)")
    return exe


def render(page: Path, tmp: Path, size: str = "1280,1600") -> tuple[str, np.ndarray]:
    """(the DOM after loading ``page``, the screenshot as an RGB array) from headless Chromium, offline."""
    from PIL import Image

    tmp.mkdir(parents=True, exist_ok=True)
    common = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
              f"--user-data-dir={tmp / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND"]  # no network
    shot = tmp / "shot.png"
    proc = subprocess.run([*common, f"--screenshot={shot}", f"--window-size={size}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert "</html>" in dom.stdout, dom.stderr[-2000:]
    return dom.stdout, np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32) / 255.0


def assert_not_blank(pixels: np.ndarray) -> None:
    grey = pixels.mean(axis=2)
    assert grey.std() > 0.1, f"screenshot looks blank (grey std {grey.std():.3f})"
    assert (grey < 0.5).mean() > 0.01, "screenshot has almost no dark pixels: nothing drawn"


def assert_self_contained(text: str) -> None:
    external = re.findall(r'(?:src|href)\s*=\s*["\'](?!data:|#)([^"\']*)', text)
    assert not external, f"page refers to files or URLs outside itself: {external[:3]}"
    assert "<script" not in text.lower() and "@import" not in text and "url(" not in text


def dom_cases(dom: str) -> list[str]:
    import html

    return [html.unescape(c) for c in re.findall(r'<tr [^>]*data-case="([^"]*)"', dom)]


def case_row(dom: str, case: str) -> str:
    """The HTML of one case's table row in the DOM."""
    start = dom.index(f'data-case="{case}"')
    return dom[start:dom.index("</tr>", start)]


def image_heights(row: str) -> list[int]:
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(b))).size[1]
            for b in re.findall(r'src="data:image/png;base64,([^"]+)"', row)]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def predicted(tmp_path_factory) -> dict:
    """Train 1 smoke epoch, log a sweep parent with a label-efficiency plot and a metrics-only run,
    then `segan predict --report` 6 test phantoms and one unusable scan."""
    from matplotlib.figure import Figure

    from data_prep.phantoms import generate

    root = tmp_path_factory.mktemp("report")
    generate(root / "ph", cases=10, size=48, seed=0, test_fraction=0.6)
    uri = f"sqlite:///{root}/mlflow.db"
    proc = run_cli("train", "-c", SMOKE, "--set", f"data.root={root / 'ph'}", "--set", "train.epochs=1",
                   "--set", f"experiment={EXPERIMENT}", "--set", "run_name=smoke-trained", "--out", root / "run",
                   "--tracking-uri", uri)
    assert proc.returncode == 0, proc.stderr[-3000:]

    parent = tracking.RunTracker.start({}, tracking_uri=uri, experiment=EXPERIMENT, run_name="label-sweep",
                                       tags={tracking.SWEEP_ROLE_TAG: "sweep"})
    fig = Figure(figsize=(4, 3))
    fig.add_subplot().plot([5, 10, 25, 50, 100], [0.3, 0.5, 0.62, 0.7, 0.74], "o-")
    png = root / "label_efficiency.png"
    fig.savefig(png)
    parent.log_artifact(png)
    child = tracking.RunTracker.start({"method": {"name": "bce"}, "seed": 3}, tracking_uri=uri,
                                      experiment=EXPERIMENT, run_name="bce-<i>3</i>", tags={"method": "bce"},
                                      parent_run_id=parent.run_id)
    for epoch, dice in enumerate([0.2, 0.4]):
        child.log_metrics({"val_dice_mean": dice, "loss_seg": 1 - dice}, step=epoch)
    child.finish("FINISHED")
    parent.finish("FINISHED")

    scans = root / "scans"
    shutil.copytree(root / "ph" / "imagesTs", scans)
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), str(scans / "bad_1channel.nii.gz"))
    out = root / "pred"
    proc = run_cli("predict", "-m", root / "run", "-i", scans, "-o", out, "--report", cwd=root)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the bad scan failed, the batch went on
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 7
    return {"root": root, "uri": uri, "out": out, "rows": rows, "stdout": proc.stdout}


# ---------------------------------------------------------------- prediction report
def test_predict_report_renders_every_case_failed_first(predicted, tmp_path):
    out, rows = predicted["out"], predicted["rows"]
    page = out / "report.html"
    assert f"QC report -> {page}" in predicted["stdout"]
    text = page.read_text()
    assert_self_contained(text)
    dom, pixels = render(page, tmp_path)
    assert_not_blank(pixels)
    cases = dom_cases(dom)
    assert sorted(cases) == sorted(r["case"] for r in rows)
    assert cases[0] == "bad_1channel"  # failed cases first
    assert "has 1 channel(s)" in case_row(dom, "bad_1channel")
    for r in rows:
        heights = image_heights(case_row(dom, r["case"]))
        assert len(heights) == (r["status"] == "ok"), r["case"]  # one slice figure per predicted case
    # volumes (no volume_ml_ columns yet): voxel count x voxel volume of each region, in mL
    case = next(r["case"] for r in rows if r["status"] == "ok")
    labels = np.asarray(nib.load(str(out / f"{case}.nii.gz")).dataobj)
    row = case_row(dom, case)
    for ids in REGIONS.values():
        assert f"<td>{np.isin(labels, ids).sum() / 1000:.2f}</td>" in row  # 1 mm voxels


def _rewrite_csv(folder: Path, extra: dict[str, dict[str, str]], add_rows: list[dict[str, str]]) -> None:
    with open(folder / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = list(rows[0]) + sorted({k for v in extra.values() for k in v})
    rows = [{**r, **extra.get(r["case"], {})} for r in rows] + add_rows
    with open(folder / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def test_report_of_a_folder_sorts_by_flags_then_ood_escapes_names_and_draws_uncertainty(predicted, tmp_path):
    folder = tmp_path / "pred"
    shutil.copytree(predicted["out"], folder)
    (folder / "report.html").unlink()
    ok = sorted(r["case"] for r in predicted["rows"] if r["status"] == "ok")
    volumes = {f"volume_ml_{name}": "12.34" for name in REGIONS}
    extra = {c: {"ood_score": "0.5", "flags": "", **volumes} for c in ok}
    extra[ok[5]].update(ood_score="9.0", flags="out_of_distribution;huge_mask")
    extra[ok[4]].update(ood_score="7.5", flags="tiny_mask")
    extra[ok[3]].update(ood_score="8.5", flags="heavily_resampled")
    extra[ok[2]].update(ood_score="3.0", uncertainty="0.2")
    extra[ok[1]].update(uncertainty="0.9")  # same ood score as ok[0]: more uncertain first
    extra[ok[0]].update(uncertainty="0.1")
    evil = '<b>evil</b>&"x"'
    _rewrite_csv(folder, extra, [{"case": evil, "inputs": "x.nii.gz", "status": "failed",
                                  "message": "<script>alert(1)</script>", "seconds": "0.00", "output": ""}])
    mask = nib.load(str(folder / f"{ok[2]}.nii.gz"))
    unc = np.random.default_rng(0).random((*mask.shape, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(unc, mask.affine), str(folder / f"{ok[2]}_unc.nii.gz"))

    proc = run_cli("report", "-p", folder, "-o", folder / "qc.html", cwd=predicted["root"])
    assert proc.returncode == 0, proc.stderr
    assert_self_contained((folder / "qc.html").read_text())
    dom, pixels = render(folder / "qc.html", tmp_path / "browser")
    assert_not_blank(pixels)
    failed = sorted(dom_cases(dom)[:2])
    assert failed == sorted(["bad_1channel", evil])
    assert dom_cases(dom)[2:] == [ok[5], ok[3], ok[4], ok[2], ok[1], ok[0]]
    assert "<b>evil" not in dom and "&lt;b&gt;evil&lt;/b&gt;" in dom and "<script>alert" not in dom
    assert '<span class="flag">out_of_distribution</span>' in case_row(dom, ok[5])
    assert "<td>12.34</td>" in case_row(dom, ok[0])  # the CSV's volumes win over the mask's
    with_unc, without = image_heights(case_row(dom, ok[2])), image_heights(case_row(dom, ok[1]))
    assert len(with_unc) == len(without) == 1 and with_unc[0] > 1.6 * without[0]  # a second row of slices


# ---------------------------------------------------------------- experiment report
def test_experiment_report_has_compare_table_curves_overlays_and_label_efficiency(predicted, tmp_path):
    page = tmp_path / "exp.html"
    proc = run_cli("report", "-e", EXPERIMENT, "-o", page, "--tracking-uri", predicted["uri"])
    assert proc.returncode == 0, proc.stderr
    assert "2 run(s)" in proc.stdout and "Downloading artifacts" not in proc.stderr
    text = page.read_text()
    assert_self_contained(text)
    dom, pixels = render(page, tmp_path / "browser", size="1280,2400")
    assert_not_blank(pixels)
    for name in ("smoke-trained", "bce-&lt;i&gt;3&lt;/i&gt;"):
        assert f"<td>{name}</td>" in dom  # the compare table
        assert f'data-run="{name}"' in dom  # the curves and overlays section
    assert "<i>3</i>" not in dom
    assert "0.4000 ± 0.0000" in dom  # mean ± std of the bce group (one run)
    efficiency = dom[dom.index('id="label-efficiency"'):]
    assert efficiency.split("</div>")[0].count("data:image/png;base64,") == 1
    trained = dom[dom.index('data-run="smoke-trained"'):].split("<h3")[0]
    assert trained.count("data:image/png;base64,") == 2  # curves.png and the last overlay
    assert "overlay epoch_001.png" in trained
    bce = dom[dom.index('data-run="bce-'):].split("<h3")[0]
    assert "no image (curves.png not logged)" in bce


def test_usage_errors_are_one_line(predicted, tmp_path):
    cases = [
        (["report"], "either -p PRED_DIR"),
        (["report", "-p", predicted["out"], "-e", EXPERIMENT], "not both"),
        (["report", "-p", tmp_path / "missing"], "no such folder"),
        (["report", "-p", tmp_path], "no predictions.csv"),
        (["report", "-e", EXPERIMENT, "--tracking-uri", predicted["uri"]], "pass -o FILE.html"),
        (["report", "-e", "report-tset", "-o", tmp_path / "x.html", "--tracking-uri", predicted["uri"]],
         "did you mean 'report-test'"),
    ]
    for args, expected in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (args, proc.stderr)
