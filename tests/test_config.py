"""config/config.yaml and the schema's defaults must not drift apart; bad values are refused."""
from pathlib import Path

import pytest
import yaml

from clcluster.config import load_config, with_defaults

REPO = Path(__file__).resolve().parents[1]


def test_config_yaml_equals_schema_defaults():
    committed = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert with_defaults(committed) == with_defaults({})


def test_workflow_schema_is_the_package_schema():
    assert (REPO / "workflow/schemas/config.schema.yaml").read_text() == (REPO / "src/clcluster/config.schema.yaml").read_text()


def test_test_workflow_config_is_valid():
    load_config(REPO / "tests/workflow/config.yaml")


@pytest.mark.parametrize("bad", [{"classes": 0}, {"preprocess": {"ctf": "flip"}}, {"train": {"steps": "many"}}])
def test_invalid_values_are_refused(bad):
    with pytest.raises(ValueError, match="invalid configuration"):
        with_defaults(bad)
