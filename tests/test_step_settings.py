"""Each workflow rule hands its command only its own step's settings ({results}/config/STEP.yaml,
keys listed in STEP_SETTINGS of workflow/rules/common.smk). A command that read a section it is
not given would silently get that section's defaults, so every `cfg[...]` a command reads must be
among its step's settings."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"simulate": "cmd_simulate", "preprocess": "cmd_preprocess", "train": "cmd_train", "embed": "cmd_embed",
            "cluster": "cmd_cluster", "export": "cmd_export", "benchmark": "cmd_benchmark"}


def step_settings() -> dict:
    text = (REPO / "workflow/rules/common.smk").read_text()
    literal = re.search(r"^STEP_SETTINGS = (\{.*?^\})", text, re.S | re.M).group(1)
    return ast.literal_eval(literal)


def keys_read(function: ast.FunctionDef) -> set:
    """Top-level config keys a command reads: cfg["key"] and cfg.get("key")."""
    keys = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "cfg":
            if isinstance(node.slice, ast.Constant):
                keys.add(node.slice.value)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "cfg" and node.args
                and isinstance(node.args[0], ast.Constant)):
            keys.add(node.args[0].value)
    return keys


def cli_functions() -> dict:
    tree = ast.parse((REPO / "src/clcluster/cli.py").read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_every_step_has_settings_and_a_command():
    assert set(step_settings()) == set(COMMANDS)
    assert set(COMMANDS.values()) <= set(cli_functions())


@pytest.mark.parametrize("step", sorted(COMMANDS))
def test_command_reads_only_its_steps_settings(step):
    read = keys_read(cli_functions()[COMMANDS[step]])
    assert read, f"{COMMANDS[step]} reads no settings: the test no longer sees how it reads them"
    assert read <= set(step_settings()[step]), f"{COMMANDS[step]} reads {sorted(read - set(step_settings()[step]))}"
