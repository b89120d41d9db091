# Accuracy benchmark on simulated data (not part of the default target); the ribosome volume
# needs its map:
#   CLCLUSTER_RIBOSOME_MAP=path/to/clean70SRibosome_vol_65p.mrc snakemake benchmark --cores 2


rule benchmark:
    """Every method over the SNR grid on the built-in volume and the ribosome map."""
    input:
        config=step_config("benchmark"),
    output:
        table=f"{R}/benchmark/results.md",
        csv=f"{R}/benchmark/results.csv",
        plot=f"{R}/benchmark/accuracy_vs_snr.png",
    log:
        f"{R}/logs/benchmark.log",
    conda:
        ENV
    threads: workflow.cores
    params:
        out_dir=lambda wildcards, output: Path(output.table).parent,
    shell:
        "clcluster benchmark --config {input.config:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
