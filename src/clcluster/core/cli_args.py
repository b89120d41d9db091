"""Command-line options that every step command shares: the run configuration and the device."""
from __future__ import annotations

import argparse


def add_config(p: argparse.ArgumentParser) -> None:
    """--config YAML: the run configuration."""
    p.add_argument("--config", metavar="YAML", help="run configuration (config/config.yaml schema); defaults fill the rest")


def add_device(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """--device auto|cpu|cuda (default: the configuration's `device`)."""
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help=help or "auto: the GPU where present (default: config device)")


def run_config(args: argparse.Namespace) -> dict:
    """The configuration named by --config with defaults filled in (all defaults without one)."""
    from clcluster.core.config import load_config, with_defaults

    return load_config(args.config) if getattr(args, "config", None) else with_defaults({})
