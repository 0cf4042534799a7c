"""The one timing discipline of every scripts/bench_*.py (issue 18), and the facts each JSON line carries.

* `run_interleaved`: every side runs the same numbered steps (the caller makes step i the same work, or
  the same pairs, on every side), the warm-up steps are run identically and left untimed, the sides take
  turns step by step (the order rotates every step and every repeat, so load on a shared machine hits all
  alike), and the whole timed pass is repeated `repeats` times.
* `ratio_summary`: the ratio of two sides' total time per repeat, its median and min-max over repeats.
* `discipline`: whether a run met the bar (>= 20 timed steps or >= 60 s per side, >= 3 repeats), stated in
  the JSON rather than assumed.
* `environment`: precision actually used, threads, CPU model, load average before/after.
* `count_tokens`: a forward pre-hook counting the token positions each side actually fed the model.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


MIN_STEPS, MIN_SECONDS, MIN_REPEATS = 20, 60.0, 3
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


# --------------------------------------------------------------------------------------------------
# Where and how it ran
# --------------------------------------------------------------------------------------------------
def cpu_model(cpuinfo: str | None = None) -> str:
    text = cpuinfo if cpuinfo is not None else _read("/proc/cpuinfo")
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The bf16 instruction flags the CPU advertises (empty: bf16 on it is emulated and far slower than fp32)."""
    text = cpuinfo if cpuinfo is not None else _read("/proc/cpuinfo")
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in BF16_FLAGS if f in flags]
    return []


def choose_precision(requested: str, device: str, cpuinfo: str | None = None) -> tuple[str, str]:
    """("bf16" | "fp32", why). auto = bf16 on CUDA, and on a CPU only when it has bf16 instructions."""
    if requested not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {requested!r}")
    if requested != "auto":
        return requested, f"--precision {requested}"
    if device == "cuda":
        return "bf16", "auto: CUDA device"
    flags = cpu_bf16_flags(cpuinfo)
    if flags:
        return "bf16", f"auto: CPU has {'/'.join(flags)}"
    return "fp32", f"auto: CPU has none of {'/'.join(BF16_FLAGS)} (bf16 would be emulated)"


