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

from clcluster.image.ctf import CTF_LABELS, PHASE_FLIPPED, PREMULTIPLIED, RAW, SIGN_CONVENTION, ctf_states, state_counts
from clcluster.io.atomic import atomic_path
from clcluster.io.mrc import (
    MRC_HEADER_BYTES,
    WHOLE_FILE_FIX,
    StackError,
    compression,
    open_stack,
    readable_images,
    stack_data,
    whole_file_problem,
)
from clcluster.io.star import ParticleFileError, ParticleTable, parse_image_name, write_star


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


# The smallest input every step supports: training draws batches of distinct particles (batch
# statistics need more than one), K-means needs at least K particles, the half-set FRC needs two
# particles per class and the t-SNE map a few points. Below this, `check` refuses before any work.
MIN_PARTICLES = 10
MIN_PER_CLASS = 2


def min_particles(classes: int | None) -> int:
    """Particles the pipeline needs for K classes: max(MIN_PARTICLES, MIN_PER_CLASS x K)."""
    return max(MIN_PARTICLES, MIN_PER_CLASS * int(classes or 1))


@dataclasses.dataclass
class CheckInput:
    """What the checkers share: the table, the options, and what earlier checkers found
    (`refs`: stack -> [(0-based row, 0-based index)], `whole`: stacks named without index@,
    `boxes`: stack -> (ny, nx) of the readable stacks)."""

    table: ParticleTable
    ctf_required: bool = True
    classes: int | None = None
    check_pixels: bool = True
    batch: int = 256
    names: list = dataclasses.field(default_factory=list)
    refs: dict = dataclasses.field(default_factory=lambda: defaultdict(list))
    whole: set = dataclasses.field(default_factory=set)
    boxes: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)

    @property
    def star(self) -> str:
        return str(self.table.path) if self.table.path is not None else "<particles>"

    def table_problem(self, message, fix) -> Problem:
        return Problem(self.star, None, None, message, fix, scope="table")

    def particle_problem(self, i: int, message, fix, file=None) -> Problem:
        return Problem(file or self.star, int(i) + 1, self.names[i], message, fix)


def check_size(c: CheckInput) -> list[Problem]:
    """Empty file, more classes than particles, fewer particles than the pipeline needs."""
    n, k = len(c.table), c.classes
    if n == 0:
        return [c.table_problem("the particle file holds no particles (empty loop)",
                                "point to the particle file of a job that produced particles")]
    if k is not None and (k < 1 or k > n):
        return [c.table_problem(f"{k} classes asked for but there are {n} particles",
                                "ask for at least 1 and at most as many classes as particles "
                                "(in practice far fewer: a few hundred particles per class or more)")]
    need = min_particles(k)
    if k is not None and n < need:
        return [c.table_problem(
            f"{n} particle{'s' if n != 1 else ''}: too few to classify{f' into {k} classes' if k else ''} "
            f"(the pipeline needs at least {need}: {MIN_PARTICLES} to train on batches of distinct particles, "
            f"and {MIN_PER_CLASS} per class for K-means and the half-set resolution)",
            "classify more particles, or ask for fewer classes")]
    return []


