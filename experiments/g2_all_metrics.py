"""Section G.2: SHD, expected SHD, AUPRC and edge F1 per acquisition.

    python experiments/g2_all_metrics.py [--policy RUN_DIR] [--n-envs 100] [--overwrite]

Settings: experiments/configs/g2_all_metrics.yaml; output: experiments/results/g2_all_metrics/.
"""

import sys

from common import figure_main

if __name__ == "__main__":
    sys.exit(figure_main("g2_all_metrics", sys.argv[1:]))
