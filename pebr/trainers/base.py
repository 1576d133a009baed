"""The one training loop under stage 0 (SFT) and stages 1-2 (GRPO).

    train()                      the loop: progress, metrics lines, checkpoints (only here)
      -> train_step()            one optimizer step's worth of data (subclass: SFT batch / GRPO rollouts)
        -> minibatch_step()      zero grads, accumulate the micro-batches, clip, AdamW step
          -> forward_backward_step()   one micro-batch's loss and backward (subclass)

Data parallelism (torchrun): each rank holds its share of every mini-batch (pebr.run.distributed).
The policy is sharded with FSDP2 (pebr.run.fsdp) and every computation with it runs through
`self.run(fn, ...)`. A micro-batch's loss is scaled by `world_size * local_count / global_count`
(counts all-reduced before the first backward), so that FSDP's average over ranks of the summed
micro-batch gradients is the gradient of the whole mini-batch's loss: the W-rank gradient equals
the 1-rank gradient of the same data, and the micro-batch size changes nothing but memory.
Only rank 0 writes the metrics file and the log; every rank takes part in checkpoints.
"""
from __future__ import annotations

import math
import os
import resource
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

import torch

from engine import nvtx
from pebr.errors import DivergedError, Interrupted
from pebr.model import hf_compat
from pebr.run.checkpoint import Checkpointer, load_trainer_state
from pebr.run.distributed import World
from pebr.run.rng import rng_state, set_rng_state
from pebr.trainers.optim import build_optimizer, set_vision_trainable

if TYPE_CHECKING:  # the type only: trainers sit below the recipe layer (docs/pebr-map.md)
    from pebr.recipe.config import TrainConfig


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 7.3 -> '7s'."""
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def peak_mem_mb(device: torch.device) -> float:
    """CUDA: max_memory_allocated; CPU: the process's RSS high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (an FSDP2 DTensor's local shard; the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def weight_scale(model) -> tuple[float, list[str]]:
    """(the largest |w| over this rank's part of `model`'s finite parameters, the names of those
    holding a non-finite value): one max-norm reduction per parameter, one copy to the host."""
    names, norms = [], []
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = _local(p)
            if t.numel():
                names.append(name)
                norms.append(torch.linalg.vector_norm(t, ord=float("inf"), dtype=torch.float32))
    if not norms:
        return 0.0, []
    values = torch.stack(norms).cpu()
    finite = torch.isfinite(values)
    bad = [n for n, ok in zip(names, finite.tolist()) if not ok]
    return float(values[finite].max()) if bool(finite.any()) else 0.0, bad


