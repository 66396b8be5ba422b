"""Figures 5 and 7: linear SCMs, zero-shot to d = 12, 15, 20.

    python experiments/fig5_linear_dims.py [--policy RUN_DIR] [--n-envs 100] [--overwrite]

Settings: experiments/configs/fig5_linear_dims.yaml; output: experiments/results/fig5_linear_dims/.
"""

import sys

from common import figure_main

if __name__ == "__main__":
    sys.exit(figure_main("fig5_linear_dims", sys.argv[1:]))
