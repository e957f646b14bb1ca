"""A new SQLite store touched by several processes at once (a sweep, parallel runs)."""

import subprocess
import sys

CODE = """
import sys
from segan.tracking.store import get_or_create_experiment, make_client
uri = sys.argv[1]
print(get_or_create_experiment(make_client(uri), uri, "race"))
"""


def test_parallel_first_use_of_a_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = [subprocess.Popen([sys.executable, "-c", CODE, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    results = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in results]
    ids = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(ids) == 1
