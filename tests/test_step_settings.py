"""Each workflow rule hands its command only its own step's settings ({results}/config/STEP.yaml,
keys listed in STEP_SETTINGS of workflow/rules/common.smk). A command that read a section it is
not given would silently get that section's defaults, so every `cfg[...]` a command reads must be
among its step's settings."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# step -> the module whose main(args) runs its command (bench/realistic_benchmark.py's main_realistic
# is the benchmark's realistic mode)
COMMANDS = {"simulate": "steps/simulate.py", "preprocess": "steps/preprocess.py", "train": "steps/train.py",
            "embed": "steps/embed.py", "cluster": "steps/cluster.py", "export": "steps/export.py",
            "benchmark": "bench/benchmark.py"}


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


def command_main(step: str) -> ast.FunctionDef:
    """The `main` function of the step's command module."""
    tree = ast.parse((REPO / "src/clcluster" / COMMANDS[step]).read_text())
    return next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")


def test_every_step_has_settings_and_a_command():
    assert set(step_settings()) == set(COMMANDS)
    for step in COMMANDS:
        assert command_main(step).args.args, step


@pytest.mark.parametrize("step", sorted(COMMANDS))
def test_command_reads_only_its_steps_settings(step):
    read = keys_read(command_main(step))
    assert read, f"{COMMANDS[step]} main reads no settings: the test no longer sees how it reads them"
    assert read <= set(step_settings()[step]), f"{COMMANDS[step]} reads {sorted(read - set(step_settings()[step]))}"
