"""Figure 8: SERGIO, zero-shot to d = 12, 15, 20.

    python experiments/fig8_sergio_dims.py [--policy RUN_DIR] [--n-envs 100] [--overwrite]

Settings: experiments/configs/fig8_sergio_dims.yaml; output: experiments/results/fig8_sergio_dims/.
"""

import sys

from common import figure_main

if __name__ == "__main__":
    sys.exit(figure_main("fig8_sergio_dims", sys.argv[1:]))