def check_pixel_sizes(c: CheckInput) -> list[Problem]:
    """Optics groups defined for every particle; a positive pixel size, the same within a group."""
    table, problems = c.table, []
    group_rows = np.zeros(len(table), dtype=int)
    if table.optics is not None:
        try:
            group_rows = table.optics_group_rows()
        except ParticleFileError as e:
            problems.append(c.table_problem(str(e), "give every particle an _rlnOpticsGroup that the optics block defines"))
    try:
        apix = np.asarray(table.pixel_size(), dtype=np.float64)
    except (ParticleFileError, ValueError) as e:
        return problems + [c.table_problem(str(e), "add _rlnImagePixelSize to the optics block (RELION 3.1+) or "
                                                   "_rlnMagnification and _rlnDetectorPixelSize to the particles (RELION 3.0)")]
    ok = np.isfinite(apix) & (apix > 0)
    for i in np.flatnonzero(~ok):
        problems.append(c.particle_problem(i, "pixel size is not a positive number", "fix the pixel size columns of this particle"))
    groups = table.optics["rlnOpticsGroup"].to_numpy()[group_rows] if (
        table.optics is not None and "rlnOpticsGroup" in table.optics) else group_rows + 1
    for g in np.unique(groups):
        sel = np.flatnonzero((groups == g) & ok)
        values = np.round(apix[sel], 4)
        counts = Counter(values.tolist())
        if len(counts) > 1:
            main, _ = counts.most_common(1)[0]
            where = f"optics group {g}" if table.optics is not None else "the particle file (no optics groups)"
            for i in sel[values != main]:
                problems.append(c.particle_problem(
                    i, f"pixel size {apix[i]:g} Å differs from the {main:g} Å of the other particles of {where}",
                    "put particles with different pixel sizes into different optics groups, or exclude them"))
    return problems


def check_ctf(c: CheckInput) -> list[Problem]:
    """With CTF correction on: every CTF column present, numeric and finite; defocus >= 0
    (positive = underfocus; negative values are refused, never silently used)."""
    if not c.ctf_required:
        return []
    table, problems = c.table, []
    missing = []
    for label in CTF_LABELS:
        try:
            if table.column(label) is None:
                missing.append(label)
        except ParticleFileError:
            missing.append(label)
    if missing:
        return [c.table_problem(
            f"CTF correction is on but the particles lack {', '.join('_' + m for m in missing)}",
            "add the CTF columns (CTF estimation results; voltage, Cs and amplitude contrast belong in the optics "
            "block of RELION 3.1+ files); run without CTF correction (--no-ctf, config preprocess.ctf: none) only "
            "for 2D particle images whose CTF is already corrected or negligible")]
    values = {}
    for label in CTF_LABELS:
        try:
            values[label] = np.asarray(table.column(label), dtype=np.float64)
        except (ValueError, TypeError, ParticleFileError):
            problems.append(c.table_problem(f"_{label} holds non-numeric values", "fix the CTF columns"))
            continue
        for i in np.flatnonzero(~np.isfinite(values[label])):
            problems.append(c.particle_problem(i, f"CTF parameter _{label} is not finite",
                                               "re-run CTF estimation for this micrograph, or exclude the particle"))
    if "rlnDefocusU" in values and "rlnDefocusV" in values:
        problems += _defocus_sign(c, values["rlnDefocusU"], values["rlnDefocusV"])
    return problems


def _defocus_sign(c: CheckInput, du, dv) -> list[Problem]:
    with np.errstate(invalid="ignore"):
        neg = np.flatnonzero((du < 0) | (dv < 0))
    if not neg.size:
        return []
    fix = ("clcluster assumes " + SIGN_CONVENTION + ": if the tool that wrote the file uses the opposite sign, "
           "negate _rlnDefocusU and _rlnDefocusV; if these particles are really overfocus, exclude them")
    if neg.size == len(du):  # a sign convention, not a few bad rows: the whole input
        return [c.table_problem(f"every defocus value is negative ({np.nanmin(np.minimum(du, dv)):g} to "
                                f"{np.nanmax(np.maximum(du, dv)):g} Å): the CTF correction would invert the contrast", fix)]
    return [c.particle_problem(i, "negative defocus (the CTF correction would invert its contrast)", fix) for i in neg]


