"""Figure 3: in-distribution linear SCMs, d = 10.

    python experiments/fig3_linear.py [--policy RUN_DIR] [--n-envs 100] [--overwrite]

Settings: experiments/configs/fig3_linear.yaml; output: experiments/results/fig3_linear/.
"""

import sys

from common import figure_main

if __name__ == "__main__":
    sys.exit(figure_main("fig3_linear", sys.argv[1:]))
