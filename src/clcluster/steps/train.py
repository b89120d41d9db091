"""Contrastive training of the encoder (SimCLR NT-Xent on two augmented views per image).

Runs for a fixed number of steps (cost independent of the number of particles), checkpoints
on a timer and on SIGTERM/SIGUSR1, resumes from the latest checkpoint, and writes the encoder,
the loss curve (CSV + PNG) and a log. Single process, or one rank of a DDP job.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from clcluster.core import distributed as dist_utils
from clcluster.core.backend import choose_array_module, select_device, to_torch
from clcluster.core.cli_args import add_config, add_device, run_config
from clcluster.core.config import dataclass_from_dict
from clcluster.core.rng import AUGMENT
from clcluster.io.atomic import atomic_path, write_text
from clcluster.learn.augment import AugmentConfig, two_views, two_views_batched
from clcluster.learn.data import BatchPlan, ShardSet
from clcluster.learn.losses import nt_xent
from clcluster.learn.models import ContrastiveModel, build_encoder, convert_sync_batchnorm

log = logging.getLogger(__name__)

# Augmentation is seeded per group of this many consecutive particles of the global batch
# (seed, step, group), so that the views of a particle do not depend on the number of ranks as
# long as the per-rank batch is a multiple of it: 1 rank and N ranks train on the same views.
AUGMENT_GROUP = 16


def make_views(x, aug: AugmentConfig, seed: int, step: int, offset: int, apix: float, xp):
    """Two views of the local images `x`, which sit at `offset` in the global batch of `step`."""
    g = math.gcd(len(x), AUGMENT_GROUP) or 1
    if offset % g:
        g = math.gcd(g, offset)
    v1, v2 = [], []
    for j in range(0, len(x), g):
        rng = xp.random.default_rng([seed, AUGMENT, step, (offset + j) // g])
        a, b = two_views(x[j:j + g], aug, rng, apix)
        v1.append(a)
        v2.append(b)
    return xp.concatenate(v1), xp.concatenate(v2)


@dataclasses.dataclass
class TrainConfig:
    """See config.schema.yaml `train:`."""

    encoder: str = "polar"
    steps: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    temperature: float = 0.2
    feature_dim: int = 128
    projection_dim: int = 64
    threads: int = 0
    checkpoint_minutes: float = 5.0
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9; its updates are linear in the gradient)
    subset: int = 0
    augment: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d):
        return dataclass_from_dict(cls, d)


class _Preempted(Exception):
    pass


def save_encoder(path, model: ContrastiveModel, cfg: TrainConfig, box: int, apix: float | None) -> None:
    """Encoder weights + what is needed to rebuild it; loads with torch.load(weights_only=True)."""
    payload = {"state_dict": model.encoder.state_dict(), "encoder": cfg.encoder, "box": box,
               "feature_dim": cfg.feature_dim, "apix_A": apix if apix is not None else -1.0}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


class Checkpointer:
    """`<encoder>.ckpt`: model, optimiser and scheduler state, the RNG states, the step reached
    and the losses so far; written atomically by rank 0, read by every rank on resume."""

    def __init__(self, path: Path, model, opt, sched, device: torch.device):
        self.path, self.model, self.opt, self.sched, self.device = Path(path), model, opt, sched, device

    def save(self, step: int, losses) -> None:
        if dist_utils.is_main_process():
            state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                     "scheduler": self.sched.state_dict(), "torch_rng": torch.get_rng_state(),
                     "step": step, "losses": torch.tensor(losses)}
            if self.device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            with atomic_path(self.path) as tmp:
                torch.save(state, tmp)
        dist_utils.barrier()

    def load(self) -> tuple[int, list[float]]:
        """Restore the saved state when a checkpoint exists. Returns (step to start at, losses).
        Read onto the CPU: the RNG states must be CPU ByteTensors whatever device wrote them;
        load_state_dict copies the rest onto the model's and optimiser's device."""
        if not self.path.exists():
            return 0, []
        ck = torch.load(self.path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["torch_rng"])
        if "cuda_rng" in ck and self.device.type == "cuda":
            torch.cuda.set_rng_state(ck["cuda_rng"], self.device)
        start = int(ck["step"])
        log.info("resumed from %s at step %d", self.path, start)
        return start, [float(v) for v in ck["losses"]]

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()


class PreemptionGuard:
    """While active, SIGTERM (preemption, scancel) and SIGUSR1 (sbatch --signal=USR1@secs before
    the time limit) only set `signum`; the loop checkpoints and stops at an agreed step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handler(self, signum, frame):
        self.signum = signum

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


