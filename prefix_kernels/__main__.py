"""`python -m prefix_kernels [demo] [...]`: see `prefix_kernels/cli/report.py`."""

import sys

from .cli.report import main

if __name__ == "__main__":
    sys.exit(main())
