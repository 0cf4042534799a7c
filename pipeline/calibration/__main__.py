"""Run the calibration stage alone (with pipeline.run's manifest bookkeeping):

    python -m pipeline.calibration --recipe tiny-cpu --output-dir runs/demo [calibration.n_bins=[5,10] ...]
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m pipeline.calibration --recipe ... --output-dir ...

Needs DIR/reward/index.json (the reward stage's output).
"""

import sys

from pipeline.run import main_for_stage


if __name__ == "__main__":
    sys.exit(main_for_stage("calibration"))
