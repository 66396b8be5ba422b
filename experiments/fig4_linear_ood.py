"""Figure 4: zero-shot OOD linear environments (the linear-ood suite).

    python experiments/fig4_linear_ood.py [--policy RUN_DIR] [--n-envs 100] [--overwrite]

Settings: experiments/configs/fig4_linear_ood.yaml; output: experiments/results/fig4_linear_ood/.
"""

import sys

from common import figure_main

if __name__ == "__main__":
    sys.exit(figure_main("fig4_linear_ood", sys.argv[1:]))
