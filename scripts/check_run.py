"""Check what a finished `python -m pipeline.run` wrote (standard library only); CI runs it on the README's demo.

    python3 scripts/check_run.py runs/tiny-cpu [DIR ...]
    python3 scripts/check_run.py --from-block quickstart.sh   # every --output-dir of the block's pipeline.run lines

For each run directory: manifest.json lists every stage and each is 'done' (none failed, running or stale);
every artifact the manifest records exists; report.md is non-empty and has sections; when calibration ran,
calibration/metrics.json holds every RM of reward/index.json with a finite accuracy and ECE per source, and
every PNG under calibration/ (at least reliability.png) is a real PNG; when align ran, align/metrics.json and
align/table.md exist. Prints one line per directory; exit 1 naming every problem."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path


PNG = b"\x89PNG\r\n\x1a\n"


def problems(run_dir: Path) -> list[str]:
    out: list[str] = []
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing: the run did not start or wrote nothing"]
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    stages = manifest.get("stages", {})
    if not stages:
        out.append("manifest.json lists no stage")
    for name, entry in stages.items():
        if entry.get("status") != "done":
            out.append(
                f"stage {name} is {entry.get('status')!r}, not 'done' ({entry.get('error', entry.get('reason'))})"
            )
        if entry.get("stale"):
            out.append(f"stage {name} is STALE: {entry['stale']}")
        out += [
            f"stage {name}: artifact {a} is missing" for a in entry.get("artifacts", []) if not (run_dir / a).exists()
        ]
    report = run_dir / "report.md"
    if not report.is_file() or report.stat().st_size < 200 or "\n## " not in report.read_text(encoding="utf-8"):
        out.append("report.md is missing, tiny or has no section")
    if stages.get("calibration", {}).get("status") == "done":
        out += _calibration(run_dir)
    if stages.get("align", {}).get("status") == "done":
        out += [f"align/{f} is missing" for f in ("metrics.json", "table.md") if not (run_dir / "align" / f).is_file()]
    return out


def _calibration(run_dir: Path) -> list[str]:
    out = []
    metrics = json.loads((run_dir / "calibration" / "metrics.json").read_text(encoding="utf-8"))
    index_path = run_dir / "reward" / "index.json"
    rms = list(json.loads(index_path.read_text(encoding="utf-8"))) if index_path.is_file() else list(metrics)
    for rm in rms:
        per = metrics.get(rm)
        if not isinstance(per, dict):
            out.append(f"calibration/metrics.json has no entry for RM {rm}")
            continue
        sources = [s for s, m in per.items() if isinstance(m, dict) and "accuracy" in m]
        if not sources:
            out.append(f"calibration/metrics.json: RM {rm} has no source with metrics")
        for s in sources:
            for key in ("accuracy", "ece_10"):
                v = per[s].get(key)
                if key in per[s] and not (isinstance(v, (int, float)) and math.isfinite(v)):
                    out.append(f"calibration/metrics.json: {rm}/{s}/{key} = {v!r} is not a finite number")
    pngs = sorted((run_dir / "calibration").glob("*.png"))
    if not any(p.name == "reliability.png" for p in pngs):
        out.append("calibration/reliability.png is missing")
    for p in pngs:
        data = p.read_bytes()
        if data[:8] != PNG or len(data) < 2000:
            out.append(f"calibration/{p.name} is not a real PNG ({len(data)} bytes)")
    return out


def dirs_from_block(text: str) -> list[str]:
    """The --output-dir of every `python -m pipeline.run` command in a shell block."""
    return re.findall(r"python3? -m pipeline(?:\.run)?\b[^\n&|;]*?--output-dir[ =](\S+)", text)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--from-block"] and len(argv) == 2:
        dirs = dirs_from_block(Path(argv[1]).read_text(encoding="utf-8"))
        if not dirs:
            print(f"check_run: {argv[1]} runs no `python -m pipeline.run ... --output-dir DIR`", file=sys.stderr)
            return 1
    elif argv and not argv[0].startswith("-"):
        dirs = argv
    else:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    bad = 0
    for d in dirs:
        found = problems(Path(d))
        print(f"check_run: {d}: " + ("ok" if not found else f"{len(found)} problem(s)"))
        for p in found:
            print(f"  - {p}")
        bad += bool(found)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