def check_image_names(c: CheckInput) -> list[Problem]:
    """Every `_rlnImageName` parses; no image referenced twice. Fills c.refs and c.whole."""
    table, problems = c.table, []
    resolved: dict[str, Path] = {}
    seen: dict[tuple[Path, int], int] = {}
    for i, name in enumerate(c.names):
        try:
            idx, stack = parse_image_name(name, c.star, i)
        except ParticleFileError as e:
            problems.append(c.particle_problem(i, str(e).split(": ", 2)[-1],
                                               "write _rlnImageName as index@stack with a 1-based index"))
            continue
        if stack not in resolved:
            resolved[stack] = table.resolve(stack)
        path = resolved[stack]
        if "@" not in name:
            c.whole.add(path)
        if (path, idx) in seen:
            problems.append(c.particle_problem(i, "the same image is referenced more than once",
                                               "remove the duplicate rows (exclusion keeps the first occurrence)"))
            continue
        seen[(path, idx)] = i
        c.refs[path].append((i, idx))
    return problems


def check_stacks(c: CheckInput) -> list[Problem]:
    """Each referenced stack: present, readable, not compressed, its size agreeing with its
    header, square images of the box `_rlnImageSize` says, indices inside the readable part,
    images named without index@ that really are single 2D images, and (check_pixels) finite,
    non-constant pixels."""
    problems: list[Problem] = []
    try:
        v = c.table.column("rlnImageSize")
        image_size = None if v is None else np.asarray(v, dtype=np.float64)
    except (ParticleFileError, ValueError, TypeError):
        image_size = None
    for path in sorted(c.refs):
        problems += _check_stack(c, path, image_size)
    return problems


def _check_stack(c: CheckInput, path: Path, image_size) -> list[Problem]:
    entries = c.refs[path]
    rows = tuple(r + 1 for r, _ in entries)
    stack = lambda message, fix: [Problem(str(path), None, None, message, fix, scope="stack", rows=rows)]
    recopy = "re-extract or re-copy the stack, or exclude its particles"
    if not path.exists():
        hint = f" (also looked under the project root {c.table.root})" if c.table.root is not None else ""
        return stack(f"stack file not found{hint}",
                     "copy or link the stacks next to the STAR file, or give the project root (--root)")
    if path.is_dir():
        return stack("is a folder, not a stack file", "point _rlnImageName at the .mrcs stack")
    if not os.access(path, os.R_OK):
        return stack("stack file is not readable (permissions)", "make the file readable")
    kind = compression(path)
    if kind is not None:
        return stack(f"stack is {kind[0]}-compressed (stacks are read through a memory map)",
                     f"decompress it ({kind[1]} FILE) and name the decompressed file in _rlnImageName")
    try:
        mrc = open_stack(path)
    except StackError as e:
        return stack(f"corrupt or truncated MRC file: {str(e).split(': ', 1)[-1]}", recopy)
    with mrc:
        data = stack_data(mrc)
        n_ok, n_claimed = readable_images(mrc)
        expected = MRC_HEADER_BYTES + int(mrc.header.nsymbt) + data.nbytes
        size = path.stat().st_size
        if n_ok == n_claimed and size != expected:
            return stack(f"file is {size} bytes but its header describes {expected} bytes "
                         f"({data.shape[0]} images of {data.shape[2]}×{data.shape[1]}, mode {int(mrc.header.mode)})"
                         + ("; truncated?" if size < expected else "; corrupt header or data appended?"), recopy)
        what = whole_file_problem(mrc) if path in c.whole else None
        if what is not None:
            return stack(f"the file is {what}, but _rlnImageName names the whole file (no index@) as one particle",
                         WHOLE_FILE_FIX)
        nimg, ny, nx = data.shape
        if nx != ny:
            return stack(f"images are not square ({nx}×{ny} px)", "re-extract with a square box")
        c.boxes[path] = (ny, nx)
        problems = []
        if image_size is not None:
            want = {int(image_size[r]) for r, _ in entries if np.isfinite(image_size[r])}
            if want and want != {nx}:
                problems += stack(f"box {nx} px but _rlnImageSize says {', '.join(map(str, sorted(want)))}",
                                  "fix _rlnImageSize in the optics block, or point to the right stacks")
        inside, past = _split_inside(c, path, entries, nimg, n_claimed)
        problems += past
        if n_ok < n_claimed and inside:
            c.notes.append(f"{path}: the header claims {n_claimed} images but the file holds only images 1-{n_ok} "
                           f"(truncated); the {len(inside)} particles it serves ask for readable images")
        if c.check_pixels and inside:
            problems += _pixel_problems(c, path, data, inside)
    return problems


