"""Against a real (local, one-node) SLURM cluster: scripts/slurm_local_start.sh starts it.

Skipped with a reason when `sinfo` is missing outside CI; a failure when CI=true, because CI
starts the cluster (.ci/run) and must run these. Tiny data, few steps: each test is tens of
seconds on 2 CPU cores.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STATE = Path(os.environ.get("CLCLUSTER_SLURM_STATE", "/tmp/clcluster-slurm"))

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _env():
    env = os.environ.copy()
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"  # clcluster and python of this venv inside jobs
    return env


def _run(cmd, timeout=300, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), **kw)


@pytest.fixture(scope="module")
def cluster():
    """The local cluster is up (sinfo answers and the node is usable)."""
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if shutil.which("sinfo") is None:
        if in_ci:
            pytest.fail("CI=true but `sinfo` is missing: .ci/run must start scripts/slurm_local_start.sh")
        pytest.skip("no SLURM here (`sinfo` missing); start one with `sudo scripts/slurm_local_start.sh`")
    p = _run(["sinfo", "-h", "-o", "%T"], timeout=30)
    states = p.stdout.split()
    if p.returncode != 0 or not any(s in ("idle", "mixed", "allocated", "completing") for s in states):
        msg = f"SLURM does not answer or has no usable node (sinfo rc {p.returncode}: {p.stdout} {p.stderr})"
        if in_ci:
            pytest.fail(msg)
        pytest.skip(msg + "; start it with scripts/slurm_local_start.sh")
    return True


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two tiny preprocessed shards (64 particles, 24 px) and their folder."""
    d = tmp_path_factory.mktemp("slurmdata")
    cmds = [["clcluster", "simulate", "--out-dir", str(d / "sim"), "--views", "4", "--images-per-view", "16",
             "--box", "32", "--snr", "0.5"],
            ["clcluster", "shard", str(d / "sim/particles.star"), "--size", "32", "--out-dir", str(d / "shards")]]
    cmds += [["clcluster", "preprocess", str(d / f"shards/shard_{i}.star"), "--out", str(d / f"pre/shard_{i}.npy"),
              "--box", "24", "--device", "cpu"] for i in (0, 1)]
    for c in cmds:
        p = _run(c)
        assert p.returncode == 0, p.stderr[-3000:]
    return d, [str(d / "pre/shard_0.npy"), str(d / "pre/shard_1.npy")]


def _sbatch(script: Path, *args, wait=True, timeout=600):
    p = _run(["sbatch", "--parsable", *(["--wait"] if wait else []), *args, str(script)], timeout=timeout)
    m = re.match(r"^(\d+)", p.stdout.strip())
    assert m, f"sbatch gave no job id: {p.stdout} {p.stderr}"
    return int(m.group(1)), p


def _write_config(path: Path, **train):
    import yaml

    cfg = {"seed": 0, "device": "cpu", "train": {"checkpoint_minutes": 0, **train}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _params(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_two_ranks_under_srun_equal_one_process(cluster, shards, tmp_path):
    """`srun -n 2` (DDP over gloo, SyncBatchNorm-equivalent statistics, negatives gathered from
    both ranks, augmentation seeded per group of particles of the global batch) trains to the
    same parameters as one process on the same global batches. SGD: its update is linear in the
    gradient, so float rounding (the gradients agree to ~1e-6) stays at rounding size; AdamW's
    first steps divide each gradient element by its own magnitude, which turns rounding of
    near-zero elements into differences of the size of the learning rate."""
    d, npys = shards
    cfg = _write_config(tmp_path / "cfg.yaml", steps=3, batch_size=32, optimizer="sgd", lr=0.02)
    common = f"clcluster train --shards {' '.join(npys)} --config {cfg} --device cpu"
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nset -e\n"
                      "echo job $SLURM_JOB_ID tasks $SLURM_NTASKS\n"
                      f"srun -n 1 -c 2 {common} --out {tmp_path}/one/encoder.pt\n"
                      f"srun -n 2 -c 1 {common} --out {tmp_path}/two/encoder.pt\n")
    job, p = _sbatch(script, "-n", "2", "-c", "1", "-t", "15", "-o", str(tmp_path / "job.out"), "-J", "ddp-equal")
    out = (tmp_path / "job.out").read_text()
    assert p.returncode == 0, out[-4000:]
    assert f"job {job} tasks 2" in out
    assert "rank 0 of 2 (srun, gloo backend" in out, out[-3000:]
    a, b = _params(tmp_path / "one/encoder.pt"), _params(tmp_path / "two/encoder.pt")
    torch.manual_seed(0)  # the initial parameters, to measure the update
    from clcluster.learn.models import ContrastiveModel, build_encoder

    a0 = ContrastiveModel(build_encoder("polar", 24, 128), 64).encoder.state_dict()
    keys = [k for k in a if a[k].is_floating_point() and "running" not in k]
    diff = sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in keys) ** 0.5
    update = sum(float(((a[k] - a0[k]).double() ** 2).sum()) for k in keys) ** 0.5
    assert update > 1e-2, "training did not move the parameters"
    assert diff / update < 1e-2, (diff, update)
    assert max(float((a[k] - b[k]).abs().max()) for k in keys) < 1e-3
    la = np.loadtxt(tmp_path / "one/encoder_loss.csv", delimiter=",", skiprows=1)[:, 1]
    lb = np.loadtxt(tmp_path / "two/encoder_loss.csv", delimiter=",", skiprows=1)[:, 1]
    np.testing.assert_allclose(la, lb, rtol=1e-3)
    # rank 0 alone wrote; no checkpoint left behind
    assert not (tmp_path / "two/encoder.ckpt").exists()


