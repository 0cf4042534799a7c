"""Write constraints.txt: the exact versions of every package this project installs, as installed here.

    python scripts/make_constraints.py                 # rewrite constraints.txt from this environment
    python scripts/make_constraints.py --check         # exit 1 if constraints.txt differs from this environment

`scripts/install.sh` installs with `pip install -c constraints.txt ...`, so a fresh machine gets the versions
CI tested (transformers, trl, accelerate, deepspeed, datasets, peft, bitsandbytes, evaluate, matplotlib,
numpy and everything they pull in). The set is the dependency closure of `more-rlhf-pipeline` with its `dev`
and `minilm` extras, read from the installed packages' metadata (markers evaluated for this Python), minus
torch and what only torch needs: install.sh picks the CPU or CUDA build of torch per machine and keeps an
installed one. pyproject.toml keeps version RANGES (the package is also a library).

To refresh the pins: install the latest versions the ranges allow (`INSTALL_LATEST=1 bash
scripts/install.sh`), run the test suite and the README's commands, then run this script and commit
constraints.txt together with the README's "Tested versions" line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import platform
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


ROOT = Path(__file__).resolve().parents[1]
PROJECT = "more-rlhf-pipeline"
EXTRAS = ("dev", "minilm")
# Chosen per machine by install.sh (CPU or CUDA build), never pinned here, and not walked into.
UNPINNED = {"torch"}


def requirements(dist: md.Distribution, extras: tuple[str, ...] = ()) -> list[Requirement]:
    """The requirements of an installed distribution that apply here (markers evaluated, with `extras`)."""
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None:
            out.append(req)
        elif any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            out.append(req)
    return out


def project_requirements(extras: tuple[str, ...] = EXTRAS) -> list[Requirement]:
    """The project's own requirements with `extras`, from pyproject.toml (not from an installed copy of the
    project, whose metadata may predate the checkout)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    texts = list(project["dependencies"])
    for e in extras:
        texts += project.get("optional-dependencies", {}).get(e, [])
    return [Requirement(t) for t in texts]


def closure(extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """{canonical name: installed version} of every package the project (with `extras`) pulls in,
    transitively, without descending into UNPINNED packages. A requirement that is not installed is an
    error: the environment must be the one install.sh made."""
    seen: dict[str, str] = {}
    todo: list = [(None, ())]
    while todo:
        dist, ex = todo.pop()
        for req in project_requirements(extras) if dist is None else requirements(dist, ex):
            if dist is None and req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # a root requirement for another Python or platform
            name = canonicalize_name(req.name)
            if name in UNPINNED:
                continue
            try:
                dep = md.distribution(req.name)
            except md.PackageNotFoundError:
                raise SystemExit(
                    f"make_constraints: {req} (needed by {dist.metadata['Name'] if dist else PROJECT}) is not "
                    "installed here; run "
                    "bash scripts/install.sh first"
                ) from None
            extra_now = tuple(sorted(req.extras))
            key = name if not extra_now else f"{name}[{','.join(extra_now)}]"
            if key in seen:
                continue
            seen[key] = dep.version
            seen.setdefault(name, dep.version)
            todo.append((dep, extra_now))
    return {n: v for n, v in seen.items() if "[" not in n}


def render(pins: dict[str, str]) -> str:
    head = [
        "# Exact versions tested by CI (written by: python scripts/make_constraints.py; see its docstring).",
        f"# Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{dt.date.today().isoformat()}. torch is not pinned: scripts/install.sh chooses its build.",
        "# Used by scripts/install.sh (pip install -c constraints.txt); INSTALL_LATEST=1 ignores it.",
    ]
    return "\n".join(head + [f"{n}=={v}" for n, v in sorted(pins.items())]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with constraints.txt instead of writing it")
    ap.add_argument("--output", default=str(ROOT / "constraints.txt"))
    args = ap.parse_args(argv)
    pins = closure()
    out = Path(args.output)
    if args.check:
        old = {
            ln.split("==")[0]: ln.split("==")[1]
            for ln in out.read_text().splitlines()
            if "==" in ln and not ln.startswith("#")
        }
        diff = sorted(set(old.items()) ^ set(pins.items()))
        for n, v in diff:
            print(f"{'constraints.txt' if old.get(n) == v else 'installed'}: {n}=={v}")
        return 1 if diff else 0
    out.write_text(render(pins))
    print(f"make_constraints: {len(pins)} packages pinned in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
