"""The SLURM requests of training, checked without a cluster: each row of the GPU table in
docs/slurm.md (and the training rule of profiles/slurm/config.yaml) goes through the SLURM
executor plugin's own code that builds the `sbatch` line (snakemake-executor-plugin-slurm,
installed with the `slurm` extra), and that line and the row's `srun` launcher are checked
against the option pairs SLURM 22.05-24.x refuses and against what the ranks need."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
plugin = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
from snakemake_executor_plugin_slurm.utils import set_gres_string  # noqa: E402

MB_PER_CUDA_RANK = 16000


class _Resources(dict):
    __getattr__ = dict.__getitem__


class _Job:
    """What the plugin reads of a Snakemake job: resources, threads, name."""

    def __init__(self, resources: dict, threads: int = 1):
        self.resources, self.threads, self.name = _Resources(resources), threads, "train_encoder"


def sbatch_line(resources: dict) -> str:
    """The plugin's sbatch call for a train_encoder job with these resources."""
    params = {"run_uuid": "u", "slurm_logfile": "log", "comment_str": "rule_train_encoder", "account": "",
              "partition": "-p gpu", "workdir": "/w"}
    job = _Job(resources)
    return plugin.get_submit_command(job, params) + set_gres_string(job)


def _opts(line: str) -> dict:
    """--name=value / --name value / -x value options of a command line → {name: value}."""
    words, out, i = shlex.split(line), {}, 0
    while i < len(words):
        w = words[i]
        if w.startswith("--"):
            name, eq, value = w[2:].partition("=")
            if not eq and i + 1 < len(words) and not words[i + 1].startswith("-"):
                value, i = words[i + 1], i + 1
            out[name] = value
        elif re.fullmatch(r"-[A-Za-z]", w) and i + 1 < len(words):
            out[w[1:]], i = words[i + 1], i + 1
        i += 1
    return out


SHORT = {"n": "ntasks", "c": "cpus-per-task", "N": "nodes", "t": "time", "p": "partition"}


def problems(resources: dict, launcher: str, fake_gpus: bool = False) -> list[str]:
    """What is wrong with a train_encoder request (empty when nothing). fake_gpus: the local
    cluster's GPUs, which need no host memory per rank."""
    sb = {SHORT.get(k, k): v for k, v in _opts(sbatch_line(resources)).items()}
    sr = {SHORT.get(k, k): v for k, v in _opts(launcher).items()}
    out = []
    gpu_job = "gpus" in sb or "gres" in sb
    if "ntasks-per-gpu" in sb and ("cpus-per-task" in sb or "cpus-per-task" in sr):
        out.append("--ntasks-per-gpu with --cpus-per-task/srun -c: srun aborts on SLURM 23.02+")
    if "ntasks-per-gpu" in sb and ("gpus-per-task" in sb or "gpus-per-task" in sr):
        out.append("--ntasks-per-gpu with --gpus-per-task")
    nodes = int(sb.get("nodes", 1))
    per_node_gpus = int(m.group(1)) if (m := re.search(r"gpu(?::\w+)?:(\d+)$", sb.get("gres", ""))) else None
    if gpu_job and nodes > 1 and per_node_gpus is None and "gpus-per-node" not in sb:
        out.append(f"--gpus={sb.get('gpus')} on {nodes} nodes: no per-node guarantee")
    if "mpi" in resources:
        ranks = int(sb["ntasks-per-node"]) * nodes if "ntasks-per-node" in sb else int(sb.get("ntasks", 0))
        if int(sr.get("ntasks", -1)) != ranks:
            out.append(f"srun -n {sr.get('ntasks')} but the job has {ranks} tasks")
        if sr.get("cpus-per-task") != sb.get("cpus-per-task"):
            out.append(f"srun -c {sr.get('cpus-per-task')} but --cpus-per-task={sb.get('cpus-per-task')}")
        if "ntasks-per-node" in sr and sr["ntasks-per-node"] != sb.get("ntasks-per-node"):
            out.append("srun --ntasks-per-node differs from the job's")
        per_node_ranks = int(sb.get("ntasks-per-node", ranks))
        if per_node_gpus is not None and per_node_gpus < per_node_ranks:
            out.append(f"{per_node_ranks} ranks per node but {per_node_gpus} GPUs per node")
        if gpu_job and int(sb.get("mem", 0)) < MB_PER_CUDA_RANK * per_node_ranks and not fake_gpus:
            out.append(f"--mem={sb.get('mem')} MB for {per_node_ranks} CUDA ranks per node")
    else:
        if launcher.strip():
            out.append("a launcher without mpi: the rule's shell runs inside a one-task srun")
        if "signal" in sb:
            out.append("--signal without mpi also hits the job's Snakemake and shell")
        if gpu_job and int(sb.get("mem", 0)) < MB_PER_CUDA_RANK:
            out.append(f"--mem={sb.get('mem')} MB for a CUDA rank")
    return out


