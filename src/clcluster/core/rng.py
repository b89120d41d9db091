"""Named random streams: every seeded generator in the package derives from the run's seed here.

A stream is NumPy's `default_rng(key)` (or a torch Generator seeded with an integer) where the key
names what the numbers are for, so that two parts of a run never draw the same numbers by accident
and a reader finds every stream in one place. The numeric values are the ones the package has
always used: changing one changes the labels a given seed gives.
"""
from __future__ import annotations

# Stream numbers: np.random.default_rng([seed, STREAM, ...]).
TRAIN_SUBSET = 1  # the training pool (train.subset particles), data.TrainingBatches
TRAIN_EPOCH = 2  # [seed, TRAIN_EPOCH, epoch]: the order of the pool in each epoch
AUGMENT = 3  # [seed, AUGMENT, step, block]: augmentation of the training batches
KMEANS_SAMPLE = 3  # [seed, KMEANS_SAMPLE]: mini-batch K-means sample and streaming order (2 entries: never equals AUGMENT's 4)
REFINE_SUBSET = 4  # [seed, REFINE_SUBSET]: the particles the refinement runs on
POLISH = 5  # [seed, POLISH]: re-seeding empty classes when the ML2D stage is polished
REALISTIC = 18  # [seed, REALISTIC]: the realistic simulator's draws; [seed, NOISE_OFFSET, REALISTIC]: its noise
RESTARTS = 6  # [seed, RESTARTS, r]: random partitions of restarts from the third on (see restart_key)
STABILITY = 7  # [seed, STABILITY]: the particles of the seed-stability runs; [seed, STABILITY, r]: run r's seed
SEED_ARI = 8  # [seed, SEED_ARI]: the master seed of the benchmark's second run of the pipeline (seed ARI)
OVERSPLIT = 9  # [seed, OVERSPLIT]: which part of its class each particle starts in when the ML2D stage over-splits

# Integer offsets and fixed seeds: default_rng(seed + OFFSET), torch.Generator().manual_seed(seed + OFFSET).
SPLIT_MERGE_OFFSET = 77  # perturbation of the references in split-and-merge moves (align.split_merge)
HALF_SETS_OFFSET = 4242  # the random half-sets of each class for the FRC (averages.split_halves)
NOISE_OFFSET = 7919  # the white noise the simulator adds (simulate.add_noise)
VOLUME_OFFSET = 10_000  # the procedural volumes builtin:N (simulate.builtin_volume)
CRYOSPARC_UID_SEED = 20240607  # the uids of the exported cryoSPARC datasets: the same for every run


def restart_key(seed: int, restart: int) -> list[int]:
    """Key of the random starting partition of refinement restart `restart` (>= 1; restart 0 starts
    from the K-means classes). Restarts 1 and 2 use [seed, restart], the keys the demo and the
    benchmark results were made with (restart 1's equals TRAIN_SUBSET's: unrelated draws, kept so
    that labels do not change); from 3 on [seed, RESTARTS, restart], because [seed, 3] and
    [seed, 4] are the K-means sample and the refinement subset."""
    return [seed, restart] if restart < 3 else [seed, RESTARTS, restart]


def stream_seed(key: list[int]) -> int:
    """An integer seed in [0, 2**31) drawn from the stream `key`, for a whole run of code that
    takes an integer seed (the cluster step's seed-stability runs: stream_seed([seed, STABILITY,
    r]); the benchmark's second pipeline run: stream_seed([seed, SEED_ARI])). Its own keys
    ([new seed, STREAM]) then differ from the main run's."""
    import numpy as np

    return int(np.random.default_rng(key).integers(0, 2**31))