def _split_inside(c: CheckInput, path, entries, nimg: int, n_claimed: int):
    """([(index, row)] of images inside the readable part, problems for those past it)."""
    inside, problems = [], []
    for r, idx in entries:
        if idx < nimg:
            inside.append((idx, r))
        elif idx < n_claimed:
            problems.append(c.particle_problem(
                r, f"image {idx + 1} is not in the file: its header claims {n_claimed} images but the file holds only "
                   f"images 1-{nimg} (truncated)", "re-copy or re-extract the stack, or exclude the particle (--exclude-bad)",
                file=str(path)))
        else:
            problems.append(c.particle_problem(r, f"index {idx + 1} is past the end of the stack ({nimg} images)",
                                               "fix _rlnImageName, or exclude the particle", file=str(path)))
    return inside, problems


def _pixel_problems(c: CheckInput, path, data, inside) -> list[Problem]:
    """Non-finite or constant images among `inside` [(index, row)], read in batches."""
    problems = []
    inside = sorted(inside)
    step = max(1, int(c.batch))
    for start in range(0, len(inside), step):
        chunk = inside[start:start + step]
        idx = np.fromiter((k for k, _ in chunk), dtype=np.int64, count=len(chunk))
        flat = np.asarray(data[idx]).reshape(len(chunk), -1)
        finite = np.isfinite(flat).all(axis=1)
        for j in np.flatnonzero(~finite):
            problems.append(c.particle_problem(chunk[j][1], "image has non-finite pixels (NaN or Inf)",
                                               "exclude the particle, or re-extract it", file=str(path)))
        with np.errstate(invalid="ignore"):
            flatness = finite & (flat.max(axis=1) == flat.min(axis=1))
        for j in np.flatnonzero(flatness):
            problems.append(c.particle_problem(chunk[j][1], "image is constant (every pixel has the same value)",
                                               "exclude the particle (blank image, e.g. extracted off the micrograph)",
                                               file=str(path)))
    return problems


def check_boxes(c: CheckInput) -> list[Problem]:
    """Every readable stack has the box of the majority of the particles."""
    if len(set(c.boxes.values())) <= 1:
        return []
    weight = Counter()
    for path, box in c.boxes.items():
        weight[box] += len(c.refs[path])
    main = weight.most_common(1)[0][0]
    return [Problem(str(path), None, None,
                    f"box {box[1]}×{box[0]} px differs from the {main[1]}×{main[0]} px of the other stacks",
                    "re-extract all particles with the same box, or exclude these",
                    scope="stack", rows=tuple(r + 1 for r, _ in c.refs[path]))
            for path, box in c.boxes.items() if box != main]


# In order; each returns its problems. check_image_names fills the references the stack checks use.
CHECKERS = (check_pixel_sizes, check_ctf, check_image_names, check_stacks, check_boxes)


def check_particles(table: ParticleTable, *, ctf_required: bool = True, classes: int | None = None,
                    check_pixels: bool = True, batch: int = 256, notes: list | None = None) -> list[Problem]:
    """All problems of `table` and its stacks, as a list (empty when all is well).

    ctf_required: CTF correction is on, so defocus U/V/angle, voltage (kV), Cs (mm) and
    amplitude contrast must be present and finite for every particle, defocus >= 0 Å.
    classes: the number of classes K asked for (1 <= K <= particles; at least
    `min_particles(K)` particles). check_pixels: read every referenced image (in batches of
    `batch` images through the memory map) to find non-finite or constant images.
    notes: a list that receives remarks that are not problems (e.g. truncated stacks whose
    referenced images are all present)."""
    c = CheckInput(table, ctf_required, classes, check_pixels, batch)
    problems = check_size(c)
    if len(table) == 0:
        return problems
    if "rlnImageName" not in table.particles.columns:
        return problems + [c.table_problem("no _rlnImageName column: the particles do not say where their images are",
                                           "pass a particle STAR file (e.g. from Extract, Select or Class2D)")]
    c.names = _names(table)
    for checker in CHECKERS:
        problems += checker(c)
    if notes is not None:
        notes.extend(c.notes)
    return problems


