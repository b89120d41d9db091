"""The import contract: modules sit in layers, and imports point down only.

A module may import modules of lower layers and of its own layer, never of a higher one; the
steps (one module per workflow step) never import each other, and `em` and `learn` (both on top
of `image`) do not import each other. Once the package has layer folders, every module must sit
in the folder of its layer. LAYERS is also what the script that moves modules into their folders
reads, so a new module is placed by adding it here.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src/clcluster"

# layer folder: (rank, modules). Higher ranks may import lower ones.
LAYERS = {
    "core": (0, ["config", "rng", "backend", "distributed", "metrics"]),
    "io": (1, []),  # the clcluster.io package: particle files, stacks, atomic writes
    "image": (2, ["imageops", "ctf", "polar"]),
    "em": (3, ["align", "ml2d", "averages", "poses"]),
    "learn": (3, ["augment", "models", "losses", "data"]),
    "steps": (4, ["check", "shards", "preprocess", "train", "embed", "cluster", "export", "simulate"]),
    "sim": (3, ["realistic"]),
    "bench": (5, ["benchmark", "baselines", "realistic_benchmark", "realistic_scores"]),
    "cli": (6, []),  # clcluster.cli: the command line over the steps
}
DESCRIPTIONS = {
    "core": "Core: configuration and its schema, named random streams, array backend, distributed ranks, metrics.",
    "image": "Image operations: Fourier shifts and rotations, filters, masks, the CTF, polar sampling grids.",
    "em": "Alignment and EM: polar scans, annealed and hard EM, split-and-merge, ML2D, class averages.",
    "learn": "Contrastive learning: augmentation, encoders, the loss, training batches over shards.",
    "steps": "One module per workflow step (check, shard, preprocess, train, embed, cluster, export, simulate).",
    "sim": "Simulation science below the simulate step: the realistic particle-set simulator.",
    "bench": "Benchmarks: the accuracy grid and the baseline methods it compares.",
}
OWN_LAYER_FORBIDDEN = {"steps"}


def layer_of(module: str) -> str:
    """Layer of a dotted module name inside clcluster, in a layer folder (core/rng.py) or flat (rng.py)."""
    parts = module.split(".")[1:]
    if not parts:
        return "core"  # the package itself: its version string
    if parts[0] in LAYERS:
        return parts[0]
    for layer, (_rank, modules) in LAYERS.items():
        if parts[0] in modules:
            return layer
    raise KeyError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["clcluster", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


def imports(path: Path, module: str):
    """Dotted clcluster modules that `path` imports (relative imports resolved)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            if target.split(".")[0] != "clcluster":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() \
                    or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else target
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "clcluster")


def step_name(module: str) -> str:
    parts = module.split(".")[1:]
    return parts[1] if parts[0] == "steps" else parts[0]


@pytest.mark.parametrize("path, module", list(modules()), ids=[m for _, m in modules()])
def test_imports_point_down(path, module):
    layer = layer_of(module)
    rank = LAYERS[layer][0]
    wrong = []
    for target in imports(path, module):
        other = layer_of(target)
        if other == layer:
            if layer in OWN_LAYER_FORBIDDEN and step_name(target) != step_name(module):
                wrong.append(f"{target} (a step imports another step)")
        elif LAYERS[other][0] >= rank:
            wrong.append(f"{target} (layer {other} is not below {layer})")
    assert wrong == [], f"{module} ({layer}) imports " + ", ".join(wrong)


def test_modules_sit_in_their_layer_folder_once_folders_exist():
    if not (PACKAGE / "core").is_dir():
        pytest.skip("flat layout: the layer folders are created by moving the modules")
    misplaced = [m for _, m in modules() if m.split(".")[1:2] and m.split(".")[1] not in LAYERS]
    assert misplaced == []
