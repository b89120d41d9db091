"""The Python part of scripts/gpu_check.sh: the GPU paths, each check one line on stdout.

    python scripts/gpu_check.py                       # on a GPU machine (what gpu_check.sh runs)
    python scripts/gpu_check.py --device cpu --small  # the same code on the CPU, tiny sizes
                                                      # (tests/test_gpu_check.py: it runs and parses)

Lines: "gpu_check: <check>: PASS|FAIL|INFO <details>". Checks: CPU vs device preprocessing of
one shard; 60 training steps (bf16 autocast on CUDA) with images/s; SIGUSR1 mid-training and the
resume from its checkpoint; embed, cluster (refinement with its ML2D stage) and export on the
device against the CPU with the same encoder (labels ARI); throughput of preprocess
(box 128 → 32), train, embed and the ML2D E-step; peak device memory. Exit status 1 when a
check FAILs. With --device cpu the "device" side is the CPU too (the comparisons are then
trivially equal; what is exercised is the code).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FAILED: list[str] = []


def report(check: str, ok: bool | None, details: str) -> None:
    """One line per check; ok None = information only."""
    status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    if ok is False:
        FAILED.append(check)
    print(f"gpu_check: {check}: {status} {details}", flush=True)


def sync(device: str) -> None:
    """Wait for the device's queued work (timings)."""
    if device == "cuda":
        import torch

        from clcluster.core.backend import cp

        torch.cuda.synchronize()
        if cp is not None:
            cp.cuda.Stream.null.synchronize()


def device_module(device: str):
    from clcluster.core.backend import choose_array_module

    return choose_array_module("cpu" if device == "cpu" else "cuda")


def simulated(n_views: int, per_view: int, box: int, snr: float, seed: int = 3):
    from clcluster.steps.simulate import SimulationConfig, simulate

    cfg = SimulationConfig(views=n_views, images_per_view=per_view, box=box, snr=snr, seed=seed)
    return cfg, simulate(cfg)


def check_preprocess(device: str, small: bool) -> np.ndarray:
    """CPU and device preprocessing of the same box-128 shard agree; throughput 128 → 32 px.
    Returns the preprocessed (working box 32) images for the training checks."""
    from clcluster.core.backend import asnumpy
    from clcluster.steps.preprocess import PreprocessConfig, preprocess_batch

    xp = device_module(device)
    cfg, sim = simulated(4, 16 if small else 500, 128, 0.1)
    pc = PreprocessConfig(box=32)
    host = preprocess_batch(sim.images, sim.ctf, cfg.apix, pc)
    dev = asnumpy(preprocess_batch(xp.asarray(sim.images), sim.ctf, cfg.apix, pc))
    err = float(np.abs(host - dev).max() / max(float(host.std()), 1e-12))
    report("preprocess-agree", err < 1e-3, f"max |CPU - {device}| / std = {err:.2e} over {len(host)} images")
    reps = 1 if small else 16
    stack = xp.asarray(np.concatenate([sim.images] * reps))
    ctf = type(sim.ctf)(*[np.concatenate([np.broadcast_to(np.asarray(v), (len(sim.images),))] * reps)
                          for v in vars(sim.ctf).values()])
    preprocess_batch(stack[:pc.batch_size], type(ctf)(*[v[:pc.batch_size] for v in vars(ctf).values()]), cfg.apix, pc)
    sync(device)
    t0 = time.perf_counter()
    for s in range(0, len(stack), 4096):
        sub = type(ctf)(*[v[s:s + 4096] for v in vars(ctf).values()])
        preprocess_batch(stack[s:s + 4096], sub, cfg.apix, pc)
    sync(device)
    rate = len(stack) / (time.perf_counter() - t0)
    report("throughput-preprocess", None, f"{rate:,.0f} images/s (box 128 -> 32, {len(stack)} images, {device})")
    return host.astype(np.float32)


def check_training(images: np.ndarray, device: str, small: bool, work: Path) -> None:
    """60 steps (bf16 autocast on CUDA) with images/s; SIGUSR1 mid-run, then resume."""
    from clcluster.steps import train as train_mod
    from clcluster.steps.train import TrainConfig, train

    np.save(work / "shard.npy", images.astype(np.float16))
    steps, batch = (6, 16) if small else (60, 128)
    res = train([work / "shard.npy"], work / "enc60.pt", TrainConfig(steps=steps, batch_size=batch), seed=0, device=device)
    ok = np.isfinite(res["final_loss"]) and (work / "enc60.pt").exists()
    report("train-60-steps", ok, f"{steps} steps of {batch} images on {device} (bf16 autocast: {device == 'cuda'}), "
                                 f"final loss {res['final_loss']:.3f}")
    report("throughput-train", None, f"{res['images_per_s']:,.0f} images/s (working box {images.shape[-1]}, batch {batch})")
    total, stop_at = (8, 3) if small else (40, 15)
    cfg = TrainConfig(steps=total, batch_size=batch, checkpoint_minutes=0)
    calls, orig = {"n": 0}, train_mod.nt_xent

    def signalling(*a, **k):
        calls["n"] += 1
        if calls["n"] == stop_at:
            signal.raise_signal(signal.SIGUSR1)
        return orig(*a, **k)

    train_mod.nt_xent = signalling
    code = None
    try:
        train([work / "shard.npy"], work / "enc_pre.pt", cfg, seed=0, device=device)
    except SystemExit as e:
        code = e.code
    finally:
        train_mod.nt_xent = orig
    ckpt = work / "enc_pre.ckpt"
    import torch

    saved = int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"]) if ckpt.exists() else -1
    train([work / "shard.npy"], work / "enc_pre.pt", cfg, seed=0, device=device)
    rows = (work / "enc_pre_loss.csv").read_text().count("\n") - 1
    ok = code == 128 + signal.SIGUSR1 and 0 < saved < total and rows == total and not ckpt.exists()
    report("sigusr1-resume", ok, f"exit {code} at step {saved} of {total}, resumed, {rows} loss rows")