def plan_lines(table: ParticleTable, ctf_required: bool) -> list[str]:
    """What the pipeline will do about the CTF state flags and the defocus sign convention."""
    if len(table) == 0:
        return []
    try:
        states = state_counts(ctf_states(table))
    except ParticleFileError:  # optics groups undefined: reported as a problem
        return []
    if not ctf_required:
        what = "CTF correction off (--no-ctf): images used as they are"
    elif any(table.column(label) is None for label in CTF_LABELS):
        return ["CTF: the particles lack CTF columns, so preprocessing cannot correct them (see the problems below)"]
    else:
        parts = {RAW: "CTF-corrected by preprocessing (config preprocess.ctf)",
                 PHASE_FLIPPED: "already phase flipped (_rlnCtfDataArePhaseFlipped 1): not flipped again",
                 PREMULTIPLIED: "already multiplied by the CTF (_rlnCtfDataAreCtfPremultiplied 1): not flipped or "
                                "multiplied again; CTF^2 weights in the class averages"}
        what = "; ".join(f"{k} particles {parts[s]}" for s, k in states.items())
    lines = [f"CTF: {what}"]
    if ctf_required:
        lines.append(f"defocus sign: {SIGN_CONVENTION}; negative defocus is refused")
    return lines


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
    parser.add_argument("--count-only", action="store_true",
                        help="only check the number of particles against --classes (reads no stack)")
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
    from clcluster.io.particles import read_particles

    if args.excluded_list and not args.exclude_bad:
        print("error: --excluded-list needs --exclude-bad OUT_STAR", file=sys.stderr)
        return 2
    try:
        table = read_particles(args.particles, root=args.root)
    except ParticleFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.count_only:
        problems = check_size(CheckInput(table, classes=args.classes))
        print(f"{args.particles}: {len(table)} particles")
        print(format_report(problems))
        return 1 if problems else 0
    notes: list[str] = []
    problems = check_particles(table, ctf_required=not args.no_ctf, classes=args.classes,
                               check_pixels=not args.no_pixels, batch=args.batch, notes=notes)
    print(f"{args.particles}: {len(table)} particles, {table.flavour} flavour")
    for line in plan_lines(table, ctf_required=not args.no_ctf) + [f"note: {n}" for n in notes]:
        print(line)
    print(format_report(problems))
    if not args.exclude_bad:
        return 1 if problems else 0
    return _write_selection(args, table, problems)


def _write_selection(args, table: ParticleTable, problems: list[Problem]) -> int:
    """--exclude-bad: the good particles to OUT_STAR and the excluded ones (with reasons) to the
    CSV, both or neither (written under temporary names, renamed when both are complete)."""
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
    with atomic_path(csv) as tmp_csv, atomic_path(out) as tmp_star:
        write_star(tmp_star, good.with_absolute_paths())  # stack paths absolute: OUT_STAR may live anywhere
        excluded.to_csv(tmp_csv, index=False)
    print(f"excluded {len(excluded)} of {len(table)} particles (listed in {csv}); {len(good)} written to {out}")
    if args.classes is not None and len(good) < min_particles(args.classes):
        print(f"error: {args.classes} classes but only {len(good)} particles remain (at least "
              f"{min_particles(args.classes)} needed)", file=sys.stderr)
        return 1
    return 0
