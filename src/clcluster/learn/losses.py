"""Contrastive losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clcluster.core.distributed import gather_with_grad, rank


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's NT-Xent loss for two views z1, z2 (b, d) of the same b images.

    Each of the 2b embeddings has its other view as positive and the remaining 2B-2 as
    negatives, where B is the global batch (all ranks, gathered with gradient)."""
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    b = z1.shape[0]
    a1, a2 = gather_with_grad(z1), gather_with_grad(z2)
    big_b = a1.shape[0]
    allz = torch.cat([a1, a2], dim=0)  # (2B, d)
    local = torch.cat([z1, z2], dim=0)  # (2b, d)
    logits = local @ allz.T / temperature  # (2b, 2B)
    off = rank() * b
    idx = torch.arange(b, device=z1.device) + off
    self_cols = torch.cat([idx, idx + big_b])
    pos_cols = torch.cat([idx + big_b, idx])
    rows = torch.arange(2 * b, device=z1.device)
    logits[rows, self_cols] = float("-inf")
    # mean over the local rows; DDP averages gradients over ranks, which gives the global mean
    return F.cross_entropy(logits, pos_cols)
