"""Input validation before any work starts (`clcluster check`).

`check_particles` looks at a ParticleTable and the stacks it points to and returns EVERY
problem it finds (not just the first): empty particle file, more classes than particles,
missing CTF columns (when CTF correction is on) or non-finite CTF values, no pixel size,
pixel sizes that differ within one optics group, malformed `_rlnImageName`, the same image
referenced twice, missing / unreadable / corrupt or truncated stacks (header disagreeing
with the file size), indices past the end of a stack, stacks whose box differs from the
others' (or from `_rlnImageSize`), non-square images, and images with non-finite pixels or
no contrast at all (read in batches through the memory map, never a whole stack at once).

Each `Problem` is one of three scopes: "table" (the whole input is unusable as is),
"stack" (every particle of one stack file; `rows` lists them) or "particle" (one row).
`exclude_bad` drops the particles of stack- and particle-scope problems and returns them
with their reasons; table-scope problems cannot be excluded.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from .ctf import CTF_LABELS
from .io.atomic import atomic_path
from .io.mrc import StackError, open_stack, stack_data
from .io.star import ParticleFileError, ParticleTable, parse_image_name, write_star

MRC_HEADER_BYTES = 1024


@dataclasses.dataclass
class Problem:
    """One problem found in the input.

    file: the STAR/.cs file (table and particle scope) or the stack file (stack scope).
    row: 1-based particle row (particle scope), else None.
    image_name: the particle's `_rlnImageName` (particle scope), else None.
    message: what is wrong; fix: what to do about it.
    scope: "table", "stack" or "particle".
    rows: the 1-based rows affected (stack scope: every particle in that stack).
    """

    file: str
    row: int | None
    image_name: str | None
    message: str
    fix: str
    scope: str = "particle"
    rows: tuple = ()

    def affected_rows(self) -> tuple:
        if self.rows:
            return tuple(self.rows)
        return (self.row,) if self.row is not None else ()


def _names(table: ParticleTable) -> list[str]:
    return table.particles["rlnImageName"].astype(object).where(table.particles["rlnImageName"].notna(), "").astype(str).tolist()


def check_particles(table: ParticleTable, *, ctf_required: bool = True, classes: int | None = None,
                    check_pixels: bool = True, batch: int = 256) -> list[Problem]:
    """All problems of `table` and its stacks, as a list (empty when all is well).

    ctf_required: CTF correction is on, so defocus U/V/angle, voltage (kV), Cs (mm) and
    amplitude contrast must be present and finite for every particle.
    classes: the number of classes K asked for (must be 1 <= K <= number of particles).
    check_pixels: read every referenced image (in batches of `batch` images through the
    memory map) to find non-finite or constant images."""
    problems: list[Problem] = []
    star = str(table.path) if table.path is not None else "<particles>"
    n = len(table)

    def table_problem(message, fix):
        problems.append(Problem(star, None, None, message, fix, scope="table"))

    if n == 0:
        table_problem("the particle file holds no particles (empty loop)",
                      "point to the particle file of a job that produced particles")
    if classes is not None and (classes < 1 or classes > n):
        table_problem(f"{classes} classes asked for but there are {n} particles",
                      "ask for at least 1 and at most as many classes as particles "
                      "(in practice far fewer: a few hundred particles per class or more)")
    if n == 0:
        return problems
    if "rlnImageName" not in table.particles.columns:
        table_problem("no _rlnImageName column: the particles do not say where their images are",
                      "pass a particle STAR file (e.g. from Extract, Select or Class2D)")
        return problems
    names = _names(table)

    # ---- optics, pixel size, CTF --------------------------------------------------------
    group_rows = np.zeros(n, dtype=int)
    if table.optics is not None:
        try:
            group_rows = table.optics_group_rows()
        except ParticleFileError as e:
            table_problem(str(e), "give every particle an _rlnOpticsGroup that the optics block defines")
    apix = None
    try:
        apix = np.asarray(table.pixel_size(), dtype=np.float64)
    except (ParticleFileError, ValueError) as e:
        table_problem(str(e), "add _rlnImagePixelSize to the optics block (RELION 3.1+) or "
                              "_rlnMagnification and _rlnDetectorPixelSize to the particles (RELION 3.0)")
    if apix is not None:
        bad = np.flatnonzero(~(np.isfinite(apix) & (apix > 0)))
        for i in bad:
            problems.append(Problem(star, int(i) + 1, names[i], "pixel size is not a positive number",
                                    "fix the pixel size columns of this particle"))
        groups = table.optics["rlnOpticsGroup"].to_numpy()[group_rows] if (
            table.optics is not None and "rlnOpticsGroup" in table.optics) else group_rows + 1
        ok = np.isfinite(apix) & (apix > 0)
        for g in np.unique(groups):
            sel = np.flatnonzero((groups == g) & ok)
            values = np.round(apix[sel], 4)
            counts = Counter(values.tolist())
            if len(counts) > 1:
                main, _ = counts.most_common(1)[0]
                where = f"optics group {g}" if table.optics is not None else "the particle file (no optics groups)"
                for i in sel[values != main]:
                    problems.append(Problem(
                        star, int(i) + 1, names[i],
                        f"pixel size {apix[i]:g} Å differs from the {main:g} Å of the other particles of {where}",
                        "put particles with different pixel sizes into different optics groups, or exclude them"))

    if ctf_required:
        missing = []
        for label in CTF_LABELS:
            try:
                if table.column(label) is None:
                    missing.append(label)
            except ParticleFileError:
                missing.append(label)
        if missing:
            table_problem(f"CTF correction is on but the particles lack {', '.join('_' + m for m in missing)}",
                          "add the CTF columns (CTF estimation results), or run without CTF correction (--no-ctf)")
        else:
            for label in CTF_LABELS:
                try:
                    v = np.asarray(table.column(label), dtype=np.float64)
                except (ValueError, TypeError, ParticleFileError):
                    table_problem(f"_{label} holds non-numeric values", "fix the CTF columns")
                    continue
                for i in np.flatnonzero(~np.isfinite(v)):
                    problems.append(Problem(star, int(i) + 1, names[i], f"CTF parameter _{label} is not finite",
                                            "re-run CTF estimation for this micrograph, or exclude the particle"))

    # ---- image names, duplicates --------------------------------------------------------
    refs: dict[Path, list[tuple[int, int]]] = defaultdict(list)   # stack -> [(row, index)]
    resolved: dict[str, Path] = {}
    seen: dict[tuple[Path, int], int] = {}
    for i, name in enumerate(names):
        try:
            idx, stack = parse_image_name(name, star, i)
        except ParticleFileError as e:
            problems.append(Problem(star, i + 1, name, str(e).split(": ", 2)[-1],
                                    "write _rlnImageName as index@stack with a 1-based index"))
            continue
        if stack not in resolved:
            resolved[stack] = table.resolve(stack)
        path = resolved[stack]
        key = (path, idx)
        if key in seen:
            problems.append(Problem(star, i + 1, name,
                                    "the same image is referenced more than once",
                                    "remove the duplicate rows (exclusion keeps the first occurrence)"))
            continue
        seen[key] = i
        refs[path].append((i, idx))

    # ---- stacks -------------------------------------------------------------------------
    boxes: dict[Path, tuple[int, int]] = {}
    image_size = None
    try:
        v = table.column("rlnImageSize")
        image_size = None if v is None else np.asarray(v, dtype=np.float64)
    except (ParticleFileError, ValueError, TypeError):
        image_size = None
    for path in sorted(refs):
        entries = refs[path]
        rows = tuple(r + 1 for r, _ in entries)

        def stack_problem(message, fix):
            problems.append(Problem(str(path), None, None, message, fix, scope="stack", rows=rows))

        if not path.exists():
            hint = f" (also looked under the project root {table.root})" if table.root is not None else ""
            stack_problem(f"stack file not found{hint}",
                          "copy or link the stacks next to the STAR file, or give the project root (--root)")
            continue
        if path.is_dir():
            stack_problem("is a folder, not a stack file", "point _rlnImageName at the .mrcs stack")
            continue
        if not os.access(path, os.R_OK):
            stack_problem("stack file is not readable (permissions)", "make the file readable")
            continue
        try:
            mrc = open_stack(path)
        except StackError as e:
            stack_problem(f"corrupt or truncated MRC file: {str(e).split(': ', 1)[-1]}",
                          "re-extract or re-copy the stack, or exclude its particles")
            continue
        with mrc:
            data = stack_data(mrc)
            size = path.stat().st_size
            expected = MRC_HEADER_BYTES + int(mrc.header.nsymbt) + data.nbytes
            if size != expected:
                stack_problem(f"file is {size} bytes but its header describes {expected} bytes "
                              f"({data.shape[0]} images of {data.shape[2]}×{data.shape[1]}, mode {int(mrc.header.mode)})"
                              + ("; truncated?" if size < expected else "; corrupt header or data appended?"),
                              "re-extract or re-copy the stack, or exclude its particles")
                continue
            nimg, ny, nx = data.shape
            if nx != ny:
                stack_problem(f"images are not square ({nx}×{ny} px)", "re-extract with a square box")
                continue
            boxes[path] = (ny, nx)
            if image_size is not None:
                want = {int(image_size[r]) for r, _ in entries if np.isfinite(image_size[r])}
                if want and want != {nx}:
                    stack_problem(f"box {nx} px but _rlnImageSize says {', '.join(map(str, sorted(want)))}",
                                  "fix _rlnImageSize in the optics block, or point to the right stacks")
            inside = []
            for r, idx in entries:
                if idx >= nimg:
                    problems.append(Problem(str(path), r + 1, names[r],
                                            f"index {idx + 1} is past the end of the stack ({nimg} images)",
                                            "fix _rlnImageName, or exclude the particle"))
                else:
                    inside.append((idx, r))
            if check_pixels and inside:
                inside.sort()
                for start in range(0, len(inside), max(1, int(batch))):
                    chunk = inside[start:start + max(1, int(batch))]
                    idx = np.fromiter((k for k, _ in chunk), dtype=np.int64, count=len(chunk))
                    block = np.asarray(data[idx])
                    flat = block.reshape(len(chunk), -1)
                    finite = np.isfinite(flat).all(axis=1)
                    for j in np.flatnonzero(~finite):
                        r = chunk[j][1]
                        problems.append(Problem(str(path), r + 1, names[r],
                                                "image has non-finite pixels (NaN or Inf)",
                                                "exclude the particle, or re-extract it"))
                    with np.errstate(invalid="ignore"):
                        flatness = finite & (flat.max(axis=1) == flat.min(axis=1))
                    for j in np.flatnonzero(flatness):
                        r = chunk[j][1]
                        problems.append(Problem(str(path), r + 1, names[r],
                                                "image is constant (every pixel has the same value)",
                                                "exclude the particle (blank image, e.g. extracted off the micrograph)"))

    # ---- box sizes across stacks --------------------------------------------------------
    if len(set(boxes.values())) > 1:
        weight = Counter()
        for path, box in boxes.items():
            weight[box] += len(refs[path])
        main = weight.most_common(1)[0][0]
        for path, box in boxes.items():
            if box != main:
                rows = tuple(r + 1 for r, _ in refs[path])
                problems.append(Problem(str(path), None, None,
                                        f"box {box[1]}×{box[0]} px differs from the {main[1]}×{main[0]} px of the "
                                        "other stacks",
                                        "re-extract all particles with the same box, or exclude these",
                                        scope="stack", rows=rows))
    return problems


def _row_ranges(rows, max_ranges: int = 4) -> str:
    """'rows 9-16, 20' for the 1-based rows (consecutive rows as ranges; at most max_ranges)."""
    rows = sorted(int(r) for r in rows)
    ranges: list[list[int]] = []
    for r in rows:
        if ranges and r == ranges[-1][1] + 1:
            ranges[-1][1] = r
        else:
            ranges.append([r, r])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in ranges[:max_ranges])
    more = f" and {len(ranges) - max_ranges} more ranges" if len(ranges) > max_ranges else ""
    return f"row{'s' if len(rows) != 1 else ''} {text}{more}"


def format_report(problems: list[Problem], max_rows: int = 5, max_groups: int = 50) -> str:
    """A human-readable summary of ALL problems, grouped by kind (and file for particles)."""
    if not problems:
        return "No problems found."
    groups: dict[tuple, list[Problem]] = defaultdict(list)
    for p in problems:
        file = "" if p.scope == "stack" else p.file      # stacks with the same problem: one group
        groups[(p.scope, file, p.message, p.fix)].append(p)
    affected = {r for p in problems for r in p.affected_rows()}
    table_level = sum(1 for p in problems if p.scope == "table")
    lines = [f"{len(problems)} problem{'s' if len(problems) != 1 else ''} found "
             f"({table_level} about the whole input, {len(affected)} particles affected):"]
    order = sorted(groups.items(), key=lambda kv: ({"table": 0, "stack": 1, "particle": 2}[kv[0][0]], kv[0][1]))
    for k, ((scope, file, message, fix), items) in enumerate(order):
        if k == max_groups:
            lines.append(f"… and {len(order) - max_groups} more kinds of problem")
            break
        if scope == "table":
            lines.append(f"- {file}: {message}")
        elif scope == "stack":
            nrows = sum(len(p.rows) for p in items)
            shown = ", ".join(f"{p.file} ({len(p.rows)} particle{'s' if len(p.rows) != 1 else ''}: "
                              f"{_row_ranges(p.rows)})" for p in items[:max_rows])
            more = f" and {len(items) - max_rows} more" if len(items) > max_rows else ""
            lines.append(f"- {message}: {len(items)} stack{'s' if len(items) != 1 else ''}, {nrows} particles"
                         f"\n    {shown}{more}")
        else:
            shown = ", ".join(f"row {p.row} ({p.image_name})" for p in items[:max_rows])
            more = f" and {len(items) - max_rows} more" if len(items) > max_rows else ""
            lines.append(f"- {file}: {message}\n    {len(items)} particle{'s' if len(items) != 1 else ''}: "
                         f"{shown}{more}")
        lines.append(f"    fix: {fix}")
    return "\n".join(lines)


def exclude_bad(table: ParticleTable, problems: list[Problem]) -> tuple[ParticleTable, pd.DataFrame]:
    """(table without the particles of stack- and particle-scope problems, the excluded rows).

    The excluded DataFrame holds `row` (1-based row in the input), `reason` (all problems of
    that particle, '; '-joined) and every particle column; good + excluded = input."""
    reasons: dict[int, list[str]] = defaultdict(list)
    for p in problems:
        if p.scope == "table":
            continue
        text = p.message if p.scope == "particle" else f"{p.file}: {p.message}"
        for r in p.affected_rows():
            reasons[int(r)].append(text)
    bad = np.array(sorted(reasons), dtype=np.int64) - 1
    keep = np.setdiff1d(np.arange(len(table)), bad)
    excluded = table.particles.iloc[bad].copy()
    excluded.insert(0, "reason", ["; ".join(reasons[int(r) + 1]) for r in bad])
    excluded.insert(0, "row", bad + 1)
    return table.subset(keep), excluded.reset_index(drop=True)


# ---- command line ------------------------------------------------------------------------

def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `clcluster check`."""
    parser.add_argument("particles", help="particle file: RELION .star or cryoSPARC .cs")
    parser.add_argument("--root", default=None, help="project folder that stack paths are relative to "
                                                     "(default: the particle file's folder)")
    parser.add_argument("--classes", type=int, default=None, metavar="K", help="number of classes to be asked for")
    parser.add_argument("--no-ctf", action="store_true", help="CTF correction is off: do not require CTF columns")
    parser.add_argument("--no-pixels", action="store_true", help="do not read the images (skip NaN/blank checks)")
    parser.add_argument("--batch", type=int, default=256, help="images read at a time (default 256)")
    parser.add_argument("--exclude-bad", metavar="OUT_STAR", default=None,
                        help="write the particles without problems to OUT_STAR (input flavour kept)")
    parser.add_argument("--excluded-list", metavar="CSV", default=None,
                        help="with --exclude-bad: where to list the excluded particles and why "
                             "(default: OUT_STAR with .excluded.csv)")
    return parser


