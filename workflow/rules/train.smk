# Contrastive training over all shards: one process locally, DDP ranks under SLURM.


rule train_encoder:
    input:
        images=per_shard(f"{R}/preprocessed/shard_{{shard}}.npy"),
        config=rules.save_config.output[0],
    output:
        encoder=f"{R}/model/encoder.pt",
        loss=f"{R}/model/encoder_loss.csv",
        plot=f"{R}/model/encoder_loss.png",
    log:
        f"{R}/logs/train_encoder.log",
    benchmark:
        f"{R}/benchmarks/train_encoder.tsv"
    threads: workflow.cores
    resources:
        mem_mb=4000,
        launcher="",
    conda:
        ENV
    shell:
        "{resources.launcher} clcluster train --shards {input.images:q} --out {output.encoder:q} "
        "--config {input.config:q} > {log:q} 2>&1"
