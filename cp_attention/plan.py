"""`python -m cp_attention.plan --model flux --height 1024 --width 1024 --gpus 8 --hardware l20-pcie`: the
ranked layouts for a model on a machine (cp_attention.planner.cli). The function is `cp_attention.plan`."""

import sys

from cp_attention.planner.cli import main

if __name__ == "__main__":
    sys.exit(main())