def main(args) -> int:
    """Run the checks; 0 when the input is usable (or made usable by --exclude-bad), 1 when
    problems remain, 2 when the particle file itself cannot be read."""
    from .io.particles import read_particles

    if args.excluded_list and not args.exclude_bad:
        print("error: --excluded-list needs --exclude-bad OUT_STAR", file=sys.stderr)
        return 2
    try:
        table = read_particles(args.particles, root=args.root)
    except ParticleFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems = check_particles(table, ctf_required=not args.no_ctf, classes=args.classes,
                               check_pixels=not args.no_pixels, batch=args.batch)
    print(f"{args.particles}: {len(table)} particles, {table.flavour} flavour")
    print(format_report(problems))
    if not args.exclude_bad:
        return 1 if problems else 0
    if any(p.scope == "table" for p in problems):
        print("not writing the selection: problems about the whole input cannot be fixed by excluding particles",
              file=sys.stderr)
        return 1
    good, excluded = exclude_bad(table, problems)
    out = Path(args.exclude_bad)
    csv = Path(args.excluded_list) if args.excluded_list else out.with_suffix(".excluded.csv")
    if len(good) == 0:
        print("not writing the selection: every particle has a problem", file=sys.stderr)
        return 1
    write_star(out, good.with_absolute_paths())  # stack paths absolute: OUT_STAR may live anywhere
    with atomic_path(csv) as tmp:
        excluded.to_csv(tmp, index=False)
    print(f"excluded {len(excluded)} of {len(table)} particles (listed in {csv}); {len(good)} written to {out}")
    if args.classes is not None and args.classes > len(good):
        print(f"error: {args.classes} classes but only {len(good)} particles remain", file=sys.stderr)
        return 1
    return 0
