"""Launcher detection (torchrun / srun / one process) and SLURM host lists; no processes started."""
from clcluster.core import distributed as d


def test_torchrun_variables():
    lay = d.launcher_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                          "MASTER_ADDR": "n1", "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"})
    assert (lay["rank"], lay["world"], lay["local_rank"], lay["local_world"], lay["addr"], lay["port"]) == (3, 4, 1, 2, "n1", 1234)
    assert lay["launcher"] == "torchrun"


def test_srun_step_variables(monkeypatch):
    monkeypatch.setattr(d, "expand_hostlist", lambda s: {"gpu[01-02]": ["gpu01", "gpu02"]}[s])
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "2",
           "SLURM_STEP_ID": "0", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "1234",
           "SLURM_STEP_TASKS_PER_NODE": "3(x2)"}
    lay = d.launcher_env(env)
    assert (lay["rank"], lay["world"], lay["local_rank"], lay["local_world"], lay["addr"]) == (5, 6, 2, 3, "gpu01")
    assert 20000 <= lay["port"] < 40000 and lay["port"] == d.launcher_env(env)["port"]
    assert d.launcher_env({**env, "SLURM_JOB_ID": "1235"})["port"] != lay["port"]


def test_batch_script_and_plain_process_are_single():
    # the batch script of an `sbatch -n 2` job has SLURM_NTASKS=2 but is one process (no step id)
    assert d.launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}) is None
    assert d.launcher_env({}) is None
    assert d.init_from_env() == (0, 1) or d.is_initialized()


def test_hostlist_parser_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert d.expand_hostlist("vm") == ["vm"]
    assert d.expand_hostlist("gpu[01-03,07],x") == ["gpu01", "gpu02", "gpu03", "gpu07", "x"]
    assert d.expand_hostlist("n[8-10]-ib") == ["n8-ib", "n9-ib", "n10-ib"]
