"""Figure 6: SERGIO in distribution and the sergio-ood suite.

    python experiments/fig6_sergio.py [--policy RUN_DIR] [--n-envs 100] [--overwrite]

Settings: experiments/configs/fig6_sergio.yaml; output: experiments/results/fig6_sergio/.
"""

import sys

from common import run_figure

if __name__ == "__main__":
    run_figure("fig6_sergio", sys.argv[1:])
