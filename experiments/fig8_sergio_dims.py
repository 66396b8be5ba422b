"""Figure 8: SERGIO, zero-shot to d = 12, 15, 20.

    python experiments/fig8_sergio_dims.py [--policy RUN_DIR] [--n-envs 100] [--overwrite]

Settings: experiments/configs/fig8_sergio_dims.yaml; output: experiments/results/fig8_sergio_dims/.
"""

import sys

from common import run_figure

if __name__ == "__main__":
    run_figure("fig8_sergio_dims", sys.argv[1:])
