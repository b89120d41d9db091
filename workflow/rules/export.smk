# Classified STAR, per-class STARs, class averages, gallery; the demo's score against its truth.


rule export_classes:
    input:
        star=particles_file(),
        assignments=rules.cluster_embeddings.output.assignments,
        images=per_shard(f"{R}/preprocessed/shard_{{shard}}.npy"),
        config=rules.save_config.output[0],
    output:
        star=f"{R}/export/particles_classified.star",
        averages=f"{R}/export/class_averages.mrcs",
        gallery=f"{R}/export/class_averages.png",
        summary=f"{R}/export/summary.json",
        classes=directory(f"{R}/export/classes"),
    params:
        root="--root " + shlex.quote(config['project_root']) if config["project_root"] else "",
    log:
        f"{R}/logs/export_classes.log",
    benchmark:
        f"{R}/benchmarks/export_classes.tsv"
    conda:
        ENV
    shell:
        "clcluster export {input.star:q} --assignments {input.assignments:q} --preprocessed {input.images:q} "
        "--out-dir {R:q}/export --config {input.config:q} {params.root} > {log:q} 2>&1"


rule score_demo:
    """Accuracy, ARI and NMI against the simulator's truth (demo only)."""
    input:
        assignments=rules.cluster_embeddings.output.assignments,
        truth=rules.simulate_demo.output.truth,
    output:
        f"{R}/score.json",
    log:
        f"{R}/logs/score_demo.log",
    conda:
        ENV
    shell:
        "clcluster score --assignments {input.assignments:q} --truth {input.truth:q} --out {output:q} > {log:q} 2>&1; "
        "cat {log:q}"
