"""`python -m pipeline.sweep ...` (and `accelerate launch -m pipeline.sweep ...`): logging and SIGTERM set up as
for a single `pipeline.run`, then the sweep's command line (pipeline.sweep.cli.main). The top of the layering:
imports pipeline.run, pipeline.dist and pipeline.sweep."""

import signal
import sys

from pipeline.dist import threading_is_main
from pipeline.run import on_sigterm, setup_logging
from pipeline.sweep.cli import main


if __name__ == "__main__":
    setup_logging()
    if threading_is_main():
        signal.signal(signal.SIGTERM, on_sigterm)
    sys.exit(main())
