"""`clcluster` command line: one subcommand per pipeline step (the Snakemake rules call these).

Every step reads the run's YAML config (`--config`, same schema as config/config.yaml; defaults
filled in) and takes its inputs and outputs as arguments. Units: Å, degrees, pixels.

Each command is a module with `add_args(parser)` and `main(args)`; its docstring is the help.
This file only finds them: the chosen command's module alone is imported, so that a rule's
command does not pay for importing every other step (torch, scikit-learn, matplotlib).
"""
from __future__ import annotations

import argparse
import ast
import errno
import importlib
import importlib.util
import logging
import sys

log = logging.getLogger("clcluster")

# command -> module with add_args(parser) and main(args), in the order of the workflow
COMMANDS = {
    "simulate": "clcluster.steps.simulate",
    "check": "clcluster.steps.check",
    "shard": "clcluster.steps.shards",
    "preprocess": "clcluster.steps.preprocess",
    "train": "clcluster.steps.train",
    "embed": "clcluster.steps.embed",
    "cluster": "clcluster.steps.cluster",
    "export": "clcluster.steps.export",
    "score": "clcluster.steps.score",
    "benchmark": "clcluster.bench.benchmark",
}


def module_docstring(module: str) -> str:
    """The docstring of `module`, read from its source without importing it."""
    origin = importlib.util.find_spec(module).origin
    with open(origin, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read())) or ""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed; only `command`'s module is imported and given its
    options (all of them when command is None, e.g. for documentation)."""
    p = argparse.ArgumentParser(prog="clcluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="STEP")
    for name, module in COMMANDS.items():
        doc = module_docstring(module)
        s = sub.add_parser(name, help=doc.split("\n\n")[0].replace("\n", " "), description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if command is None or command == name:
            mod = importlib.import_module(module)
            mod.add_args(s)
            s.set_defaults(func=mod.main)
    return p


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first word that is one), or None."""
    return next((a for a in argv if a in COMMANDS), None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(chosen_command(argv)).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from clcluster.core.integrity import IntegrityError
    from clcluster.io.mrc import StackError
    from clcluster.io.star import ParticleFileError

    try:
        return int(args.func(args) or 0)
    except (ParticleFileError, StackError, IntegrityError, ValueError) as e:
        print(f"clcluster {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # cannot read or write a file: one line naming it and the cause
        print(f"clcluster {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2


OS_ERROR_HINTS = {
    errno.EFBIG: "the file size limit was reached (ulimit -f, or the file system's largest file)",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EACCES: "no permission",
    errno.EPERM: "no permission",
    errno.EROFS: "the file system is read-only",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


def os_error_line(e: OSError) -> str:
    """'PATH: cause (what it means)' for a failed read or write."""
    path = e.filename if e.filename is not None else "(file)"
    cause = e.strerror or str(e)
    hint = OS_ERROR_HINTS.get(e.errno)
    return f"{path}: {cause}" + (f" ({hint}); nothing was left half-written" if hint else "")


if __name__ == "__main__":
    sys.exit(main())
