# Merge embeddings, K-means++, alignment refinement against the nearest centroids.


rule cluster_embeddings:
    input:
        embeddings=per_shard(f"{R}/embeddings/shard_{{shard}}.npy"),
        stars=per_shard(f"{R}/shards/shard_{{shard}}.star"),
        images=per_shard(f"{R}/preprocessed/shard_{{shard}}.npy"),
        config=step_config("cluster"),
        classes=rules.check_classes.output[0],
    output:
        labels=f"{R}/clusters/labels.npy",
        assignments=f"{R}/clusters/assignments.npz",
    log:
        f"{R}/logs/cluster_embeddings.log",
    benchmark:
        f"{R}/benchmarks/cluster_embeddings.tsv"
    conda:
        ENV
    threads: workflow.cores
    resources:
        mem_mb=4000,
    params:
        out_dir=lambda wildcards, output: Path(output.labels).parent,
    shell:
        "clcluster cluster --embeddings {input.embeddings:q} --shard-stars {input.stars:q} "
        "--preprocessed {input.images:q} --out-dir {params.out_dir:q} --config {input.config:q} > {log:q} 2>&1"
