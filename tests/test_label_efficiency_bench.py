"""benchmarks/label_efficiency.py says when a comparison is not budget-matched."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from label_efficiency import unused_budget  # noqa: E402


def _run(method: str, stop: str, minutes: float, seed: int = 0) -> dict:
    return {"variant": "default", "method": method, "labeled": 2, "seed": seed, "exit_code": 0, "stop": stop,
            "epochs": 40, "train_minutes": minutes, "test_dice": 0.8}


def test_a_method_that_stops_on_its_epochs_early_is_named():
    # the measured case: the 40-epoch supervised recipe done in 6.0-6.8 of 10 min, the others on the clock
    results = [_run("supervised", "epochs", 6.8), _run("supervised", "epochs", 6.0, seed=1),
               _run("advsemi", "time budget", 10.2), _run("meanteacher", "epochs", 9.5)]
    lines = unused_budget(results, 10.0)
    assert lines == ["note: supervised (default, 2 labelled): 2 run(s) stopped at their 40 epochs after 6.0-6.8 "
                     "of 10 min; the budget is not matched for it: give it more train.epochs to compare under "
                     "one wall clock"]
    assert unused_budget(results, 7.0) == []   # 6.0 and 6.8 of 7 min: more than 0.8 of the budget
