# Classified and selected STARs, aligned CTF-aware class averages + model STAR, class quality,
# cryoSPARC .cs, pictures (gallery, FRC, t-SNE map, loss curve) flagged for `snakemake --report`;
# the demo's score against its truth.


rule export_classes:
    input:
        star=particles_file(),
        assignments=rules.cluster_embeddings.output.assignments,
        images=per_shard(f"{R}/preprocessed/shard_{{shard}}.npy"),
        embeddings=per_shard(f"{R}/embeddings/shard_{{shard}}.npy"),
        loss_plot=rules.train_encoder.output.plot,
        config=step_config("export"),
    output:
        star=f"{R}/export/particles_classified.star",
        selected=f"{R}/export/particles_selected.star",
        averages=f"{R}/export/class_averages.mrcs",
        model=f"{R}/export/class_averages.star",
        gallery=report(f"{R}/export/class_averages.png", caption="../report/gallery.rst", category="1. Classes"),
        quality=report(f"{R}/export/class_quality.csv", caption="../report/quality.rst", category="1. Classes"),
        frc=report(f"{R}/export/frc.png", caption="../report/frc.rst", category="1. Classes"),
        embedding_map=report(
            f"{R}/export/embedding_map.png", caption="../report/embedding_map.rst", category="2. Embedding"
        ),
        loss_plot=report(f"{R}/export/encoder_loss.png", caption="../report/loss.rst", category="3. Training"),
        summary=report(f"{R}/export/summary.json", caption="../report/summary.rst", category="4. Run"),
        classes=directory(f"{R}/export/classes"),
    log:
        f"{R}/logs/export_classes.log",
    benchmark:
        f"{R}/benchmarks/export_classes.tsv"
    conda:
        ENV
    threads: workflow.cores
    resources:
        mem_mb=4000,
    params:
        out_dir=lambda wildcards, output: Path(output.star).parent,
        root=root_option(),
    shell:
        "clcluster export {input.star:q} --assignments {input.assignments:q} --preprocessed {input.images:q} "
        "--embeddings {input.embeddings:q} --out-dir {params.out_dir:q} --config {input.config:q} {params.root} "
        "> {log:q} 2>&1 && cp {input.loss_plot:q} {output.loss_plot:q}"


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