def gpu_table() -> list[tuple[str, dict, str]]:
    """(setup, resources, launcher) of every row of the GPU table in docs/slurm.md."""
    text = (REPO / "docs/slurm.md").read_text()
    table = text[text.index("### The GPU table"):].split("\n\n")
    rows = [line for block in table for line in block.splitlines() if line.startswith("| ") and "`{" in line]
    out = []
    for line in rows:
        setup, res, launcher = [c.strip() for c in line.strip("|").split("|")]
        resources = yaml.safe_load(res.strip("`"))
        out.append((setup, resources, launcher.strip("`").strip('"')))
    return out


ROWS = gpu_table()


def test_the_docs_have_the_gpu_rows():
    setups = [r[0] for r in ROWS]
    assert len(ROWS) >= 4 and any("2 nodes" in s for s in setups) and any(s.startswith("local") for s in setups)


@pytest.mark.parametrize("setup, resources, launcher", ROWS, ids=[r[0] for r in ROWS])
def test_gpu_table_rows_are_valid_requests(setup, resources, launcher):
    assert problems(resources, launcher, fake_gpus=setup.startswith("local")) == [], sbatch_line(resources)


@pytest.mark.parametrize("resources, launcher, expected", [
    # the table as it was: tasks_per_gpu makes the plugin emit --ntasks-per-gpu next to -c
    ({"gpu": 4, "tasks_per_gpu": 1, "tasks": 4, "mpi": "srun", "nodes": 1, "cpus_per_task": 8, "mem_mb": 64000},
     "srun -n 4 -c 8", "--ntasks-per-gpu with --cpus-per-task"),
    ({"gpu": 8, "tasks_per_gpu": 1, "tasks": 8, "mpi": "srun", "nodes": 2, "cpus_per_task": 8, "mem_mb": 64000},
     "srun -n 8 -c 8", "no per-node guarantee"),
    ({"gres": "gpu:4", "nodes": 1, "tasks_per_node": 4, "tasks_per_gpu": 0, "mpi": "srun", "cpus_per_task": 8,
      "mem_mb": 4000}, "srun -n 4 -c 8", "MB for 4 CUDA ranks"),
    ({"gpu": 1, "cpus_per_task": 8, "mem_mb": 32000, "slurm_extra": "'--signal=USR1@300'"}, "",
     "--signal without mpi"),
    ({"gres": "gpu:4", "nodes": 2, "tasks_per_node": 4, "tasks_per_gpu": 0, "mpi": "srun", "cpus_per_task": 8,
      "mem_mb": 64000}, "srun -n 4 -c 8", "srun -n 4 but the job has 8 tasks"),
])
def test_the_checks_catch_the_known_bad_requests(resources, launcher, expected):
    found = problems(resources, launcher)
    assert any(expected in p for p in found), (found, sbatch_line(resources))


def test_profile_training_request_is_valid():
    """The profile's own train_encoder (CPU ranks on the local cluster) passes the same checks."""
    prof = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    res = dict(prof["default-resources"]) | dict(prof["set-resources"]["train_encoder"])
    launcher = res.pop("launcher")
    assert problems(res, launcher) == [], sbatch_line(res)
