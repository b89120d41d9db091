"""Process-group helpers that fall back to single-process no-ops when torch.distributed is not
initialised, so the same training code runs on one CPU, under torchrun, or under srun."""
from __future__ import annotations

import datetime
import logging
import os
import re
import subprocess

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def expand_hostlist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list: `scontrol show hostnames` when it is there, else a
    parser for the usual forms ("vm", "a,b", "gpu[01-03,07]", "n[1-2]-ib,x")."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    hosts = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,]*)", nodelist):
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    return hosts


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE ("2(x3),1") → number of tasks on node `node_id`."""
    counts = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if node_id < len(counts) else (counts[0] if counts else 1)


def launcher_env(env=None) -> dict | None:
    """Rank layout from the environment: torchrun's variables, else those of a SLURM job step
    (srun), else None (one process). Returns {rank, world, local_rank, local_world, addr, port}."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return {"rank": int(env["RANK"]), "world": world, "local_rank": int(env.get("LOCAL_RANK", 0)),
                "local_world": int(env.get("LOCAL_WORLD_SIZE", world)),
                "addr": env.get("MASTER_ADDR", "127.0.0.1"), "port": int(env.get("MASTER_PORT", 29500)),
                "launcher": "torchrun"}
    # only inside a job step (srun): the batch script itself also has SLURM_NTASKS but is one process
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        step = int(env.get("SLURM_STEP_ID", "0") or 0) if env.get("SLURM_STEP_ID", "").isdigit() else 0
        tpn = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
        return {"rank": int(env["SLURM_PROCID"]), "world": world, "local_rank": int(env.get("SLURM_LOCALID", 0)),
                "local_world": _tasks_on_node(tpn, int(env.get("SLURM_NODEID", 0) or 0)),
                "addr": env.get("MASTER_ADDR") or expand_hostlist(nodes)[0],
                # one port per (job, step) so that two steps of one job on a node do not collide
                "port": int(env.get("MASTER_PORT") or 20000 + (job * 7 + step) % 20000),
                "launcher": "srun"}
    return None


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group that the launcher (torchrun or srun) describes, or stay a single
    process. NCCL when CUDA is usable (each rank on `backend.rank_device`), gloo otherwise. Exports
    RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT so that the rest of the
    code sees one convention. Returns (rank, world)."""
    if is_initialized():
        return rank(), world_size()
    lay = launcher_env()
    if lay is None or lay["world"] <= 1:
        return 0, 1
    for k, v in {"RANK": lay["rank"], "WORLD_SIZE": lay["world"], "LOCAL_RANK": lay["local_rank"],
                 "LOCAL_WORLD_SIZE": lay["local_world"], "MASTER_ADDR": lay["addr"], "MASTER_PORT": lay["port"]}.items():
        os.environ[k] = str(v)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        from clcluster.core.backend import rank_device, use_device

        use_device(rank_device("cuda"))  # local_rank % visible GPUs, for torch and CuPy
    dist.init_process_group(backend, init_method=f"tcp://{lay['addr']}:{lay['port']}", rank=lay["rank"],
                            world_size=lay["world"], timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d of %d (%s, %s backend, rendezvous %s:%d)", lay["rank"], lay["world"], lay["launcher"],
             backend, lay["addr"], lay["port"])
    return lay["rank"], lay["world"]


def shutdown() -> None:
    """Leave the process group (no-op on one process)."""
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values) -> list[float]:
    """Sum a few floats over ranks (identity on one process)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns each rank its slice of the summed gradient."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (b, d) from all ranks along dim 0, keeping gradients; identity on one process."""
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)
