"""Figure 3 with DiffCBED and SS Finite added (100 environments, ~1.5 h here; resumable).

    python experiments/fig3_linear_likelihood.py [--n-envs 5] [--overwrite]

Settings: experiments/configs/fig3_linear_likelihood.yaml; output:
experiments/results/fig3_linear_likelihood/.
"""

import sys

from common import figure_main

if __name__ == "__main__":  # the GIES refits run in spawned worker processes
    sys.exit(figure_main("fig3_linear_likelihood", sys.argv[1:]))