def _clcluster(*args, cwd: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "clcluster.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"clcluster {args[0]} failed:\n{p.stderr[-3000:]}")


def check_chain(device: str, small: bool, work: Path) -> None:
    """One CPU-trained encoder; embed, cluster (refinement + ML2D stage) and export on the CPU
    and on the device through the CLI; labels compared with ARI."""
    import yaml
    from sklearn.metrics import adjusted_rand_score

    from clcluster.io import read_particles

    classes = 4 if small else 10
    views, per = (4, 16) if small else (10, 100)
    cfg = {"seed": 0, "classes": classes, "train": {"steps": 4 if small else 100, "batch_size": 32 if small else 128}}
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    c = ["--config", work / "cfg.yaml"]
    _clcluster("simulate", "--out-dir", "sim", "--views", views, "--images-per-view", per, "--box", 64, "--snr", 0.1, *c, cwd=work)
    _clcluster("shard", "sim/particles.star", "--size", 10 ** 6, "--out-dir", "shards", cwd=work)
    _clcluster("preprocess", "shards/shard_0.star", "--out", "pre/shard_0.npy", "--device", "cpu", *c, cwd=work)
    _clcluster("train", "--shards", "pre/shard_0.npy", "--out", "model/encoder.pt", "--device", "cpu", *c, cwd=work)
    labels, t = {}, {}
    for dev in ("cpu", device) if device != "cpu" else ("cpu", "cpu2"):
        d, run = ("cpu" if dev == "cpu2" else dev), work / dev
        t0 = time.perf_counter()
        _clcluster("embed", "--encoder", "model/encoder.pt", "--shard", "pre/shard_0.npy", "--out", f"{dev}/emb.npy",
                   "--device", d, *c, cwd=work)
        _clcluster("cluster", "--embeddings", f"{dev}/emb.npy", "--shard-stars", "shards/shard_0.star", "--preprocessed",
                   "pre/shard_0.npy", "--out-dir", f"{dev}/clusters", "--device", d, *c, cwd=work)
        _clcluster("export", "sim/particles.star", "--assignments", f"{dev}/clusters/assignments.npz", "--preprocessed",
                   "pre/shard_0.npy", "--embeddings", f"{dev}/emb.npy", "--out-dir", f"{dev}/export", "--device", d, *c, cwd=work)
        t[dev] = time.perf_counter() - t0
        star = read_particles(run / "export/particles_classified.star").particles
        labels[dev] = star.sort_values("rlnImageName")["rlnClassNumber"].to_numpy()
    a, b = labels.values()
    ari = adjusted_rand_score(a, b)
    report("chain-agree", ari >= 0.95, f"embed+cluster(refine, ML2D)+export: ARI(CPU, {device}) = {ari:.3f} "
                                       f"over {len(a)} particles, K={classes}; " +
                                       ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))


def check_embed_and_estep(images: np.ndarray, device: str, small: bool, work: Path) -> None:
    """Throughput of embedding and of one ML2D E-step (classify with a fitted model)."""
    import torch

    from clcluster.core.backend import select_device
    from clcluster.steps.embed import embed_images
    from clcluster.em.ml2d import classify, ml2d
    from clcluster.learn.models import load_encoder

    tdev = select_device(device)
    enc, _ = load_encoder(work / "enc60.pt", tdev)
    stack = np.concatenate([images] * (1 if small else 32))
    embed_images(enc, stack[:256], 512, tdev)
    sync(device)
    t0 = time.perf_counter()
    embed_images(enc, stack, 512, tdev)
    sync(device)
    report("throughput-embed", None, f"{len(stack) / (time.perf_counter() - t0):,.0f} images/s ({len(stack)} images)")
    k = 4 if small else 50
    sub = images[: 64 if small else 2000]
    model = ml2d(sub, k, n_starts=1, max_iter=1, device=tdev, seed=0)
    stack = np.concatenate([images] * (1 if small else 8))
    sync(device)
    t0 = time.perf_counter()
    classify(stack, model, device=tdev)
    sync(device)
    report("throughput-estep", None, f"{len(stack) / (time.perf_counter() - t0):,.0f} images/s "
                                     f"(ML2D E-step, K={k}, all classes, box {images.shape[-1]})")
    del torch


def report_memory(device: str) -> None:
    if device != "cuda":
        report("peak-memory", None, "no device memory on the CPU")
        return
    import torch

    from clcluster.core.backend import cp

    pool = cp.get_default_memory_pool().total_bytes() if cp is not None else 0
    report("peak-memory", None, f"torch peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, CuPy pool "
                                f"{pool / 2**30:.2f} GiB, on {torch.cuda.get_device_name()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes (a smoke run of the code)")
    ap.add_argument("--work-dir", help="scratch folder (default: a temporary one)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["preprocess", "train", "chain", "throughput"])
    args = ap.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing checked", flush=True)
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        images = check_preprocess(args.device, args.small)
        if "train" not in args.skip:
            check_training(images, args.device, args.small, work)
            if "throughput" not in args.skip:
                check_embed_and_estep(images, args.device, args.small, work)
        if "chain" not in args.skip:
            check_chain(args.device, args.small, work)
        report_memory(args.device)
        report("summary", not FAILED, f"{len(FAILED)} failed {json.dumps(FAILED)}, {time.perf_counter() - t0:.0f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
