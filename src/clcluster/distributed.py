"""Process-group helpers that fall back to single-process no-ops when torch.distributed is not
initialised, so the same training code runs on one CPU, under torchrun, or under srun."""
from __future__ import annotations

import torch
import torch.distributed as dist


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
