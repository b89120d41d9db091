"""Real Snakemake runs of the whole chain on tiny simulated data (slow; run in CI)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clcluster.io import read_particles

REPO = Path(__file__).resolve().parents[1]


def run_snakemake(results, *extra, cores=2, configfiles=()):
    files = [str(REPO / "tests/workflow/config.yaml"), *map(str, configfiles)]
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile", *files,
           "--config", f"results={results}", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """160 particles in 3 shards of 60 (shards cut across the stacks of 70) under the tiny memory
    budget of tests/workflow/tiny_memory.yaml."""
    results = tmp_path_factory.mktemp("wf") / "results"
    proc = run_snakemake(results, configfiles=[REPO / "tests/workflow/tiny_memory.yaml"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return results, proc


@pytest.mark.slow
def test_workflow_classifies_every_particle_once(demo_run):
    results, proc = demo_run
    inp = read_particles(results / "demo/particles.star")
    out = read_particles(results / "export/particles_classified.star")
    assert len(out) == len(inp) == 160
    assert out.particles["rlnImageName"].is_unique
    assert sorted(out.particles["rlnImageName"]) == sorted(inp.particles["rlnImageName"])
    assert set(out.particles["rlnClassNumber"]) <= set(range(1, 5))
    # every input column and the optics block kept
    assert set(inp.particles.columns) <= set(out.particles.columns)
    assert out.optics is not None and out.optics.equals(inp.optics)
    per_class = sum(len(read_particles(p)) for p in (results / "export/classes").glob("class_*.star"))
    assert per_class == 160
    score = json.loads((results / "score.json").read_text())
    assert score["accuracy"] > 0.6  # 4 views at SNR 0.5; chance ~0.3
    # seed stability from the cluster step's further run, per class in class_quality.csv
    quality = pd.read_csv(results / "export/class_quality.csv")
    assert quality["stability"].between(0, 1).all() and quality["stability"].notna().sum() >= 3
    assert 0 < json.loads((results / "export/summary.json").read_text())["seed_ari"] <= 1
    assert "clustering accuracy" in proc.stdout + proc.stderr
    for rule in ("simulate_demo", "check_particles", "train_encoder", "cluster_embeddings", "export_classes"):
        assert (results / "logs" / f"{rule}.log").exists(), rule


@pytest.mark.slow
def test_sharded_tiny_memory_run_equals_unsharded_run(demo_run, tmp_path):
    """Same seed, same labels: the sharded run under a tiny memory budget against one shard with
    the default batch sizes and an in-memory polar cache. Embeddings are merged as float16, so
    float rounding that depends on batch size does not reach K-means; all steps are per image or
    use global particle indices (training batches, refinement subset)."""
    results, _ = demo_run
    again = tmp_path / "again"
    one_shard = tmp_path / "one_shard.yaml"
    one_shard.write_text("shard:\n  size: 100000\n")
    proc = run_snakemake(again, configfiles=[one_shard])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(list((again / "shards").glob("shard_*.star"))) == 1
    assert len(list((results / "shards").glob("shard_*.star"))) == 3
    # whitening (the default) used one spectrum for the whole set in both runs
    # (summed over batches of other sizes: equal up to float64 rounding)
    spectrum = json.loads((results / "preprocessed/noise_spectrum.json").read_text())["noise_spectrum"]
    assert np.allclose(spectrum, json.loads((again / "preprocessed/noise_spectrum.json").read_text())["noise_spectrum"],
                       rtol=1e-12)
    for side in (results / "preprocessed").glob("shard_*.json"):
        assert json.loads(side.read_text())["noise_spectrum"] == spectrum, side
    sharded, whole = np.load(results / "clusters/labels.npy"), np.load(again / "clusters/labels.npy")
    assert len(sharded) == len(whole) == 160
    assert np.array_equal(sharded, whole)
    out = read_particles(again / "export/particles_classified.star")
    assert sorted(out.particles["rlnImageName"]) == sorted(read_particles(results / "export/particles_classified.star").particles["rlnImageName"])


@pytest.mark.slow
def test_user_particles_via_config(demo_run, tmp_path):
    """particles=, classes=, results= on the command line; the demo's STAR stands in for user data."""
    results, _ = demo_run
    out = tmp_path / "user"
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(REPO / "tests/workflow/config.yaml"),
           "--config", f"particles={results / 'demo/particles.star'}", "classes=3", f"results={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    star = read_particles(out / "export/particles_classified.star")
    assert len(star) == 160 and set(star.particles["rlnClassNumber"]) <= {1, 2, 3}
    assert not (out / "score.json").exists()


def planned_jobs(results, *configfiles) -> dict:
    """Rule -> job count that `snakemake -n` plans on the finished tiny run under extra config files."""
    proc = run_snakemake(results, "-n", configfiles=[REPO / "tests/workflow/tiny_memory.yaml", *configfiles])
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1].splitlines()
    rows = [line.split() for line in table[3:]]
    jobs = {}
    for row in rows:
        if len(row) != 2 or row[0] == "total":
            break
        jobs[row[0]] = int(row[1])
    jobs.pop("all", None)  # the target rule, planned whenever anything is
    return jobs


@pytest.mark.slow
def test_each_rule_reruns_only_when_its_own_settings_change(demo_run, tmp_path):
    """Each rule reads only its step's settings: a cosmetic export key must not plan hours of
    training and clustering again; a training key reruns training and what follows it only; the
    number of classes reruns the clustering and what follows, the CTF correction the
    preprocessing (the noise spectrum included) and what follows."""
    results, _ = demo_run
    assert planned_jobs(results) == {}
    gallery = tmp_path / "gallery.yaml"
    gallery.write_text("export:\n  gallery_columns: 5\n")
    assert set(planned_jobs(results, gallery)) == {"step_config", "export_classes"}
    train = tmp_path / "train.yaml"
    train.write_text("train:\n  temperature: 0.3\n")
    assert set(planned_jobs(results, train)) == {"step_config", "train_encoder", "embed_shard", "cluster_embeddings",
                                                  "export_classes", "score_demo"}
    # the number of classes: its own count check, the clustering and what follows; not the check,
    # sharding, preprocessing or training
    classes = tmp_path / "classes.yaml"
    classes.write_text("classes: 3\n")
    assert set(planned_jobs(results, classes)) == {"step_config", "check_classes", "cluster_embeddings",
                                                    "export_classes", "score_demo"}
    # the CTF correction: preprocessing and what follows; not the simulation, check or sharding
    ctf = tmp_path / "ctf.yaml"
    ctf.write_text("preprocess:\n  ctf: wiener\n")
    assert set(planned_jobs(results, ctf)) == {"step_config", "noise_spectrum", "preprocess_shard", "embed_shard",
                                                "train_encoder", "cluster_embeddings", "export_classes", "score_demo"}
