"""Figure 3 scored by the exact posterior of the linear prior (the oracle reward).

    python experiments/fig3_linear_exact.py [--policy RUN_DIR] [--n-envs 100] [--overwrite]

Settings: experiments/configs/fig3_linear_exact.yaml; output:
experiments/results/fig3_linear_exact/.
"""

import sys

from common import figure_main

if __name__ == "__main__":
    sys.exit(figure_main("fig3_linear_exact", sys.argv[1:]))
