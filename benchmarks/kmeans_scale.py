"""Where full K-means++ stops being affordable: wall time and peak memory of the cluster step's
K-means (`clcluster.steps.cluster.kmeans` + the streamed `assign`) on synthetic embeddings, full
scikit-learn K-means against the mini-batch path, by number of particles.

    python benchmarks/kmeans_scale.py                       # N = 1e4 ... 1e6, K = 50, 128-D
    python benchmarks/kmeans_scale.py --sizes 100000 --k 200

Features: K Gaussian blobs on the unit sphere in 128-D (L2-normalised like the encoder's), stored
as float16 like the merged embeddings. Printed per N and path: seconds for fitting, seconds for
the streamed assignment, agreement (adjusted Rand) with the blobs, and the process's peak RSS so
far (resource.getrusage; it only grows, so run one size per process for clean memory figures).
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from clcluster.steps.cluster import assign, kmeans


def blobs(n: int, k: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    labels = rng.integers(0, k, n)
    x = np.empty((n, d), np.float16)
    for s in range(0, n, 100_000):
        part = centres[labels[s:s + 100_000]] + 1.5 * rng.normal(size=(len(labels[s:s + 100_000]), d))
        x[s:s + 100_000] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x, labels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 200_000, 1_000_000])
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n-init", type=int, default=10)
    p.add_argument("--full-up-to", type=int, default=200_000, help="skip full K-means above this N")
    args = p.parse_args(argv)
    print("| N | path | fit s | assign s | ARI | peak RSS MB |\n|---|---|---|---|---|---|")
    for n in args.sizes:
        x, truth = blobs(n, args.k, args.dim)
        paths = [("full", n)] if n <= args.full_up_to else []
        paths.append(("mini-batch", min(n - 1, 200_000) if n > 20_000 else n // 2))
        for name, above in paths:
            t = time.time()
            cents = kmeans(x, args.k, args.n_init, 0, minibatch_above=above)
            t_fit = time.time() - t
            t = time.time()
            labels = assign(x, cents, 3)[0]
            t_assign = time.time() - t
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"| {n} | {name} | {t_fit:.1f} | {t_assign:.1f} | {adjusted_rand_score(truth, labels):.3f} | {rss:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
