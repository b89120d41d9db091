"""Preprocessing and augmentation throughput (images per second per stage) and peak memory.

    python benchmarks/preprocess.py                          # CPU (NumPy), boxes 64, 128, 256
    python benchmarks/preprocess.py --device cuda            # GPU (CuPy; pip install .[gpu])
    python benchmarks/preprocess.py --boxes 128 --n 1024 --batch 256

For each input box D it simulates --n particles (clcluster.steps.simulate, written as a RELION STAR +
.mrcs stacks in a temporary folder; not timed), then times, over all particles in batches of
--batch, each stage on its own: reading the raw images from the stacks (io.mrc.read_images),
CTF phase flip, Wiener filter, Fourier crop D → D/2, background normalisation (on the cropped
images), the whole `preprocess_batch` (phase flip, crop, normalise, soft mask), the whole
per-shard `preprocess_table` (read + preprocess + float16 memory-mapped output + sidecar), and
the augmentation pipeline `two_views` (default AugmentConfig plus CTF envelope and erasing, on
the D/2 working images; images/s counts input images, each giving two views). Each stage runs
once untimed first (FFT plans, caches). Rates are images per second of wall time; on a GPU the
device is synchronised before each clock reading.

Peak memory of `preprocess_table`: on the CPU the peak of traced Python/NumPy allocations
(tracemalloc, a separate untimed run) and its ratio to one raw float32 batch; it must not grow
with the number of particles, since only one batch of raw images is held at a time (the output is
a memory map). On the GPU: CuPy's memory-pool high-water mark (pool emptied before the run; the
pool keeps what it allocated, so total_bytes() afterwards is the peak reserved). The process's
max RSS (resource.getrusage) is printed too; it includes the page cache of the memory-mapped
stacks and output and everything imported, so it is an upper bound, not the working set.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from clcluster.learn.augment import AugmentConfig, two_views
from clcluster.core.backend import choose_array_module, make_rng
from clcluster.image.ctf import CTFParams, phase_flip, wiener_filter
from clcluster.image.imageops import fourier_crop, normalise_background
from clcluster.io.mrc import read_images
from clcluster.io.star import read_star
from clcluster.steps.preprocess import PreprocessConfig, preprocess_batch, preprocess_table
from clcluster.steps.simulate import SimulationConfig, simulate, write_simulation


def make_data(box: int, n: int, work: Path) -> Path:
    views = 4
    cfg = SimulationConfig(views=views, images_per_view=-(-n // views), box=box, apix=1.0 * 128 / box * 1.25,
                           snr=0.1, stack_size=500, seed=0)
    return write_simulation(simulate(cfg), cfg, work / f"box{box}")


def timed(fn, batches, sync):
    """Images per second of fn over all batches (one untimed warm-up call first)."""
    fn(batches[0])
    sync()
    t0 = time.perf_counter()
    n = 0
    for b in batches:
        fn(b)
        n += len(b[0]) if isinstance(b, tuple) else len(b)
    sync()
    return n / (time.perf_counter() - t0)


def bench_box(box: int, n: int, batch: int, xp, device: str, work: Path) -> dict:
    star = make_data(box, n, work)
    table = read_star(star).subset(np.arange(n))
    apix = float(table.pixel_size()[0])
    paths, idx = table.image_refs()
    ctf = CTFParams.from_table(table)
    wbox = box // 2
    cfg = PreprocessConfig(box=wbox, batch_size=batch, ctf="phase_flip", mask_radius_px=0.4 * wbox)
    if xp is np:
        sync = lambda: None
    else:
        sync = lambda: xp.cuda.Device().synchronize()
    starts = list(range(0, n, batch))
    rows = [np.arange(s, min(n, s + batch)) for s in starts]
    res = {"box": box, "work_box": wbox, "n": n}
    res["read"] = timed(lambda r: read_images([paths[i] for i in r], idx[r]), rows, sync)
    raw = [xp.asarray(read_images([paths[i] for i in r], idx[r])) for r in rows]  # on the device
    ctfs = [ctf.subset(r) for r in rows]
    pairs = list(zip(raw, ctfs))
    res["phase_flip"] = timed(lambda p: phase_flip(p[0], p[1], apix), pairs, sync)
    res["wiener"] = timed(lambda p: wiener_filter(p[0], p[1], apix, 1.0), pairs, sync)
    res["fourier_crop"] = timed(lambda x: fourier_crop(x, wbox), raw, sync)
    cropped = [fourier_crop(x, wbox) for x in raw]
    res["normalise"] = timed(lambda x: normalise_background(x, cfg.bg_radius()), cropped, sync)
    res["preprocess_batch"] = timed(lambda p: preprocess_batch(p[0], p[1], apix, cfg), pairs, sync)
    work_imgs = [preprocess_batch(x, c, apix, cfg) for x, c in pairs]
    aug = AugmentConfig(ctf_prob=0.3, erase_prob=0.2)
    rng = make_rng(xp, 0)
    res["two_views"] = timed(lambda x: two_views(x, aug, rng, apix * box / wbox), work_imgs, sync)
    del raw, cropped, work_imgs, pairs
    # the whole per-shard step, from the stacks to the float16 memory map
    out = work / f"pre_{box}.npy"
    t0 = time.perf_counter()
    preprocess_table(table, out, cfg, device=device)
    sync()
    res["preprocess_table"] = n / (time.perf_counter() - t0)
    raw_batch = batch * box * box * 4
    if xp is np:
        tracemalloc.start()
        preprocess_table(table, out, cfg, device=device)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    else:
        pool = xp.get_default_memory_pool()
        pool.free_all_blocks()
        preprocess_table(table, out, cfg, device=device)
        sync()
        peak = pool.total_bytes()
    res["peak_MiB"] = peak / 2 ** 20
    res["peak_over_raw_batch"] = peak / raw_batch
    res["raw_batch_MiB"] = raw_batch / 2 ** 20
    res["maxrss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


STAGES = ("read", "phase_flip", "wiener", "fourier_crop", "normalise", "preprocess_batch", "preprocess_table", "two_views")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--n", type=int, default=256, help="particles per box")
    ap.add_argument("--batch", type=int, default=64, help="preprocess.batch_size")
    ap.add_argument("--device", default="cpu", help="cpu (NumPy) or cuda (CuPy)")
    ap.add_argument("--work", default=None, help="folder for the simulated data (default: a temporary one)")
    args = ap.parse_args(argv)
    xp = choose_array_module("cpu" if args.device == "cpu" else "cuda")
    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(args.work or tmp.name)
    load = os.getloadavg()
    print(f"# array module {xp.__name__}; {os.cpu_count()} CPUs; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"n={args.n} per box, batch {args.batch}; python {sys.version.split()[0]}, numpy {np.__version__}")
    if xp is not np:
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        print(f"# GPU {props['name'].decode() if isinstance(props['name'], bytes) else props['name']}, cupy {xp.__version__}")
    rows = []
    for box in args.boxes:
        r = bench_box(box, args.n, args.batch, xp, args.device, work)
        rows.append(r)
        print(f"# box {box} done", file=sys.stderr, flush=True)
    peak_label = "peak traced MiB" if xp is np else "peak pool MiB"
    print("\nimages per second per stage (input box → working box = box/2)\n")
    print("| box | work | " + " | ".join(STAGES) + f" | {peak_label} (x raw batch) | max RSS MiB |")
    print("|" + "---|" * (len(STAGES) + 4))
    for r in rows:
        print(f"| {r['box']} | {r['work_box']} | " + " | ".join(f"{r[s]:,.0f}" for s in STAGES)
              + f" | {r['peak_MiB']:.1f} ({r['peak_over_raw_batch']:.1f}) | {r['maxrss_MiB']:.0f} |")
    load = os.getloadavg()
    print(f"\n# load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
