"""``medssl pretrain CONFIG [key=value ...]``: the training loop, top to bottom.

accelerate handles devices, processes (DDP) and precision. Every run writes to
``output_dir``: ``run.json`` (the run record, medssl/rundir.py), ``config.yaml`` (resolved, git
SHA, intensity handling), ``metrics.jsonl``, ``checkpoints/``, ``logs/``. Before any of that,
rank zero decides whether ``output_dir`` is a new run, this run resumed, or a folder to refuse,
checks the shards and takes the run dir's lock (pretrain/resume.py). Re-running the same
command resumes from the newest intact checkpoint; a finished run exits 0 at once;
SIGTERM/SIGUSR1 checkpoint and exit 75; weights that are not finite stop the run unsaved.

Randomness is a pure function of (seed, step, rank): each step reseeds the global torch RNG
(MAE masks, dropout) and the augmentation generator, and the data stream is a function of
the seed and the batches consumed. That is what makes a resumed run bitwise equal to an
uninterrupted one on CPU, and lets a checkpoint from N ranks resume on M.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from medssl.config import load_config, save_config, to_dict
from medssl.errors import ConfigError, MedsslError
from medssl.rundir import RunRecord, load_checkpoint, nonfinite_tensors, write_record
from pretrain.checkpoint import StopFlag, capture_rng, restore_rng, save_checkpoint
from pretrain.config import PretrainConfig, cosine_factor, scaled_lr
from pretrain.data import (
    build_loader,
    estimated_epoch_steps,
    resolve_shards,
    summarize_intensity,
    worker_shards,
)
from pretrain.init import load_init
from pretrain.methods import BACKBONE_PREFIX, get_method
from pretrain.monitor import Monitor
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.resolve import resolve_config
from pretrain.resume import RunPlan, plan_run, record_start
from pretrain.shardcheck import write_cache
from pretrain.tracking import MetricsFile, start_wandb
from pretrain.volumes import is_volume, make_augment, memory_format

log = logging.getLogger("medssl.pretrain")

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early by a signal, checkpointed, resumable
PLAN_TIMEOUT = datetime.timedelta(hours=6)   # other ranks wait this long for rank zero's checks


def pretrain_command(config_path: Path, overrides: list[str], force_resume: bool = False) -> int:
    """CLI entry: validate the whole config, then train. Returns the exit code (0 / 75).

    ``force_resume``: continue the run in ``output_dir`` although settings differ from its
    record (pretrain/resume.py); the differences are recorded in run.json.
    """
    cfg = resolve_config(load_config(PretrainConfig, config_path, overrides))
    return train(cfg, force_resume=force_resume)


def _precision(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of one (step, rank): distinct streams, reproducible after resume."""
    return (seed * 1_000_003 + step * 1_009 + rank) % (2**63 - 1)


