"""`python -m pipeline.align --recipe NAME|PATH --output-dir DIR [key=value ...]`: run the alignment stage alone.

Same bookkeeping as `python -m pipeline.run --stages align` (skipped when up to date unless --force).
"""

import sys


def main(argv=None) -> int:
    from pipeline.run import main_for_stage  # lazy: the orchestrator imports the recipe loader

    return main_for_stage("align", argv)


if __name__ == "__main__":
    sys.exit(main())
