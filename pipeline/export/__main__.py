"""`python -m pipeline.export`: export a run's reward models for the RL engines (see `pipeline.export`).

    python -m pipeline.export --run-dir runs/tiny-cpu --out exports/tiny-cpu
    python -m pipeline.export --run-dir runs/tiny-cpu --rm more --fold-temperature --out exports/more-calibrated

Reads DIR/recipe.yaml (the run's resolved recipe) for the held-out pairs the certificate uses. Exit codes: 0 the
folders are written (each engine's certificate is in the log and in export.json), 2 a user-fixable error (one line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.export.certify import ENGINES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.export",
        description="Export each RM of a run directory as a standalone folder for TRL, OpenRLHF and verl, "
        "certified on the input each engine builds (OUT/<rm>/export.json, OUT/export.json).",
    )
    p.add_argument("--run-dir", required=True, help="a run directory whose reward stage is done")
    p.add_argument("--out", required=True, help="folder to write OUT/<rm>/ and OUT/export.json into")
    p.add_argument(
        "--rm", action="append", default=None, metavar="NAME", help="an RM to export (repeatable; default: all)"
    )
    p.add_argument(
        "--fold-temperature",
        action="store_true",
        help="divide the head by the RM's fitted temperature (calibration stage), so the folder's reward is r / T",
    )
    p.add_argument("--pairs", type=int, default=64, help="held-out test pairs the certificate uses (default 64)")
    p.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"comma-separated engines to certify (default: {','.join(ENGINES)})",
    )
    p.add_argument(
        "--no-verl-head",
        action="store_true",
        help="do not add the token-classification head tensors verl's reward worker loads",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import RecipeError
    from pipeline.logs import quiet_library_noise

    args = build_parser().parse_args(argv)
    quiet_library_noise()
    try:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        unknown = [e for e in engines if e not in ENGINES]
        if unknown or not engines:
            raise ValueError(f"--engines: unknown {unknown or 'none given'}; choose from {list(ENGINES)}")
        if args.pairs < 1:
            raise ValueError(f"--pairs must be >= 1, got {args.pairs}")
        run_dir = Path(args.run_dir)
        recipe_file = run_dir / "recipe.yaml"
        if not recipe_file.is_file():
            raise FileNotFoundError(
                f"{recipe_file} not found: --run-dir must be a run directory written by python -m pipeline.run"
            )
        from pipeline.config import load_recipe
        from pipeline.export.rms import export_run

        export_run(
            run_dir,
            args.out,
            recipe=load_recipe(recipe_file),
            rms=args.rm,
            fold=args.fold_temperature,
            n_pairs=args.pairs,
            engines=engines,
            verl_head=not args.no_verl_head,
        )
    except (RecipeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
