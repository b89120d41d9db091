# Per shard: CTF correction, Fourier crop, normalisation (CuPy on a GPU, NumPy otherwise).


rule preprocess_shard:
    input:
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
    shell:
        "clcluster preprocess {input.star:q} --out {output.images:q} --config {input.config:q} > {log:q} 2>&1"


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