class Pretrainer:
    """Model, optimizer, schedule and augmentation of one run, and its ``step``."""

    def __init__(self, cfg: PretrainConfig, accelerator: Accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.spec = get_method(cfg.method.name)
        set_seed(cfg.seed)
        model = self.spec.build(cfg)
        if cfg.train.sync_batchnorm and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
            # SimCLR's negatives span all ranks; per-rank BN statistics leak which rank a
            # sample came from (the paper's "global BN"). Same state_dict keys.
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if memory_format(cfg) is not None:   # NHWC, or NDHWC for volumes
            model = model.to(memory_format=memory_format(cfg))
        self.unwrapped = model
        self.optimizer = build_optimizer(model, cfg.train)
        # The scheduler is not prepare()d: accelerate would step it once per process.
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        if cfg.train.compile:
            model.compile()  # in place: state_dict keys stay those of the plain module
        self.model, self.optimizer = accelerator.prepare(model, self.optimizer)
        self.augment = make_augment(cfg, self.spec.n_views)   # 2-D or 3-D, by model.arch
        self.generator = torch.Generator(device=accelerator.device)
        self.check_grads = accelerator.mixed_precision != "fp16"  # fp16: the scaler skips infs
        # The method's optional hooks (pretrain/methods/__init__.py).
        self._before_update = getattr(model, "before_optimizer_step", None)
        self._after_update = getattr(model, "after_optimizer_step", None)
        self.check_health = getattr(model, "check_health", None)
        self.monitors: dict[str, torch.Tensor] = {}

    def step(self, batches: list[Any], step: int, augment: bool = True,
             stop: bool = False) -> tuple[torch.Tensor, bool, bool]:
        """One optimizer step over ``grad_accum`` micro-batches.

        Returns ``(loss, finite, stop)``: this rank's mean loss (a device tensor), whether the
        update was applied, and whether any rank was asked to stop (``stop`` is this rank's
        wish; both flags travel in one all-reduce, the step's only host sync).

        ``batches``: loader batches (dicts, augmented here), or with ``augment=False`` lists of
        ready views already on the device (the throughput benchmark's model-only rate).

        A non-finite loss or gradient on any rank skips the update on every rank (all-reduced
        flag): weights and optimizer moments stay as they were, the batch is consumed and the
        schedule moves on, so lr stays a function of the step.
        """
        acc, cfg = self.accelerator, self.cfg
        torch.manual_seed(step_seed(cfg.seed, step, acc.process_index))
        self.generator.manual_seed(step_seed(cfg.seed + 1, step, acc.process_index))
        losses, monitors = [], {}
        for i, batch in enumerate(batches):
            groups = None
            if augment:
                batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
                views = self.augment(batch, self.generator)
                groups = batch.get("group")   # patient ids when data.positives pairs images
                if "pair_cross" in batch:     # how many pairs really are two different images
                    monitors.setdefault("cross_image_pairs", []).append(batch["pair_cross"].mean())
            else:
                views = batch
            sync = i == len(batches) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                out = self.model(views, groups)
                loss = out["loss"]
                for key, value in out.items():
                    if key != "loss":
                        monitors.setdefault(key, []).append(value.detach().float())
                if step + 1 in cfg.debug.nan_at_steps:  # numbered as logged (1-based)
                    loss = loss * float("nan")
                acc.backward(loss / len(batches))
            losses.append(loss.detach().float())
        loss = torch.stack(losses).mean()
        # Device tensors, read by the loop only at log steps (no host sync here).
        self.monitors = {key: torch.stack(values).mean() for key, values in monitors.items()}
        max_norm = cfg.train.clip_grad_norm or float("inf")
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        if self._before_update is not None:
            self._before_update(step)
        finite = torch.isfinite(loss)
        if self.check_grads and grad_norm is not None:
            finite = finite & torch.isfinite(torch.as_tensor(grad_norm, device=loss.device))
        # MAX over ranks of (not finite, stop): any bad rank skips everywhere, any stop stops all.
        flags = torch.stack([(~finite).float(), torch.tensor(float(stop), device=finite.device)])
        if acc.num_processes > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, stop_all = flags.tolist()
        if not bad:
            self.optimizer.step()
            if self._after_update is not None:
                self._after_update(step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss, not bad, bool(stop_all)


def train(cfg: PretrainConfig, force_resume: bool = False) -> int:
    """Run (or resume) pretraining as configured; returns the exit code."""
    # Installed before the slow set-up, so an early SIGTERM/SIGUSR1 still ends in a checkpoint.
    with StopFlag() as stop, contextlib.ExitStack() as held:
        return _train(cfg, stop, force_resume, held)


def _train(cfg: PretrainConfig, stop: StopFlag, force_resume: bool, held: contextlib.ExitStack) -> int:
    out = Path(cfg.output_dir)
    urls = resolve_shards(cfg.data.shards, cfg.data.split)
    # cpu=True when there is no accelerator: only then does accelerate (1.15) treat a torchrun
    # launch on CPU as multi-process (gloo) instead of N independent single-process runs.
    accelerator = Accelerator(mixed_precision=_precision(cfg.train.precision),
                              cpu=not torch.accelerator.is_available())
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    per_step = world * cfg.train.grad_accum
    if cfg.train.batch_size % per_step:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must be divisible by "
                          f"{world} processes x train.grad_accum {cfg.train.grad_accum}")
    local_batch = cfg.train.batch_size // per_step
    slices = worker_shards(urls, rank, world, cfg.data.num_workers)
    monitor = Monitor.from_config(cfg, keep_images=main)   # every rank: a missing val split refused here

    plan = _agree_on_plan(cfg, urls, force_resume, accelerator, held)
    if plan["finished"]:
        log.info("%s: already finished (step %d of train.max_steps=%d); nothing to do",
                 out, plan["start"], cfg.train.max_steps)
        return 0
    start, latest = plan["start"], out / "checkpoints" / plan["file"] if plan["file"] else None
    ckpt = None
    if latest is not None:
        ckpt = plan["legacy"] if plan.get("legacy") is not None else load_checkpoint(latest)

    trainer = Pretrainer(cfg, accelerator)
    if ckpt is not None:
        _restore(trainer, accelerator, ckpt, latest)
        layout = ckpt.get("data", {})
        if (layout.get("world_size"), layout.get("num_workers")) != (world, cfg.data.num_workers):
            log.warning("resuming with %d ranks x %d workers (checkpoint: %s x %s): the data order "
                        "differs from an uninterrupted run", world, cfg.data.num_workers,
                        layout.get("world_size"), layout.get("num_workers"))
        log.info("resuming from %s (step %d)", latest, start)
        started_from = None   # recorded at the run's first start
    else:
        started_from = load_init(trainer.unwrapped, cfg)

    record = None
    if main:
        run_plan: RunPlan = plan["plan"]
        augment_record = trainer.augment.record()
        data_intensity = summarize_intensity(urls)
        record = record_start(run_plan, cfg, world, augment_record, data_intensity)
        if started_from is not None:
            record.started_from = started_from
        resolved = {"world_size": world, "local_batch": local_batch,
                    "precision": accelerator.mixed_precision, "peak_lr": scaled_lr(cfg.train)}
        record.resolved = resolved
        write_record(out, record)   # from here on the folder is this run's
        if run_plan.report is not None:
            write_cache(out, run_plan.report.cache)
        save_config(cfg, out / "config.yaml", extra={
            "resolved": resolved,
            **augment_record,
            "data_intensity": data_intensity,
        })
    accelerator.wait_for_everyone()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"shards_rank{rank}.json").write_text(
        _json({"rank": rank, "workers": [[Path(u).name for u in s] for s in slices]}))

    loader = build_loader(urls, rank=rank, world_size=world, local_batch=local_batch, seed=cfg.seed,
                          data_cfg=cfg.data, in_chans=cfg.model.in_chans, volume=is_volume(cfg),
                          skip_batches=start * cfg.train.grad_accum,
                          pin_memory=cfg.data.pin_memory and accelerator.device.type == "cuda")
    return _loop(cfg, accelerator, trainer, loader, start, ckpt, latest, urls, stop, record, monitor)


