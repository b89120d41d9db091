# CL-Clustering: unsupervised 2D classification of cryo-EM particles by contrastive learning.
#   snakemake --cores 2                                   (demo: simulated particles)
#   snakemake --cores 2 --config particles=data/p.star classes=50 results=out
#   snakemake --profile profiles/slurm --config particles=...
from snakemake.utils import min_version

min_version("8.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/config.smk"
include: "workflow/rules/input.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/benchmark.smk"


rule all:
    default_target: True
    input:
        final_outputs(),


onsuccess:
    print_score()
