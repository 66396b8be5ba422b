"""Figure 4 (linear OOD) with DiffCBED and SS Finite added (2 environments per set: they are slow).

    python experiments/fig4_linear_ood_likelihood.py [--n-envs 100] [--overwrite]

Settings: experiments/configs/fig4_linear_ood_likelihood.yaml; output:
experiments/results/fig4_linear_ood_likelihood/.
"""

import sys

from common import run_figure

if __name__ == "__main__":  # the GIES refits run in spawned worker processes
    run_figure("fig4_linear_ood_likelihood", sys.argv[1:])
