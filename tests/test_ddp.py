"""Multi-process training under torchrun: 2 CPU ranks on gloo leave one checkpoint and one MLflow run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from conftest import REPO

SMOKE = REPO / "configs" / "smoke.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_ranks_train_once(phantoms_small, tmp_path):
    run = tmp_path / "run"
    db = tmp_path / "mlflow.db"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{db}", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "segan", "train", "-c", str(SMOKE), "--set", f"data.root={phantoms_small}",
           "--set", f"preprocess.cache_dir={tmp_path / 'cache'}", "--set", "train.device=cpu",
           "--set", "train.epochs=1", "--out", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr

    # one checkpoint set, written by rank 0 only, with no temporary leftovers
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "last.pt"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # atomic writes' temp files
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    # 16 samples per epoch / (batch 4 x 2 ranks) = 2 steps per epoch: the data were sharded
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2

    # exactly one MLflow run in the store, read from a fresh process
    query = ("import mlflow; r = mlflow.search_runs(search_all_experiments=True); "
             "print(len(r)); print(r['status'].iloc[0] if len(r) else '')")
    check = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True, cwd=tmp_path,
                           env=dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{db}"), timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    count, status = check.stdout.split("\n")[:2]
    assert (int(count), status) == (1, "FINISHED")
