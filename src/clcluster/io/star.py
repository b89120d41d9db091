"""RELION STAR particle files through `starfile`: read, resolve optics, write in the input's flavour.

A `ParticleTable` holds the particle rows (a pandas DataFrame, column names without the
leading underscore, as `starfile` gives them), the optics block when there is one (RELION
3.1+), and the names of the blocks, so that what is written keeps the input's flavour,
every column and the optics block. Indices inside the package are 0-based; `_rlnImageName`
is `index@stack` with a 1-based index.

Reading is `starfile` after a light line scan of the text (`_scan_star`) that refuses
what `starfile` would silently misread (rows with too few or too many values, repeated
labels, labels after data rows, two loops in one block) and cleans what it stumbles on
(byte-order mark, `stop_` lines, comments or blank lines between labels, empty `data_`
blocks, repeated block names, key-value blocks). Files written by RELION 1.x-5.x,
cryoDRGN, pyem, Scipion, Warp and hand-edited variants are read; anything else is refused
with a `ParticleFileError` that names the file and says why.

Units: pixel size in Å/px (RELION <= 3.0: `_rlnDetectorPixelSize` [µm] * 1e4 /
`_rlnMagnification`), defocus in Å, angles in degrees, voltage in kV, Cs in mm.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from clcluster.io.atomic import atomic_path


class ParticleFileError(ValueError):
    """A particle file that cannot be used; the message names the file and what is wrong."""


@dataclasses.dataclass
class ParticleTable:
    """Particles of one STAR file.

    particles: one row per particle (columns like "rlnImageName", "rlnDefocusU").
    optics: the optics groups (RELION 3.1+), or None for the 3.0 flavour.
    path: the STAR file it came from (stack paths are relative to its folder).
    root: optional project root that stack paths are resolved against first.
    particles_block / optics_block: block names in the source file ("" for `data_`).
    version: the `# version NNNNN` number of the source file, if it had one.
    """

    particles: pd.DataFrame
    optics: pd.DataFrame | None = None
    path: Path | None = None
    root: Path | None = None
    particles_block: str = "particles"
    optics_block: str = "optics"
    version: int | None = None

    @property
    def flavour(self) -> str:
        return "3.1" if self.optics is not None else "3.0"

    def __len__(self) -> int:
        return len(self.particles)

    def subset(self, rows) -> "ParticleTable":
        """A table with the given 0-based rows (same optics, same origin)."""
        return dataclasses.replace(self, particles=self.particles.iloc[rows].reset_index(drop=True))

    def with_particles(self, particles: pd.DataFrame) -> "ParticleTable":
        return dataclasses.replace(self, particles=particles.reset_index(drop=True))

    @property
    def folder(self) -> Path:
        return self.path.parent if self.path is not None else Path(".")

    # ---- per-particle values merged from the optics block -------------------------------
    def column(self, name: str, default=None) -> np.ndarray | None:
        """Per-particle values of a RELION label ("rlnVoltage"), from the particle rows or
        from the particle's optics group; `default` (or None) when absent in both."""
        if name in self.particles.columns:
            return self.particles[name].to_numpy()
        if self.optics is not None and name in self.optics.columns:
            groups = self.optics_group_rows()
            return self.optics[name].to_numpy()[groups]
        if default is None:
            return None
        return np.full(len(self.particles), default)

    def optics_group_rows(self) -> np.ndarray:
        """Row of the optics block for each particle (by `rlnOpticsGroup` number)."""
        if self.optics is None:
            raise ParticleFileError(f"{self.path}: no optics block")
        if "rlnOpticsGroup" not in self.particles.columns:
            if len(self.optics) == 1:
                return np.zeros(len(self.particles), dtype=int)
            raise ParticleFileError(
                f"{self.path}: {len(self.optics)} optics groups but the particles have no _rlnOpticsGroup column")
        numbers = self.optics["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in self.optics else np.arange(1, len(self.optics) + 1)
        try:
            lookup = {int(n): i for i, n in enumerate(numbers)}
        except (TypeError, ValueError):
            raise ParticleFileError(f"{self.path}: optics block has non-integer _rlnOpticsGroup values "
                                    f"{list(numbers)}") from None
        if len(lookup) != len(numbers):
            raise ParticleFileError(f"{self.path}: optics block defines the same _rlnOpticsGroup twice "
                                    f"({list(numbers)})")
        groups = self.particles["rlnOpticsGroup"].to_numpy()
        rows = np.empty(len(groups), dtype=int)
        for i, g in enumerate(groups):
            try:
                rows[i] = lookup[int(g)]
            except (KeyError, ValueError, TypeError):
                raise ParticleFileError(
                    f"{self.path}: particle row {i + 1} ({self.image_name(i)}) names optics group {g}, "
                    f"which the optics block does not define (groups {sorted(lookup)})") from None
        return rows

    def image_name(self, i: int) -> str:
        if "rlnImageName" in self.particles.columns:
            return str(self.particles["rlnImageName"].iloc[i])
        return f"row {i + 1}"

    def pixel_size(self) -> np.ndarray:
        """Pixel size of each particle image in Å/px (ImagePixelSize, PixelSize, or
        DetectorPixelSize [µm] * 1e4 / Magnification for RELION <= 3.0)."""
        for label in ("rlnImagePixelSize", "rlnPixelSize"):
            v = self.column(label)
            if v is not None:
                return _as_float(v, label, self.path)
        det, mag = self.column("rlnDetectorPixelSize"), self.column("rlnMagnification")
        if det is not None and mag is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                return _as_float(det, "rlnDetectorPixelSize", self.path) * 1e4 / _as_float(mag, "rlnMagnification", self.path)
        if det is not None:
            d = np.unique(_as_float(det, "rlnDetectorPixelSize", self.path))
            raise ParticleFileError(
                f"{self.path}: _rlnDetectorPixelSize ({', '.join(f'{x:g}' for x in d[:3])} µm) without "
                "_rlnMagnification: the pixel size is undefined (Scipion writes such files with an implied "
                f"magnification of 10000, i.e. {d[0]:g} Å/px); add a _rlnMagnification column or an optics "
                "block with _rlnImagePixelSize")
        hint = ""
        if self.optics is None and "rlnOpticsGroup" in self.particles.columns:
            hint = (" The particles carry _rlnOpticsGroup (RELION 3.1 style) but the file has no data_optics "
                    "block, which is where RELION 3.1+ keeps the pixel size, voltage, Cs and amplitude contrast.")
        raise ParticleFileError(
            f"{self.path}: no pixel size anywhere (need _rlnImagePixelSize in the optics block, "
            f"_rlnPixelSize, or _rlnDetectorPixelSize with _rlnMagnification).{hint}")

    # ---- image references ---------------------------------------------------------------
    def image_refs(self) -> tuple[list[Path], np.ndarray]:
        """(stack path, 0-based index) of every particle, paths resolved against the project
        root (if given and the file exists there), else the STAR file's folder."""
        if "rlnImageName" not in self.particles.columns:
            raise ParticleFileError(f"{self.path}: no _rlnImageName column; this is not a particle file")
        paths, indices = [], np.empty(len(self.particles), dtype=np.int64)
        cache: dict[str, Path] = {}
        for i, name in enumerate(self.particles["rlnImageName"].astype(str)):
            idx, stack = parse_image_name(name, self.path, i)
            indices[i] = idx
            if stack not in cache:
                cache[stack] = self.resolve(stack)
            paths.append(cache[stack])
        return paths, indices

    def whole_file_rows(self) -> np.ndarray:
        """(n,) bool: particles whose `_rlnImageName` has no `index@`, i.e. the whole file is
        meant to be the particle's image (it must then hold one 2D image)."""
        if "rlnImageName" not in self.particles.columns:
            return np.zeros(len(self.particles), bool)
        return ~self.particles["rlnImageName"].astype(str).str.contains("@", regex=False).to_numpy()

    def with_absolute_paths(self) -> "ParticleTable":
        """The same table with every `_rlnImageName` stack path made absolute (index text kept),
        so that a STAR written from it can live in any folder."""
        paths, _ = self.image_refs()
        names = self.particles["rlnImageName"].astype(str)
        idx = [name.split("@", 1)[0] + "@" if "@" in name else "" for name in names]
        parts = self.particles.copy()
        parts["rlnImageName"] = [i + str(Path(p).resolve()) for i, p in zip(idx, paths)]
        return self.with_particles(parts)

    def resolve(self, stack: str) -> Path:
        p = Path(stack)
        if p.is_absolute():
            return p
        if self.root is not None and (self.root / p).exists():
            return self.root / p
        return self.folder / p


def _as_float(values, label, path) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ParticleFileError(f"{path}: _{label} holds non-numeric values "
                                f"(e.g. {list(pd.unique(np.asarray(values, dtype=object)))[:3]})") from None


def parse_image_name(name: str, star_path=None, row: int = 0) -> tuple[int, str]:
    """Split `index@stack` (1-based index) into (0-based index, stack). A name without `@`
    is a single-image file (index 0)."""
    name = str(name).strip()
    if "@" not in name:
        if not name or name.lower() in ("nan", "<na>"):
            raise ParticleFileError(f"{star_path}: particle row {row + 1}: _rlnImageName is empty")
        return 0, name
    idx, stack = name.split("@", 1)
    try:
        i = int(idx)
    except ValueError:
        raise ParticleFileError(f"{star_path}: particle row {row + 1}: _rlnImageName {name!r} has a non-integer index") from None
    if i < 1:
        raise ParticleFileError(f"{star_path}: particle row {row + 1}: _rlnImageName {name!r} has index {i}; indices are 1-based")
    if not stack.strip():
        raise ParticleFileError(f"{star_path}: particle row {row + 1}: _rlnImageName {name!r} names no stack file")
    return i - 1, stack.strip()


# ---- reading -----------------------------------------------------------------------------

# Labels whose values are names, never numbers: keep them as text ("0003" stays "0003").
STRING_LABELS = [
    "rlnImageName", "rlnImageOriginalName", "rlnMicrographName", "rlnMicrographOriginalName",
    "rlnMicrographMovieName", "rlnMicrographMetadata", "rlnOpticsGroupName", "rlnMtfFileName",
    "rlnCtfImage", "rlnCtfPowerSpectrum", "rlnGroupName", "rlnParticleName", "rlnOriginalParticleName",
    "rlnReferenceImage", "rlnOddZernike", "rlnEvenZernike", "rlnTomoName", "rlnTomoParticleName",
    "rlnMicrographNameNoDW",
]

_TOKEN = re.compile(r'"[^"]*"|\'[^\']*\'|#|[^\s#"\']+')  # as pandas splits: '#' anywhere starts a comment
_VERSION = re.compile(r"^#\s*version\s+(\d+)")


@dataclasses.dataclass
class _Block:
    name: str
    kind: str = "empty"          # "loop", "simple" or "empty"
    labels: list = dataclasses.field(default_factory=list)
    nrows: int = 0
    first_line: int = 0
    items: dict = dataclasses.field(default_factory=dict)   # key-value blocks: label -> text


def _tokens(line: str) -> int:
    """Number of values on a data row (quoted strings count as one; `#` starts a comment)."""
    if '"' not in line and "'" not in line and "#" not in line:
        return len(line.split())
    n = 0
    for m in _TOKEN.finditer(line):
        if m.group(0) == "#":
            break
        n += 1
    return n


class _StarScanner:
    """The line-by-line state machine of `_scan_star`: `out` collects the cleaned lines,
    `blocks` the data blocks; `state` is outside | block | header | rows | simple."""

    def __init__(self, path):
        self.path = path
        self.out: list[str] = []
        self.blocks: list[_Block] = []
        self.names: dict[str, int] = {}
        self.version = None
        self.block: _Block | None = None
        self.state = "outside"
        self.simple_lines: list[tuple[str, str]] = []
        self.block_start = 0      # index in `out` where the current block starts
        self.changed = False

    def error(self, lineno: int, message: str) -> ParticleFileError:
        return ParticleFileError(f"{self.path}: line {lineno}: {message}")

    def close_block(self) -> None:
        """End the current block: drop an empty one (starfile would pair it with the next
        block's loop), rewrite a key-value block as a one-row loop when it is a single particle
        (starfile's shlex split breaks on some values) and drop it otherwise."""
        block, out = self.block, self.out
        if block is None:
            return
        if block.kind == "empty":
            del out[self.block_start:]
            self.blocks.pop()
            self.changed = True
        elif block.kind == "simple":
            del out[self.block_start:]
            self.changed = True
            block.items = {k[1:]: v.strip() for k, v in self.simple_lines}
            if any(k == "_rlnImageName" for k, _ in self.simple_lines):
                out.append(f"data_{block.name}")
                out.append("loop_")
                out.extend(k for k, _ in self.simple_lines)
                out.append(" ".join(v for _, v in self.simple_lines))
                block.kind, block.nrows = "loop", 1
                block.labels = [k[1:] for k, _ in self.simple_lines]

    def data_line(self, lineno: int, raw: str, s: str) -> None:
        """`data_NAME`: a new block (a repeated name gets a suffix: starfile would keep only the last)."""
        self.close_block()
        name = s[5:].split()[0] if s[5:].split() else ""
        if name in self.names:
            self.names[name] += 1
            new = f"{name}__{self.names[name]}"
            raw, self.changed = f"data_{new}", True
            name = new
        else:
            self.names[name] = 1
        if s != f"data_{name}":
            raw, self.changed = f"data_{name}", True
        self.block = _Block(name, first_line=lineno)
        self.blocks.append(self.block)
        self.block_start = len(self.out)
        self.simple_lines = []
        self.state = "block"
        self.out.append(raw)

    def comment(self, raw: str, s: str) -> None:
        """A comment: the first `# version N` is read; comments between labels (they end
        starfile's header) and in a loop before its first row (a loop of comments only breaks
        pandas) are dropped."""
        if self.version is None:
            m = _VERSION.match(s)
            if m:
                self.version = int(m.group(1))
        if self.state == "header" or (self.state == "rows" and self.block.nrows == 0):
            self.changed = True
            return
        self.out.append(raw)

    def loop_line(self, lineno: int, raw: str) -> None:
        block = self.block
        if block.kind == "loop":
            raise self.error(lineno, f"a second loop_ inside data_{block.name}; "
                                     "a RELION STAR file has one loop per data block")
        if block.kind == "simple":
            raise self.error(lineno, f"loop_ after key-value items in data_{block.name}")
        block.kind = "loop"
        self.state = "header"
        self.out.append(raw)

    def label_line(self, lineno: int, raw: str, s: str) -> None:
        label = s.split()[0][1:]
        if label in self.block.labels:
            raise self.error(lineno, f"label _{label} appears twice in data_{self.block.name}")
        self.block.labels.append(label)
        self.out.append(raw)

    def row_line(self, lineno: int, raw: str, s: str) -> None:
        """A data row of a loop: as many values as the loop has labels."""
        block = self.block
        if self.state == "header" and not block.labels:
            raise self.error(lineno, f"loop_ in data_{block.name} has no labels")
        if s.startswith("_"):
            raise self.error(lineno, f"label {s.split()[0]} after the data rows of data_{block.name}")
        self.state = "rows"
        n = _tokens(s)
        if n != len(block.labels):
            raise self.error(lineno, f"{n} values for the {len(block.labels)} labels of data_{block.name} "
                                     "(truncated or corrupt file, or a value with spaces that is not quoted?)")
        block.nrows += 1
        self.out.append(raw)

    def item_line(self, lineno: int, raw: str, s: str) -> None:
        """A key-value item (`_label value` outside a loop)."""
        if self.block.kind == "loop":
            raise self.error(lineno, f"key-value item after a loop in data_{self.block.name}")
        self.block.kind = "simple"
        self.state = "simple"
        parts = s.split(None, 1)
        self.simple_lines.append((parts[0], parts[1] if len(parts) > 1 else '""'))
        self.out.append(raw)

    def line(self, lineno: int, raw: str) -> None:
        """Dispatch one line by what it is and the current state."""
        s = raw.strip()
        if s.startswith("data_"):
            self.data_line(lineno, raw, s)
        elif s == "stop_":
            self.changed = True
            if self.state in ("rows", "header"):
                self.state = "block"
        elif s.startswith("#"):
            self.comment(raw, s)
        elif not s:
            if self.state == "header":
                self.changed = True
            else:
                self.out.append(raw)
        elif self.state == "outside":
            self.out.append(raw)                   # text before the first data_: starfile ignores it
        elif s.startswith("loop_"):
            self.loop_line(lineno, raw)
        elif self.state == "header" and s.startswith("_"):
            self.label_line(lineno, raw, s)
        elif self.state in ("header", "rows"):
            self.row_line(lineno, raw, s)
        elif self.state == "simple" and not s.startswith("_"):
            self.out.append(raw)                   # continuation of a key-value block (dropped below)
        elif s.startswith("_"):
            self.item_line(lineno, raw, s)
        else:
            raise self.error(lineno, f"unexpected text {s[:40]!r} in data_{self.block.name}")


def _scan_star(text: str, path) -> tuple[str, list[_Block], int | None, bool]:
    """Check the structure of STAR text line by line and clean what `starfile` misreads.

    Returns (clean text, blocks, `# version` number, whether the text was changed).
    Raises ParticleFileError for rows whose number of values differs from the number of
    labels, labels repeated within a loop, labels after data rows, two loops in one block."""
    scanner = _StarScanner(path)
    if text.startswith("\ufeff"):
        text, scanner.changed = text[1:], True
    for lineno, raw in enumerate(text.splitlines(), 1):
        scanner.line(lineno, raw)
    scanner.close_block()
    if scanner.changed:
        text = "\n".join(scanner.out) + "\n"
    return text, scanner.blocks, scanner.version, scanner.changed


def _describe(blocks: list[_Block]) -> str:
    if not blocks:
        return "no data_ blocks"
    parts = []
    for b in blocks[:6]:
        what = f"{b.nrows} rows, labels {', '.join('_' + l for l in b.labels[:3])}{', …' if len(b.labels) > 3 else ''}" \
            if b.kind == "loop" else "key-value items"
        parts.append(f"data_{b.name} ({what})")
    return "blocks: " + "; ".join(parts) + (" …" if len(blocks) > 6 else "")


def _not_particles_hint(text_head: str, blocks: list[_Block]) -> str:
    names = {b.name for b in blocks}
    labels = {l for b in blocks for l in b.labels}
    if "XMIPP_STAR" in text_head or (labels and not any(l.startswith("rln") for l in labels)):
        return "its labels lack RELION's rln prefix (Xmipp/Scipion or other non-RELION metadata)"
    if "model_general" in names or "model_classes" in names:
        return "it is a RELION model file (*_model.star); pass the *_data.star of the same run"
    if "optimiser_general" in names:
        return "it is a RELION optimiser file (*_optimiser.star); pass the *_data.star of the same run"
    if "general" in names and "fsc" in names:
        return "it is a RELION postprocess file, not a particle file"
    if blocks and all(b.kind == "loop" and b.nrows == 0 for b in blocks):
        return "its only loops are empty and have no _rlnImageName label"
    return "no data block has an _rlnImageName column"


def _is_particles(df) -> bool:
    return isinstance(df, pd.DataFrame) and "rlnImageName" in df.columns


def _is_optics(df) -> bool:
    return isinstance(df, pd.DataFrame) and "rlnOpticsGroup" in df.columns and "rlnImageName" not in df.columns and (
        "rlnVoltage" in df.columns or "rlnImagePixelSize" in df.columns or "rlnOpticsGroupName" in df.columns)


def _subtomogram_reasons(blocks: list[_Block], table: ParticleTable | None) -> list[str]:
    """What says that the particles are subtomograms (3D, or 2D stacks of tilt images)."""
    reasons = []
    for b in blocks:
        v = b.items.get("rlnTomoSubTomosAre2DStacks", "").strip("\"'")
        if v in ("1", "1.0", "true", "True"):
            reasons.append(f"data_{b.name} says _rlnTomoSubTomosAre2DStacks {v}: each particle is a stack of "
                           "tilt images (the 2D-stack subtomograms RELION 5 and WarpTools write)")
    if table is not None:
        dims = table.column("rlnImageDimensionality")
        if dims is not None:
            d = pd.to_numeric(pd.Series(dims), errors="coerce").to_numpy()
            if np.any(d == 3):
                reasons.append(f"_rlnImageDimensionality is 3 for {int(np.sum(d == 3))} particles (subtomograms)")
    return reasons


def _refuse_subtomograms(path, blocks: list[_Block], table: ParticleTable | None = None) -> None:
    """Raise ParticleFileError for subtomogram particle files (never read one tilt image or
    one z-slice as the particle)."""
    reasons = _subtomogram_reasons(blocks, table)
    if reasons:
        raise ParticleFileError(
            f"{path}: subtomogram particles, not 2D particle images ({'; '.join(reasons)}). clcluster "
            "classifies single 2D particle images, one image per _rlnImageName (index@stack); extract 2D "
            "particles from the micrographs (e.g. RELION Extract), or project the subtomograms, and classify "
            "those")


def _read_text(path: Path) -> str:
    """The text of a STAR file (UTF-8, else Latin-1); refuses missing files, folders and binary files."""
    if not path.exists():
        raise ParticleFileError(f"{path}: particle file not found")
    if path.is_dir():
        raise ParticleFileError(f"{path}: is a folder, not a particle file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ParticleFileError(f"{path}: cannot read the particle file ({e.strerror or e})") from None
    head = raw[:65536]
    if b"\x00" in head:
        kind = "a NumPy/cryoSPARC .cs file" if raw.startswith(b"\x93NUMPY") else "a binary file (MRC stack?)"
        raise ParticleFileError(f"{path}: {kind}, not a STAR text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _particles_block(path: Path, text: str, blocks: list[_Block]) -> _Block:
    """The one loop with `_rlnImageName` (among several, the one named data_particles)."""
    cands = [b for b in blocks if b.kind == "loop" and "rlnImageName" in b.labels]
    if not cands:
        raise ParticleFileError(f"{path}: not a particle file: {_not_particles_hint(text[:2000], blocks)} "
                                f"({_describe(blocks)})")
    if len(cands) > 1:
        named = [b for b in cands if b.name == "particles"]
        if len(named) != 1:
            raise ParticleFileError(
                f"{path}: {len(cands)} data blocks hold particles ({', '.join('data_' + b.name for b in cands)}); "
                "which one is meant is ambiguous: keep one, or name it data_particles")
        cands = named
    return cands[0]


def _starfile_read(path: Path, clean: str, changed: bool) -> dict:
    """starfile's blocks of the file, or of its cleaned text (through a temporary file) when
    `_scan_star` changed it."""
    tmp = None
    try:
        if changed:
            fd, tmp = tempfile.mkstemp(suffix=".star", prefix="clcluster-clean-")
            with os.fdopen(fd, "w") as f:
                f.write(clean)
        try:
            return starfile.read(tmp or path, always_dict=True, parse_as_string=STRING_LABELS)
        except Exception as e:  # starfile raises many kinds on malformed text
            raise ParticleFileError(f"{path}: not a readable STAR file ({type(e).__name__}: {e})") from None
    finally:
        if tmp is not None:
            os.unlink(tmp)


def _particles_frame(path: Path, data: dict, pblock: _Block) -> pd.DataFrame:
    """The particles as starfile read them, checked against the scan's row and label counts."""
    particles = data.get(pblock.name)
    if not isinstance(particles, pd.DataFrame) or len(particles) != pblock.nrows \
            or list(particles.columns) != pblock.labels:
        got = particles.shape if isinstance(particles, pd.DataFrame) else type(particles).__name__
        raise ParticleFileError(f"{path}: data_{pblock.name} has {pblock.nrows} rows × {len(pblock.labels)} labels "
                                f"but starfile read {got}; the file is malformed")
    particles = particles.reset_index(drop=True)
    if len(particles) == 0:  # starfile gives float zeros for empty loops; keep names as text
        particles = particles.astype({c: "str" for c in particles.columns if c in STRING_LABELS})
    return particles


def _optics_frame(path: Path, data: dict, pblock: _Block) -> tuple[pd.DataFrame | None, str | None]:
    """(optics block, its name): data_optics, else the one block that looks like optics, else None."""
    others = {k: v for k, v in data.items() if k != pblock.name and isinstance(v, pd.DataFrame)}
    oname = "optics" if "optics" in others else None
    if oname is None:
        found = [k for k, v in others.items() if _is_optics(v)]
        if len(found) > 1:
            raise ParticleFileError(f"{path}: {len(found)} blocks look like optics blocks "
                                    f"({', '.join('data_' + k for k in found)}); name one data_optics")
        oname = found[0] if found else None
    optics = others[oname].reset_index(drop=True) if oname is not None else None
    if optics is not None and len(optics) == 0:
        raise ParticleFileError(f"{path}: data_{oname} (optics) has no rows")
    return optics, oname


def _check_table(path: Path, table: ParticleTable, blocks: list[_Block]) -> None:
    """Every particle in a defined optics group, not a subtomogram, with a positive pixel size."""
    if table.optics is not None:
        table.optics_group_rows()  # raises for particles naming undefined optics groups
    _refuse_subtomograms(path, blocks, table)
    apix = table.pixel_size()       # raises when there is no pixel size anywhere
    bad = np.flatnonzero(~(np.isfinite(apix) & (apix > 0)))
    if bad.size:
        i = int(bad[0])
        raise ParticleFileError(f"{path}: particle row {i + 1} ({table.image_name(i)}) has pixel size "
                                f"{apix[i]:g} Å/px (must be a positive number); {bad.size} rows affected")


def read_star(path, root=None) -> ParticleTable:
    """Read a RELION 3.1+ (optics + particles) or 3.0 (particles only) STAR file.

    Checks what every later step relies on: one block of particles (`_rlnImageName`), an
    optics group for every particle (3.1), and a pixel size in Å/px for every particle.
    Raises ParticleFileError (naming the file and why) for anything else."""
    path = Path(path)
    text = _read_text(path)
    clean, blocks, version, changed = _scan_star(text, path)
    pblock = _particles_block(path, text, blocks)
    _refuse_subtomograms(path, blocks)
    data = _starfile_read(path, clean, changed)
    particles = _particles_frame(path, data, pblock)
    optics, oname = _optics_frame(path, data, pblock)
    table = ParticleTable(particles=particles, optics=optics, path=path,
                          root=Path(root) if root else None, particles_block=pblock.name,
                          optics_block=oname if oname is not None else "optics", version=version)
    if len(table) == 0:
        return table  # an empty particle file is reported by `clcluster check`, not refused here
    _check_table(path, table, blocks)
    return table


# ---- writing -----------------------------------------------------------------------------

def _format_column(s: pd.Series) -> list[str]:
    """Text of each value: shortest round-trip repr for numbers, quoted strings where needed."""
    if pd.api.types.is_bool_dtype(s) and not s.isna().any():
        return list(map(str, s.astype(int).tolist()))
    if pd.api.types.is_integer_dtype(s) and not s.isna().any():
        return list(map(str, s.tolist()))
    if pd.api.types.is_numeric_dtype(s):
        values = s.to_numpy(dtype=np.float64, na_value=np.nan) + 0.0  # -0.0 + 0.0 is 0.0: never write "-0.0"
        return list(map(repr, values.tolist()))
    t = s.astype(object).where(s.notna(), "nan").astype(str)
    needs = t.str.contains(r"\s", regex=True) | (t == "") | t.str.startswith(("#", "_", "'", '"')) \
        | t.str.startswith(("data_", "loop_"))
    if needs.any():
        dq = t.str.contains('"', regex=False)
        t = t.where(~needs, np.where(dq, "'" + t + "'", '"' + t + '"'))
    return t.tolist()


def _loop_lines(name: str, df: pd.DataFrame, version: int | None) -> list[str]:
    lines = [] if version is None else [f"# version {version}", ""]
    lines += [f"data_{name}", "", "loop_"]
    lines += [f"_{c} #{i}" for i, c in enumerate(df.columns, 1)]
    if len(df) and len(df.columns):
        cols = [_format_column(df[c]) for c in df.columns]
        lines.extend(" ".join(row) for row in zip(*cols))
    lines += [""]
    return lines


def write_star(path, table: ParticleTable) -> None:
    """Write `table` keeping its flavour: optics + particles for 3.1 (`# version` line, the
    source's block names), particles alone for 3.0; every column, numbers written with
    enough digits to read back the same float64.

    Written atomically (temporary name, then rename)."""
    lines: list[str] = []
    if table.optics is not None:
        version = table.version if table.version is not None else 30001
        lines += _loop_lines(table.optics_block, table.optics, version)
        lines += _loop_lines(table.particles_block, table.particles, version)
    else:
        lines += _loop_lines(table.particles_block, table.particles, table.version)
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