def test_training_killed_with_sigterm_resumes_from_checkpoint(cluster, shards, tmp_path):
    """scancel --signal=TERM mid-training: both ranks agree to stop at one step, rank 0 writes
    <encoder>.ckpt, the step exits 143; the same command again resumes from that step."""
    d, npys = shards
    steps = 40
    cfg = _write_config(tmp_path / "cfg.yaml", steps=steps, batch_size=16)
    enc = tmp_path / "model/encoder.pt"
    ckpt = enc.with_suffix(".ckpt")
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\nsrun -n 2 -c 1 clcluster train --shards {' '.join(npys)} --config {cfg} "
                      f"--device cpu --out {enc}\necho srun exit $?\n")
    job, _ = _sbatch(script, "-n", "2", "-c", "1", "-t", "15", "-o", str(tmp_path / "first.out"), wait=False)
    log = tmp_path / "first.out"
    deadline = time.time() + 300
    while time.time() < deadline:
        if log.exists() and re.search(r"step 10/40", log.read_text()):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"training did not reach step 10: {log.read_text() if log.exists() else 'no log'}")
    assert _run(["scancel", "--signal=TERM", str(job)]).returncode == 0
    deadline = time.time() + 120
    while time.time() < deadline and str(job) in _run(["squeue", "-h", "-o", "%i"]).stdout.split():
        time.sleep(0.5)
    first = log.read_text()
    assert "srun exit 143" in first or "signal 15" in first, first[-3000:]
    assert ckpt.exists(), first[-3000:]
    assert not enc.exists()
    saved = int(torch.load(ckpt, weights_only=True)["step"])
    assert 10 <= saved < steps
    job2, p = _sbatch(script, "-n", "2", "-c", "1", "-t", "15", "-o", str(tmp_path / "second.out"))
    second = (tmp_path / "second.out").read_text()
    assert p.returncode == 0 and "srun exit 0" in second, second[-3000:]
    assert f"resumed from {ckpt} at step {saved}" in second
    assert enc.exists() and not ckpt.exists()
    losses = np.loadtxt(enc.with_name("encoder_loss.csv"), delimiter=",", skiprows=1)
    assert len(losses) == steps  # the steps before the kill are kept, none is done twice


def test_whole_workflow_through_slurm_profile(cluster, tmp_path):
    """`snakemake --profile profiles/slurm` on the tiny config: every job goes through sbatch
    (job ids in Snakemake's log, known to slurmctld), training runs as one 2-task job, and the
    classified STAR holds every particle exactly once."""
    from clcluster.io import read_particles

    results = tmp_path / "results"
    cmd = ["timeout", "--foreground", "-s", "INT", "-k", "60", "840", sys.executable, "-m", "snakemake",
           "--profile", "profiles/slurm", "--configfile", str(REPO / "tests/workflow/config.yaml"),
           "--config", f"results={results}"]
    t0 = time.time()
    p = _run(cmd, timeout=900, cwd=REPO)
    wall = time.time() - t0
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-5000:]
    ids = [int(i) for i in re.findall(r"submitted with SLURM jobid (\d+)", log)]
    rules = re.findall(r"slurm_logs/rule_(\w+)/", log)
    assert len(ids) >= 8 and len(set(ids)) == len(ids), log[-3000:]
    assert {"train_encoder", "preprocess_shard", "embed_shard", "cluster_embeddings", "export_classes"} <= set(rules)
    # slurmctld saw them (its log names every allocated job id)
    ctld = STATE / "log/slurmctld.log"
    if ctld.exists():
        text = ctld.read_text(errors="replace")
        for i in ids:
            assert re.search(rf"JobId={i}\b", text), f"job {i} not in {ctld}"
    # the training job had 2 tasks and its ranks found each other through srun
    train_log = (results / "logs/train_encoder.log").read_text()
    assert "rank 0 of 2 (srun, gloo backend" in train_log, train_log[-2000:]
    inp = read_particles(results / "demo/particles.star")
    out = read_particles(results / "export/particles_classified.star")
    names = out.particles["rlnImageName"]
    assert len(out) == len(inp) == 160 and names.is_unique
    assert sorted(names) == sorted(inp.particles["rlnImageName"])
    assert set(out.particles["rlnClassNumber"]) <= set(range(1, 5))
    print(f"tiny workflow under local SLURM: {wall:.0f} s wall, {len(ids)} jobs")