def add_precision_argument(parser, what: str = "autocast of ALL sides") -> None:
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help=f"{what} (auto: bf16 on CUDA and on CPUs with avx512_bf16/amx_bf16, else fp32)",
    )


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def environment(device: str, precision: str, precision_reason: str, threads: int) -> dict:
    import torch

    dev = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu: {cpu_model()}"
    return {
        "precision": precision,
        "precision_reason": precision_reason,
        "threads": threads,
        "device": dev,
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
@dataclass
class Timings:
    """seconds[side][repeat][step] and out[side][repeat][step] (what each timed step returned)."""

    sides: list[str]
    seconds: dict[str, list[list[float]]] = field(default_factory=dict)
    out: dict[str, list[list]] = field(default_factory=dict)
    orders: list[list[str]] = field(default_factory=list)

    def total(self, side: str, repeat: int) -> float:
        return sum(self.seconds[side][repeat])

    @property
    def repeats(self) -> int:
        return len(self.seconds[self.sides[0]])

    @property
    def steps(self) -> int:
        return len(self.seconds[self.sides[0]][0]) if self.repeats else 0


def rotation(names: list[str], step: int, repeat: int) -> list[str]:
    k = (step + repeat) % len(names)
    return names[k:] + names[:k]


def run_interleaved(
    steps: dict[str, Callable[[int], object]],
    n_steps: int,
    *,
    repeats: int = MIN_REPEATS,
    warmup_steps: int = 0,
    warmup: dict[str, Callable[[int], object]] | None = None,
    sync: Callable[[], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Timings:
    """Time `steps[side](i)` for i in range(n_steps) on every side, interleaved step by step, `repeats`
    times. `warmup[side](j)` (default: the timed step j) runs first, `warmup_steps` times per side, untimed,
    in the same interleaving. The step's return value is kept (e.g. the tokens it fed the model)."""
    if n_steps < 1 or repeats < 1:
        raise ValueError(f"need n_steps >= 1 and repeats >= 1, got {n_steps}, {repeats}")
    names = list(steps)
    warm = warmup or steps
    if set(warm) != set(names):
        raise ValueError(f"warmup sides {sorted(warm)} differ from the timed sides {sorted(names)}")
    sync = sync or (lambda: None)
    for j in range(warmup_steps):
        for name in rotation(names, j, 0):
            warm[name](j)
    sync()
    t = Timings(names, {n: [] for n in names}, {n: [] for n in names})
    for r in range(repeats):
        for n in names:
            t.seconds[n].append([])
            t.out[n].append([])
        for i in range(n_steps):
            order = rotation(names, i, r)
            t.orders.append(order)
            for name in order:
                sync()
                t0 = time.perf_counter()
                res = steps[name](i)
                sync()
                t.seconds[name][r].append(time.perf_counter() - t0)
                t.out[name][r].append(res)
        if progress:
            progress(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {t.total(n, r):.2f}s" for n in names))
    return t


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------
def ratio_summary(timings: Timings, num: str, den: str, digits: int = 3) -> dict:
    """Per repeat, total seconds of `num` / total seconds of `den` (> 1: `den` is faster); the median and
    the min-max over repeats."""
    per = [timings.total(num, r) / timings.total(den, r) for r in range(timings.repeats)]
    return {
        "median": round(statistics.median(per), digits),
        "min": round(min(per), digits),
        "max": round(max(per), digits),
        "per_repeat": [round(x, digits) for x in per],
    }


def flat_ratio_fields(prefix: str, summary: dict) -> dict:
    """{prefix: median, prefix_min, prefix_max, prefix_per_repeat}."""
    return {
        prefix: summary["median"],
        f"{prefix}_min": summary["min"],
        f"{prefix}_max": summary["max"],
        f"{prefix}_per_repeat": summary["per_repeat"],
    }


def seconds_per_side(timings: Timings) -> dict[str, float]:
    """Median over repeats of each side's total timed seconds in one repeat."""
    return {n: round(statistics.median(timings.total(n, r) for r in range(timings.repeats)), 3) for n in timings.sides}


def discipline(timings: Timings, min_steps: int = MIN_STEPS, min_seconds: float = MIN_SECONDS) -> dict:
    """Whether the run met the bar: >= min_steps timed steps or >= min_seconds per side per repeat, and
    >= MIN_REPEATS repeats. Reported, never assumed."""
    shortest = min(timings.total(n, r) for n in timings.sides for r in range(timings.repeats))
    ok = timings.repeats >= MIN_REPEATS and (timings.steps >= min_steps or shortest >= min_seconds)
    return {
        "repeats": timings.repeats,
        "timed_steps": timings.steps,
        "shortest_side_repeat_s": round(shortest, 3),
        "meets_discipline": bool(ok),
    }


def same_multiset(*plans: list[list[int]]) -> bool:
    """True when every plan (a list of batches of item ids) covers the very same items, each as often."""
    keys = [sorted(i for batch in plan for i in batch) for plan in plans]
    return all(k == keys[0] for k in keys[1:])


# --------------------------------------------------------------------------------------------------
# Tokens actually fed to a model
# --------------------------------------------------------------------------------------------------
class TokenCounter:
    def __init__(self):
        self.tokens = 0
        self.forwards = 0

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.tokens += int(ids.numel())
            self.forwards += 1

    def take(self) -> int:
        n, self.tokens = self.tokens, 0
        return n


@contextlib.contextmanager
def count_tokens(model):
    """Counts the token positions (input_ids.numel(), padding included) of every forward of `model`."""
    counter = TokenCounter()
    handle = model.register_forward_pre_hook(counter, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def emit(result: dict) -> dict:
    """The last line a benchmark prints: one JSON object."""
    print(json.dumps(result), flush=True)
    return result


# --------------------------------------------------------------------------------------------------
# The report: docs/benchmarks.json, docs/benchmarks.md and the README's generated block
# --------------------------------------------------------------------------------------------------
README_BEGIN = "<!-- benchmarks:begin (generated by scripts/bench_all.sh from docs/benchmarks.json; do not edit) -->"
README_END = "<!-- benchmarks:end -->"

# benchmark -> (headline field, what it is, target); the first is the headline, the rest second fields
HEADLINES = {
    "rm_train_throughput": [
        (
            "speedup_vs_trl",
            "TRL s / MORE s, same timed pairs (our trainer's defaults vs stock `RewardTrainer`)",
            ">= 1.5",
        ),
        ("more_overhead", "MORE s / MultiTask s, identical batches (same sampler and packing)", "<= 1.01"),
    ],
    "rm_scoring": [
        ("ratio_vs_dynamic_padding", "batched dynamic padding s / our scorer s, same pairs", "> 1"),
        ("ratio_vs_naive_pad", "per-pair loop padded to 512 s / our scorer s (second field)", ""),
    ],
    "more_vs_multitask_step_time": [
        ("ratio", "MORE s / MultiTask s, same batches (random pairs, no shared prompt)", "<= 1.01"),
        ("more_vs_trl", "MORE s / stock TRL s, same pairs (< 1: MORE faster)", ""),
    ],
    "bon_generation": [("ratio", "per-prompt `generate` loop s / our batched sampler s, same prompts", "")],
    "tiny_cpu_demo": [("seconds", "`python -m pipeline.run --recipe tiny-cpu` end to end, wall s", "<= 300")],
    "min_norm_solve": [("ms", "MORE's min-norm solve, worst case, median ms per K", "<= 1 ms at K=16, <= 10 at K=64")],
}


def _fmt(x) -> str:
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        return f"{x:,.3f}".rstrip("0").rstrip(".") if abs(x) < 100 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in x.items())
    return str(x)


def headline(result: dict, key: str) -> str:
    if key not in result:
        return "n/a"
    if isinstance(result[key], dict):  # per-K figures
        return ", ".join(f"K={k}: **{_fmt(v)}**" for k, v in result[key].items())
    if f"{key}_min" in result:
        return f"**{_fmt(result[key])}** [{_fmt(result[f'{key}_min'])}-{_fmt(result[f'{key}_max'])}]"
    return f"**{_fmt(result[key])}**"


def evidence(result: dict) -> str:
    """The identical-work evidence of one JSON line: pairs identical, tokens per side."""
    parts = []
    for key in ("timed_pairs_identical", "timed_prompts_identical", "more_overhead_batches_identical"):
        if key in result:
            parts.append(f"{key.replace('_', ' ')}: {_fmt(result[key])}")
    if "timed_pair_tokens_trl" in result:
        parts.append(
            f"pair tokens TRL {_fmt(result['timed_pair_tokens_trl'])} / ours {_fmt(result['timed_pair_tokens_ours'])}"
        )
        parts.append(f"input tokens TRL {_fmt(result['input_tokens_trl'])} / ours {_fmt(result['input_tokens_ours'])}")
    for key in ("timed_pair_tokens", "timed_prompt_tokens", "new_tokens", "input_tokens"):
        if key in result and not isinstance(result.get("input_tokens_trl"), int):
            parts.append(f"{key.replace('_', ' ')}: {_fmt(result[key])}")
    return "; ".join(parts) or "-"


def setting(result: dict) -> str:
    bits = [result.get("model", ""), f"{result['params_m']}M params" if "params_m" in result else ""]
    for key in ("data", "pairs_per_step", "n_pairs", "prompts", "pairs", "seq"):
        if key in result:
            bits.append(f"{key.replace('_', ' ')} {_fmt(result[key])}")
    if "precision" in result:
        bits.append(f"{result['precision']}, {result.get('threads')} threads")
    if "repeats" in result:
        bits.append(f"{result['repeats']} repeats x {result['timed_steps']} steps")
        bits.append("meets discipline" if result.get("meets_discipline") else "BELOW the >=20 steps / 60 s bar")
    return ", ".join(b for b in bits if b)


def markdown_table(report: dict) -> str:
    lines = [
        f"Generated by `{report['command']}` on {report['date']} (CPU: {report['cpu_model']}, {report['cpus']} cores; "
        f"load average 1/5/15 min before {_fmt(report['load_before'])}, after {_fmt(report['load_after'])}). "
        "Each cell: median over repeats [min-max]; every side timed the same work, interleaved, warm-up excluded "
        "alike (scripts/bench_common.py). Raw JSON lines: docs/benchmarks.json.",
        "",
        "| benchmark | what | target | measured | identical-work evidence | setting | load before / after |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in report["results"]:
        r = entry["result"]
        load = f"{_fmt(r.get('load_before', '-'))} / {_fmt(r.get('load_after', '-'))}"
        for i, (key, what, target) in enumerate(HEADLINES.get(r["benchmark"], [])):
            first = i == 0
            lines.append(
                f"| {'`' + entry['command'] + '`' if first else ''} | {what} | {target} | {headline(r, key)} | "
                f"{evidence(r) if first else ''} | {setting(r) if first else ''} | {load if first else ''} |"
            )
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    """The README with its generated block replaced (the markers must exist, once each)."""
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise ValueError(f"README needs exactly one {README_BEGIN!r} and one {README_END!r} line")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{block}{README_END}{tail}"


def write_report(lines_file: str, json_out: str, md_out: str, readme: str | None, command: str, load_before) -> dict:
    """lines_file holds `<command>\\t<last JSON line>` per benchmark. Writes the JSON, the markdown table and
    (if given) the README block, each atomically (temp file, then rename)."""
    results = []
    for raw in Path(lines_file).read_text(encoding="utf-8").splitlines():
        if raw.strip():
            cmd, line = raw.split("\t", 1)
            results.append({"command": cmd, "result": json.loads(line)})
    report = {
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": load_average(),
        "results": results,
    }
    from pipeline.io import atomic_write_text

    table = markdown_table(report)
    atomic_write_text(json_out, json.dumps(report, indent=1) + "\n")
    atomic_write_text(md_out, "# Benchmarks\n\n" + table)
    if readme:
        atomic_write_text(readme, replace_block(Path(readme).read_text(encoding="utf-8"), table))
    return report


if __name__ == "__main__":
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    ap = argparse.ArgumentParser(description="write docs/benchmarks.json, docs/benchmarks.md and the README block")
    ap.add_argument("lines_file")
    ap.add_argument("--json", default="docs/benchmarks.json")
    ap.add_argument("--md", default="docs/benchmarks.md")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--command", default="bash scripts/bench_all.sh")
    ap.add_argument("--load-before", type=float, nargs=3, required=True)
    a = ap.parse_args()
    write_report(a.lines_file, a.json, a.md, a.readme or None, a.command, a.load_before)
