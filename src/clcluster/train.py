"""Contrastive training of the encoder (SimCLR NT-Xent on two augmented views per image).

Runs for a fixed number of steps (cost independent of the number of particles), checkpoints
on a timer and on SIGTERM/SIGUSR1, resumes from the latest checkpoint, and writes the encoder,
the loss curve (CSV + PNG) and a log. Single process, or one rank of a DDP job.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist_utils
from .augment import AugmentConfig, two_views
from .backend import choose_array_module, to_torch, torch_device
from .data import BatchPlan, ShardSet
from .io.atomic import atomic_path, write_text
from .losses import nt_xent
from .models import ContrastiveModel, build_encoder, convert_sync_batchnorm
from .config import dataclass_from_dict
from .rng import AUGMENT

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


def train(shard_paths, out_path, cfg: TrainConfig, seed: int = 0, device: str = "auto",
          apix: float | None = None) -> dict:
    """Train on the preprocessed shards; writes `out_path` (encoder), `<out>.ckpt` while running,
    `<out stem>_loss.csv` and `_loss.png`. Returns {"steps", "final_loss", "images_per_s"}."""
    out_path = Path(out_path)
    ckpt_path = out_path.with_suffix(".ckpt")
    rank, world = dist_utils.rank(), dist_utils.world_size()
    tdev = torch_device(device) if device != "auto" or not torch.cuda.is_available() else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    xp = choose_array_module("cpu" if tdev.type == "cpu" else "auto")
    if tdev.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    torch.manual_seed(seed)
    data = ShardSet(shard_paths)
    plan = BatchPlan(len(data), cfg.batch_size, seed, cfg.subset or None, rank, world)
    aug = AugmentConfig.from_dict(cfg.augment)
    model = ContrastiveModel(build_encoder(cfg.encoder, data.box, cfg.feature_dim), cfg.projection_dim).to(tdev)
    if world > 1:  # batch statistics over the global batch, as on one process
        model = convert_sync_batchnorm(model)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    else:
        raise ValueError(f"train.optimizer must be adamw or sgd, not {cfg.optimizer!r}")
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / max(cfg.steps, 1))))
    losses: list[float] = []
    start = 0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=tdev, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["torch_rng"])
        start = int(ck["step"])
        losses = [float(v) for v in ck["losses"]]
        log.info("resumed from %s at step %d", ckpt_path, start)
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[tdev.index] if tdev.type == "cuda" else None)
    use_amp = tdev.type == "cuda"

    def checkpoint(step):
        if dist_utils.is_main_process():
            with atomic_path(ckpt_path) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "torch_rng": torch.get_rng_state(), "step": step, "losses": torch.tensor(losses)}, tmp)
        dist_utils.barrier()

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
    last_ckpt = time.time()
    t0, seen = time.time(), 0
    try:
        for step in range(start, cfg.steps):
            idx = plan.batch(step)
            x = xp.asarray(data.take(idx))
            v1, v2 = make_views(x, aug, seed, step, rank * len(idx), apix or 1.0, xp)
            v1, v2 = to_torch(v1).to(tdev), to_torch(v2).to(tdev)
            with torch.autocast(device_type=tdev.type, dtype=torch.bfloat16, enabled=use_amp):
                z = ddp(torch.cat([v1, v2]))
            z1, z2 = z.float().chunk(2)
            loss = nt_xent(z1, z2, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            # one small collective per step: the global loss, and whether any rank was signalled
            # or rank 0's checkpoint timer ran out, so that all ranks checkpoint/stop at one step
            timer = rank == 0 and cfg.checkpoint_minutes > 0 and time.time() - last_ckpt > 60 * cfg.checkpoint_minutes
            loss_sum, n_signalled, n_timer = dist_utils.all_reduce_sum(
                [float(loss.detach()), stop["signal"] is not None, timer])
            losses.append(loss_sum / world)
            seen += len(idx) * world
            if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
                log.info("step %d/%d loss %.4f (%.0f img/s)", step + 1, cfg.steps, np.mean(losses[-10:]), seen / (time.time() - t0))
            if n_signalled:
                stop["signal"] = stop["signal"] or signal.SIGTERM
                checkpoint(step + 1)
                raise _Preempted()
            if n_timer:
                checkpoint(step + 1)
                last_ckpt = time.time()
    except _Preempted:
        log.warning("signal %s: checkpoint written to %s, exiting; rerun to resume", stop["signal"], ckpt_path)
        raise SystemExit(128 + int(stop["signal"])) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    rate = seen / max(time.time() - t0, 1e-9)
    if dist_utils.is_main_process():
        save_encoder(out_path, model, cfg, data.box, apix)
        write_loss_curve(out_path, losses)
        if ckpt_path.exists():
            ckpt_path.unlink()
    dist_utils.barrier()
    return {"steps": cfg.steps, "final_loss": float(np.mean(losses[-10:])) if losses else float("nan"), "images_per_s": rate}


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
