"""Run the calibration stage alone.

    python -m pipeline.calibration --recipe tiny-cpu --output-dir runs/demo [calibration.n_bins=[5,10] ...]
    accelerate launch --config_file accelerate_configs/<x>.yaml -m pipeline.calibration --recipe ... --output-dir ...

Needs DIR/reward/index.json (the reward stage's output). Overrides use the recipe loader's
`key.sub=value` syntax; they are passed to `pipeline.config.load_recipe` unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="a recipe name shipped with the package, or a YAML path")
    parser.add_argument("--output-dir", required=True, help="the run directory DIR (holds DIR/reward/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of recipe fields")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must look like key.sub=value, got {bad}")

    from pipeline.config import RecipeError, load_recipe  # lazy: the recipe loader lives in another module
    from pipeline.calibration.stage import run

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        artifacts = run(recipe, Path(args.output_dir))
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if not str(e).startswith("calibration"):  # not one of the stage's own user-facing errors: show it all
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in artifacts:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
