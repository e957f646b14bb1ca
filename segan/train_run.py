"""One training run end to end (``segan train``, each fold of ``--folds``, each sweep child).

:func:`run_training` sets up ranks, the output folder and the MLflow run, resumes from a
checkpoint when asked, runs :meth:`segan.training.Trainer.fit` and records why it stopped
(epochs / time budget / diverged / killed / error) before the tracker finishes.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from segan.checkpoint import load_checkpoint, resolve_checkpoint_path
from segan.config import Config, dump_yaml, to_dict
from segan.errors import TrainingDiverged
from segan.runtime import init_distributed, seed_everything
from segan.training import Trainer


@dataclass
class TrainResult:
    out_dir: Path
    status: str = "FINISHED"  # FINISHED | FAILED | KILLED
    exit_code: int = 0
    epochs_done: int = 0
    best_metric: float = float("nan")
    metrics: dict = field(default_factory=dict)
    best_metrics: dict = field(default_factory=dict)  # the record of the epoch that wrote best.pt
    run_id: str | None = None
    message: str = ""
    is_main: bool = True  # rank 0 (or a plain run)

    def summary(self) -> str:
        """One line, ``FINISHED (stopped: time budget): N epochs, ...``; an error or interrupt
        message follows on its own line."""
        dice = {k: round(v, 4) for k, v in self.metrics.items() if k.startswith("val_dice")}
        stop = self.message.startswith("stopped: ")
        return (f"{self.status}{f' ({self.message})' if stop else ''}: {self.epochs_done} epochs, "
                f"best val_dice_mean {self.best_metric:.4f}, last {dice}; outputs in {self.out_dir}"
                + (f"; MLflow run {self.run_id}" if self.run_id else "")
                + (f"\n{self.message}" if self.message and not stop else ""))


def _stop_on_sigterm() -> None:
    """Treat SIGTERM (a scheduler's kill, ``timeout``) like Ctrl-C: save state and exit 130."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _log_run_inputs(tracker, trainer: Trainer, out: Path, extra: dict[str, str] | None = None) -> None:
    """Config, data list and preprocessing spec as artifacts; the data list's fingerprint as a param.

    ``extra``: more files (name -> text) written to ``out`` and logged beside them, e.g. the
    plan and the data-set fingerprint of ``segan train --data`` (``plan.yaml``, ``fingerprint.json``)."""
    from segan.io_utils import atomic_write_text

    data = trainer.data
    atomic_write_text(out / "datalist.json", json.dumps(data.datalist, indent=1))
    atomic_write_text(out / "preprocess.json", json.dumps(data.preprocess_spec, indent=1))
    for name, text in (extra or {}).items():
        atomic_write_text(out / name, text)
    tracker.log_params({"data.fingerprint": data.datalist.get("fingerprint", ""),
                        "data.n_train": len(data.datalist.get("training", [])),
                        "data.n_val": len(data.datalist.get("validation", [])),
                        "data.n_labeled": len(data.datalist.get("training", [])),
                        "data.n_unlabeled": len(data.datalist.get("unlabeled") or [])})
    for name in ("config.yaml", "datalist.json", "preprocess.json", *(extra or {})):
        tracker.log_artifact(out / name)


def _log_stop(tracker, trainer: Trainer | None, reason: str) -> None:
    """Record why and when training stopped (``segan compare`` shows it beside the metrics)."""
    if trainer is not None:
        tracker.log_stop(reason, trainer.epoch, trainer.step, trainer.clock.seconds())


def _warn_if_critic_idle(trainer: Trainer) -> None:
    """One warning when a critic method ended without its critic ever training: the run was
    supervised (``adv_start: settled`` whose loss never settled, or a warm-up as long as the run)."""
    method, cfg = trainer.method, trainer.cfg.method
    if not method.has_critic or method.schedule.trained_by(trainer.schedule_epoch(trainer.epoch)):
        return
    if cfg.w_adv <= 0:
        why, fix = "method.w_adv is 0", "set method.w_adv above 0"
    elif cfg.adv_start == "settled":
        why = (f"loss_seg never settled (method.adv_start: settled, adv_settle_tol {cfg.adv_settle_tol}, "
               f"adv_settle_below {cfg.adv_settle_below})")
        fix = "give it more train.epochs / train.max_minutes or set method.adv_start=epoch"
    else:
        why = f"the run ended before method.adv_warmup_epochs {cfg.adv_warmup_epochs}"
        fix = "give it more train.epochs / train.max_minutes or lower method.adv_warmup_epochs"
    print(f"warning: the {cfg.name} critic never trained in {trainer.epoch} epochs: {why}; this run is "
          f"supervised. To train it, {fix}", file=sys.stderr)


def run_training(cfg: Config, out_dir: str | Path | None = None, resume: str | Path | None = None,
                 tracking_uri: str | None = None, register: str | None = None,
                 parent_run_id: str | None = None, extra_inputs: dict[str, str] | None = None) -> TrainResult:
    """Train per ``cfg``; returns a :class:`TrainResult` (``exit_code`` 0, 3 on divergence, 130 on Ctrl-C).

    ``extra_inputs``: files (name -> text) to keep in the output folder and log as artifacts
    with the config (``segan train --data``: the plan and the fingerprint)."""
    dist = init_distributed(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ckpt = None
    if resume:
        resume_path = resolve_checkpoint_path(Path(resume) / "last.pt" if Path(resume).is_dir() else resume)
        ckpt = load_checkpoint(resume_path)
        out = resume_path.parent
    else:
        from segan.tracking import default_run_name

        run_name = cfg.run_name or default_run_name(to_dict(cfg))
        cfg.run_name = run_name
        out = Path(out_dir) if out_dir else Path("outputs") / cfg.experiment / run_name
    if ckpt is not None:
        cfg.run_name = cfg.run_name or ckpt["config"].get("run_name")
    seed_everything(cfg.seed + dist.rank, cfg.train.deterministic)
    _stop_on_sigterm()
    from segan.tracking import NullTracker, make_tracker

    tracker = NullTracker()
    result = TrainResult(out_dir=out, is_main=dist.is_main)
    trainer = None
    try:
        trainer = Trainer(cfg, out, dist)
        tracker = make_tracker(cfg, dist.rank, tracking_uri=tracking_uri, experiment=cfg.experiment,
                               run_name=cfg.run_name, resume_run_id=ckpt.get("mlflow_run_id") if ckpt else None,
                               parent_run_id=parent_run_id,
                               tags={"method": cfg.method.name, "spatial_dims": str(cfg.data.spatial_dims),
                                     "dataset": trainer.data.dataset_name})
        trainer.tracker = tracker
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, out / "config.yaml")
            _log_run_inputs(tracker, trainer, out, extra_inputs)
        if ckpt is not None:
            trainer.load_state_dict(ckpt)
        budget_s = cfg.train.max_minutes * 60 if cfg.train.max_minutes else None
        deadline = time.monotonic() + budget_s if budget_s else None
        reason = trainer.fit(deadline, budget_s)
        _log_stop(tracker, trainer, reason)
        result.message = f"stopped: {reason}"
        if dist.is_main:
            _warn_if_critic_idle(trainer)
            tracker.log_curves(trainer.history)
            best = out / "best.pt"
            if cfg.train.fit_temperature:
                _fit_temperature(trainer, best if best.exists() else out / "last.pt", tracker)
            tracker.log_model(best if best.exists() else out / "last.pt", register=register)
        result.status = "FINISHED"
    except TrainingDiverged as exc:
        _log_stop(tracker, trainer, "diverged")
        result.status, result.exit_code, result.message = "FAILED", exc.exit_code, f"error: {exc}"
    except KeyboardInterrupt:
        if trainer is not None:
            trainer.save("last.pt")
        _log_stop(tracker, trainer, "killed")
        result.status, result.exit_code = "KILLED", 130
        result.message = f"interrupted: state saved to {out / 'last.pt'}; continue with --resume {out / 'last.pt'}"
    except BaseException:
        _log_stop(tracker, trainer, "error")
        tracker.finish("FAILED")
        raise
    tracker.finish(result.status)
    result.run_id = getattr(tracker, "run_id", None)  # known only once the store answered
    if trainer is not None:
        result.epochs_done = trainer.epoch
        result.best_metric = trainer.best_metric
        result.metrics = trainer.history[-1] if trainer.history else {}
        scored = [h for h in trainer.history if "val_dice_mean" in h]
        result.best_metrics = max(scored, key=lambda h: h["val_dice_mean"]) if scored else {}
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return result


def _fit_temperature(trainer, checkpoint: Path, tracker) -> None:
    """``train.fit_temperature``: per-region temperature on the validation cases, into ``checkpoint``."""
    from segan.calibration import calibrate, store_temperature
    from segan.predictor import Predictor

    cfg = trainer.cfg
    cases = trainer.validation_cases
    if not cases:
        print("warning: train.fit_temperature: no validation cases; the probabilities stay uncalibrated",
              file=sys.stderr)
        return
    model = Predictor.from_checkpoint(checkpoint, trainer.device).model
    temperatures, metrics = calibrate(model, cases, trainer.data.region_names, cfg.data.spatial_dims,
                                      cfg.data.patch_size, trainer.device, amp=trainer.amp,
                                      overlap=cfg.post.overlap, sw_batch_size=cfg.post.sw_batch_size, seed=cfg.seed)
    store_temperature(checkpoint, temperatures)
    tracker.log_metrics(metrics, step=trainer.epoch)
    print("temperature on the validation cases: " + ", ".join(
        f"{name} T={t:.3g} (ECE {metrics[f'calib_ece_{name}_before']:.4f} -> {metrics[f'calib_ece_{name}_after']:.4f})"
        for name, t in zip(trainer.data.region_names, temperatures)) + f"; stored in {checkpoint}", file=sys.stderr)
