"""The CPU training environment DeepSpeed reads: ZeRO-3 asks the accelerator for its device
count on every gradient reduce-scatter, and DeepSpeed's CPU accelerator answers by running
`numactl --hardware` unless LOCAL_SIZE is set."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_device_count_comes_from_the_local_world_not_numactl():
    code = textwrap.dedent(
        """
        import deepspeed.utils.numa as numa
        from cpi_ray.training import zero3

        zero3.set_accelerator_env(use_gpu=False)

        def numactl():
            raise AssertionError("numactl was run")

        numa.get_numa_cores = numactl
        from deepspeed.accelerator import get_accelerator

        print(get_accelerator().device_count())
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_SIZE", "DS_ACCELERATOR")}
    env.update(
        LOCAL_WORLD_SIZE="2", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "2"


def _shm_worker(rank, world, port, out):
    os.environ.update(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    os.environ.pop("LOCAL_SIZE", None)
    import torch
    import torch.distributed as dist

    from cpi_ray.training import zero3

    zero3.init_distributed(False)
    import deepspeed.comm as ds_comm

    names = [zero3.shm_workspace_name(r) for r in range(world)]
    t = torch.full((8,), float(rank + 1))
    ds_comm.inference_all_reduce(t)  # DeepSpeed's shm all-reduce, on the unlinked workspaces
    dist.barrier()
    left = sorted(n for n in names if (zero3.SHM_DIR / n).exists())
    from deepspeed.comm import comm

    shm_built = comm.cdb.shm_comm_op is not None
    if rank == 0:
        Path(out).write_text(f"{t.tolist()}|{left}|{shm_built}")
    dist.barrier()
    dist.destroy_process_group()


def test_a_cpu_job_leaves_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU comm creates a ~66 MiB /dev/shm workspace per rank and never unlinks it;
    `init_distributed` unlinks them once every rank has mapped them, and the shm all-reduce that
    uses them still sums."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    mp.spawn(_shm_worker, args=(2, port, str(out)), nprocs=2, join=True)
    summed, left, built = out.read_text().split("|")
    assert summed == str([3.0] * 8)
    assert left == "[]"
    assert built == "True"  # the case the unlinking is for did happen