class BatchPrefetcher:
    """Reads the images of step+1 from the shards in a background thread while step computes."""

    def __init__(self, data: ShardSet, plan: BatchPlan, last_step: int):
        self.data, self.plan, self.last = data, plan, last_step
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: dict[int, object] = {}

    def _read(self, step: int):
        idx = self.plan.batch(step)
        return idx, self.data.take(idx)

    def get(self, step: int):
        """(indices, images (b, D, D)) of `step`; starts reading step+1."""
        fut = self.pending.pop(step, None)
        idx, images = fut.result() if fut is not None else self._read(step)
        if step + 1 < self.last:
            self.pending[step + 1] = self.pool.submit(self._read, step + 1)
        return idx, images

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class ViewMaker:
    """The two augmented views of a step's local images. NumPy: `make_views` (seeded per group
    of the global batch: the same views on any number of ranks). CuPy: `two_views_batched`
    with one generator for the whole run, seeded by (seed, rank, first step)."""

    def __init__(self, aug: AugmentConfig, seed: int, apix: float, xp, rank: int, start_step: int):
        self.aug, self.seed, self.apix, self.xp = aug, seed, apix, xp
        key = int(np.random.SeedSequence([seed, AUGMENT, rank, start_step]).generate_state(1, np.uint64)[0])
        self.rng = None if xp is np else xp.random.default_rng(key)

    def __call__(self, x, step: int, offset: int):
        if self.rng is None:
            return make_views(x, self.aug, self.seed, step, offset, self.apix, self.xp)
        return two_views_batched(x, self.aug, self.rng, self.apix)


def build_optimiser(model, cfg: TrainConfig):
    """(optimiser, scheduler): AdamW or SGD, linear warm-up over 5% of the steps, cosine decay."""
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    else:
        raise ValueError(f"train.optimizer must be adamw or sgd, not {cfg.optimizer!r}")
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / max(cfg.steps, 1))))
    return opt, sched


def train(shard_paths, out_path, cfg: TrainConfig, seed: int = 0, device: str = "auto",
          apix: float | None = None) -> dict:
    """Train on the preprocessed shards; writes `out_path` (encoder), `<out>.ckpt` while running,
    `<out stem>_loss.csv` and `_loss.png`. Returns {"steps", "final_loss", "images_per_s"}."""
    out_path = Path(out_path)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    tdev = select_device(device)
    xp = choose_array_module("cpu" if tdev.type != "cuda" else "auto")
    if tdev.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    log.info("rank %d of %d computes on %s", rank, world, tdev)
    torch.manual_seed(seed)
    data = ShardSet(shard_paths)
    plan = BatchPlan(len(data), cfg.batch_size, seed, cfg.subset or None, rank, world)
    model = ContrastiveModel(build_encoder(cfg.encoder, data.box, cfg.feature_dim), cfg.projection_dim).to(tdev)
    if world > 1:  # batch statistics over the global batch, as on one process
        model = convert_sync_batchnorm(model)
    opt, sched = build_optimiser(model, cfg)
    ckpt = Checkpointer(out_path.with_suffix(".ckpt"), model, opt, sched, tdev)
    start, losses = ckpt.load()
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[tdev.index] if tdev.type == "cuda" else None)
    views = ViewMaker(AugmentConfig.from_dict(cfg.augment), seed, apix or 1.0, xp, rank, start)
    batches = BatchPrefetcher(data, plan, cfg.steps)
    t0 = time.time()
    try:
        with PreemptionGuard() as guard:
            seen = _loop(ddp, opt, sched, cfg, tdev, xp, views, batches, ckpt, guard, start, losses)
    except _Preempted:
        log.warning("signal %s: checkpoint written to %s, exiting; rerun to resume", guard.signum, ckpt.path)
        raise SystemExit(128 + int(guard.signum)) from None
    finally:
        batches.close()
    rate = seen / max(time.time() - t0, 1e-9)
    if dist_utils.is_main_process():
        save_encoder(out_path, model, cfg, data.box, apix)
        write_loss_curve(out_path, losses)
        ckpt.remove()
    dist_utils.barrier()
    return {"steps": cfg.steps, "final_loss": float(np.mean(losses[-10:])) if losses else float("nan"), "images_per_s": rate}


# On a GPU the loop reads the losses back (a device-to-host sync) and agrees on stopping with
# the other ranks once per this many steps; on the CPU every step (nothing to wait for there).
GPU_SYNC_EVERY = 10


