"""One source of configuration: the packaged schema holds every default and description;
config/config.yaml, the dataclasses and the workflow agree with it; typos and bad values are refused."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clcluster.learn.augment import AugmentConfig
from clcluster.steps.cluster import ClusterConfig
from clcluster.core.config import SCHEMA_PATH, load_config, schema, unknown_keys, with_defaults
from clcluster.steps.export import ExportConfig
from clcluster.steps.preprocess import PreprocessConfig
from clcluster.steps.simulate import SimulationConfig
from clcluster.steps.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]

# Dataclass fields the run configuration does not set: the simulation's seed comes from the
# top-level seed, the cluster step's inner schedule is fixed (ClusterConfig marks it "schedule").
NOT_IN_SCHEMA = {
    "simulate": {"seed"},
    "cluster": {"refine_method", "refine_anneal_iterations", "refine_full_every", "refine_wide", "refine_split_merge",
                "refine_split_merge_rounds", "refine_lean_iterations", "refine_ml_wide", "refine_ml_max_shift_px",
                "refine_ml_sparse_classes", "refine_ml_full_every", "assign_candidates"},
}
DATACLASSES = {"simulate": SimulationConfig, "preprocess": PreprocessConfig, "train": TrainConfig,
               "cluster": ClusterConfig, "export": ExportConfig, "train.augment": AugmentConfig}


def _section(path: str) -> dict:
    node = schema()
    for part in path.split("."):
        node = node["properties"][part]
    return node["properties"]


def _default(field: dataclasses.Field):
    value = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("section", sorted(DATACLASSES))
def test_dataclass_defaults_equal_schema_defaults(section):
    props = _section(section)
    fields = {f.name: _default(f) for f in dataclasses.fields(DATACLASSES[section])}
    drift = {k: (fields[k], v["default"]) for k, v in props.items() if k in fields and fields[k] != v["default"]}
    assert drift == {}, f"dataclass default != schema default: {drift}"
    assert set(props) - set(fields) == set(), "schema keys the dataclass lacks"
    assert set(fields) - set(props) == NOT_IN_SCHEMA.get(section, set())


def test_every_key_has_a_default_and_description_and_objects_are_closed():
    def walk(node, path):
        if node.get("type") == "object":
            assert node.get("additionalProperties") is False, f"{path or 'top level'} accepts unknown keys"
        for key, sub in node.get("properties", {}).items():
            assert "default" in sub and "description" in sub, f"{path}{key}"
            walk(sub, f"{path}{key}.")

    walk(schema(), "")


def test_config_yaml_equals_schema_defaults():
    committed = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert with_defaults(committed) == with_defaults({})


def test_workflow_schema_is_a_link_to_the_package_schema():
    link = REPO / "workflow/schemas/config.schema.yaml"
    assert link.is_symlink(), "a copy would drift from the package schema"
    assert (link.parent / os.readlink(link)).resolve() == SCHEMA_PATH.resolve()


def test_test_workflow_config_is_valid():
    load_config(REPO / "tests/workflow/config.yaml")


@pytest.mark.parametrize("bad", [{"classes": 0}, {"preprocess": {"ctf": "flip"}}, {"train": {"steps": "many"}}])
def test_invalid_values_are_refused(bad):
    with pytest.raises(ValueError, match="invalid configuration"):
        with_defaults(bad)


@pytest.mark.parametrize("typo, message", [
    ({"cluster": {"refine_restart": 5}}, "cluster.refine_restart (did you mean cluster.refine_restarts?)"),
    ({"train": {"augment": {"max_shfit_px": 1.0}}}, "train.augment.max_shfit_px (did you mean train.augment.max_shift_px?)"),
    ({"clases": 5}, "clases (did you mean classes?)"),
])
def test_unknown_key_is_refused_naming_the_closest_valid_key(typo, message):
    with pytest.raises(ValueError, match="unknown configuration key") as e:
        with_defaults(typo)
    assert message in str(e.value)


def test_collapsed_schedule_knobs_are_not_settable():
    assert unknown_keys({"cluster": {"refine_wide": 4}})[0].startswith("cluster.refine_wide ")


def test_snakemake_refuses_a_typo_naming_the_closest_key(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("cluster:\n  refine_restart: 5\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(typo),
                           "--config", f"results={tmp_path / 'results'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "cluster.refine_restart (did you mean cluster.refine_restarts?)" in proc.stdout + proc.stderr
