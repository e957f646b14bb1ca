"""``segan sweep --set-grid``: grid parsing, a real label-efficiency sweep, ``compare --group-by data.n_labeled``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, tiny_sweep_workspace
from segan import tracking
from segan.errors import UserError
from segan.sweep_grid import ChildResult, child_run_name, efficiency_series, grid_cells, parse_grid, split_values
from test_compare import db_template  # noqa: F401 - the shared empty-store fixture

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def test_grid_parsing_and_cells():
    assert split_values("2, 4,8") == ["2", "4", "8"]
    assert split_values("[32, 32],[16, 16]") == ["[32, 32]", "[16, 16]"]
    axes = parse_grid(["data.labeled_cases=2,4", "optim.lr=0.001,0.01"])
    assert [a.numeric for a in axes] == [True, True]
    cells = grid_cells(axes)
    assert len(cells) == 4 and cells[1] == {"data.labeled_cases": "2", "optim.lr": "0.01"}
    names = {child_run_name(m, s, c, "h") for m in ("bce", "supervised") for s in (0, 1) for c in cells}
    assert len(names) == 16  # unique per (method, seed, cell)
    assert grid_cells([]) == [{}] and child_run_name("bce", 0, {}, "h") == "bce-seed0-h"
    for spec, message in [("data.labeled_cases", "expected KEY=V1,V2"), ("seed=1,2", "use that option"),
                          ("method.name=bce", "--methods"), ("data.labeled_cases=", "expected KEY=V1,V2")]:
        with pytest.raises(UserError, match=message):
            parse_grid([spec])
    with pytest.raises(UserError, match="gridded twice"):
        parse_grid(["optim.lr=1", "optim.lr=2"])
    with pytest.raises(UserError, match="also given with --set"):
        parse_grid(["optim.lr=1,2"], ["optim.lr=3"])
    proc = run_cli("sweep", "-c", SMOKE, "--methods", "supervised", "--set-grid", "seed=1,2")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --set-grid 'seed=1,2': seed is set by --seeds; use that option instead"]
    # mean and sample std over seeds per (method, value); failed children are left out
    results = [ChildResult("bce", s, {"data.labeled_cases": n}, "r", 0, d)
               for s, n, d in [(0, "2", 0.5), (1, "2", 0.7), (0, "4", 0.8)]]
    results.append(ChildResult("bce", 2, {"data.labeled_cases": "4"}, "r", 3, 0.1))
    (points,) = efficiency_series(results, "data.labeled_cases").values()
    assert points[0][:2] == (2.0, pytest.approx(0.6)) and points[0][2] == pytest.approx(0.1414, abs=1e-4)
    assert points[1] == (4.0, 0.8, 0.0, 1)


def test_label_count_sweep_plots_and_never_overwrites(tmp_path, db_template, monkeypatch, capsys):  # noqa: F811
    from data_prep.phantoms import generate
    from segan.sweep import run_sweep

    generate(tmp_path / "phantoms", cases=5, size=32, seed=0, test_fraction=0.2)  # 4 train: 3 + 1 validation
    uri, sets = tiny_sweep_workspace(tmp_path, db_template, monkeypatch, "grid", "train.progress=false")
    with pytest.raises(UserError, match="data.labeled_cases: 9 not in 1..3"):
        run_sweep(str(SMOKE), methods="supervised", seeds="0", overrides=sets, tracking_uri=None,
                  grid=["data.labeled_cases=1,9"])
    assert run_sweep(str(SMOKE), methods="supervised,bce", seeds="0,1", overrides=sets, tracking_uri=None,
                     grid=["data.labeled_cases=1,2"]) == 0
    err = capsys.readouterr().err
    client = tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("grid").experiment_id
    runs = client.search_runs([exp])
    (parent,) = [r for r in runs if r.data.tags.get(tracking.SWEEP_ROLE_TAG) == "sweep"]
    children = [r for r in runs if r is not parent]
    assert len(children) == 8 and len({r.info.run_name for r in children}) == 8
    assert {(r.data.tags["method"], r.data.params["data.n_labeled"], r.data.params["seed"]) for r in children} == {
        (m, n, s) for m in ("supervised", "bce") for n in ("1", "2") for s in ("0", "1")}
    assert all(r.data.params["data.n_labeled"] == r.data.params["data.labeled_cases"] for r in children)
    assert parent.data.tags["sweep.grid"] == "data.labeled_cases=1,2"
    folder = tmp_path / "outputs" / "grid" / parent.info.run_name
    png = folder / "label_efficiency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "label_efficiency.png" in {f.path for f in client.list_artifacts(parent.info.run_id)}
    grid = json.loads((folder / "grid.json").read_text())
    assert len(grid["children"]) == 8 and all(c["exit_code"] == 0 for c in grid["children"])
    assert "[sweep] supervised: data.labeled_cases=1:" in err and f"wrote {png.relative_to(tmp_path)}" in err

    # compare: mean ± std per (method, labelled cases), each over the 2 seeds
    proc = run_cli("compare", "-e", "grid", "--group-by", "data.n_labeled", "--tracking-uri", uri, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout[proc.stdout.index("Mean ± std per method and data.n_labeled"):].split("\n\n")[1]
    rows = [line.split()[:3] for line in table.splitlines()[2:]]
    assert rows == [["bce", "1", "2"], ["bce", "2", "2"], ["supervised", "1", "2"], ["supervised", "2", "2"]]

    # the same sweep again: new runs and folders, the first sweep's left as they were
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "outputs" / "grid").rglob("*.pt")}
    assert run_sweep(str(SMOKE), methods="supervised", seeds="0", overrides=sets, tracking_uri=None,
                     grid=["data.labeled_cases=1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in first} == first
    assert len(client.search_runs([exp])) == len(runs) + 2
