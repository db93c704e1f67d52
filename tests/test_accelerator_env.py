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
