"""`python -m pipeline.policy --recipe NAME|PATH --output-dir DIR [key=value ...]`: run the policy stage alone.

Same bookkeeping as `python -m pipeline.run --stages policy` (skipped when up to date unless --force).
"""

import sys


def main(argv=None) -> int:
    from pipeline.run import main_for_stage  # lazy: the orchestrator imports the recipe loader

    return main_for_stage("policy", argv)


if __name__ == "__main__":
    sys.exit(main())
