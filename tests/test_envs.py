"""The conda environments (envs/*.yaml) agree with pyproject.toml, and every rule uses one.

Conda's channels cannot be reached from CI, so what is checked is what can be without them:
each env file parses, every package it names is a dependency of the package (or one of the
conda-only helpers below) with the same version constraint, every runtime dependency of the
package that a rule's command needs is there, and every rule that runs a shell command has a
`conda:` directive pointing at an existing env file."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))

# conda package name -> PyPI name (where they differ)
CONDA_TO_PYPI = {"pytorch": "torch", "cupy": "cupy-cuda12x"}
# conda-only packages that are not Python dependencies of clcluster
CONDA_ONLY = {"python", "pip", "cpuonly", "pytorch-cuda", "cuda-version"}
# dependencies of the package that the rules' commands do not need inside the env
# (Snakemake runs the workflow from outside the env)
NOT_NEEDED_IN_ENV = {"snakemake"}
_SPEC = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$")


def _split(spec: str) -> tuple[str, str]:
    m = _SPEC.match(spec)
    assert m, spec
    return m.group(1).lower(), m.group(2).replace(" ", "")


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _pypi_pins() -> dict[str, str]:
    proj = _pyproject()["project"]
    specs = list(proj["dependencies"])
    for extra in proj.get("optional-dependencies", {}).values():
        specs += extra
    return dict(_split(s) for s in specs)


@pytest.mark.parametrize("env_file", ENV_FILES, ids=[p.name for p in ENV_FILES])
def test_env_file_parses_and_agrees_with_pyproject(env_file):
    env = yaml.safe_load(env_file.read_text())
    assert isinstance(env, dict) and env.get("name") and env.get("channels"), env_file
    deps = env["dependencies"]
    conda = [d for d in deps if isinstance(d, str)]
    pip = [p for d in deps if isinstance(d, dict) for p in d.get("pip", [])]
    pins = _pypi_pins()
    named = set()
    for spec in conda:
        name, version = _split(spec.replace("==", "=") if "==" in spec else spec)
        if name in CONDA_ONLY:
            continue
        pypi = CONDA_TO_PYPI.get(name, name)
        assert pypi in pins, f"{env_file.name}: {name} is not a dependency in pyproject.toml"
        assert version == pins[pypi], f"{env_file.name}: {name}{version} but pyproject.toml says {pypi}{pins[pypi]}"
        named.add(pypi)
    runtime = {_split(s)[0] for s in _pyproject()["project"]["dependencies"]}
    missing = runtime - NOT_NEEDED_IN_ENV - named
    assert not missing, f"{env_file.name} lacks runtime dependencies {sorted(missing)}"
    # the package itself, from the repository, into the env
    assert any(p.strip() in ("-e ../", "-e ..", "../", "..") for p in pip), f"{env_file.name}: package not pip-installed"
    python = [d for d in conda if _split(d)[0] == "python"]
    assert python, f"{env_file.name}: no python pin"
    requires = _pyproject()["project"]["requires-python"]
    low = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", requires).group(1).split("."))
    pinned = tuple(int(x) for x in re.search(r"=\s*([\d.]+)", python[0]).group(1).split("."))
    assert pinned[:2] >= low[:2], f"{env_file.name}: {python[0]} below requires-python {requires}"


def test_gpu_env_has_cuda_builds():
    gpu = yaml.safe_load((REPO / "envs/gpu.yaml").read_text())
    names = {_split(d)[0] for d in gpu["dependencies"] if isinstance(d, str)}
    assert {"pytorch-cuda", "cupy"} <= names or {"cuda-version", "cupy"} <= names
    cpu = yaml.safe_load((REPO / "envs/cpu.yaml").read_text())
    assert "cpuonly" in {_split(d)[0] for d in cpu["dependencies"] if isinstance(d, str)}


def _rules():
    """(name, body) of every rule/checkpoint in workflow/rules/*.smk and the Snakefile."""
    out = []
    for f in [REPO / "Snakefile", *sorted((REPO / "workflow/rules").glob("*.smk"))]:
        text = f.read_text()
        heads = list(re.finditer(r"^(?:rule|checkpoint)\s+(\w+)\s*:", text, re.M))
        for i, h in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
            out.append((f, h.group(1), text[h.end():end]))
    return out


def test_every_shell_rule_has_a_conda_env():
    common = (REPO / "workflow/rules/common.smk").read_text()
    env_vars = dict(re.findall(r'^(\w+)\s*=\s*"([^"]+\.yaml)"', common, re.M))
    rules = _rules()
    assert len(rules) >= 8
    for f, name, body in rules:
        if "shell:" not in body:
            # `run:` blocks cannot have conda envs (Snakemake refuses); target rules have no command
            assert "conda:" not in body, f"{name}: conda: without shell:"
            continue
        m = re.search(r"^\s+conda:\s*\n\s+(.+?)\s*$", body, re.M)
        assert m, f"rule {name} ({f.name}) runs a shell command without a conda: directive"
        ref = m.group(1).strip()
        path = env_vars.get(ref) if ref in env_vars else ref.strip("\"'")
        assert path, f"rule {name}: conda: {ref} is not an env file"
        # relative paths in conda: are relative to the file the rule is in (common.smk for ENV)
        base = (REPO / "workflow/rules") if ref in env_vars else f.parent
        target = (base / path).resolve()
        assert target.exists() and target.parent == (REPO / "envs").resolve(), f"rule {name}: {path} -> {target}"
