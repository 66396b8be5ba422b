"""Figure 6: SERGIO in distribution and the sergio-ood suite.

    python experiments/fig6_sergio.py [--policy RUN_DIR] [--n-envs 100] [--overwrite]

Settings: experiments/configs/fig6_sergio.yaml; output: experiments/results/fig6_sergio/.
"""

import sys

from common import figure_main

if __name__ == "__main__":
    sys.exit(figure_main("fig6_sergio", sys.argv[1:]))
