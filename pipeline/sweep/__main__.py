"""`python -m pipeline.sweep ...` (and `accelerate launch -m pipeline.sweep ...`): logging and SIGTERM set up as
for a single `pipeline.run`, then the sweep's command line (pipeline.sweep.cli.main). The top of the layering:
imports pipeline.run and pipeline.sweep."""

import signal
import sys

from pipeline.run import _on_sigterm, _setup_logging, threading_is_main
from pipeline.sweep.cli import main


_setup_logging()
if threading_is_main():
    signal.signal(signal.SIGTERM, _on_sigterm)
sys.exit(main())