def _agree_on_plan(cfg: PretrainConfig, urls: list[str], force_resume: bool, accelerator: Accelerator,
                   held: contextlib.ExitStack) -> dict[str, Any]:
    """Rank zero decides what the run dir holds and locks it (pretrain/resume.py); every rank
    learns the outcome, so a refusal ends every rank with the same one line instead of a hang.

    The outcome travels over a gloo group with a long timeout: checking a large corpus with
    data.verify=full can outlast NCCL's 10-minute default while the other ranks wait.
    """
    group = None
    if accelerator.num_processes > 1:
        group = dist.new_group(backend="gloo", timeout=PLAN_TIMEOUT)

    def share(message: dict[str, Any]) -> dict[str, Any]:
        box = [message]
        if group is not None:
            dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    if not accelerator.is_main_process:
        message = share({})
        if "error" in message:
            raise (ConfigError if message["config"] else MedsslError)(message["error"])
        return message
    try:
        plan = plan_run(cfg, urls, force_resume)
    except BaseException as exc:   # whatever stops rank zero must not leave the others waiting
        text = str(exc) if isinstance(exc, MedsslError) else f"rank 0 failed: {type(exc).__name__}: {exc}"
        share({"error": text, "config": isinstance(exc, ConfigError)})
        raise
    held.callback(plan.lock.release)
    message = share({"finished": plan.finished, "start": plan.start,
                     "file": plan.resume.file if plan.resume else None})
    return {**message, "plan": plan, "legacy": plan.legacy}


