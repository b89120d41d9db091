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
CONDA_ONLY = {"python", "pip", "setuptools", "pytorch-cpu", "pytorch-gpu", "cuda-version"}
# dependencies of the package that the rules' commands do not need inside the env
# (Snakemake runs the workflow from outside the env)
NOT_NEEDED_IN_ENV = {"snakemake"}
_SPEC = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*)$")  # name[extras]version


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
    # no pip section with paths: Snakemake creates the env from a copy (see the test below)
    assert not pip, f"{env_file.name}: pip entries {pip}; the package comes from the post-deploy script"
    python = [d for d in conda if _split(d)[0] == "python"]
    assert python, f"{env_file.name}: no python pin"
    requires = _pyproject()["project"]["requires-python"]
    low = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", requires).group(1).split("."))
    pinned = tuple(int(x) for x in re.search(r"=\s*([\d.]+)", python[0]).group(1).split("."))
    assert pinned[:2] >= low[:2], f"{env_file.name}: {python[0]} below requires-python {requires}"


def test_gpu_env_has_cuda_builds():
    gpu = yaml.safe_load((REPO / "envs/gpu.yaml").read_text())
    names = {_split(d)[0] for d in gpu["dependencies"] if isinstance(d, str)}
    # conda-forge's CUDA build of PyTorch (the pytorch channel has no pytorch-cuda after 2.5)
    assert {"pytorch", "pytorch-gpu", "cuda-version", "cupy"} <= names and "pytorch-cuda" not in names
    assert gpu["channels"] == ["conda-forge"], gpu["channels"]
    cuda = [d for d in gpu["dependencies"] if isinstance(d, str) and _split(d)[0] == "cuda-version"][0]
    assert re.search(r"(=|>=)\s*12", cuda), cuda
    cpu = yaml.safe_load((REPO / "envs/cpu.yaml").read_text())
    assert "pytorch-cpu" in {_split(d)[0] for d in cpu["dependencies"] if isinstance(d, str)}


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
    m = re.search(r'^ENV\s*=\s*f"([^"]+\.yaml)"', common, re.M)
    assert m and "{config['conda_env']}" in m.group(1), "ENV must follow config conda_env"
    schema = yaml.safe_load((REPO / "src/clcluster/core/config.schema.yaml").read_text())
    choices = schema["properties"]["conda_env"]["enum"]
    assert set(choices) == {p.stem for p in ENV_FILES}
    for choice in choices:
        target = (REPO / "workflow/rules" / m.group(1).replace("{config['conda_env']}", choice)).resolve()
        assert target.exists() and target.parent == (REPO / "envs").resolve(), target
    env_vars = {"ENV": m.group(1).replace("{config['conda_env']}", choices[0])}
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


def _paths_in(env: dict) -> list[str]:
    """Entries of an env file that name files or folders (pip paths, -e, -r, file: URLs)."""
    out = []
    for d in env["dependencies"]:
        for item in (d.get("pip", []) if isinstance(d, dict) else [d]):
            word = str(item).split()[-1]
            if word.startswith((".", "/", "~", "file:")) or "/" in word:
                out.append(word.removeprefix("file:"))
    return out


@pytest.mark.parametrize("env_file", ENV_FILES, ids=[p.name for p in ENV_FILES])
def test_env_file_works_from_snakemakes_copy(env_file, tmp_path):
    """Snakemake creates an environment from a copy of the file (.snakemake/conda/<hash>.yaml):
    every path in it must still resolve from there (a relative `-e ../` pointed into
    .snakemake/ and pip failed). The package is installed by envs/<name>.post-deploy.sh, which
    Snakemake copies next to the env and runs in Snakemake's working directory: from any
    folder it installs CLCLUSTER_SOURCE (set by common.smk to workflow.basedir)."""
    import shutil
    import stat
    import subprocess

    copy_dir = tmp_path / ".snakemake/conda"
    copy_dir.mkdir(parents=True)
    copy = copy_dir / "0123abcd.yaml"
    shutil.copy(env_file, copy)
    for path in _paths_in(yaml.safe_load(copy.read_text())):
        target = (copy_dir / Path(path).expanduser()).resolve()
        assert (target / "pyproject.toml").exists() or target.is_file(), f"{env_file.name}: {path} -> {target}"
    deploy = env_file.with_name(env_file.stem + ".post-deploy.sh")
    assert deploy.exists(), f"{deploy.name} missing: nothing installs the package into the env"
    deploy_copy = copy_dir / "0123abcd.post-deploy.sh"
    shutil.copy(deploy, deploy_copy)
    # a `python` that records its arguments stands in for the env's interpreter
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    shim = fake_bin / "python"
    shim.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/python_args\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    elsewhere = tmp_path / "workdir"
    elsewhere.mkdir()
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "CLCLUSTER_SOURCE": str(REPO)}
    p = subprocess.run(["bash", str(deploy_copy)], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    args = (tmp_path / "python_args").read_text().split()
    assert args[:3] == ["-m", "pip", "install"] and args[-1] == str(REPO) and "--no-deps" in args
    # without CLCLUSTER_SOURCE it stops with a message instead of installing something else
    p = subprocess.run(["bash", str(deploy_copy)], cwd=elsewhere, env={"PATH": env["PATH"]}, capture_output=True, text=True)
    assert p.returncode != 0 and "CLCLUSTER_SOURCE" in p.stderr


def test_workflow_exports_its_source_folder_and_picks_the_env_from_config(tmp_path):
    """common.smk sets ENV to envs/<conda_env>.yaml and CLCLUSTER_SOURCE to the repository
    (the folder with pyproject.toml), also when the main Snakefile and the working directory
    are elsewhere: a Snakefile in a temporary folder includes it and prints both (dry run)."""
    import subprocess
    import sys

    (tmp_path / "Snakefile").write_text(
        f'configfile: "{REPO}/config/config.yaml"\n'
        f'include: "{REPO}/workflow/rules/common.smk"\n'
        'print("ENV=" + ENV, "SOURCE=" + os.environ["CLCLUSTER_SOURCE"])\n'
        "rule nothing:\n    output: []\n")
    for choice in ("cpu", "gpu"):
        p = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config", f"conda_env={choice}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-3000:]
        assert f"ENV=../../envs/{choice}.yaml SOURCE={REPO}\n" in out, out[-2000:]
