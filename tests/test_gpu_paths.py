"""The GPU code paths that can be checked without a GPU. No GPU exists on the machines these
tests run on: where a test needs CUDA to look present, it mocks torch.cuda's queries
(is_available, device_count, the RNG state calls) inside this Python process only; nothing
here computes on a GPU. scripts/gpu_check.sh runs the real thing on a GPU machine."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from clcluster.core import backend

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda reports CUDA present with as many devices as CUDA_VISIBLE_DEVICES lists
    (mocked: no GPU here); set_device/get/set_rng_state are recorded, not executed."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def count():
        import os

        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0,1,2,3")
        return len([v for v in visible.split(",") if v.strip()])

    monkeypatch.setattr(torch.cuda, "device_count", count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.full((16,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: calls.append(("set_rng_state", state, device)))
    return calls


@pytest.mark.parametrize("visible, local, expected", [
    ("3", "1", 0),        # srun --gpus-per-task / per-task binding: each rank sees one GPU, index 0
    ("0", "3", 0),
    ("0,1,2,3", "1", 1),  # all four GPUs of the node visible to every rank
    ("0,1,2,3", "6", 2),  # more ranks than GPUs on the node: shared round robin
    ("0,1", "0", 0),
])
def test_rank_device_respects_the_visible_device_count(fake_cuda, monkeypatch, visible, local, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setenv("LOCAL_RANK", local)
    assert backend.rank_device("auto") == torch.device("cuda", expected)
    assert backend.rank_device("cuda") == torch.device("cuda", expected)
    backend.select_device("auto")
    assert ("set_device", expected) in fake_cuda


def test_rank_device_reads_slurm_localid_and_keeps_explicit_devices(fake_cuda, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("SLURM_LOCALID", "5")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert backend.rank_device("auto") == torch.device("cuda", 1)
    assert backend.rank_device("cpu") == torch.device("cpu")
    assert backend.rank_device("cuda:3") == torch.device("cuda", 3)


def test_rank_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert backend.rank_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        backend.rank_device("cuda")


def test_no_module_chooses_a_gpu_by_itself():
    """Only backend.rank_device maps a rank to a GPU: no other module builds a CUDA device from
    LOCAL_RANK (train once did, and ranks >= 1 then failed with "invalid device ordinal" when
    SLURM bound one GPU per task) or calls torch.cuda.set_device."""
    offenders = []
    for path in (REPO / "src/clcluster").rglob("*.py"):
        if path.name == "backend.py":
            continue
        text = path.read_text()
        for pattern in (r'torch\.device\(\s*"cuda"\s*,', r"cuda\.set_device\(", r'environ[^\n]*"LOCAL_RANK"\s*,\s*0'):
            if re.search(pattern, text):
                offenders.append(f"{path.name}: {pattern}")
    assert not offenders, offenders
    for name in ("steps/train.py", "steps/embed.py", "steps/cluster.py", "steps/export.py"):
        assert "select_device(" in (REPO / "src/clcluster" / name).read_text(), name


def _cuda_tagged_save(obj, path, monkeypatch):
    """torch.save with every storage tagged "cuda:0", as a checkpoint written on a GPU is (the
    bytes are CPU bytes; only the location tag is mocked)."""
    import torch.serialization as ser

    monkeypatch.setattr(ser, "location_tag", lambda storage: "cuda:0")
    torch.save(obj, path)
    monkeypatch.undo()


def _gpu_checkpoint(path: Path, box: int, steps: int, monkeypatch):
    """A checkpoint as a GPU run writes it at its last step (built by hand, storages tagged cuda:0)."""
    from clcluster.learn.models import ContrastiveModel, build_encoder

    torch.manual_seed(5)
    model = ContrastiveModel(build_encoder("polar", box, 128), 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "torch_rng": torch.get_rng_state(), "step": steps, "losses": torch.linspace(4, 3, steps)}
    _cuda_tagged_save(state, path, monkeypatch)
    with pytest.raises(RuntimeError):  # what a CPU-only torch does with a GPU-written file by default
        torch.load(path, weights_only=True)
    return state


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_resume_from_a_gpu_checkpoint_on_a_non_cpu_device(tmp_path, monkeypatch):
    """Resuming reads the checkpoint onto the CPU whatever device wrote it and whatever device
    training continues on: the "meta" device stands in for a GPU (no GPU here). Loading with
    map_location=<training device> put the RNG state on that device and torch.set_rng_state
    failed ("RNG state must be a torch.ByteTensor"), so every requeued GPU job crashed."""
    from clcluster.steps.train import TrainConfig, train

    box, steps = 24, 4
    np.save(tmp_path / "s.npy", np.random.default_rng(0).standard_normal((32, box, box)).astype(np.float32))
    state = _gpu_checkpoint(tmp_path / "enc.ckpt", box, steps, monkeypatch)
    out = train([tmp_path / "s.npy"], tmp_path / "enc.pt", TrainConfig(steps=steps, batch_size=16), seed=0, device="meta")
    assert not (tmp_path / "enc.ckpt").exists() and (tmp_path / "enc.pt").exists()
    assert torch.equal(torch.get_rng_state(), state["torch_rng"])
    assert out["final_loss"] == pytest.approx(float(state["losses"].mean()))
    assert (tmp_path / "enc_loss.csv").read_text().count("\n") == steps + 1


def test_checkpointer_restores_cpu_and_cuda_rng(tmp_path, fake_cuda, monkeypatch):
    """On a CUDA device the checkpoint also holds the CUDA generator's state, restored with
    torch.cuda.set_rng_state (mocked here), while the CPU state goes to torch.set_rng_state as a
    CPU ByteTensor."""
    from clcluster.steps.train import Checkpointer, TrainConfig, build_optimiser

    model = torch.nn.Linear(3, 2)
    opt, sched = build_optimiser(model, TrainConfig(steps=10))
    ck = Checkpointer(tmp_path / "c.ckpt", model, opt, sched, torch.device("cuda", 0))
    torch.manual_seed(11)
    ck.save(7, [1.0, 0.5])
    saved = torch.get_rng_state()
    torch.manual_seed(12)
    start, losses = Checkpointer(tmp_path / "c.ckpt", model, opt, sched, torch.device("cuda", 0)).load()
    assert (start, losses) == (7, [1.0, 0.5])
    assert torch.equal(torch.get_rng_state(), saved)
    cuda_calls = [c for c in fake_cuda if c[0] == "set_rng_state"]
    assert len(cuda_calls) == 1 and cuda_calls[0][1].device.type == "cpu" and int(cuda_calls[0][1][0]) == 7


@pytest.mark.slow
def test_reading_the_loss_back_every_10_steps_changes_nothing(tmp_path, monkeypatch):
    """On CUDA the loop reads the losses back and votes on stopping once per 10 steps (fewer
    device-to-host syncs). Forced here on the CPU (no GPU): same losses and parameters as
    reading back every step; a single process still stops at the step a signal arrives (it
    needs no vote; ranks of a DDP job stop at the next multiple of 10), and completes from
    that checkpoint with the same losses."""
    import signal

    from clcluster.steps import train as train_mod
    from clcluster.steps.train import TrainConfig, train

    np.save(tmp_path / "s.npy", np.random.default_rng(0).standard_normal((64, 24, 24)).astype(np.float32))
    cfg = TrainConfig(steps=13, batch_size=16, checkpoint_minutes=0)
    train([tmp_path / "s.npy"], tmp_path / "every1.pt", cfg, seed=2, device="cpu")
    monkeypatch.setattr(train_mod, "sync_interval", lambda tdev: 10)
    train([tmp_path / "s.npy"], tmp_path / "every10.pt", cfg, seed=2, device="cpu")
    assert (tmp_path / "every1_loss.csv").read_text() == (tmp_path / "every10_loss.csv").read_text()
    a = torch.load(tmp_path / "every1.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "every10.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    calls, orig = {"n": 0}, train_mod.nt_xent

    def signalling(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            signal.raise_signal(signal.SIGUSR1)
        return orig(*args, **kw)

    monkeypatch.setattr(train_mod, "nt_xent", signalling)
    with pytest.raises(SystemExit):
        train([tmp_path / "s.npy"], tmp_path / "stopped.pt", cfg, seed=2, device="cpu")
    assert int(torch.load(tmp_path / "stopped.ckpt", weights_only=True)["step"]) == 4
    monkeypatch.setattr(train_mod, "nt_xent", orig)
    train([tmp_path / "s.npy"], tmp_path / "stopped.pt", cfg, seed=2, device="cpu")
    assert (tmp_path / "stopped_loss.csv").read_text() == (tmp_path / "every1_loss.csv").read_text()
