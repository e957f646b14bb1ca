"""The training loop shared by every method: alternate critic and segmentor steps.

Follow ``segan train`` here: :func:`segan.train_run.run_training` makes a :class:`Trainer`,
which builds the data (``segan.data``), the method (``segan.methods``: critic, critic loss, segmentor loss terms), the segmentor
(``segan.nets``) and runs :class:`Trainer`. Per iteration: the labelled batch (and, when
the data has an unlabelled stream and the method uses it, an unlabelled batch) is
segmented and handed to the method as a :class:`segan.methods.Step`; critic step(s),
then a segmentor step with the critic frozen, loss = ``sum(weight * term)`` over the
method's named terms (``w_seg * seg + w_adv(t) * adversarial`` for the GAN methods).
The loop owns optimizers, autocast, backward, gradient averaging across ranks, logging of
every named term and the NaN guard; it never looks at which method it runs.
Losses stay on the device and are fetched every ``train.log_every`` steps (no
host-device sync per step); that fetch is also the NaN/inf guard.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from segan.checkpoint import make_meta, save_checkpoint
from segan.config import Config, to_dict
from segan.errors import TrainingDiverged
from segan.methods import METHODS, Step, fused_pass_is_exact, total_loss
from segan.optim import ProgressSchedule, build_optimizer
from segan.progress import Progress
from segan.run_clock import RunClock
from segan.runtime import (DistContext, allreduce_grads, amp_enabled, autocast, cycle, resolve_device, rng_state,
                           set_rng_state, sharded_loader)
from segan.validation import validate


class Trainer:
    """Owns models, optimizers and state; ``fit`` runs epochs until done or out of budget."""

    def __init__(self, cfg: Config, out_dir: Path, dist: DistContext, data=None) -> None:
        """``data``: a :class:`segan.data.DataBundle`; built from ``cfg`` when omitted
        (``segan bench`` passes one describing synthetic batches)."""
        from segan.data import build_data
        from segan.tracking import NullTracker

        self.cfg, self.out_dir, self.dist = cfg, out_dir, dist
        self.tracker = NullTracker()  # replaced by run_training once the data set is known
        self.device = resolve_device(cfg.train.device, dist.local_rank)
        self.amp = amp_enabled(cfg.train.amp, cfg.train.amp_cpu, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.data = data if data is not None else build_data(cfg)
        cfg.data.channels = list(self.data.channels)  # the resolved config names what was derived
        cfg.data.regions = dict(zip(self.data.region_names, self.data.region_labels))
        n_in, n_out = len(self.data.channels), len(self.data.region_names)
        dims = cfg.data.spatial_dims

        from segan.nets import build_segmentor

        self.method = METHODS[cfg.method.name](cfg, n_in, n_out)
        self.segmentor = build_segmentor(cfg.model, dims, n_in, n_out).to(self.device)
        self.method.prepare(self.segmentor, self.device)
        # The unlabelled stream is drawn only for a method that uses it.
        self.unlabeled_set = self.data.unlabeled_set if self.method.uses_unlabeled else None
        # What train_step returns and each epoch logs: the method's segmentor terms, then the critic's loss.
        # (and the values of the method's adversarial balance, e.g. adv_scale under adv_balance: adaptive).
        self.loss_names: tuple[str, ...] = (*self.method.loss_names, "loss_critic", *self.method.balance_names)
        critic = self.method.build_critic()
        self.critic = critic.to(self.device) if critic is not None else None
        self.memory_format = None
        if cfg.train.channels_last and self.device.type == "cuda":
            self.memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
            for m in (self.segmentor, self.critic):
                if m is not None:
                    m.to(memory_format=self.memory_format)
        if dist.enabled:
            self.segmentor = nn.SyncBatchNorm.convert_sync_batchnorm(self.segmentor) if self.device.type == "cuda" \
                else self.segmentor
            self.seg_ddp: nn.Module = nn.parallel.DistributedDataParallel(
                self.segmentor, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.seg_ddp = self.segmentor
        self.seg_forward = self._maybe_compile(self.seg_ddp)
        o = cfg.optim
        self.opt_seg = build_optimizer(self.segmentor.parameters(), o, o.lr, self.device)
        self.sched_seg = ProgressSchedule(self.opt_seg, o, cfg.train.epochs)
        self.opt_critic = self.sched_critic = None
        if self.critic is not None:
            self.opt_critic = build_optimizer(self.critic.parameters(), o, o.critic_lr, self.device, o.critic_betas)
            self.sched_critic = ProgressSchedule(self.opt_critic, o, cfg.train.epochs)
        self.epoch = 0
        self.step = 0
        self.best_metric = -math.inf
        self.history: list[dict] = []
        self.clock = RunClock()   # seconds trained (over resumed sessions), the budget's deadline
        per_rank = max(cfg.data.samples_per_epoch // (cfg.train.batch_size * dist.world_size), 1)
        self.steps_per_epoch = cfg.train.steps_per_epoch or per_rank

    # ------------------------------------------------------------------ set-up helpers
    def _maybe_compile(self, module: nn.Module):
        if not self.cfg.train.compile:
            return module
        try:
            return torch.compile(module)
        except Exception as exc:  # noqa: BLE001 - any backend failure falls back to eager
            print(f"warning: torch.compile unavailable ({type(exc).__name__}); running eager", file=sys.stderr)
            return module

    def _segment(self, image: torch.Tensor) -> torch.Tensor:
        """Segmentor logits; a compiled segmentor that fails on its first call (compilation
        is lazy) falls back to eager once, with a warning."""
        try:
            with self._autocast():
                return self.seg_forward(image)
        except Exception as exc:  # noqa: BLE001 - inductor/dynamo errors have many types
            if self.seg_forward is self.seg_ddp:
                raise
            print(f"warning: torch.compile failed ({type(exc).__name__}); running eager", file=sys.stderr)
            self.seg_forward = self.seg_ddp
            with self._autocast():
                return self.seg_forward(image)

    def _autocast(self):
        return autocast(self.device, self.amp)

    def meta(self) -> dict:
        d = self.data
        if not hasattr(self, "_train_fingerprint"):  # computed once, when the first checkpoint is saved
            from segan.qc import train_fingerprint

            self._train_fingerprint = train_fingerprint(d, self.cfg.preprocess.cache_dir or None)
        return make_meta(channels=d.channels, region_names=d.region_names, region_labels=d.region_labels,
                         label_names=d.label_names, spatial_dims=self.cfg.data.spatial_dims,
                         patch_size=self.cfg.data.patch_size, preprocess=d.preprocess_spec, dataset=d.dataset_name,
                         train_fingerprint=self._train_fingerprint)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {
            "config": to_dict(self.cfg), "meta": self.meta(),
            "segmentor": self.segmentor.state_dict(),
            "opt_seg": self.opt_seg.state_dict(), "sched_seg": self.sched_seg.state_dict(),
            "epoch": self.epoch, "step": self.step, "best_metric": self.best_metric,
            "rng": rng_state(), "history": self.history, "train_seconds": self.clock.seconds(),
            "mlflow_run_id": getattr(self.tracker, "run_id", None),
        }
        if self.critic is not None:
            state.update(critic=self.critic.state_dict(), opt_critic=self.opt_critic.state_dict(),
                         sched_critic=self.sched_critic.state_dict())
        method_state = self.method.state_dict()
        if method_state:
            state["method"] = method_state
        schedule_state = self.method.schedule.state_dict()
        if schedule_state:  # adv_start: settled
            state["adv_schedule"] = schedule_state
        return state

    def load_state_dict(self, ckpt: dict) -> None:
        self.segmentor.load_state_dict(ckpt["segmentor"])
        self.opt_seg.load_state_dict(ckpt["opt_seg"])
        self.sched_seg.load_state_dict(ckpt["sched_seg"])
        if self.critic is not None and "critic" in ckpt:
            self.critic.load_state_dict(ckpt["critic"])
            self.opt_critic.load_state_dict(ckpt["opt_critic"])
            self.sched_critic.load_state_dict(ckpt["sched_critic"])
        if "method" in ckpt:
            self.method.load_state_dict(ckpt["method"])
        self.method.schedule.load_state_dict(ckpt.get("adv_schedule", {}))
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.best_metric = float(ckpt["best_metric"])
        self.history = list(ckpt.get("history", []))
        self.clock = RunClock(float(ckpt.get("train_seconds", 0.0)))  # absent in older checkpoints
        set_rng_state(ckpt["rng"])

    def save(self, name: str) -> Path:
        path = self.out_dir / name
        if self.dist.is_main:
            save_checkpoint(self.state_dict(), path)
        return path

    # ------------------------------------------------------------------ one iteration
    def train_step(self, image: torch.Tensor, target: torch.Tensor, w_adv: float,
                   image_u: torch.Tensor | None = None, uniform: torch.Tensor | None = None,
                   epoch: float | None = None) -> torch.Tensor:
        """One critic update (or ``critic_steps``) then one segmentor update.

        ``image_u``: an unlabelled batch ``(M, C, *s)`` (segmented together with ``image``);
        ``uniform``: ``(N,)`` bool, labelled items drawn like the unlabelled ones; ``epoch``:
        the schedule position handed to the method (default: the current epoch).
        Returns the losses as one device tensor in :attr:`loss_names` order (no sync).
        """
        zero = image.new_zeros(())
        logits_u = None
        if image_u is not None and fused_pass_is_exact(self.segmentor):
            # One pass over both batches (the labelled logits come first), only where it
            # equals two passes: batch norm would mix the two streams' statistics.
            both = self._segment(torch.cat([image, image_u]))
            logits, logits_u = both[:image.shape[0]], both[image.shape[0]:]
        elif image_u is not None:
            logits, logits_u = self._segment(image), self._segment(image_u)
        else:
            logits = self._segment(image)
        step = Step(image=image, target=target, logits=logits, prob=torch.sigmoid(logits.float()),
                    segment=self._segment, epoch=float(self.epoch if epoch is None else epoch), index=self.step,
                    image_u=image_u, logits_u=logits_u,
                    prob_u=torch.sigmoid(logits_u.float()) if logits_u is not None else None, uniform=uniform)
        loss_critic = zero
        train_critic = self.critic is not None and w_adv > 0  # warm-up is segmentation only
        if train_critic:
            for _ in range(self.cfg.method.critic_steps):
                self.opt_critic.zero_grad(set_to_none=True)
                with self._autocast():
                    loss_critic = self.method.critic_loss(self.critic, step)
                loss_critic.backward()
                if self.dist.enabled:
                    allreduce_grads(self.critic)
                self.opt_critic.step()
                self.method.after_critic_step(self.critic)
            self.critic.requires_grad_(False)
        with self._autocast():
            terms = self.method.segmentor_terms(self.critic if train_critic else None, step, w_adv)
        terms, balance = self.method.balance(terms, self.segmentor)  # adv_balance: fixed returns terms as given
        self.opt_seg.zero_grad(set_to_none=True)
        total_loss(terms).backward()
        self.opt_seg.step()
        self.method.after_segmentor_step(self.segmentor, step)
        if train_critic:
            self.critic.requires_grad_(True)
        values = [terms[name].value.detach().float() if name in terms else zero for name in self.method.loss_names]
        extra = [balance[name].float() if name in balance else zero for name in self.method.balance_names]
        return torch.stack([*values, loss_critic.detach().float(), *extra])

    # ------------------------------------------------------------------ epochs
    def fit(self, deadline: float | None = None, budget_s: float | None = None) -> str:
        """Run until ``train.epochs`` or the wall-clock ``deadline`` (``budget_s`` after the
        start); returns the stop reason."""
        cfg = self.cfg
        pin = self.device.type == "cuda"
        loader, sampler = self._loader(self.data.train_set, cfg.train.batch_size, pin)
        streams = [(self.data.train_set, sampler)]
        loader_u = None
        if self.unlabeled_set is not None:
            loader_u, sampler_u = self._loader(self.unlabeled_set, self.unlabeled_batch_size, pin)
            streams.append((self.unlabeled_set, sampler_u))
        reason = "epochs"
        self.clock.start(deadline, budget_s, agreed=self.dist.enabled)
        # One line per epoch on rank 0, terminal or log file alike; train.progress is the step bar.
        epochs = Progress(cfg.train.epochs, "epoch", enabled=self.dist.is_main, bar=False, initial=self.epoch,
                          deadline=deadline)
        while self.epoch < cfg.train.epochs:
            for dataset, shard in streams:
                dataset.set_epoch(self.epoch)
                if shard is not None:
                    shard.set_epoch(self.epoch)
            stats, out_of_time = self.train_epoch(loader, loader_u)
            self.epoch += 1
            self._end_epoch_schedule(stats)
            progress = self.schedule_epoch(self.epoch) / cfg.train.epochs
            for sched in (self.sched_seg, self.sched_critic):
                if sched is not None:
                    sched.step(progress)
            last = self.epoch >= cfg.train.epochs or out_of_time
            record = {"epoch": self.epoch, **stats, "lr": self.opt_seg.param_groups[0]["lr"]}
            improved = False
            if self.dist.is_main and (self.epoch % cfg.train.val_every == 0 or last):
                record.update(self.run_validation(final=last))
                score = record.get("val_dice_mean", -math.inf)
                improved = score > self.best_metric
                self.best_metric = max(self.best_metric, score)
            self.history.append(record)
            if improved:
                self.save("best.pt")
            self.save("last.pt")
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=self.epoch)
            epochs.done(self._epoch_summary(record, improved))
            if out_of_time:
                reason = "time budget"
                break
        return reason

    def _epoch_summary(self, record: dict, improved: bool) -> str:
        """``seg 0.412, adv 0.693, critic -0.690, val_dice_mean 0.7312 (best)``: one epoch in a log line."""
        parts = [f"{name.removeprefix('loss_')} {record[name]:.4g}" for name in self.loss_names
                 if name in record and (name != "loss_critic" or self.critic is not None)]
        if "val_dice_mean" in record:
            parts.append(f"val_dice_mean {record['val_dice_mean']:.4f}" + (" (best)" if improved else ""))
        return ", ".join(parts)

    def _end_epoch_schedule(self, stats: dict) -> None:
        """Hand the epoch's segmentation loss to the adversarial schedule (``adv_start: settled``);
        under DDP rank 0's decision holds on every rank (the critic steps must agree)."""
        schedule = self.method.schedule
        schedule.end_epoch(self.schedule_epoch(self.epoch), stats.get("loss_seg"))
        if self.dist.enabled and schedule.state_dict():
            import torch.distributed as dist

            t = torch.tensor([-1.0 if schedule.start is None else schedule.start],
                             device=self.device if self.device.type == "cuda" else "cpu", dtype=torch.float64)
            dist.broadcast(t, 0)
            schedule.start = None if t.item() < 0 else float(t.item())

    @property
    def unlabeled_batch_size(self) -> int:
        return self.cfg.data.unlabeled_batch_size or self.cfg.train.batch_size

    def _loader(self, dataset, batch_size: int, pin_memory: bool):
        """A loader over ``dataset`` in index order and, under DDP, the sampler that shards it."""
        return sharded_loader(dataset, batch_size, self.cfg.data.num_workers, self.dist, self.cfg.seed, pin_memory)

    @property
    def validation_cases(self) -> list:
        """The validation cases validated on: the first ``train.val_max_cases`` (all when unset)."""
        limit = self.cfg.train.val_max_cases
        return self.data.val_cases[:limit] if limit else self.data.val_cases

    def run_validation(self, final: bool) -> dict:
        cfg = self.cfg
        cases = self.validation_cases
        if not cases:
            return {}
        res = validate(self.segmentor, cases, self.data.region_names, cfg.data.spatial_dims, cfg.data.patch_size,
                       self.device, cfg.post.threshold, self.amp, hd95=final, overlap=cfg.post.overlap,
                       sw_batch_size=cfg.post.sw_batch_size)
        if res.overlay is not None and (self.epoch % max(cfg.tracking.overlay_every, 1) == 0 or final):
            self.tracker.log_overlay(*res.overlay, self.data.region_names, self.epoch)
        return res.metrics

    def train_epoch(self, loader, loader_u=None) -> tuple[dict, bool]:
        cfg = self.cfg
        self.segmentor.train()
        if self.critic is not None:
            self.critic.train()
        names = self.loss_names
        window = torch.zeros(len(names), device=self.device)
        totals, count, seen = [0.0] * len(names), 0, 0
        out_of_time = False
        start = time.perf_counter()
        # A bar on a terminal only: a batch log gets the one line per epoch that fit() writes.
        bar = Progress(self.steps_per_epoch, f"epoch {self.epoch + 1}/{cfg.train.epochs}", "step",
                       enabled=cfg.train.progress and self.dist.is_main, lines=False)
        postfix = None
        batches = cycle(loader)
        batches_u = cycle(loader_u) if loader_u is not None else None
        for i in range(self.steps_per_epoch):
            batch = next(batches)
            image = self._to_device(batch["image"])
            target = self._to_device(batch["target"])
            epoch = self.schedule_epoch(self.epoch + i / self.steps_per_epoch)
            w_adv = self.method.schedule.weight(epoch)
            image_u = uniform = None
            if batches_u is not None and self.method.needs_unlabeled(w_adv, epoch):
                image_u = self._to_device(next(batches_u)["image"])
                if "uniform" in batch:
                    uniform = batch["uniform"].to(self.device, non_blocking=True)
            window += self.train_step(image, target, w_adv, image_u=image_u, uniform=uniform, epoch=epoch)
            self.step += 1
            seen += image.shape[0]
            if (i + 1) % cfg.train.log_every == 0 or i + 1 == self.steps_per_epoch:
                values = (window / ((i % cfg.train.log_every) + 1)).tolist()  # the one sync per window
                n = (i % cfg.train.log_every) + 1
                self._check_finite(values)
                totals = [t + v * n for t, v in zip(totals, values)]
                count += n
                window.zero_()
                postfix = {name.removeprefix("loss_"): f"{v:.3f}" for name, v in zip(names, values)}
                out_of_time = self._out_of_time()
            bar.update(1, postfix)
            if out_of_time:
                break
        bar.close()
        elapsed = time.perf_counter() - start
        stats = {name: totals[k] / max(count, 1) for k, name in enumerate(names)}
        stats["samples_per_s"] = seen * self.dist.world_size / max(elapsed, 1e-9)
        stats["w_adv"] = self.method.schedule.weight(self.schedule_epoch(self.epoch + 1))
        if self.device.type == "cuda":
            stats["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        return stats, out_of_time

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device, non_blocking=True)
        return tensor.contiguous(memory_format=self.memory_format) if self.memory_format is not None else tensor

    def schedule_epoch(self, epoch: float) -> float:
        """The epoch the schedules act on (:meth:`segan.run_clock.RunClock.schedule_epoch`)."""
        return self.clock.schedule_epoch(epoch, self.cfg.train.epochs)

    def _check_finite(self, values: list[float]) -> None:
        if all(math.isfinite(v) for v in values):
            return
        named = ", ".join(f"{n}={v:.4g}" for n, v in zip(self.loss_names, values))
        raise TrainingDiverged(
            f"training diverged at epoch {self.epoch + 1}, step {self.step} ({named}); the last good checkpoint "
            f"is kept in {self.out_dir}; lower optim.lr / optim.critic_lr or method.w_adv and resume or restart")

    def _out_of_time(self) -> bool:
        """Whether the budget is spent. Under DDP every rank stops at the same step and takes
        the most advanced rank's share of the budget used as the schedules' position (the
        one sync per ``train.log_every`` steps carries both)."""
        flag = self.clock.past_deadline()
        if self.dist.enabled:
            import torch.distributed as dist

            t = torch.tensor([float(flag), self.clock.used()],
                             device=self.device if self.device.type == "cuda" else "cpu", dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            done, used = t.tolist()   # the one host sync of this check
            flag = bool(done)
            if self.clock.agreed_used is not None:
                self.clock.agreed_used = used
        return flag

