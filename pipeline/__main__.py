"""`python -m pipeline ...` is `python -m pipeline.run ...` (the whole pipeline from a recipe)."""

import sys

from pipeline.run import main


sys.exit(main())
