"""Faults at the workflow level: preemption of training (SIGTERM, SIGKILL), an interrupted
`preprocess`, bad input (`clcluster check` and the Snakemake run), explicit exclusion.

Real Snakemake runs of tiny simulated data (slow; run in CI). Every run uses --nolock: a
run killed with SIGKILL would otherwise leave stale locks behind in the repository's
.snakemake folder.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

from clcluster.io import read_particles
from clcluster.io.mrc import write_stack
from clcluster.io.star import read_star, write_star
from clcluster.steps.simulate import SimulationConfig, simulate, write_simulation

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests/workflow/config.yaml"
FAULTS = REPO / "tests/workflow/config_faults.yaml"   # 4 shards, 40 steps, checkpoint ~every step
N_DEMO = 160
STEPS = yaml.safe_load(FAULTS.read_text())["train"]["steps"]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def snakemake_cmd(results, *extra, configs=(TINY, FAULTS), cores=2, config=()):
    return [sys.executable, "-m", "snakemake", *extra, "--cores", str(cores), "--nolock",
            "--configfile", *map(str, configs), "--config", f"results={results}", *config]


def run_snakemake(results, *extra, timeout=600, **kw):
    return subprocess.run(snakemake_cmd(results, *extra, **kw), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def start_snakemake(results, *extra, log: Path, **kw):
    """Snakemake in its own process group (so that the whole run can be killed at once)."""
    f = open(log, "w")
    proc = subprocess.Popen(snakemake_cmd(results, *extra, **kw), cwd=REPO, env=ENV, stdout=f,
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_file = f
    return proc


def wait_for(predicate, proc, timeout=300, poll=0.02, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"snakemake ended (rc {proc.returncode}) before {what}:\n"
                        + Path(proc.log_file.name).read_text()[-3000:])
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}")


def train_process(results):
    """The `clcluster train` process of this run (not the shell around it, nor anyone else's)."""
    out = str(Path(results) / "model/encoder.pt")
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if (len(cmd) > 2 and any(Path(a).name == "clcluster" for a in cmd[:2]) and "train" in cmd and out in cmd):
            return p
    return None


def stop(proc):
    """End a run we started: its whole process group, and reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    proc.log_file.close()


def assert_complete_output(results, n=N_DEMO, k=4, star=None):
    """The classified STAR holds every particle of `star` exactly once, classes in 1..k."""
    inp = read_particles(star or results / "demo/particles.star")
    out = read_particles(results / "export/particles_classified.star")
    assert len(out) == len(inp) == n
    assert out.particles["rlnImageName"].is_unique
    assert sorted(out.particles["rlnImageName"]) == sorted(inp.particles["rlnImageName"])
    assert set(out.particles["rlnClassNumber"]) <= set(range(1, k + 1))


# ---- interrupted preprocess ------------------------------------------------------------------

@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    """Run to the preprocess step one job at a time, SIGKILL the whole run (Snakemake and its
    job) while one shard is done and the next is in progress, then rerun with
    --rerun-incomplete. Returns what was seen; the finished folder is the starting point of
    the training tests."""
    base = tmp_path_factory.mktemp("faults")
    results = base / "results"
    pre = results / "preprocessed"
    proc = start_snakemake(results, "preprocess_all", cores=1, log=base / "run1.log")

    def one_done_next_running():
        done = sorted(pre.glob("shard_*.json")) if pre.exists() else []   # .json: written after the .npy
        logs = results / "logs/preprocess_shard"
        started = {p.stem for p in logs.glob("*.log")} if logs.exists() else set()
        running = started - {p.stem.split("_", 1)[1] for p in done}
        return (done, running) if done and running else None

    try:
        done, running = wait_for(one_done_next_running, proc, what="one shard preprocessed and the next started")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        stop(proc)
    finished = {p.stem: p.with_suffix(".npy") for p in done}
    mtimes = {name: p.stat().st_mtime_ns for name, p in finished.items()}
    # nothing under a final name is partial: every .npy there loads whole, with its shard's particles
    at_kill = {}
    for npy in pre.glob("shard_*.npy"):
        shard_star = results / "shards" / f"{npy.stem}.star"
        at_kill[npy.stem] = len(np.load(npy, mmap_mode="r"))
        assert at_kill[npy.stem] == len(read_star(shard_star)), npy
    leftovers = sorted(p.name for p in pre.glob(".*.part*"))

    rerun = run_snakemake(results, "preprocess_all", "--rerun-incomplete", cores=1)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    return dict(results=results, finished=finished, mtimes=mtimes, running=running, at_kill=at_kill,
                leftovers=leftovers, rerun=rerun)


def test_interrupted_preprocess_redoes_only_the_unfinished_shards(preprocessed):
    results, finished = preprocessed["results"], preprocessed["finished"]
    n_shards = len(list((results / "shards").glob("shard_*.star")))
    assert n_shards == 2
    assert 1 <= len(finished) < n_shards
    npys = sorted((results / "preprocessed").glob("shard_*.npy"))
    assert len(npys) == n_shards
    assert sum(len(np.load(p, mmap_mode="r")) for p in npys) == N_DEMO
    # the finished shards were not redone ...
    for name, npy in finished.items():
        assert npy.stat().st_mtime_ns == preprocessed["mtimes"][name], f"{name} was preprocessed again"
    # ... and only the others were run
    counts = re.findall(r"^preprocess_shard\s+(\d+)\s*$", preprocessed["rerun"].stdout + preprocessed["rerun"].stderr,
                        flags=re.M)
    assert counts and int(counts[-1]) == n_shards - len(finished), counts
    # what the killed job left (if anything) kept its temporary .part name: no partial file ever
    # had a final name (the fixture loaded every shard_*.npy present right after the kill)
    assert all(".part" in name for name in preprocessed["leftovers"])
    assert set(preprocessed["at_kill"]) >= set(finished)


# ---- preempted training -------------------------------------------------------------------

def copy_results(preprocessed, dest: Path) -> Path:
    results = dest / "results"
    shutil.copytree(preprocessed["results"], results, symlinks=True)  # copy2: mtimes kept
    for p in (results / "preprocessed").glob(".*.part*"):
        p.unlink()
    return results


def interrupt_training(results, sig, log: Path, after_ns: int = 0):
    """Start the workflow, wait until its training has written a checkpoint (newer than
    `after_ns`), send `sig` to the `clcluster train` process; returns Snakemake's exit code."""
    ckpt = results / "model/encoder.ckpt"
    proc = start_snakemake(results, "--rerun-incomplete", log=log)
    try:
        # find the process while it starts up, then signal it the moment a checkpoint appears
        train = wait_for(lambda: train_process(results), proc, poll=0.1, what="the train process")
        wait_for(lambda: ckpt.exists() and ckpt.stat().st_mtime_ns > after_ns, proc, poll=0.005,
                 what="a training checkpoint")
        train.send_signal(sig)
        rc = proc.wait(300)
    finally:
        stop(proc)
    return rc


def assert_interrupted(results, log: Path):
    """The run failed at training, left a checkpoint and nothing that looks like an encoder."""
    text = log.read_text()
    assert "train_encoder" in text and "Error" in text, text[-3000:]
    assert (results / "model/encoder.ckpt").exists()
    assert not list((results / "model").glob("encoder*.pt"))
    assert not (results / "model/encoder_loss.csv").exists()
    assert not (results / "export").exists()


def resumed_step(results) -> int:
    train_log = (results / "logs/train_encoder.log").read_text()
    m = re.search(r"resumed from \S+encoder\.ckpt at step (\d+)", train_log)
    assert m, train_log
    return int(m.group(1))


def test_training_killed_resumes_from_checkpoint(preprocessed, tmp_path):
    """SIGKILL (node lost: only the timer's checkpoint survives), rerun; SIGTERM (preemption
    notice: the signal makes a checkpoint) in the resumed run, rerun: the last run completes
    from the checkpoint with a complete, valid output."""
    results = copy_results(preprocessed, tmp_path)
    shards = sorted((results / "preprocessed").glob("shard_*.npy"))
    mtimes = [p.stat().st_mtime_ns for p in shards]
    ckpt = results / "model/encoder.ckpt"

    # 1. SIGKILL mid-training: the last timer checkpoint stays
    rc = interrupt_training(results, signal.SIGKILL, tmp_path / "run1.log")
    assert rc != 0
    assert_interrupted(results, tmp_path / "run1.log")
    first = ckpt.stat().st_mtime_ns

    # 2. rerun: resumes from it; SIGTERM once it has checkpointed again
    rc = interrupt_training(results, signal.SIGTERM, tmp_path / "run2.log", after_ns=first)
    assert rc != 0
    assert_interrupted(results, tmp_path / "run2.log")
    step1 = resumed_step(results)
    train_log = (results / "logs/train_encoder.log").read_text()
    assert "checkpoint written" in train_log and "rerun to resume" in train_log   # said why it stopped

    # 3. rerun: resumes from the SIGTERM checkpoint and completes
    proc = run_snakemake(results, "--rerun-incomplete")
    assert proc.returncode == 0, proc.stderr[-4000:]
    step2 = resumed_step(results)
    assert 0 < step1 < step2 < STEPS
    assert not ckpt.exists()                                     # removed once training is done
    losses = pd.read_csv(results / "model/encoder_loss.csv")
    assert list(losses["step"]) == list(range(1, STEPS + 1))           # the whole curve over three runs
    assert np.isfinite(losses["loss"]).all()
    assert [p.stat().st_mtime_ns for p in shards] == mtimes      # preprocessing never redone
    assert_complete_output(results)


# ---- bad input -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """24 simulated particles (2 views x 12) in three stacks of 8, box 64 at 2.5 Å/px."""
    folder = tmp_path_factory.mktemp("small")
    cfg = SimulationConfig(views=2, images_per_view=12, snr=1.0, stack_size=8, seed=5)
    star = write_simulation(simulate(cfg), cfg, folder / "good")
    return star


def make_bad(small_set, dest: Path, kind: str):
    """A copy of the small set with one fault; returns (STAR, stack file named, row, image name)."""
    src = small_set.parent
    shutil.copytree(src, dest)
    star = dest / small_set.name
    table = read_star(star)
    names = table.particles["rlnImageName"].astype(str)
    if kind == "missing_stack":
        row = 9                                      # first particle of the second stack
        stack = dest / names[row - 1].split("@", 1)[1]
        stack.unlink()
    elif kind == "nan_pixels":
        row = 11
        idx, rel = names[row - 1].split("@", 1)
        stack = dest / rel
        import mrcfile

        with mrcfile.open(stack) as m:
            data = np.array(m.data)
            apix = float(m.voxel_size.x)
        data[int(idx) - 1, 5, 7] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # mrcfile: "Data array contains NaN values"
            write_stack(stack, data, apix)
    elif kind == "index_out_of_range":
        row = 20
        rel = names[row - 1].split("@", 1)[1]
        stack = dest / rel
        parts = table.particles.copy()
        parts.loc[row - 1, "rlnImageName"] = f"000099@{rel}"
        write_star(star, table.with_particles(parts))
    else:
        raise ValueError(kind)
    name = str(read_star(star).particles["rlnImageName"].iloc[row - 1])
    return star, stack, row, name


EXPECTED = {
    "missing_stack": "stack file not found",
    "nan_pixels": "non-finite pixels",
    "index_out_of_range": "past the end of the stack",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_bad_input_check_cli_and_workflow_refuse(small_set, tmp_path, kind):
    star, stack, row, name = make_bad(small_set, tmp_path / "data", kind)
    # the CLI
    proc = subprocess.run([str(Path(sys.executable).parent / "clcluster"), "check", str(star), "--classes", "2"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert EXPECTED[kind] in out
    assert stack.name in out                                  # the file
    if kind != "missing_stack":                               # the particle: row and _rlnImageName
        assert f"row {row} ({name})" in out
    else:                                                     # every particle of the stack
        assert "(8 particles: rows 9-16)" in out
    assert str(star) in out
    # the workflow stops at the check, says the same, and leaves nothing finished-looking
    results = tmp_path / "results"
    wf = run_snakemake(results, configs=(TINY,), config=(f"particles={star}", "classes=2"))
    log = wf.stdout + wf.stderr
    assert wf.returncode != 0
    assert "check_particles" in log and EXPECTED[kind] in log and stack.name in log
    assert f"row {row} ({name})" in log if kind != "missing_stack" else "rows 9-16" in log
    assert not (results / "check/report.txt").exists()
    assert not (results / "shards").exists()
    assert not (results / "export").exists()


def test_exclude_bad_keeps_every_checked_particle_once(small_set, tmp_path):
    """check.exclude_bad: the run goes on without the bad particles, lists them in
    check/excluded.csv, and the classified STAR holds every checked particle exactly once."""
    data = tmp_path / "data"
    star, _, nan_row, nan_name = make_bad(small_set, data, "nan_pixels")
    table = read_star(star)
    parts = table.particles.copy()
    oob_row = 20
    rel = parts.loc[oob_row - 1, "rlnImageName"].split("@", 1)[1]
    parts.loc[oob_row - 1, "rlnImageName"] = f"000099@{rel}"
    write_star(star, table.with_particles(parts))
    overlay = tmp_path / "exclude.yaml"
    overlay.write_text("check:\n  exclude_bad: true\nshard:\n  size: 1000\ntrain:\n  steps: 4\n  batch_size: 16\n"
                       "cluster:\n  refine: false\nexport:\n  align_iterations: 1\n  align_angles: 32\n  cryosparc: false\n"
                       "  average_box: working\n  tsne_max_points: 100\n")
    results = tmp_path / "results"
    wf = run_snakemake(results, configs=(TINY, overlay), config=(f"particles={star}", "classes=2"))
    assert wf.returncode == 0, wf.stderr[-4000:]
    checked_star = results / "check/particles_checked.star"
    checked = read_star(checked_star)
    assert len(checked) == 22
    # stack paths absolute: the checked STAR lives in the results folder, away from the stacks
    assert all(Path(n.split("@", 1)[1]).is_absolute() for n in checked.particles["rlnImageName"])
    excluded = pd.read_csv(results / "check/excluded.csv")
    assert sorted(excluded["row"]) == sorted([nan_row, oob_row])
    reasons = dict(zip(excluded["row"], excluded["reason"]))
    assert "non-finite" in reasons[nan_row] and "past the end" in reasons[oob_row]
    assert_complete_output(results, n=22, k=2, star=checked_star)
    out = read_particles(results / "export/particles_classified.star")
    # good + excluded = input, nothing silent
    stem = lambda n: (int(n.split("@", 1)[0]), Path(n.split("@", 1)[1]).name)  # noqa: E731
    kept = {stem(n) for n in out.particles["rlnImageName"]}
    dropped = {stem(n) for n in excluded["rlnImageName"]}
    assert not kept & dropped
    assert kept | dropped == {stem(n) for n in read_star(star).particles["rlnImageName"]}
    assert "excluded 2 of 24" in (results / "check/report.txt").read_text()
