"""One module per workflow step (check, shard, preprocess, train, embed, cluster, export, simulate)."""
