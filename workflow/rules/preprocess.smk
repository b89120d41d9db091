# Per shard: CTF correction, Fourier crop, normalisation, whitening (CuPy on a GPU, NumPy otherwise).

# preprocess.whiten: one noise spectrum for the whole set, estimated before the shards are
# preprocessed, so that every shard is whitened alike whatever shard.size is.
SPECTRUM = dict(spectrum=f"{R}/preprocessed/noise_spectrum.json") if config["preprocess"]["whiten"] else {}


rule noise_spectrum:
    """The particle set's radial noise spectrum (from evenly spaced particles) for whitening."""
    input:
        star=particles_file(),
        check=rules.check_particles.output.report,
        config=step_config("preprocess"),
    output:
        f"{R}/preprocessed/noise_spectrum.json",
    log:
        f"{R}/logs/noise_spectrum.log",
    benchmark:
        f"{R}/benchmarks/noise_spectrum.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
    params:
        root=root_option(),
    shell:
        "clcluster preprocess {input.star:q} --spectrum-out {output:q} {params.root} --config {input.config:q} "
        "> {log:q} 2>&1"


rule preprocess_shard:
    input:
        **SPECTRUM,
        star=f"{R}/shards/shard_{{shard}}.star",
        config=step_config("preprocess"),
    output:
        images=f"{R}/preprocessed/shard_{{shard}}.npy",
        meta=f"{R}/preprocessed/shard_{{shard}}.json",
    log:
        f"{R}/logs/preprocess_shard/{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/preprocess_shard/{{shard}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
    params:
        spectrum=f"--noise-spectrum {shlex.quote(SPECTRUM['spectrum'])}" if SPECTRUM else "",
    shell:
        "clcluster preprocess {input.star:q} --out {output.images:q} {params.spectrum} --config {input.config:q} "
        "> {log:q} 2>&1"


rule embed_shard:
    input:
        encoder=f"{R}/model/encoder.pt",
        images=f"{R}/preprocessed/shard_{{shard}}.npy",
        config=step_config("embed"),
    output:
        f"{R}/embeddings/shard_{{shard}}.npy",
    log:
        f"{R}/logs/embed_shard/{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/embed_shard/{{shard}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "clcluster embed --encoder {input.encoder:q} --shard {input.images:q} --out {output:q} --threads {threads} "
        "--config {input.config:q} > {log:q} 2>&1"


rule preprocess_all:
    """Target that stops after preprocessing: `snakemake preprocess_all` (every shard done)."""
    input:
        per_shard(f"{R}/preprocessed/shard_{{shard}}.npy"),
    localrule: True
