# Particles in: the demo simulation (when no particle file is given), validation, sharding.


rule simulate_demo:
    """Simulated particles with known classes (only when config particles is empty)."""
    input:
        config=step_config("simulate"),
    output:
        star=f"{R}/demo/particles.star",
        truth=f"{R}/demo/particles_truth.csv",
    log:
        f"{R}/logs/simulate_demo.log",
    benchmark:
        f"{R}/benchmarks/simulate_demo.tsv"
    conda:
        ENV
    params:
        out_dir=lambda wildcards, output: Path(output.star).parent,
    shell:
        "clcluster simulate --config {input.config:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


# check.exclude_bad: the particles without problems go to particles_checked.star (which the later
# steps then read, see particles_file()) and the excluded ones, with the reason, to excluded.csv.
CHECKED = (
    dict(checked=f"{R}/check/particles_checked.star", excluded=f"{R}/check/excluded.csv")
    if config["check"]["exclude_bad"]
    else {}
)


rule check_particles:
    """Validate the particle file and its stacks before any work (every problem listed)."""
    input:
        star=particles_file(checked=False),
    output:
        **CHECKED,
        report=f"{R}/check/report.txt",
    log:
        f"{R}/logs/check_particles.log",
    benchmark:
        f"{R}/benchmarks/check_particles.tsv"
    conda:
        ENV
    params:
        root=root_option(),
        ctf="--no-ctf" if config["preprocess"]["ctf"] == "none" else "",
        exclude=(
            f"--exclude-bad {shlex.quote(CHECKED['checked'])} --excluded-list {shlex.quote(CHECKED['excluded'])}"
            if CHECKED
            else ""
        ),
    shell:
        "clcluster check {input.star:q} {params.root} {params.ctf} {params.exclude} "
        "> {output.report:q} 2> {log:q} || (cat {output.report:q} >&2; exit 1)"


# The number of classes is checked by a rule of its own, so that changing `classes` reruns this
# cheap count, the clustering and what follows, but not the check, sharding, preprocessing or
# training. Its high priority runs it as soon as the particles are checked, before any training.
rule check_classes:
    """Enough particles (after the check's selection) for `classes` classes."""
    input:
        star=particles_file(),
        check=rules.check_particles.output.report,
    output:
        f"{R}/check/classes.txt",
    log:
        f"{R}/logs/check_classes.log",
    priority: 50
    localrule: True
    conda:
        ENV
    params:
        classes=config["classes"],
    shell:
        "clcluster check {input.star:q} --classes {params.classes:q} --count-only "
        "> {output:q} 2> {log:q} || (cat {output:q} >&2; exit 1)"


checkpoint shard_particles:
    """Split the particles into STAR shards of `shard.size` (no pixel copy)."""
    input:
        star=particles_file(),
        check=rules.check_particles.output.report,
    output:
        folder=directory(f"{R}/shards"),
    log:
        f"{R}/logs/shard_particles.log",
    benchmark:
        f"{R}/benchmarks/shard_particles.tsv"
    conda:
        ENV
    params:
        size=config["shard"]["size"],
        root=root_option(),
    shell:
        "clcluster shard {input.star:q} --size {params.size:q} --out-dir {output.folder:q} {params.root} > {log:q} 2>&1"
