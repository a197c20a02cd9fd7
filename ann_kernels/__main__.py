"""``python -m ann_kernels COMMAND ...``: the same as the ``ann-kernels`` console script."""

import sys

from ann_kernels.cli import main

# The guard matters: worker processes started with "spawn" (parallel runs, DDP) re-import
# the main module under another name, and must not re-run the command.
if __name__ == "__main__":
    sys.exit(main())
