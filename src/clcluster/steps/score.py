"""Score a clustering against the simulator's truth: accuracy (Hungarian-matched), ARI and NMI.

The demo's last step: it reads the cluster step's assignments and the simulated stack's
NAME_truth.csv (which nothing else reads) and prints the scores of the final labels and of the
alignment-free stage alone.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

from clcluster.core.metrics import scores


def score_assignments(assignments: str, truth_csv: str) -> dict:
    """{"particles", accuracy, ari, nmi, and the same prefixed kmeans_ for the alignment-free labels}."""
    truth = pd.read_csv(truth_csv)["class"].to_numpy()
    a = np.load(assignments)
    result = {"particles": int(len(truth))}
    result.update({f"{k}": round(v, 4) for k, v in scores(truth, a["labels"]).items()})
    result.update({f"kmeans_{k}": round(v, 4) for k, v in scores(truth, a["kmeans_labels"]).items()})
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--assignments", required=True)
    p.add_argument("--truth", required=True, help="NAME_truth.csv from simulate")
    p.add_argument("--out", help="write the scores as JSON")


def main(args: argparse.Namespace) -> int:
    result = score_assignments(args.assignments, args.truth)
    print(f"clustering accuracy (Hungarian-matched) against the simulator's truth: {result['accuracy']:.3f} "
          f"(alignment-free stage alone: {result['kmeans_accuracy']:.3f}); ARI {result['ari']:.3f}, NMI {result['nmi']:.3f}")
    if args.out:
        from clcluster.io.atomic import write_text

        write_text(args.out, json.dumps(result, indent=2))
    return 0
