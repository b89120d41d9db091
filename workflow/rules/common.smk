# Config validation, paths and input functions shared by the rules.
import json
import os
import shlex
from pathlib import Path

import yaml
from snakemake.utils import validate

from clcluster.core.config import reject_unknown_keys

reject_unknown_keys(config)  # a typo'd key is an error naming the closest valid key
validate(config, schema="../schemas/config.schema.yaml", set_default=True)

R = config["results"].rstrip("/")
SIMULATED = config["particles"] == ""
# With --software-deployment-method conda, the shell rules run in envs/cpu.yaml or envs/gpu.yaml,
# as config conda_env says. Their post-deploy scripts install the package from the folder named
# by the environment variable CLCLUSTER_SOURCE, set here to the repository this file is in (two
# folders up), whatever the working directory or the main Snakefile. (Set with update() because
# the variable is the workflow's own, not one the user must provide.)
ENV = f"../../envs/{config['conda_env']}.yaml"
os.environ.update(CLCLUSTER_SOURCE=str(Path(str(workflow.current_basedir)).resolve().parents[1]))


wildcard_constraints:
    shard=r"\d+",


def particles_file(checked=True):
    """The particles the pipeline classifies: the user's file, or the simulated demo set.

    With check.exclude_bad, the steps after the check read the checked selection
    ({R}/check/particles_checked.star, stack paths absolute); checked=False gives the input."""
    if checked and config["check"]["exclude_bad"]:
        return f"{R}/check/particles_checked.star"
    return f"{R}/demo/particles.star" if SIMULATED else config["particles"]


def shard_ids(wildcards):
    """Shard numbers, known once the shard checkpoint has run."""
    folder = checkpoints.shard_particles.get(**wildcards).output.folder
    return sorted(int(i) for i in glob_wildcards(f"{folder}/shard_{{shard}}.star").shard)


def per_shard(pattern):
    """Input function: `pattern` (with {shard}) for every shard."""

    def inputs(wildcards):
        return [pattern.format(shard=i) for i in shard_ids(wildcards)]

    return inputs


def final_outputs():
    out = [f"{R}/export/particles_classified.star", f"{R}/export/class_averages.png"]
    if SIMULATED:
        out.append(f"{R}/score.json")
    return out


def print_score():
    score = Path(f"{R}/score.json")
    if SIMULATED and score.exists():
        s = json.loads(score.read_text())
        print(
            f"CL-Clustering demo: {s['particles']} particles, clustering accuracy (Hungarian-matched) "
            f"{s['accuracy']:.3f}, alignment-free stage alone {s['kmeans_accuracy']:.3f}, "
            f"ARI {s['ari']:.3f}, NMI {s['nmi']:.3f}  ({score})"
        )


# The settings each step reads. A rule depends on its own step's file only, so that changing a
# key reruns that step and what follows it, and nothing else (an export key: export alone).
STEP_SETTINGS = {
    "simulate": ["seed", "simulate"],
    "preprocess": ["device", "preprocess"],
    "train": ["seed", "device", "train"],
    "embed": ["device", "embed"],
    "cluster": ["seed", "device", "classes", "cluster"],
    "export": ["seed", "device", "classes", "project_root", "export"],
    "benchmark": ["seed", "device", "simulate", "preprocess", "train", "embed", "cluster"],
}


def step_config(step):
    """The file of `step`'s settings (validated, defaults filled in) that its rule reads."""
    return f"{R}/config/{step}.yaml"


def write_settings(path, settings):
    """Write a step's settings as YAML, atomically (a .part file, then a rename)."""
    tmp = Path(path).with_name(f".{Path(path).name}.part")
    tmp.write_text(yaml.safe_dump(dict(settings), sort_keys=False))
    tmp.replace(path)


def root_option():
    """The --root option of the steps that resolve stack paths ("" when project_root is unset)."""
    return f"--root {shlex.quote(config['project_root'])}" if config["project_root"] else ""
