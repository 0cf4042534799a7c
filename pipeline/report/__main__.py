"""Run the report stage alone (with pipeline.run's manifest bookkeeping):

python -m pipeline.report --recipe tiny-cpu --output-dir runs/tiny-cpu
"""

import sys

from pipeline.run import main_for_stage


if __name__ == "__main__":
    sys.exit(main_for_stage("report"))
