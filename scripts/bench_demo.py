"""Time the embedded default end to end: `python -m pipeline.run --recipe tiny-cpu` in a fresh temp dir.

    python scripts/bench_demo.py [--keep DIR] [--recipe tiny-cpu] [key.sub=value ...]

Prints each stage's wall time (from the run's manifest) and, as its LAST line, one JSON object:
{"benchmark": "tiny_cpu_demo", "seconds": <total wall time>, "stages": {...}, "cpus": N, "target_seconds": 300}
The target is <= 300 s on 2 CPU cores. The run happens in a subprocess exactly as a user would start it,
so interpreter start-up and imports are included.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="tiny-cpu")
    p.add_argument("--keep", default=None, help="run in this directory (kept) instead of a temp dir")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        out = Path(args.keep) if args.keep else Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "pipeline.run",
            "--recipe",
            args.recipe,
            "--output-dir",
            str(out),
            *args.overrides,
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env)
        seconds = time.perf_counter() - t0
        stages = {}
        manifest = out / "manifest.json"
        if manifest.exists():
            for name, e in json.loads(manifest.read_text())["stages"].items():
                if e.get("started") and e.get("finished") and e.get("status") == "done":
                    d = dt.datetime.fromisoformat(e["finished"]) - dt.datetime.fromisoformat(e["started"])
                    stages[name] = round(d.total_seconds(), 1)
        for name, s in stages.items():
            print(f"  {name:12s} {s:8.1f} s")
        if proc.returncode != 0:
            print(f"the run failed (exit code {proc.returncode})", file=sys.stderr)
        print(
            json.dumps(
                {
                    "benchmark": "tiny_cpu_demo",
                    "seconds": round(seconds, 1),
                    "stages": stages,
                    "cpus": os.cpu_count(),
                    "target_seconds": 300,
                    "ok": proc.returncode == 0,
                    "load_average_1min": round(os.getloadavg()[0], 2),
                }
            )
        )
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
