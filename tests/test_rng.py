"""Named random streams: no two parts of a run share a generator key."""
from clcluster.core import rng


def test_restart_partitions_never_reuse_another_streams_key():
    seed = 0
    others = [[seed, rng.TRAIN_SUBSET], [seed, rng.KMEANS_SAMPLE], [seed, rng.REFINE_SUBSET], [seed, rng.POLISH]]
    keys = [rng.restart_key(seed, r) for r in range(1, 20)]
    assert len({tuple(k) for k in keys}) == len(keys)
    assert not [k for k in keys[2:] if k in others]  # restarts 1 and 2: see test_first_two_restarts_keep_their_keys


def test_first_two_restarts_keep_their_keys():
    """The keys the demo and the benchmark results were made with (refine_restarts 2 uses restart 1);
    restart 1's key equals the training subset's, a coincidence between unrelated draws (the
    training pool and a starting partition) kept so that labels do not change."""
    assert rng.restart_key(7, 1) == [7, 1] and rng.restart_key(7, 2) == [7, 2]


def test_stream_seeds_differ_from_the_main_seed_and_from_each_other():
    seeds = [rng.stream_seed([0, rng.STABILITY, r]) for r in range(1, 6)] + [rng.stream_seed([0, rng.SEED_ARI])]
    assert len(set(seeds)) == len(seeds) and 0 not in seeds
    assert all(0 <= s < 2**31 for s in seeds)
    assert rng.stream_seed([0, rng.STABILITY, 1]) == rng.stream_seed([0, rng.STABILITY, 1])  # reproducible
    assert rng.STABILITY not in (rng.TRAIN_SUBSET, rng.TRAIN_EPOCH, rng.AUGMENT, rng.REFINE_SUBSET, rng.POLISH,
                                 rng.RESTARTS, rng.REALISTIC, rng.SEED_ARI)
