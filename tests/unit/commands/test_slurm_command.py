"""`phalanx slurm script|submit`: what the sbatch script holds, and one line for what cannot go into one."""
import os
import stat
import sys

import pytest

from phalanx.commands import main


def test_the_script_runs_one_launcher_per_node_requeues_and_checkpoints_before_the_limit(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["slurm", "script", "--run_dir", str(run), "--nodes", "2", "--gpus_per_node", "8", "--time",
                 "12:00:00", "--partition", "gpu", "--account", "proj1", "--signal_s", "300", "--nproc", "8",
                 "--", "--epochs", "3", "--optim.lr=0.2"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for want in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj1",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", f"#SBATCH --output={run}/logs/slurm-%j.out"):
        assert want in lines, want
    srun = next(line for line in lines if line.startswith("srun "))
    assert srun.startswith("srun --ntasks-per-node=1 ") and srun.endswith(" &")
    assert f"{sys.executable} -m phalanx train --run_dir {run} --nproc 8 --epochs 3 --optim.lr=0.2" in srun
    assert "trap 'kill -USR1 \"$PID\" 2>/dev/null' USR1" in lines
    assert not any(line.startswith("#SBATCH --cpus-per-task") for line in lines)  # not asked for


@pytest.mark.parametrize("argv, says", [
    (["--nodes", "2"], "--run_dir is required"),
    (["--run_dir", "r", "--time", "1:00 ; rm -rf ~"], "--time '1:00 ; rm -rf ~': letters, digits"),
    (["--run_dir", "r", "--", "--epochs", "two"], "epochs='two'"),
    (["--run_dir", "r", "--", "--optim.lrr", "0.1"], "unknown option 'optim.lrr'"),
    (["--run_dir", "r", "--", "--nproc", "2"], "give --run_dir and --nproc to `phalanx slurm`"),
    (["--run_dir", "r", "--nodes", "0"], "--nodes 0: must be a whole number >= 1"),
])
def test_what_cannot_go_into_a_script_is_one_line(capsys, argv, says):
    assert main(["slurm", "script", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


def test_submit_writes_the_script_into_a_marked_run_directory_and_prints_the_job(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/sbatch-args\necho '731;cluster'\n")
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = tmp_path / "run"
    assert main(["slurm", "submit", "--run_dir", str(run), "--", "--epochs", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"submitted job 731; run directory {run}")
    assert (tmp_path / "sbatch-args").read_text().split() == ["--parsable", str(run / "slurm-job.sh")]
    assert (run / "slurm-job.sh").read_text().startswith("#!/bin/bash") and (run / "logs").is_dir()
    assert (run / "phalanx-run.json").is_file()  # `phalanx train` in it is then a run's, not a user's folder


def test_submit_refuses_a_folder_of_the_users(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["slurm", "submit", "--run_dir", str(mine), "--", "--epochs", "1"]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_launcher_per_node_takes_nodes_rank_and_rendezvous_from_slurm_and_hands_them_to_its_ranks():
    from phalanx.commands.train import join_slurm
    from phalanx.config import Config
    from phalanx.runtime.slurm import Allocation
    alloc = Allocation("900", ("n1", "n2"), 1, 2, (1, 1), 1, 0, True)
    cfg, argv = Config(), ["--epochs", "1"]
    assert join_slurm(cfg, alloc, set(), argv) == "node"
    p = cfg.parallel
    assert (p.nnodes, p.node_rank, p.rdzv_endpoint, p.rdzv_id) == (2, 1, "n1:20900", "slurm-900")
    assert argv[2:] == ["--parallel.nnodes=2", "--parallel.node_rank=1", "--parallel.rdzv_endpoint=n1:20900",
                        "--parallel.rdzv_id=slurm-900"]
    cfg, argv = Config(), []
    cfg.parallel.rdzv_endpoint = "head:29400"
    join_slurm(cfg, alloc, {"parallel.rdzv_endpoint"}, argv)  # the user's flags win
    assert cfg.parallel.nnodes == 1 and argv == []


def test_a_task_that_is_one_rank_gets_torchruns_variables(monkeypatch):
    from phalanx.commands.train import join_slurm
    from phalanx.config import Config
    from phalanx.runtime.slurm import Allocation
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # recorded, so that what join_slurm sets is undone after the test
        monkeypatch.delenv(k)
    alloc = Allocation("5", ("n1",), 0, 2, (2,), 1, 1, True)
    assert join_slurm(Config(), alloc, set(), []) == "rank"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"]) == \
        ("1", "2", "1", "n1")
