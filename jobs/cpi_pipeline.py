"""CPI-FT pipeline job: `python jobs/cpi_pipeline.py --config jobs/configs/smoke.yaml`.

Runs as it is on a laptop (embedded local Ray) and under
`ray job submit --working-dir . -- python jobs/cpi_pipeline.py --config ...` on a cluster.
"""

import argparse
import os
import sys

# Under `ray job submit --working-dir .` the package is importable from the working dir.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpi_ray.cli import add_run_args, run_command  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_args(parser)
    sys.exit(run_command(parser.parse_args()))
