"""Training throughput (images/s) with 1 and more DDP ranks, on CPU or GPU.

    python benchmarks/train_throughput.py                    # 1 and 2 ranks, torchrun, CPU
    python benchmarks/train_throughput.py --launcher srun    # ranks as srun tasks (inside SLURM)
    python benchmarks/train_throughput.py --device cuda --ranks 1   # one GPU

Makes tiny preprocessed data with `clcluster simulate/shard/preprocess` (in --work), then runs
`clcluster train` for --steps steps with each number of ranks (same global batch) and reads the
rate that training logs (images of the global batch per second of the training loop, start-up
excluded); also reports the wall time of the whole command. Prints a Markdown table.
On a machine with 2 CPU cores, 2 ranks share the cores that 1 rank used: the figure shows the
cost of DDP (all-reduce, synchronised batch norm, gathered negatives), not a speed-up.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def sh(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def make_data(work: Path, n_per_view: int, box: int, shard: int) -> list[str]:
    pre = sorted((work / "pre").glob("shard_*.npy"))
    if pre:
        return [str(p) for p in pre]
    sh(["clcluster", "simulate", "--out-dir", str(work / "sim"), "--views", "8", "--images-per-view", str(n_per_view),
        "--box", str(2 * box), "--snr", "0.1"])
    sh(["clcluster", "shard", str(work / "sim/particles.star"), "--size", str(shard), "--out-dir", str(work / "shards")])
    for s in sorted((work / "shards").glob("shard_*.star")):
        sh(["clcluster", "preprocess", str(s), "--out", str(work / "pre" / (s.stem + ".npy")), "--box", str(box),
            "--device", "cpu"])
    return [str(p) for p in sorted((work / "pre").glob("shard_*.npy"))]


def run(ranks: int, launcher: str, shards, cfg: Path, out: Path, device: str, threads_total: int):
    train = ["clcluster", "train", "--shards", *shards, "--config", str(cfg), "--out", str(out), "--device", device]
    if ranks == 1 and launcher != "srun":
        cmd = train
    elif launcher == "torchrun":
        cmd = ["torchrun", "--standalone", f"--nproc-per-node={ranks}", "--no-python", *train]
    else:
        cmd = ["srun", "-n", str(ranks), "-c", str(max(1, threads_total // ranks)), *train]
    env = os.environ.copy()
    env["PATH"] = f"{BIN}:{env['PATH']}"
    t0 = time.time()
    text = sh(cmd, env)
    wall = time.time() - t0
    m = re.findall(r"trained \d+ steps, final loss [\d.na]+, ([\d.]+) images/s", text)
    return float(m[-1]), wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--launcher", choices=["torchrun", "srun"], default="torchrun")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch (split over the ranks)")
    ap.add_argument("--box", type=int, default=32, help="working box (px)")
    ap.add_argument("--encoder", default="polar")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: the rank's share of the cores)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", type=Path, help="folder for the data (default: a temporary one)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="clcluster-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = make_data(work, n_per_view=32, box=args.box, shard=128)
    cfg = work / "bench.yaml"
    cfg.write_text(f"seed: 0\ntrain:\n  steps: {args.steps}\n  batch_size: {args.batch_size}\n"
                   f"  encoder: {args.encoder}\n  checkpoint_minutes: 0\n  threads: {args.threads}\n")
    cores = len(os.sched_getaffinity(0))
    import torch

    print(f"# clcluster train throughput: {args.encoder} encoder, box {args.box}, global batch {args.batch_size}, "
          f"{args.steps} steps, device {args.device}, {cores} CPU cores, "
          f"threads/rank {args.threads or 'auto'}, torch {torch.__version__}, launcher {args.launcher}")
    print("| ranks | images/s (training loop) | wall s (whole command) | relative to 1 rank |")
    print("|------:|-------------------------:|-----------------------:|-------------------:|")
    base = None
    for r in args.ranks:
        best = None
        for i in range(args.repeats):
            rate, wall = run(r, args.launcher, shards, cfg, work / f"r{r}_{i}/encoder.pt", args.device, cores)
            best = (rate, wall) if best is None or rate > best[0] else best
        base = base or best[0]
        print(f"| {r} | {best[0]:.1f} | {best[1]:.1f} | {best[0] / base:.2f} |", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