def sync_interval(tdev: torch.device) -> int:
    """Steps between read-backs of the loss and stop votes: 1 on the CPU, GPU_SYNC_EVERY on CUDA."""
    return GPU_SYNC_EVERY if tdev.type == "cuda" else 1


def _loop(ddp, opt, sched, cfg: TrainConfig, tdev, xp, views: ViewMaker, batches: BatchPrefetcher,
          ckpt: Checkpointer, guard: PreemptionGuard, start: int, losses: list) -> int:
    """Steps start..cfg.steps-1; appends the global mean loss of every step to `losses`.
    One small collective per sync: the losses since the last one, whether any rank was
    signalled and whether rank 0's checkpoint timer ran out, so that all ranks checkpoint or
    stop at the same step. Raises _Preempted after the checkpoint. Returns images seen."""
    rank, world = dist_utils.rank(), dist_utils.world_size()
    every = sync_interval(tdev)
    use_amp = tdev.type == "cuda"
    last_ckpt, t0, seen, pending = time.time(), time.time(), 0, []
    for step in range(start, cfg.steps):
        idx, images = batches.get(step)
        x = xp.asarray(images)
        v1, v2 = views(x, step, rank * len(idx))
        v1, v2 = to_torch(v1).to(tdev), to_torch(v2).to(tdev)
        with torch.autocast(device_type=tdev.type, dtype=torch.bfloat16, enabled=use_amp):
            z = ddp(torch.cat([v1, v2]))
        z1, z2 = z.float().chunk(2)
        loss = nt_xent(z1, z2, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pending.append(loss.detach())
        seen += len(idx) * world
        timer = rank == 0 and cfg.checkpoint_minutes > 0 and time.time() - last_ckpt > 60 * cfg.checkpoint_minutes
        local_stop = world == 1 and (guard.signum is not None or timer)
        if (step + 1) % every and step + 1 != cfg.steps and not local_stop:
            continue
        *loss_sums, n_signalled, n_timer = dist_utils.all_reduce_sum(
            [*torch.stack(pending).float().cpu().tolist(), guard.signum is not None, timer])
        losses.extend(v / world for v in loss_sums)
        pending = []
        if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
            log.info("step %d/%d loss %.4f (%.0f img/s)", step + 1, cfg.steps, np.mean(losses[-10:]), seen / (time.time() - t0))
        if n_signalled:
            guard.signum = guard.signum or signal.SIGTERM
            ckpt.save(step + 1, losses)
            raise _Preempted()
        if n_timer:
            ckpt.save(step + 1, losses)
            last_ckpt = time.time()
    return seen


def write_loss_curve(out_path: Path, losses) -> None:
    """`<stem>_loss.csv` (step, loss) and `<stem>_loss.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = out_path.with_name(out_path.stem + "_loss")
    write_text(stem.with_suffix(".csv"), "step,loss\n" + "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(losses)))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="per step")
    if len(losses) >= 10:
        k = 10
        ax.plot(np.arange(k, len(losses) + 1), np.convolve(losses, np.ones(k) / k, mode="valid"), lw=1.5, label="mean of 10")
    ax.set_xlabel("step")
    ax.set_ylabel("NT-Xent loss")
    ax.set_title("contrastive training")
    ax.legend()
    fig.tight_layout()
    with atomic_path(stem.with_suffix(".png")) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


# --- command line: `clcluster train` -------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", nargs="+", required=True, help="preprocessed .npy shards")
    p.add_argument("--out", required=True, help="encoder file (.pt); loss curve written beside it")
    p.add_argument("--steps", type=int, help="optimiser steps (default: config train.steps)")
    add_device(p)
    add_config(p)


def main(args: argparse.Namespace) -> int:
    """One rank of the training (multi-rank under torchrun or srun); rank 0 alone logs progress."""
    import json

    cfg = run_config(args)
    tc = TrainConfig.from_dict(cfg["train"])
    if args.steps is not None:
        tc.steps = args.steps
    rank, _ = dist_utils.init_from_env()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        meta = Path(args.shards[0]).with_suffix(".json")
        apix = json.loads(meta.read_text())["apix_A"] if meta.exists() else None
        out = train(args.shards, args.out, tc, seed=cfg["seed"], device=args.device or cfg["device"], apix=apix)
    finally:
        dist_utils.shutdown()
    log.info("trained %d steps, final loss %.4f, %.1f images/s", out["steps"], out["final_loss"], out["images_per_s"])
    return 0
