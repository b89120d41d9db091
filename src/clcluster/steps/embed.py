"""Per-shard embedding: the trained encoder's L2-normalised features, no augmentation."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import torch

from clcluster.core.backend import select_device
from clcluster.core.cli_args import add_config, add_device, run_config
from clcluster.io.atomic import save_npy

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_images(encoder, images, batch_size: int = 128, device="cpu") -> np.ndarray:
    """Features (n, d) float32, L2-normalised, of images (n, box, box) (array-like, read in batches)."""
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.as_tensor(np.asarray(images[s:s + batch_size], dtype=np.float32), device=device)
        out.append(torch.nn.functional.normalize(encoder(x).float(), dim=1).cpu().numpy())
        if (s // batch_size) % 20 == 0:
            log.info("embedded %d/%d", min(len(images), s + batch_size), len(images))
    d = getattr(encoder, "feature_dim", 0)
    return np.concatenate(out) if out else np.zeros((0, d), np.float32)


def embed_shard(encoder_path, shard_npy, out_path, batch_size: int = 128, device: str = "auto", threads: int = 0) -> int:
    """Embed one preprocessed shard into `out_path` (.npy float32 (n, d)). Returns n."""
    from clcluster.learn.models import load_encoder

    tdev = select_device(device)
    if tdev.type == "cpu":
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    encoder, _ = load_encoder(encoder_path, tdev)
    images = np.load(shard_npy, mmap_mode="r")
    feats = embed_images(encoder, images, batch_size, tdev)
    save_npy(Path(out_path), feats.astype(np.float32))
    return len(feats)


# --- command line: `clcluster embed` -------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", required=True, help="encoder .pt from train")
    p.add_argument("--shard", required=True, help="preprocessed .npy shard")
    p.add_argument("--out", required=True, help="output .npy (n, feature_dim) float32, L2-normalised")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = all this process may use)")
    add_device(p)
    add_config(p)


def main(args: argparse.Namespace) -> int:
    cfg = run_config(args)
    n = embed_shard(args.encoder, args.shard, args.out, cfg["embed"]["batch_size"], args.device or cfg["device"],
                    threads=args.threads)
    log.info("embedded %d particles into %s", n, args.out)
    return 0
