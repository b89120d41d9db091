"""The command line finds its commands in the step modules and imports only the chosen one."""
import subprocess
import sys

from clcluster import cli


def test_every_command_module_has_add_args_and_main():
    import importlib

    for name, module in cli.COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_args) and callable(mod.main), name
        assert cli.module_docstring(module), f"{module} has no docstring: the help of `clcluster {name}` would be empty"


def test_help_lists_every_command():
    text = cli.build_parser().format_help()
    for name in cli.COMMANDS:
        assert name in text


def test_a_command_imports_only_its_own_module():
    """`clcluster shard` must not import torch (the train step's dependency) just to build its parser."""
    code = ("import sys; from clcluster import cli; cli.build_parser('shard').parse_args(['shard', 'p.star', '--size', '5',"
            " '--out-dir', 'o']); print('torch' in sys.modules, 'clcluster.steps.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_unknown_option_of_a_command_is_an_argparse_error(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        cli.main(["shard", "p.star", "--size", "5", "--out-dir", "o", "--no-such-option"])
    assert e.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err
