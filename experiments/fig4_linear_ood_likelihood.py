"""Figure 4 (linear OOD) with DiffCBED and SS Finite added (100 envs per set: ~3.6 h on 2 cores).

    python experiments/fig4_linear_ood_likelihood.py [--n-envs 2] [--overwrite]

The baselines save their progress after every design step; rerunning resumes.

Settings: experiments/configs/fig4_linear_ood_likelihood.yaml; output:
experiments/results/fig4_linear_ood_likelihood/.
"""

import sys

from common import figure_main

if __name__ == "__main__":  # the GIES refits run in spawned worker processes
    sys.exit(figure_main("fig4_linear_ood_likelihood", sys.argv[1:]))
