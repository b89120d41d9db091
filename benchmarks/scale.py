"""How the whole chain's cost grows with the number of particles: wall time, images per second
and peak resident memory of every step, the fitted time per particle, and an extrapolation to
10^6 and 10^7 particles.

    python benchmarks/scale.py                                  # N = 10k, 30k, 100k at box 64 + 10k at box 128
    python benchmarks/scale.py --runs 10000:64 --work /tmp/scale   # one quick run
    python benchmarks/scale.py --report-only --work /tmp/scale     # re-read finished runs

Each run is the real Snakemake workflow (`snakemake --cores C`) on the demo simulator's data
(10 views of builtin:0, SNR 0.05, `--images-per-view` = N / 10) with this repo's default config
except: `shard.size` (--shard-size, default 10000), `cluster.refine_subset` (--refine-subset,
default 5000, so that every size has the streamed alignment of all particles), a fixed training budget (the default
`train.steps` x `train.batch_size`, whatever N is) and the results folder. The figures come from
the `benchmark:` files Snakemake writes for every job (`{results}/benchmarks/**.tsv`: wall
seconds `s` and peak resident memory `max_rss` in MB, sampled by Snakemake), and the cluster
step's parts (K-means, refinement on the subset, alignment of all particles) from its log. For the per-shard
steps (preprocess, embed) the time is the sum over that step's jobs (job-seconds: the wall time
one core-pair would need; with --cores 2 two jobs may overlap) and the memory the largest of any
job. Peak RSS includes the page cache of memory-mapped files the job touched.

Growth: for each step, time = a + b N is fitted by least squares over the box-64 runs (a: fixed
cost, b: cost per particle); training, whose budget is fixed, is extrapolated as its mean time. The extrapolation assumes the per-shard steps run
as --parallel-jobs simultaneous jobs of this machine's speed (e.g. nodes x jobs per node on a
SLURM cluster of CPU nodes; one GPU per job is faster, not measured here), training keeps its
fixed budget and the cluster step runs as one job.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = ("simulate_demo", "check_particles", "shard_particles", "preprocess_shard", "train_encoder",
         "embed_shard", "cluster_embeddings", "export_classes")
PER_SHARD = {"preprocess_shard", "embed_shard"}
FIXED = {"train_encoder", "cluster: refinement (subset)"}  # fixed by design: extrapolated as the mean of the runs


def run_config(n: int, box: int, shard_size: int, results: Path, refine_subset: int) -> dict:
    """The default config with the scale run's data size, shard size, refinement subset and results folder."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    if n % 10:
        raise SystemExit(f"N must be a multiple of 10 views, got {n}")
    cfg["results"] = str(results)
    cfg["simulate"].update(views=10, images_per_view=n // 10, box=box)
    cfg["shard"]["size"] = shard_size
    cfg["cluster"]["refine_subset"] = refine_subset
    return cfg


def run_workflow(n: int, box: int, args) -> Path:
    """Run the whole chain for one size (skipped when its outputs exist); returns the results folder."""
    results = Path(args.work) / f"n{n}_box{box}"
    results.mkdir(parents=True, exist_ok=True)
    cfg_file = results.parent / f"n{n}_box{box}.yaml"
    cfg_file.write_text(yaml.safe_dump(run_config(n, box, args.shard_size, results, args.refine_subset), sort_keys=False))
    if (results / "score.json").exists() and not args.force:
        print(f"[scale] N={n} box={box}: finished earlier, re-reading {results}", flush=True)
        return results
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", str(args.cores),
           "--configfile", str(cfg_file), "--forceall" if args.force else "--rerun-incomplete"]
    print(f"[scale] N={n} box={box}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(results.parent / f"n{n}_box{box}.snakemake.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    (results / "wall_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
    return results


def read_benchmarks(results: Path) -> dict:
    """Per step: jobs, summed wall seconds, largest max_rss (MB), from Snakemake's benchmark files."""
    out = {}
    for step in STEPS:
        files = sorted((results / "benchmarks" / step).glob("*.tsv")) if step in PER_SHARD \
            else [results / "benchmarks" / f"{step}.tsv"]
        rows = []
        for f in files:
            if f.exists():
                with open(f) as fh:
                    rows += list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            rss = [float(r["max_rss"]) for r in rows if r["max_rss"] not in ("", "NA", "-")]
            out[step] = {"jobs": len(rows), "seconds": sum(float(r["s"]) for r in rows), "max_rss_mb": max(rss, default=np.nan)}
    return out


CLUSTER_PARTS = (("cluster: K-means++ + assignment", re.compile(r"K-means\+\+ .* features: ([0-9.]+) s")),
                 ("cluster: refinement (subset)", re.compile(r"refinement: mean NCC [0-9.]+, ([0-9.]+) s")),
                 ("cluster: alignment of all", re.compile(r"assigned all \d+ particles to the refined classes: ([0-9.]+) s")))


def cluster_parts(results: Path) -> dict:
    """Seconds of the cluster step's parts, from its log."""
    log = results / "logs" / "cluster_embeddings.log"
    text = log.read_text() if log.exists() else ""
    out = {}
    for name, pattern in CLUSTER_PARTS:
        m = pattern.search(text)
        if m:
            out[name] = float(m.group(1))
    return out


def fit_growth(ns, seconds):
    """Least-squares a + b N (a >= 0 not enforced) over the runs; returns (a seconds, b seconds per particle)."""
    ns, seconds = np.asarray(ns, float), np.asarray(seconds, float)
    if len(ns) < 2:
        return 0.0, float(seconds[0] / ns[0])
    b, a = np.polyfit(ns, seconds, 1)
    return float(a), float(b)


def report(runs, args) -> str:
    rows, measured = [], {}
    for n, box in runs:
        results = Path(args.work) / f"n{n}_box{box}"
        if not (results / "benchmarks").exists():
            continue
        bench = read_benchmarks(results)
        score = json.loads((results / "score.json").read_text()) if (results / "score.json").exists() else {}
        wall = (results / "wall_seconds.txt").read_text().strip() if (results / "wall_seconds.txt").exists() else "?"
        for part, secs in cluster_parts(results).items():
            bench[part] = {"jobs": "", "seconds": secs, "max_rss_mb": np.nan}
        measured[(n, box)] = bench
        for step, b in bench.items():
            rows.append({"N": n, "box": box, "step": step, "jobs": b["jobs"], "seconds": round(b["seconds"], 1),
                         "images_per_s": round(n / b["seconds"], 1) if b["seconds"] > 0 else "",
                         "ms_per_particle": round(1000 * b["seconds"] / n, 3),
                         "peak_rss_mb": "" if np.isnan(b["max_rss_mb"]) else round(b["max_rss_mb"])})
        rows.append({"N": n, "box": box, "step": "whole run (wall)", "jobs": "", "seconds": wall, "images_per_s": "",
                     "ms_per_particle": "", "peak_rss_mb": "",
                     "accuracy": score.get("accuracy", ""), "alignment_free": score.get("kmeans_accuracy", "")})
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ["N", "box", "step", "jobs", "seconds", "images_per_s", "ms_per_particle", "peak_rss_mb", "accuracy", "alignment_free"]
    with open(out_dir / "scale.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    md = ["| N | box | step | jobs | seconds | images/s | ms/particle | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = f" (accuracy {r['accuracy']:.3f}, alignment-free {r['alignment_free']:.3f})" if r.get("accuracy") != "" and "accuracy" in r else ""
        md.append(f"| {r['N']} | {r['box']} | {r['step']}{extra} | {r['jobs']} | {r['seconds']} | {r['images_per_s']} | "
                  f"{r['ms_per_particle']} | {r['peak_rss_mb']} |")
    # growth over the box-64 runs, and the extrapolation
    box64 = sorted(n for n, box in measured if box == 64)
    if box64:
        md += ["", f"Fitted time = a + b N over the box-64 runs (N = {', '.join(map(str, box64))}); extrapolation with the "
               f"per-shard steps spread over {args.parallel_jobs} simultaneous jobs (training: fixed budget; cluster: one job):", "",
               "| step | a (s) | b (ms/particle) | time per particle, smallest → largest N (ms) | 10^6 particles | 10^7 particles |",
               "|---|---|---|---|---|---|"]
        total = {1e6: 0.0, 1e7: 0.0}
        for step in STEPS + tuple(name for name, _ in CLUSTER_PARTS):
            secs = [measured[(n, 64)][step]["seconds"] for n in box64 if step in measured[(n, 64)]]
            if len(secs) != len(box64):
                continue
            a, b = fit_growth(box64, secs)
            if step in FIXED:
                a, b = float(np.mean(secs)), 0.0
            per = [1000 * s / n for s, n in zip(secs, box64)]
            par = args.parallel_jobs if step in PER_SHARD else 1
            ext = {big: (max(a, 0) + b * big) / par for big in total}
            for big in total:
                total[big] += ext[big] if step in STEPS and step != "simulate_demo" else 0.0
            md.append(f"| {step} | {a:.1f} | {1000 * b:.3f} | {' → '.join(f'{p:.3f}' for p in per)} | "
                      f"{_hours(ext[1e6])} | {_hours(ext[1e7])} |")
        md.append(f"| all steps but simulate (sum) | | | | {_hours(total[1e6])} | {_hours(total[1e7])} |")
    text = "\n".join(md) + "\n"
    (out_dir / "scale.md").write_text(text)
    return text


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["10000:64", "30000:64", "100000:64", "10000:128"],
                   help="N:box pairs (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=10000, help="particles per shard (default %(default)s)")
    p.add_argument("--refine-subset", type=int, default=5000,
                   help="cluster.refine_subset: particles the refinement runs on, the rest aligned once (default %(default)s)")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--parallel-jobs", type=int, default=20,
                   help="simultaneous per-shard jobs assumed in the extrapolation (default %(default)s)")
    p.add_argument("--work", default="scale_runs", help="folder for the runs' data and results")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale"), help="where scale.csv/.md go")
    p.add_argument("--force", action="store_true", help="re-run finished sizes")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    runs = [tuple(int(v) for v in r.split(":")) for r in args.runs]
    if not args.report_only:
        for n, box in runs:
            run_workflow(n, box, args)
            print(report(runs, args), flush=True)
    print(report(runs, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