def _restore(trainer: Pretrainer, accelerator: Accelerator, ckpt: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's states; a --force-resume that changed a shape is one clear line."""
    try:
        trainer.unwrapped.load_state_dict(ckpt["model"])
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedsslError(f"{path}: does not fit the configured model or optimizer ({first}); "
                          "use another output_dir") from None
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"], trainer.generator)


def _loop(cfg: PretrainConfig, accelerator: Accelerator, trainer: Pretrainer, loader: Any, start: int,
          ckpt: dict[str, Any] | None, latest: Path | None, urls: list[str], stop: StopFlag,
          record: RunRecord | None, monitor: Monitor | None = None) -> int:
    out, main = Path(cfg.output_dir), accelerator.is_main_process
    metrics = MetricsFile(out / "metrics.jsonl", start) if main else None
    run = None
    wandb_id = ckpt.get("wandb_id") if ckpt else None
    if main:
        run = start_wandb(cfg.logging.wandb, cfg.logging.project, cfg.logging.run_name, wandb_id,
                          out, to_dict(cfg))
        wandb_id = run.id if run is not None else None
    epoch_steps = estimated_epoch_steps(urls, cfg.train.batch_size)
    bar = tqdm(total=cfg.train.max_steps, initial=start, disable=not (main and cfg.logging.progress),
               desc="pretrain", dynamic_ncols=True)
    last_good = str(latest) if latest else "none"
    step, bad_streak = start, 0
    skipped = int(ckpt.get("skipped_steps", 0)) if ckpt else 0
    t_log, n_log = time.perf_counter(), 0
    monitor_sums: dict[str, torch.Tensor] = {}
    stopped = False
    resumed_entry = record.entry(latest.name) if record is not None and latest is not None else None
    last_rankme = resumed_entry.rankme if resumed_entry is not None else None

    def checkpoint() -> None:
        nonlocal last_good
        accelerator.wait_for_everyone()
        # Loss and gradients were finite, yet weights can still overflow (a huge lr step, BN
        # statistics): never save those as good. Every rank checks, all agree (one all-reduce).
        state_dict = trainer.unwrapped.state_dict()
        bad = nonfinite_tensors(state_dict)
        flag = torch.tensor(float(bool(bad)), device=accelerator.device)
        if accelerator.num_processes > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            bar.close()
            first = f" (first: {bad[0]})" if bad else ""
            raise MedsslError(
                f"step {step}: model weights are not finite in {len(bad)} of {len(state_dict)} tensors"
                f"{first}; not saved as a checkpoint; last good checkpoint: {last_good}; lower train.lr "
                f"or set train.clip_grad_norm, then resume with --force-resume, or use another output_dir")
        if main:
            assert record is not None
            state = {
                "step": step, "model": trainer.unwrapped.state_dict(), "backbone_prefix": BACKBONE_PREFIX,
                "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": capture_rng(trainer.generator),
                "data": {"batches": step * cfg.train.grad_accum, "world_size": accelerator.num_processes,
                         "num_workers": cfg.data.num_workers},
                "wandb_id": wandb_id, "config": to_dict(cfg), "skipped_steps": skipped,
            }
            entry = save_checkpoint(out, state, cfg.train.keep_checkpoints, record, rankme=last_rankme)
            last_good = str(out / "checkpoints" / entry.file)
        accelerator.wait_for_everyone()

    it = iter(loader)
    while step < cfg.train.max_steps:
        batches = [next(it) for _ in range(cfg.train.grad_accum)]
        loss, finite, stop_all = trainer.step(batches, step, stop=stop.requested)
        step += 1
        if step == cfg.debug.nan_weights_at_step:
            with torch.no_grad():
                next(trainer.unwrapped.parameters()).view(-1)[0] = float("nan")
        n_log += 1
        for key, value in trainer.monitors.items():
            monitor_sums[key] = monitor_sums.get(key, 0) + value
        if finite:
            bad_streak = 0
        else:
            bad_streak += 1
            skipped += 1
            log.warning("step %d: non-finite loss or gradient on some rank; update skipped "
                        "(%d in a row)", step, bad_streak)
            if bad_streak >= cfg.train.max_nonfinite_steps:
                bar.close()
                raise MedsslError(
                    f"step {step}: loss or gradients non-finite for {bad_streak} steps in a row "
                    f"(train.max_nonfinite_steps); last good checkpoint: {last_good}; lower train.lr "
                    f"or set train.clip_grad_norm, then resume")
        if cfg.debug.step_sleep:
            time.sleep(cfg.debug.step_sleep)
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            mean_loss = accelerator.reduce(loss, reduction="mean").item()
            elapsed = time.perf_counter() - t_log
            lr = scaled_lr(cfg.train) * cosine_factor(step - 1, cfg.train)  # lr this step used
            row = {"step": step, "loss": mean_loss, "lr": lr,
                   "samples_per_s": n_log * cfg.train.batch_size / max(elapsed, 1e-9),
                   "epoch": step / epoch_steps if not math.isnan(epoch_steps) else None,
                   "skipped_steps": skipped}
            for key, total in sorted(monitor_sums.items()):   # same keys on every rank
                row[key] = accelerator.reduce(total / n_log, reduction="mean").item()
            t_log, n_log, monitor_sums = time.perf_counter(), 0, {}
            failure = trainer.check_health(row) if trainer.check_health is not None else None
            if main:
                metrics.write(row)
                bar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{row['samples_per_s']:.1f}")
                if run is not None:
                    # No step=: after a resume wandb would drop steps it already saw from
                    # the interrupted run; "step" is in the row for the x-axis instead.
                    run.log(row)
            if failure:   # every rank saw the same reduced row, so every rank stops here
                bar.close()
                raise MedsslError(f"step {step}: {failure}; last good checkpoint: {last_good}")
        if monitor is not None and monitor.due(step):   # rank zero evaluates, the others wait
            last_rankme = monitor.log(trainer.unwrapped.backbone, step, accelerator, metrics, run)
        # Every rank must agree to stop (the flag rode the step's all-reduce), or one would
        # wait forever in the next collective.
        stopped = stop_all and step < cfg.train.max_steps
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps or stopped:
            checkpoint()
        if stopped:
            break
    bar.close()
    if cfg.debug.dump_rank_weights:
        _dump_rank_weights(trainer, out, accelerator.process_index)
    if run is not None:
        run.finish()
    accelerator.end_training()
    if stopped:
        log.info("stopped by signal at step %d; checkpoint %s; run the same command to resume",
                 step, last_good)
        return EXIT_STOPPED
    log.info("finished %d steps; checkpoint %s", step, last_good)
    return 0


def _dump_rank_weights(trainer: Pretrainer, out: Path, rank: int) -> None:
    from safetensors.torch import save_file

    folder = out / "debug"
    folder.mkdir(parents=True, exist_ok=True)
    params = {n: p.detach().cpu().contiguous() for n, p in trainer.unwrapped.named_parameters()}
    save_file(params, str(folder / f"rank{rank}.safetensors"))


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=1) + "\n"
