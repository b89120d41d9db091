"""`snakemake --report` gathers the export's pictures (slow: runs the whole tiny chain first)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def snakemake(results, *extra):
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(REPO / "tests/workflow/config.yaml"),
           "--config", f"results={results}", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_report_html_gathers_the_export_pictures(tmp_path):
    results = tmp_path / "results"
    proc = snakemake(results)
    assert proc.returncode == 0, proc.stderr[-4000:]
    export = results / "export"
    for name in ("particles_classified.star", "particles_selected.star", "class_averages.star", "class_averages.mrcs",
                 "class_averages.png", "frc.png", "embedding_map.png", "encoder_loss.png", "class_quality.csv",
                 "particles_classified.cs"):
        assert (export / name).stat().st_size > 0, name
    report = tmp_path / "report.html"
    proc = snakemake(results, "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report.stat().st_size > 100_000
    text = proc.stdout + proc.stderr
    for name in ("class_averages.png", "embedding_map.png", "encoder_loss.png", "frc.png"):
        assert f"Adding {name}" in text, name
