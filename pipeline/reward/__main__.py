"""Run the reward stage alone (with pipeline.run's manifest bookkeeping):

python -m pipeline.reward --recipe tiny-cpu --output-dir runs/demo [reward.methods=[more] ...]
accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml -m pipeline.reward --recipe ...
"""

import sys

from pipeline.run import main_for_stage


if __name__ == "__main__":
    sys.exit(main_for_stage("reward"))
