"""Do two revisions give the same labels? Runs the tiny demo workflow (tests/workflow/config.yaml)
and, with --benchmark, a small benchmark grid at each revision, from fresh git worktrees with the
same seed, and compares the labels and accuracies. For refactorings that must not change results.

    python benchmarks/same_labels.py BASE_REV [NEW_REV (default: the working tree)] [--benchmark]
        [--demo tiny|full|hard]

--demo full runs the quick start's demo (config/config.yaml: 1500 particles), --demo hard the
same at SNR 0.02 with seed 1; both take minutes per revision on 2 cores.

Exit status 0 when everything compared is identical, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
BENCH_ARGS = ["--snrs", "0.1", "0.02", "--volumes", "builtin:0", "--views", "4", "--images-per-view", "40",
              "--methods", "cl_kmeans", "cl_refined", "refine_random"]


def checkout(rev: str | None, where: Path) -> Path:
    """A worktree of `rev` at `where`, or the repository itself for rev None."""
    if rev is None:
        return REPO
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=REPO, check=True, capture_output=True)
    return where


DEMOS = {"tiny": ["tests/workflow/config.yaml"], "full": ["config/config.yaml"],
         "hard": ["config/config.yaml", "HARD"]}
HARD_OVERLAY = "seed: 1\nsimulate:\n  snr: 0.02\n"


def run(tree: Path, out: Path, benchmark: bool, demo: str = "tiny") -> None:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    files = []
    for f in DEMOS[demo]:
        if f == "HARD":
            f = str(out.parent / "hard_overlay.yaml")
            Path(f).write_text(HARD_OVERLAY)
        files.append(f)
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", *files,
           "--config", f"results={out}"]
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True)
    if benchmark:
        subprocess.run([sys.executable, "-m", "clcluster.cli", "benchmark", "--out-dir", str(out / "bench"),
                        *BENCH_ARGS], cwd=tree, env=env, check=True, capture_output=True)


def compare(a: Path, b: Path, benchmark: bool) -> bool:
    same = True
    for key in ("labels", "kmeans_labels"):
        x, y = np.load(a / "clusters/assignments.npz")[key], np.load(b / "clusters/assignments.npz")[key]
        equal = np.array_equal(x, y)
        print(f"demo {key}: {len(x)} particles, {'identical' if equal else f'{int((x != y).sum())} differ'}")
        same &= equal
    if benchmark:
        cols = ["volume", "snr", "method", "accuracy"]
        x, y = pd.read_csv(a / "bench/results.csv")[cols], pd.read_csv(b / "bench/results.csv")[cols]
        equal = x.equals(y)
        print(f"benchmark accuracies ({len(x)} cells): {'identical' if equal else 'differ'}")
        if not equal:
            print(x.merge(y, on=cols[:3], suffixes=("_base", "_new")).to_string(index=False))
        same &= equal
    return same


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base")
    p.add_argument("new", nargs="?")
    p.add_argument("--benchmark", action="store_true", help="also compare a small benchmark grid")
    p.add_argument("--demo", choices=sorted(DEMOS), default="tiny", help="which demo workflow to compare")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = [checkout(args.base, tmp / "base"), checkout(args.new, tmp / "new")]
        try:
            for tree, name in zip(trees, ("base", "new")):
                run(tree, tmp / f"results_{name}", args.benchmark, args.demo)
            return 0 if compare(tmp / "results_base", tmp / "results_new", args.benchmark) else 1
        finally:
            for tree in trees:
                if tree != REPO:
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
