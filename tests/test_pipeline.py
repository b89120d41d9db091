"""The classifier end to end through the package API (no Snakemake): easy data far above chance."""
import numpy as np
import pytest

from clcluster.cluster import ClusterConfig, cluster
from clcluster.embed import embed_images
from clcluster.metrics import hungarian_accuracy
from clcluster.train import TrainConfig, load_encoder, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, preprocessed_easy):
    d = tmp_path_factory.mktemp("train")
    np.save(d / "shard_0.npy", preprocessed_easy.astype(np.float16))
    train([d / "shard_0.npy"], d / "encoder.pt", TrainConfig(steps=25, batch_size=64), seed=0, device="cpu", apix=5.0)
    enc, _ = load_encoder(d / "encoder.pt")
    return enc, d


def test_clustering_of_easy_set_far_above_chance(easy_sim, preprocessed_easy, trained):
    cfg, sim = easy_sim
    enc, _ = trained
    feats = embed_images(enc, preprocessed_easy)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
    res = cluster(feats, 4, ClusterConfig(n_init=4, refine_restarts=2), seed=0, images=preprocessed_easy, device="cpu")
    truth = sim.truth["class"].to_numpy()
    acc = hungarian_accuracy(truth, res.labels)
    assert acc >= 0.85, acc  # chance is ~0.3 for 4 balanced classes
    # a shuffled labelling would miss the floor
    assert hungarian_accuracy(truth, np.random.default_rng(0).permutation(res.labels)) < 0.5
    assert res.angle_deg is not None and res.shift_px.shape == (len(truth), 2)


def test_encoder_alone_beats_chance(easy_sim, preprocessed_easy, trained):
    cfg, sim = easy_sim
    enc, _ = trained
    res = cluster(embed_images(enc, preprocessed_easy), 4, ClusterConfig(n_init=4, refine=False), seed=0)
    assert hungarian_accuracy(sim.truth["class"], res.labels) >= 0.45


def test_training_writes_loss_curve_and_resumes_from_checkpoint(tmp_path, preprocessed_easy):
    import shutil

    import torch

    np.save(tmp_path / "s.npy", preprocessed_easy[:64].astype(np.float16))
    cfg = TrainConfig(steps=6, batch_size=16, checkpoint_minutes=0)
    ref = train([tmp_path / "s.npy"], tmp_path / "ref.pt", cfg, seed=1, device="cpu")
    assert (tmp_path / "ref_loss.csv").read_text().count("\n") == 7 and (tmp_path / "ref_loss.png").exists()
    assert not (tmp_path / "ref.ckpt").exists()  # removed once training completed
    # an interrupted run: 3 steps, then a checkpoint as the signal handler writes it, then resume
    part = TrainConfig(steps=6, batch_size=16, checkpoint_minutes=0)
    import signal
    import threading

    from clcluster import train as train_mod

    calls = {"n": 0}
    orig = train_mod.nt_xent

    def counting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGUSR1)
        return orig(*a, **k)

    train_mod.nt_xent = counting
    try:
        with pytest.raises(SystemExit) as e:
            train([tmp_path / "s.npy"], tmp_path / "run.pt", part, seed=1, device="cpu")
        assert e.value.code == 128 + signal.SIGUSR1
    finally:
        train_mod.nt_xent = orig
    assert (tmp_path / "run.ckpt").exists() and not (tmp_path / "run.pt").exists()
    train([tmp_path / "s.npy"], tmp_path / "run.pt", part, seed=1, device="cpu")
    a = torch.load(tmp_path / "ref.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "run.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