# A sitecustomize for the GPU-shaped submission: no GPU exists here, so inside each rank's
# Python process (and only there) torch.cuda reports the devices that SLURM's
# CUDA_VISIBLE_DEVICES lists; the device that backend.rank_device chooses from them is printed,
# and the rank then computes on the CPU.
FAKE_CUDA_SITECUSTOMIZE = '''
import os
if os.environ.get("CLCLUSTER_TEST_FAKE_CUDA") == "1":
    import torch
    from clcluster.core import backend
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: len([v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()])
    _real_rank_device = backend.rank_device
    def rank_device(device="auto", env=None):
        chosen = _real_rank_device(device, env)
        print(f"fake-cuda rank {os.environ.get('SLURM_PROCID')} localid {os.environ.get('SLURM_LOCALID')} "
              f"visible {os.environ.get('CUDA_VISIBLE_DEVICES')} -> {chosen}", flush=True)
        torch.cuda.is_available = lambda: False
        return torch.device("cpu")
    backend.rank_device = rank_device
'''


def _plugin_sbatch_options(resources: dict) -> list[str]:
    """The options the SLURM executor plugin passes to sbatch for these resources, without
    the ones tied to a Snakemake run (name, log, comment, partition, work dir)."""
    import shlex

    sys.path.insert(0, str(REPO / "tests"))
    from test_slurm_profile import sbatch_line

    words, keep, i = shlex.split(sbatch_line(resources))[1:], [], 0
    while i < len(words):
        if words[i] in ("--job-name", "--output", "--comment", "-p", "-D"):
            i += 2
            continue
        if words[i] != "--parsable":
            keep.append(words[i])
        i += 1
    return keep


def test_gpu_shaped_submission_chooses_one_gpu_per_rank(cluster, shards, tmp_path):
    """The local row of docs/slurm.md's GPU table through real sbatch/srun on the local
    cluster's 2 fake GPUs (--gres=gpu:2, 2 tasks per node): both ranks train together, and
    each picks its GPU from the CUDA_VISIBLE_DEVICES that SLURM gave its step. All GPUs of
    the node visible: rank i uses cuda:i. One GPU bound per task (srun --gpus-per-task=1):
    every rank uses cuda:0 (rank 1 once asked for cuda:1, "invalid device ordinal")."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_slurm_profile import gpu_table

    (setup, resources, launcher), = [r for r in gpu_table() if r[0].startswith("local")]
    opts = _plugin_sbatch_options(resources)
    assert "--gres=gpu:2" in opts and "--ntasks-per-node=2" in opts, opts
    assert not any(o.startswith("--ntasks-per-gpu") for o in opts)
    fake = tmp_path / "fake_cuda"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(FAKE_CUDA_SITECUSTOMIZE)
    d, npys = shards
    cfg = _write_config(tmp_path / "cfg.yaml", steps=2, batch_size=32)
    common = f"clcluster train --shards {' '.join(npys)} --config {cfg} --device auto"
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nset -e\n"
                      f"export CLCLUSTER_TEST_FAKE_CUDA=1 PYTHONPATH={fake}:${{PYTHONPATH:-}}\n"
                      "echo job GPUs $CUDA_VISIBLE_DEVICES\n"
                      f"{launcher} {common} --out {tmp_path}/all/encoder.pt\n"
                      f"{launcher} --gpus-per-task=1 {common} --out {tmp_path}/bound/encoder.pt\n")
    job, p = _sbatch(script, *opts, "-t", "15", "-o", str(tmp_path / "job.out"), "-J", "gpu-shaped")
    out = (tmp_path / "job.out").read_text()
    assert p.returncode == 0, out[-4000:]
    assert "job GPUs 0,1" in out, out[-2000:]
    chosen = re.findall(r"fake-cuda rank (\d) localid (\d) visible (\S+) -> (\S+)", out)
    assert sorted(chosen[:2]) == [("0", "0", "0,1", "cuda:0"), ("1", "1", "0,1", "cuda:1")], out[-3000:]
    assert sorted(chosen[2:]) == [("0", "0", "0", "cuda:0"), ("1", "1", "1", "cuda:0")], out[-3000:]
    assert out.count("rank 0 of 2 (srun, gloo backend") == 2, out[-3000:]
    assert (tmp_path / "all/encoder.pt").exists() and (tmp_path / "bound/encoder.pt").exists()