def _as_float(x) -> float:
    """A float from a tensor, a DTensor (FSDP's grad norm) or a number."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


class StopSignals:
    """SIGTERM and SIGINT during training: the first is noted and the loop stops after the current
    step, with a checkpoint; a second one ends the process at once (exit status 128 + signal).
    Installed only from the main thread (signal handlers can be set nowhere else); the previous
    handlers come back with `restore`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._note)

    def _note(self, signum, frame) -> None:
        if self.signum:  # the second signal: no checkpoint wait
            print(f"{signal.Signals(signum).name} again: exiting now, without a checkpoint of this step",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    def agreed(self, world) -> int:
        """The signal any rank got (every rank stops at the same step), or 0."""
        if world is not None and world.distributed:
            return int(world.max([float(self.signum)])[0])
        return self.signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class Trainer:
    """Subclasses set `total_steps`, `order` (a DataOrder) and implement train_step /
    forward_backward_step; `progress_postfix(metrics)` feeds the progress bar."""

    desc = "train"

    def __init__(self, cfg: TrainConfig, *, policy, run_dir: str, world: World | None, lr: float, warmup_steps: int,
                 freeze_vision: bool, stage: int, init_model: str | None, log=print, metrics_log=None):
        self.cfg, self.policy, self.run_dir, self.stage, self.init_model = cfg, policy, run_dir, stage, init_model
        self.world = world or World(device=policy.device)
        self.log = log if self.world.is_main else (lambda *a, **k: None)
        self.metrics_log = metrics_log if self.world.is_main else None
        model = policy.model
        if policy.adapter is None:  # LoRA: the adapters alone train (pebr.model.lora), wherever they are
            set_vision_trainable(model, not freeze_vision)
        if cfg.gradient_checkpointing:  # decoder layers and vision blocks recompute in backward
            hf_compat.enable_activation_checkpointing(model)
        self.runner = None
        if self.world.distributed:
            from pebr.run.fsdp import shard_model

            self.runner = shard_model(model, mixed_bf16=cfg.dtype == "bfloat16", cpu_offload=cfg.cpu_offload)
        self.opt, self.sched = build_optimizer(model, lr=lr, weight_decay=cfg.optimizer.weight_decay,
                                               betas=cfg.optimizer.betas, warmup_steps=warmup_steps)
        self.ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=cfg.keep_checkpoints)
        # the largest |w| of the weights this run starts from (a resumed run: its checkpoint's), then of
        # each checkpoint saved: a save whose weights grew past --max-weight-growth times it is refused
        self.max_abs_weight = float(self.world.max([weight_scale(model)[0]])[0])
        self.step = 0
        self.skipped_in_a_row = 0  # optimizer updates skipped for a non-finite gradient, consecutively
        self.settings_changed: list[dict] = []  # resumes that changed settings (--allow-changed-settings)
        self.history: list[dict] = []

    # ---- the model, wherever its shards live

    def run(self, fn, *args, **kwargs):
        """fn(model, *args, **kwargs), inside the FSDP root's forward when sharded."""
        if self.runner is not None:
            return self.runner(fn, *args, **kwargs)
        return fn(self.policy.model, *args, **kwargs)

    # ---- state

    def state_dict(self) -> dict:
        """JSON-able trainer state; the optimizer goes through torch.distributed.checkpoint."""
        return {
            "step": self.step,
            "data_position": self.order.position,
            "scheduler": {k: v for k, v in self.sched.state_dict().items() if k != "lr_lambdas"},
            "config": self.cfg.to_dict(),
            "init_model": self.init_model,
            "stage": self.stage,
            "world_size": self.world.world_size,
            "max_abs_weight": self.max_abs_weight,
            "settings_changed": self.settings_changed,
        }

    def save(self, *, final: bool = False) -> str:
        """A checkpoint of this step; DivergedError instead when the weights are not all finite, or
        finite but blown up (the largest |w| grew more than --max-weight-growth times since the last
        checkpoint, or the starting weights), so such a model never replaces a good checkpoint (nor
        pushes one out under --keep-checkpoints). final: the stage's last checkpoint; with LoRA it also
        holds the merged model (a plain HF folder the next stage and transformers load alone), the
        others the adapter only."""
        scale, bad = weight_scale(self.policy.model)
        n_bad, scale = self.world.max([float(len(bad)), scale]).tolist()  # every rank decides alike: none saves alone
        if n_bad > 0:
            raise DivergedError(f"step {self.step}: the weights hold non-finite values ({', '.join(bad[:3]) or 'on another rank'}"
                                f"{', ...' if len(bad) > 3 else ''}); not saved over the last good checkpoint")
        growth = self.cfg.max_weight_growth
        if growth and self.max_abs_weight > 0 and scale > growth * self.max_abs_weight:
            raise DivergedError(f"step {self.step}: the weights blew up: the largest |w| is {scale:.3g}, "
                                f"{scale / self.max_abs_weight:.3g} times the last checkpoint's (or the starting "
                                f"weights') {self.max_abs_weight:.3g}, more than --max-weight-growth {growth:g}; not "
                                f"saved over the last good checkpoint: lower the learning rate, or resume from it")
        previous, self.max_abs_weight = self.max_abs_weight, scale
        try:
            return self.ckpt.save(self.step, self.policy, self.state_dict(), world=self.world, optimizer=self.opt,
                                  rng=rng_state(), merged=final or self.policy.adapter is None)
        except BaseException:
            self.max_abs_weight = previous  # not saved: the last checkpoint is still the reference
            raise

    def resume_from(self, path: str) -> None:
        state = load_trainer_state(path)
        self.step = int(state["step"])
        self.order.position = int(state["data_position"])
        self.settings_changed = list(state.get("settings_changed") or [])
        mine = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]  # this run's settings
        self.ckpt.load_optimizer(path, self.policy.model, self.opt, state)
        sched = self.sched.state_dict()
        sched.update(state["scheduler"])
        self.sched.load_state_dict(sched)
        if self.cfg.allow_changed_settings:  # the new values run, not the checkpoint's (which loading restored)
            self._use_hyperparameters(mine)
        rng = self.ckpt.load_rng(path, self.world.rank)
        if rng is not None:
            set_rng_state(rng)
        else:  # another world size wrote it: a fresh, rank-distinct stream from the seed and step
            torch.manual_seed(self.cfg.seed * 100003 + self.step * 101 + self.world.rank)
        if self.metrics_log is not None:
            self.metrics_log.truncate_after(self.step)
        self.log(f"resumed from {path} at step {self.step} (data position {self.order.position}, "
                 f"written by {state.get('world_size', 1)} rank(s), now {self.world.world_size})")

    def _use_hyperparameters(self, groups: list[dict]) -> None:
        """Put this run's optimizer settings (`groups`: its param groups before the checkpoint's were
        loaded) back: weight decay, betas, eps, and the learning rate the scheduler scales from, at
        the scheduler's restored step. The moments and the step count stay the checkpoint's."""
        for g, mine in zip(self.opt.param_groups, groups):
            for key in ("weight_decay", "betas", "eps", "initial_lr"):
                if key in mine:
                    g[key] = mine[key]
        self.sched.base_lrs = [g["initial_lr"] for g in self.opt.param_groups]
        for g, base, fn in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas):
            g["lr"] = base * fn(self.sched.last_epoch)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]

    # ---- the loop

    def progress_postfix(self, metrics: dict) -> dict:
        return {}

    def step_line(self, m: dict, eta_s: float | None = None) -> str:
        """One compact line of a step's metrics: what `log_every` writes to the log and train.log.
        eta_s: the estimated seconds left (this run's mean step time so far x steps left)."""
        parts = [f"step {m['step']}/{self.total_steps}"]
        for key, name in (("reward/overall", "reward"), ("accuracy", "acc"), ("loss", "loss"), ("kl", "kl")):
            if isinstance(m.get(key), (int, float)):
                parts.append(f"{name} {m[key]:.4g}")
        if m.get("skipped"):
            parts.append("update skipped")
        parts.append(f"{m.get('step_time_s', 0.0):.2f}s/step")
        if eta_s is not None and self.step < self.total_steps:
            parts.append(f"eta {format_duration(eta_s)}")
        return " ".join(parts)

    def train(self) -> list[dict]:
        """Run until `total_steps`; checkpoint every `save_every` steps and at the end; a line of
        metrics to the log every `log_every` steps (and at the last step)."""
        cfg = self.cfg
        every = cfg.log_every
        bar, redirect = None, None
        if cfg.progress and self.world.is_main:
            import logging

            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            redirect = logging_redirect_tqdm(loggers=[logging.getLogger("pebr")])  # log lines above the bar
            redirect.__enter__()
            bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, unit="step")
        t_start, first = time.perf_counter(), self.step
        stop = StopSignals()
        try:
            while self.step < self.total_steps:
                metrics = self.train_step()
                done = self.step - first
                eta = (time.perf_counter() - t_start) / done * (self.total_steps - self.step)
                if done == 1 and self.step < self.total_steps:  # say early how long the stage will take
                    self.log(f"{self.desc}: first step {metrics.get('step_time_s', 0.0):.1f}s; "
                             f"about {format_duration(eta)} for the {self.total_steps - self.step} steps left")
                metrics["world_size"] = self.world.world_size
                self.history.append(metrics)
                if self.metrics_log is not None:
                    self.metrics_log.append(metrics)
                if self.step % every == 0 or self.step == self.total_steps:
                    self.log(self.step_line(metrics, eta))
                signum = stop.agreed(self.world)
                if signum or self.step % cfg.save_every == 0 or self.step == self.total_steps:
                    path = self.save(final=self.step == self.total_steps)
                if signum:  # SIGTERM (a scheduler's preemption) or Ctrl-C: this step kept, then stop
                    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} after step {self.step}; "
                                              f"checkpoint {path}: --resume continues from it")
                if bar is not None:
                    bar.set_postfix(**self.progress_postfix(metrics))
                    bar.update(1)
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
            if redirect is not None:
                redirect.__exit__(None, None, None)
        return self.history

    def train_step(self) -> dict:
        raise NotImplementedError

    def minibatch_step(self, micro_batches: list, **shared) -> dict:
        """One optimizer step over `micro_batches` -> {sums of the micro-batches' metric dicts...,
        grad_norm, skipped}. `shared` is passed to every forward_backward_step."""
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for mb in micro_batches:
            for k, v in self.forward_backward_step(mb, **shared).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        params = [p for p in self.policy.model.parameters() if p.requires_grad]
        with nvtx.range("clip_grad_norm"):
            norm = _as_float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optimizer.grad_clip))
        skipped = 0
        if math.isfinite(norm):
            self.skipped_in_a_row = 0
            with nvtx.range("optimizer_step"):
                self.opt.step()
            self.sched.step()
            self.after_optimizer_step()
        else:  # a non-finite gradient would poison AdamW's moments: skip this update, keep going
            skipped = 1
            self.skipped_in_a_row += 1
            self.log(f"step {self.step + 1}: gradient norm is {norm}; update skipped")
            limit = self.cfg.max_skipped_updates
            if limit and self.skipped_in_a_row >= limit:  # the same on every rank: the norm is global
                raise DivergedError(f"step {self.step + 1}: {self.skipped_in_a_row} updates in a row had a non-finite "
                                    f"gradient (--max-skipped-updates {limit}): the run diverged; lower the learning rate "
                                    f"or resume from an earlier checkpoint")
        self.opt.zero_grad(set_to_none=True)
        sums.update(grad_norm=norm, skipped=skipped)
        return sums

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step that changed the weights (the GRPO trainer hands them to
        its rollout engine here)."""

    def forward_backward_step(self, micro_batch, **shared) -> dict:
        raise NotImplementedError

    def step_metrics(self, t0: float, tokens_local: float) -> dict:
        """Timing and memory, reduced over ranks: the slowest rank's time, the job's tokens/s."""
        dt = time.perf_counter() - t0
        slowest, peak = self.world.max([dt, peak_mem_mb(self.world.device)]).tolist()
        tokens = float(self.world.sum([tokens_local])[0])
        return {"step_time_s": slowest, "tokens_per_s": tokens / max(slowest, 1e-9), "peak_mem_mb": peak,
                "lr": self.sched.get_last_lr()[0]}
