# Contrastive training over all shards: one process locally, DDP ranks under SLURM.
#
# `launcher` is what starts the ranks; the command is `{launcher} clcluster train ...`:
#   ""                                                  one process (default; CPU or one GPU)
#   "torchrun --standalone --nproc-per-node=4 --no-python"   4 GPUs of one workstation
#   "srun -n 2 -c 1"                                    2 ranks of a SLURM job (profiles/slurm)
# Under the SLURM executor the profile also sets `tasks` (= ranks) and `mpi: "srun"`: the plugin
# then submits `sbatch --ntasks=N` and runs this shell directly in the allocation (no wrapping
# one-task srun, which would make a nested `srun -n N` deadlock). The plugin's job-step part
# (snakemake-executor-plugin-slurm-jobstep 0.6) starts this shell without the allocation's
# SLURM_* variables other than the job id, so the launcher must name the task count (-n) and,
# when cpus_per_task > 1, -c. `clcluster train` finds its rank from srun's or torchrun's
# variables and its GPU with backend.rank_device (local rank modulo the GPUs it sees).


rule train_encoder:
    input:
        images=per_shard(f"{R}/preprocessed/shard_{{shard}}.npy"),
        config=step_config("train"),
    output:
        encoder=f"{R}/model/encoder.pt",
        loss=f"{R}/model/encoder_loss.csv",
        plot=f"{R}/model/encoder_loss.png",
    log:
        f"{R}/logs/train_encoder.log",
    benchmark:
        f"{R}/benchmarks/train_encoder.tsv"
    conda:
        ENV
    threads: workflow.cores
    resources:
        mem_mb=4000,
        launcher="",
    shell:
        "{resources.launcher} clcluster train --shards {input.images:q} --out {output.encoder:q} "
        "--config {input.config:q} > {log:q} 2>&1"
