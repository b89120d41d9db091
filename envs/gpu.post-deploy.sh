#!/usr/bin/env bash
# Snakemake runs this once inside the freshly created environment of envs/gpu.yaml (from its
# copy under .snakemake/conda/, in Snakemake's working directory). It installs the clcluster
# package from the workflow's source folder, which workflow/rules/common.smk exports as
# CLCLUSTER_SOURCE (workflow.basedir). The dependencies come from the env file (--no-deps), the
# build backend too (setuptools; --no-build-isolation), so nothing is downloaded here.
set -euo pipefail
src=${CLCLUSTER_SOURCE:?"CLCLUSTER_SOURCE is not set: it is exported by workflow/rules/common.smk"}
[[ -f "$src/pyproject.toml" ]] || { echo "no pyproject.toml in CLCLUSTER_SOURCE=$src" >&2; exit 1; }
python -m pip install --no-deps --no-build-isolation "$src"
