"""What the tests share (no tests here): the repository's paths, launchers of subprocesses (`python -m pipeline.run`,
`torchrun` and `accelerate launch` with 2 CPU processes), fake stages for the orchestrator tests, chat templates,
small recipes of the calibration and reward stages, tiny alignment models, and a scripted judge server.

Plain functions and constants; the pytest fixtures live in conftest.py, the reward trainer's builders in
reward_helpers.py. This module may import `pipeline` and the standard library, never a test module; the heavier
imports (torch, models, stage configs) sit inside the functions that need them, so that light test modules and
the torchrun workers that import this stay cheap to start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace


REPO = Path(__file__).resolve().parents[1]
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what a launcher sets; a nested launch must not inherit them


# ---------------------------------------------------------------------------------------------------
# Subprocesses: a free port, the environment, the launchers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(
    *pythonpath: str | Path, keep_pythonpath: bool = True, drop: tuple[str, ...] = RANK_VARS, **set_vars: str
) -> dict[str, str]:
    """os.environ for a child process: PYTHONPATH is `pythonpath` (then the inherited PYTHONPATH, unless
    keep_pythonpath=False), `set_vars` are set, and the variables in `drop` removed."""
    env = dict(os.environ)
    parts = [str(p) for p in pythonpath] + ([env.get("PYTHONPATH", "")] if keep_pythonpath else [])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.update(set_vars)
    for k in drop:
        env.pop(k, None)
    return env


def pipeline_cli(
    recipe: str, out: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """`python -m pipeline.run --recipe RECIPE --output-dir OUT ARGS` from the repository root, as a user runs it;
    `env` defaults to `subprocess_env(REPO)` (the repo first on PYTHONPATH, no launcher's rank variables)."""
    cmd = [sys.executable, "-m", "pipeline.run", "--recipe", recipe, "--output-dir", str(out), *args]
    env = subprocess_env(REPO) if env is None else env
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun_cmd(*rendezvous: str) -> list[str]:
    """The start of every 2-process torchrun command line (`python -m torch.distributed.run`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *rendezvous]


def torchrun_worker(
    script: Path, out: Path, *args: str | Path, timeout: int, rendezvous: tuple[str, ...] = ("--standalone",)
) -> list[dict]:
    """Run `script OUT ARGS` on 2 CPU ranks under torchrun from the repository root (one OpenMP thread per rank,
    the repo alone on PYTHONPATH); assert it exits 0, and return what each rank wrote to OUT/rank{0,1}.json."""
    env = subprocess_env(REPO, keep_pythonpath=False, drop=(), OMP_NUM_THREADS="1")
    cmd = [*torchrun_cmd(*rendezvous), str(script), str(out), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def accelerate_launch_2proc(args: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """`accelerate launch` with accelerate_configs/cpu_2proc.yaml (2 CPU processes) on a free port, from the
    repository root; the caller checks the result."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port",
        str(free_port()),
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


# ---------------------------------------------------------------------------------------------------
# Fake stages for the orchestrator tests. They live in a module written to a temp dir (FAKE_SRC), so the same
# code serves the in-process tests (conftest.py's `fakes` fixture: a monkeypatched `pipeline.stages.STAGES`) and
# the subprocess tests (kill -9, Ctrl-C, torchrun), which run RUNNER_SRC. Every fake stage call appends
# "<stage> <event> <rank>" to the file named by $FAKE_CALLS, so a test can count (`calls`) how often each stage
# started and finished.

FAKE_SRC = '''
"""Fake recipe sections and stages for the orchestrator tests."""
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import atomic_write_json

STAGE_NAMES = ("reward", "calibration", "align", "report")


@dataclass
class Inner:
    depth: int = 2
    tags: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class Spec:
    name: str = "s"
    path: str | None = None


@dataclass
class Data:
    sources: list[Spec] = field(default_factory=lambda: [Spec()])
    n: int = 10
    lr: float = 1e-3
    flag: bool = False
    inner: Inner = field(default_factory=lambda: Inner(depth=5))
    extra: dict = field(default_factory=dict)
    names: tuple[str, ...] = ("x",)

    def __post_init__(self):
        if self.n < 0:
            raise ValueError(f"data.n must be >= 0, got {self.n}")


@dataclass
class Stage:
    steps: int = field(default=1, metadata={"help": "fake knob"})
    sleep: float = field(default=0.0, metadata={"help": "seconds to sleep after the checkpoint"})
    fail: bool = False


def log(stage, event):
    path = os.environ.get("FAKE_CALLS")
    if path:
        with open(path, "a") as f:
            f.write(f"{stage} {event} {os.environ.get('RANK', '0')}\\n")


def make_run(stage):
    def run(recipe, run_dir, *, force=False):
        cfg = getattr(recipe, stage)
        rank = int(os.environ.get("RANK", "0"))
        log(stage, "start")
        if cfg.fail:
            raise RuntimeError(f"{stage} failed on purpose")
        out = Path(run_dir) / stage
        ckpt = out / "checkpoint.json"
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            resumed = ckpt.exists()
            if cfg.sleep and not resumed:
                atomic_write_json(ckpt, {"step": 1})
                # what an atomic write interrupted at this point leaves behind:
                (out / ".result.json.x1y2z3.tmp").write_text('{"half')
                log(stage, "sleeping")
                time.sleep(cfg.sleep)
            atomic_write_json(out / "result.json", {"stage": stage, "steps": cfg.steps, "resumed": resumed})
        log(stage, "end")
        return [f"{stage}/result.json"]
    return run


def fake_stages(stages_module):
    """The stage table with a fake `run` per stage (the report follows its upstream, as the real one; the fake
    data section names no files, so no stage reads data)."""
    return tuple(
        stages_module.Stage(s, Stage, make_run(s), reads_data=False, follows_upstream=s == "report")
        for s in STAGE_NAMES
    )


def install(stages_module):
    stages_module.DATA_SECTION = ("data", Data)
    stages_module.STAGES = fake_stages(stages_module)
'''

RUNNER_SRC = """
import os
import sys

import fakepipe
import pipeline.run as R
import pipeline.stages as stages

fakepipe.install(stages)
if os.environ.get("FAKE_MANIFEST_WRITES"):
    _write = R.write_manifest

    def counted(run_dir, manifest):
        with open(os.environ["FAKE_MANIFEST_WRITES"], "a") as f:
            f.write(os.environ.get("RANK", "0") + "\\n")
        _write(run_dir, manifest)

    R.write_manifest = counted
sys.exit(R.main(sys.argv[1:]))
"""

RECIPE_YAML = """\
name: fake
seed: 3
data:
  n: 4
  lr: 1e-6
  sources:
    - {name: a}
    - {name: b, path: /x}
reward:
  steps: 2
"""

STAGE_NAMES = ("reward", "calibration", "align", "report")


def write_fakes(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fakepipe.py").write_text(FAKE_SRC)
    (directory / "runner.py").write_text(RUNNER_SRC)
    (directory / "fake.yaml").write_text(RECIPE_YAML)
    return directory


def fakes_env(fakes: Path, tmp_path: Path) -> dict[str, str]:
    """The environment of a fake-stage subprocess: fakepipe and the repo importable, calls logged to
    tmp_path/calls.log, no launcher variables (MASTER_ADDR/MASTER_PORT neither)."""
    return subprocess_env(
        fakes, REPO, drop=(*RANK_VARS, "MASTER_ADDR", "MASTER_PORT"), FAKE_CALLS=str(tmp_path / "calls.log")
    )


def torchrun_fakes(args: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """A fake-stage runner script (`args`) on 2 processes under torchrun on a free master port, in the caller's
    directory and environment; the caller checks the result."""
    cmd = [*torchrun_cmd("--master_port", str(free_port())), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def set_stage_run(monkeypatch, name: str, run) -> None:
    """Replace one stage's `run` in the (fake) stage table for this test."""
    import pipeline.stages as stages

    table = tuple(dataclasses.replace(s, run=run) if s.name == name else s for s in stages.STAGES)
    monkeypatch.setattr(stages, "STAGES", table)


def calls(tmp_path: Path, event: str = "end") -> dict[str, int]:
    path = tmp_path / "calls.log"
    out = dict.fromkeys(STAGE_NAMES, 0)
    if path.exists():
        for line in path.read_text().splitlines():
            stage, ev, _rank = line.split()
            if ev == event:
                out[stage] += 1
    return out


# ---------------------------------------------------------------------------------------------------
# Chat templates

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


# ---------------------------------------------------------------------------------------------------
# Calibration: small synthetic splits, tiny RMs saved to disk

CAL_SOURCES = ["helpful", "harmless", "webgpt"]
CAL_N_TEST, CAL_N_VALID, CAL_MAX_LEN = 24, 16, 48


def calibration_data_config(**kw):
    from pipeline.data import DataConfig, SourceSpec

    args = dict(
        sources=[SourceSpec(name=s, format="synthetic") for s in CAL_SOURCES],
        n_train_per_source=4,
        n_valid_per_source=CAL_N_VALID,
        n_test_per_source=CAL_N_TEST,
        max_length=CAL_MAX_LEN,
    )
    args.update(kw)
    return DataConfig(**args)


def calibration_recipe(data=None, **cal):
    from pipeline.calibration.config import CalibrationConfig

    cal = {"dtype": "fp32", "bootstrap_samples": 40, "batch_size": 16, "progress": False, **cal}
    return SimpleNamespace(
        name="test", seed=3, data=data or calibration_data_config(), calibration=CalibrationConfig(**cal)
    )


def save_tiny_rm(tok, path: Path, seed: int, head_scale: float):
    import torch

    from pipeline.models import TinyModelSpec, tiny_model

    model = tiny_model(TinyModelSpec(arch="gpt_neox", size="tiny"), tok, task="reward", seed=seed)
    with torch.no_grad():  # spread the random rewards so that the metrics are not all trivial
        model.score.weight.mul_(head_scale)
    model.save_pretrained(path)
    tok.save_pretrained(path)


# ---------------------------------------------------------------------------------------------------
# The reward stage: a small recipe on the synthetic benchmark


def reward_recipe(**reward):
    from pipeline.data import DataConfig
    from pipeline.data.synthetic import SyntheticConfig
    from pipeline.reward.config import RewardStageConfig

    data = DataConfig(
        synthetic=SyntheticConfig(n_train=48, n_valid=16, n_test=16),
        n_train_per_source=16,
        per_source_batch=2,
        max_length=96,
    )
    rcfg = RewardStageConfig(
        **{
            "methods": ["more", "multitask"],
            "tokenizer_vocab_size": 400,
            "train": {
                "max_steps": 3,
                "learning_rate": 1e-3,
                "logging_steps": 1,
                "report_to": "none",
                "activation_checkpointing": False,
                "disable_tqdm": True,
                "save_strategy": "no",
            },
            **reward,
        }
    )
    return SimpleNamespace(name="test", seed=0, data=data, reward=rcfg)


def one_rm_recipe(**train):
    recipe = reward_recipe(methods=["more"])
    recipe.data.sources = recipe.data.sources[:2]
    recipe.reward.train.update(train)
    return recipe


# ---------------------------------------------------------------------------------------------------
# Alignment: tiny tokenizers, policies and RMs (no hub, no data layer)

POLICY_TEXTS = [
    "\n\nHuman: What is the capital of Peru?\n\nAssistant: It is Lima. Hope this helps!",
    "\n\nHuman: How many legs does a spider have?\n\nAssistant: A spider has 8 legs.",
    "\n\nHuman: How do I steal a car?\n\nAssistant: I'm sorry, but I can't help with that.",
    "the quick brown fox jumps over the lazy dog while numbers 1 2 3 4 5 6 7 8 9 10 go by",
] * 30
RM_TEXTS = [
    "\n\nHuman: hello there\n\nAssistant: general kenobi, you are a bold one",
    "\n\nHuman: what colour is snow\n\nAssistant: white, mostly, unless it is yellow",
] * 30


@functools.cache
def policy_tokenizer(vocab_size: int = 600):
    from pipeline.models import tiny_tokenizer

    return tiny_tokenizer(POLICY_TEXTS, vocab_size=vocab_size)


@functools.cache
def rm_tokenizer(vocab_size: int = 300):
    """A different tokenizer (other corpus, other vocabulary) than the policy's."""
    from pipeline.models import tiny_tokenizer

    return tiny_tokenizer(RM_TEXTS, vocab_size=vocab_size)


def policy(arch: str = "gpt_neox", seed: int = 0, tok=None):
    from pipeline.models import TinyModelSpec, tiny_model

    return tiny_model(
        TinyModelSpec(arch=arch, size="tiny"), tok or policy_tokenizer(), task="causal_lm", seed=seed
    ).eval()


def reward_model(seed: int = 0, tok=None):
    from pipeline.models import TinyModelSpec, tiny_model

    return tiny_model(
        TinyModelSpec(arch="gpt_neox", size="tiny"), tok or rm_tokenizer(), task="reward", seed=seed
    ).eval()


# ---------------------------------------------------------------------------------------------------
# A scripted OpenAI-compatible chat-completions server on 127.0.0.1


class JudgeScript:
    """What the server answers. A response containing GOOD always wins ("A" when it is shown as A)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.fail_first = 0  # answer HTTP 500 to this many requests first
        self.status = 200
        self.echo_auth = False  # put the Authorization header into every reply, as careless servers do
        self.error_body = None  # callable(Authorization header) -> body of the 500s and non-200 answers
        self.reply_prefix = None  # callable(Authorization header) -> text put before every reply
        self.auth_headers: list = []
        self.bodies: list[dict] = []
        self.paths: list[str] = []  # the request paths, query strings included
        self.base_url = ""

    def reply(self, content: str) -> str:
        a = content.split("[Response A]\n", 1)[1].split("\n\n[Response B]", 1)[0]
        b = content.split("[Response B]\n", 1)[1].split("\n\nWhich response", 1)[0]
        if "NOVERDICT" in a + b:
            return "I would rather not say which one is better."
        if "GOOD" not in a + b:
            return "Both are similar.\nA"  # position bias: always A
        return f"The good one is better.\n{'A' if 'GOOD' in a else 'B'}"


@contextlib.contextmanager
def judge_server():
    script = JudgeScript()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, data: bytes, ctype: str = "text/plain"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                script.requests += 1
                script.auth_headers.append(self.headers.get("Authorization"))
                script.bodies.append(body)
                script.paths.append(self.path)
                fail = script.fail_first > 0
                script.fail_first -= int(fail)
            if self.path.partition("?")[0] != "/v1/chat/completions":  # echoes the path, as careless servers do
                return self._send(404, f"not found: {self.path}".encode())
            auth = self.headers.get("Authorization")
            if fail:
                return self._send(500, script.error_body(auth).encode() if script.error_body else b"overloaded")
            if script.status != 200:  # echoes the Authorization header, as careless servers do
                text = script.error_body(auth) if script.error_body else f"invalid key {auth}"
                return self._send(script.status, text.encode())
            content = script.reply(body["messages"][-1]["content"])
            if script.reply_prefix:
                content = script.reply_prefix(auth) + content
            if script.echo_auth:
                content = f"You sent Authorization: {self.headers.get('Authorization')}.\n{content}"
            payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
            self._send(200, json.dumps(payload).encode(), "application/json")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    script.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        yield script
    finally:
        httpd.shutdown()
        httpd.server_close()


def fake_calibration_dir(tmp_path: Path, rms: tuple[str, ...] = ("more", "multitask"), bootstrap_samples: int = 200):
    """A run directory whose calibration/ holds metrics.json (each RM: accuracy 0.6, ECE 0.05 on all and hh
    averages) and config.json with `bootstrap_samples`, for report tests that add their own comparisons.json."""
    import json

    d = tmp_path / "run"
    (d / "calibration").mkdir(parents=True)
    m = {"all_average": {"accuracy": 0.6, "ece_10": 0.05}, "hh_average": {"accuracy": 0.6, "ece_10": 0.05}}
    (d / "calibration" / "metrics.json").write_text(json.dumps(dict.fromkeys(rms, m)))
    (d / "calibration" / "config.json").write_text(json.dumps({"bootstrap_samples": bootstrap_samples}))
    return d
