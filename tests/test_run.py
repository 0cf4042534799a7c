"""The orchestrator (`pipeline.run`) on fake stages: skip/rerun logic, manifest, CLI, crash safety.

The fake stages are those of tests/helpers.py (FAKE_SRC, RUNNER_SRC; it says how they work), installed in-process
by the `fakes` fixture of conftest.py and run by the subprocess tests (kill -9, Ctrl-C, torchrun) through
runner.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline.config as C
import pipeline.plan as P
import pipeline.run as R
from tests.helpers import STAGE_NAMES, accelerate_launch_2proc, calls, fakes_env, set_stage_run, torchrun_fakes


def run(fakes, out, *overrides, **kw):
    recipe = C.load_recipe(str(fakes / "fake.yaml"), list(overrides))
    return R.run_pipeline(recipe, out, **kw)


# ---------------------------------------------------------------------------------------------------
# Skip / rerun decisions


def test_first_run_writes_complete_manifest(fakes, tmp_path):
    out = tmp_path / "run"
    run(fakes, out)
    assert calls(tmp_path) == dict.fromkeys(STAGE_NAMES, 1)
    m = json.loads((out / "manifest.json").read_text())
    assert set(m) >= {"stages", "versions", "git_commit", "recipe"}
    assert set(m["versions"]) >= {
        "torch",
        "trl",
        "transformers",
        "accelerate",
        "deepspeed",
        "peft",
        "datasets",
        "python",
        "pipeline",
    }
    assert m["versions"]["torch"] and m["versions"]["python"].count(".") == 2
    recipe = C.load_recipe(str(fakes / "fake.yaml"))
    assert m["recipe"]["data"]["lr"] == 1e-6 and m["recipe"]["reward"]["steps"] == 2
    for s in STAGE_NAMES:
        e = m["stages"][s]
        assert e["status"] == "done"
        assert e["config_hash"] == P.stage_config_hash(recipe, s)
        assert e["artifacts"] == [f"{s}/result.json"]
        assert e["started"] <= e["finished"]
    # every downstream stage recorded which upstream run it consumed
    assert m["stages"]["report"]["upstream"] == {s: m["stages"][s]["run_id"] for s in STAGE_NAMES[:3]}
    assert (out / "recipe.yaml").exists()
    assert not list(out.rglob("*.tmp"))


def test_rerun_skips_everything(fakes, tmp_path, caplog):
    out = tmp_path / "run"
    run(fakes, out)
    before = json.loads((out / "manifest.json").read_text())
    caplog.set_level("INFO", logger="pipeline.run")
    run(fakes, out)
    assert calls(tmp_path) == dict.fromkeys(STAGE_NAMES, 1)
    after = json.loads((out / "manifest.json").read_text())
    assert {s: after["stages"][s]["run_id"] for s in STAGE_NAMES} == {
        s: before["stages"][s]["run_id"] for s in STAGE_NAMES
    }
    assert caplog.text.count("SKIP") == 4 and "up to date" in caplog.text


def test_changed_override_reruns_stage_and_downstream(fakes, tmp_path):
    out = tmp_path / "run"
    run(fakes, out)
    run(fakes, out, "align.steps=5")
    assert calls(tmp_path) == {"reward": 1, "calibration": 1, "align": 2, "report": 2}
    run(fakes, out, "align.steps=5")  # and is stable again
    assert calls(tmp_path) == {"reward": 1, "calibration": 1, "align": 2, "report": 2}
    run(fakes, out, "align.steps=5", "data.n=7")  # data feeds every stage
    assert calls(tmp_path) == {"reward": 2, "calibration": 2, "align": 3, "report": 3}
    run(fakes, out, "align.steps=5", "data.n=7", "seed=4")
    assert calls(tmp_path) == {"reward": 3, "calibration": 3, "align": 4, "report": 4}


def test_renaming_or_moving_does_not_rerun(fakes, tmp_path):
    out = tmp_path / "run"
    run(fakes, out)
    run(fakes, out, "name=other", "description=hello", "output_dir=/elsewhere")
    assert calls(tmp_path) == dict.fromkeys(STAGE_NAMES, 1)


def test_force_reruns_stage_and_downstream(fakes, tmp_path):
    out = tmp_path / "run"
    run(fakes, out)
    run(fakes, out, force=["calibration"])
    assert calls(tmp_path) == {"reward": 1, "calibration": 2, "align": 2, "report": 2}
    run(fakes, out, force=["all"])
    assert calls(tmp_path) == {"reward": 2, "calibration": 3, "align": 3, "report": 3}
    with pytest.raises(C.RecipeError, match="not among the selected stages"):
        run(fakes, out, stages="report", force=["reward"])


def test_stages_subset_then_rest(fakes, tmp_path):
    out = tmp_path / "run"
    run(fakes, out, stages="report,reward")  # any order given; runs in pipeline order
    assert calls(tmp_path) == {"reward": 1, "calibration": 0, "align": 0, "report": 1}
    m = json.loads((out / "manifest.json").read_text())
    assert m["stages"]["calibration"]["status"] == "skipped"
    assert m["stages"]["report"]["status"] == "done"
    run(fakes, out)  # calibration/align never ran; report consumed an older state, so it reruns
    assert calls(tmp_path) == {"reward": 1, "calibration": 1, "align": 1, "report": 2}


def test_stage_run_alone_invalidates_downstream_later(fakes, tmp_path, caplog):
    out = tmp_path / "run"
    run(fakes, out)
    caplog.set_level("INFO", logger="pipeline.run")
    run(fakes, out, stages=["calibration"], force=["calibration"])
    # the report reads calibration's results, so it is regenerated; align is not rerun but marked stale
    assert calls(tmp_path) == {"reward": 1, "calibration": 2, "align": 1, "report": 2}
    m = json.loads((out / "manifest.json").read_text())
    assert m["stages"]["align"]["stale"] == "upstream stage calibration reruns"
    assert m["stages"]["report"]["reason"] == "regenerated: upstream stage calibration reruns"
    assert "align is STALE" in caplog.text
    run(fakes, out)  # align consumed the old calibration run; the report then reads the new align
    assert calls(tmp_path) == {"reward": 1, "calibration": 2, "align": 2, "report": 3}
    assert "stale" not in json.loads((out / "manifest.json").read_text())["stages"]["align"]


def test_report_regenerated_later_when_an_upstream_reran_without_it(fakes, tmp_path):
    out = tmp_path / "run"
    run(fakes, out, stages="reward,calibration")
    run(fakes, out, stages="report")
    run(fakes, out, stages="calibration", force=["calibration"])  # report was done: regenerated
    assert calls(tmp_path) == {"reward": 1, "calibration": 2, "align": 0, "report": 2}
    run(fakes, out, stages="reward")  # nothing reruns: the report is left alone
    assert calls(tmp_path)["report"] == 2


def test_plan_names_the_changed_keys(fakes, tmp_path, caplog):
    out = tmp_path / "run"
    run(fakes, out)
    assert json.loads((out / "manifest.json").read_text())["stages"]["align"]["inputs"]["align"]["steps"] == 1
    caplog.set_level("INFO", logger="pipeline.run")
    run(fakes, out, "calibration.steps=7", "data.sources.1.path=/y", dry_run=True)
    text = caplog.text
    assert 'reward       RUN     config changed: data.sources.1.path: "/x" -> "/y"' in text
    assert "calibration.steps: 1 -> 7" in text and "config changed (hash" not in text
    # an older manifest without recorded inputs still says the config changed, by hash
    m = json.loads((out / "manifest.json").read_text())
    del m["stages"]["reward"]["inputs"]
    (out / "manifest.json").write_text(json.dumps(m))
    caplog.clear()
    run(fakes, out, "data.n=5", dry_run=True)
    assert "config changed (hash" in caplog.text and "config changed: data.n: 4 -> 5" in caplog.text


def test_recipe_stages_field(fakes, tmp_path):
    out = tmp_path / "run"
    run(fakes, out, "stages=[reward,report]")
    assert calls(tmp_path) == {"reward": 1, "calibration": 0, "align": 0, "report": 1}
    with pytest.raises(C.RecipeError, match="unknown stage"):
        C.load_recipe(str(fakes / "fake.yaml"), ["stages=[reward,sft]"])


def test_missing_artifact_reruns(fakes, tmp_path):
    out = tmp_path / "run"
    run(fakes, out)
    (out / "align" / "result.json").unlink()
    run(fakes, out)
    assert calls(tmp_path) == {"reward": 1, "calibration": 1, "align": 2, "report": 2}


def test_truncated_or_edited_artifact_reruns(fakes, tmp_path, caplog):
    """Defect 11: an artifact cut short (or edited in place) since its stage finished is not up to date."""
    out = tmp_path / "run"
    run(fakes, out)
    m = json.loads((out / "manifest.json").read_text())
    rec = m["stages"]["align"]["artifact_files"]["align/result.json"]
    assert rec["size"] == (out / "align" / "result.json").stat().st_size and len(rec["sha256"]) == 64
    text = (out / "align" / "result.json").read_text()
    (out / "align" / "result.json").write_text(text[:5])
    with caplog.at_level("INFO", logger="pipeline.run"):
        run(fakes, out)
    assert calls(tmp_path) == {"reward": 1, "calibration": 1, "align": 2, "report": 2}
    assert "artifacts changed since it finished: align/result.json (size" in caplog.text
    # same size, other bytes (mtime moves): the hash catches it
    body = (out / "reward" / "result.json").read_text()
    (out / "reward" / "result.json").write_text(body.replace('"steps": 2', '"steps": 3'))
    run(fakes, out)
    assert calls(tmp_path) == {"reward": 2, "calibration": 2, "align": 3, "report": 3}
    run(fakes, out)  # and a clean rerun skips again
    assert calls(tmp_path) == {"reward": 2, "calibration": 2, "align": 3, "report": 3}


def test_files_of_another_stage_inside_an_artifact_are_not_recorded(fakes, tmp_path, monkeypatch):
    """calibration writes reward/<rm>/temperature.json inside the reward stage's RM directory: rewriting it
    must not make the reward stage look changed."""

    def reward_run(recipe, run_dir, *, force=False):
        (Path(run_dir) / "reward" / "rm").mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "reward" / "rm" / "w.bin").write_bytes(b"weights")
        return ["reward/rm"]

    def calibration_run(recipe, run_dir, *, force=False):
        (Path(run_dir) / "reward" / "rm" / "temperature.json").write_text(str(time.time()))
        return ["reward/rm/temperature.json"]

    set_stage_run(monkeypatch, "reward", reward_run)
    set_stage_run(monkeypatch, "calibration", calibration_run)
    out = tmp_path / "run"
    run(fakes, out, stages="reward,calibration")
    run(fakes, out, stages="reward,calibration", force=["reward"])  # reward rerecords with temperature.json there
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["stages"]["reward"]["artifact_files"]) == ["reward/rm/w.bin"]
    steps = R.plan(C.load_recipe(str(fakes / "fake.yaml")), out.resolve(), m, ["reward", "calibration"], [])
    assert [s["action"] for s in steps[:2]] == ["skip", "skip"]


def test_force_reaches_stages_that_keep_their_own_results(fakes, tmp_path, monkeypatch):
    """`--force reward` must make the reward stage redo its RMs, not only rerun it (defect 1)."""

    seen = []

    def reward_run(recipe, run_dir, *, force=False):
        seen.append(force)
        return []

    set_stage_run(monkeypatch, "reward", reward_run)
    out = tmp_path / "run"
    run(fakes, out, stages="reward")
    run(fakes, out, stages="reward", force=["reward"])
    run(fakes, out, "data.n=5", stages="reward")  # rerun for a config change: the stage decides what to redo
    assert seen == [False, True, False]


def test_manifest_lists_stages_in_pipeline_order(fakes, tmp_path):
    """The report lists the manifest's stages as they are: the orchestrator writes them in pipeline order,
    also when the first run selected later stages only and an older manifest had them in another order."""
    out = tmp_path / "run"
    run(fakes, out, stages="calibration,report")
    assert list(json.loads((out / "manifest.json").read_text())["stages"]) == list(STAGE_NAMES)
    m = json.loads((out / "manifest.json").read_text())
    m["stages"] = dict(reversed(m["stages"].items()))
    (out / "manifest.json").write_text(json.dumps(m))
    run(fakes, out, stages="reward")
    assert list(json.loads((out / "manifest.json").read_text())["stages"]) == list(STAGE_NAMES)


def test_failed_stage_recorded_and_retried(fakes, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="failed on purpose"):
        run(fakes, out, "calibration.fail=true")
    m = json.loads((out / "manifest.json").read_text())
    assert m["stages"]["reward"]["status"] == "done"
    assert m["stages"]["calibration"]["status"] == "failed"
    assert "failed on purpose" in m["stages"]["calibration"]["error"]
    assert "align" not in m["stages"] or m["stages"]["align"]["status"] != "done"
    run(fakes, out)  # config changed back, and the stage had failed anyway
    assert calls(tmp_path) == {"reward": 1, "calibration": 1, "align": 1, "report": 1}
    assert calls(tmp_path, "start")["calibration"] == 2


def test_running_status_resumes(fakes, tmp_path):
    out = tmp_path / "run"
    run(fakes, out)
    m = json.loads((out / "manifest.json").read_text())
    m["stages"]["align"]["status"] = "running"  # what kill -9 leaves
    (out / "manifest.json").write_text(json.dumps(m))
    (out / "align" / ".result.json.abc.tmp").write_text("half")
    run(fakes, out)
    assert calls(tmp_path) == {"reward": 1, "calibration": 1, "align": 2, "report": 2}
    assert not list(out.rglob("*.tmp"))


def test_dry_run_changes_nothing(fakes, tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level("INFO", logger="pipeline.run")
    run(fakes, out, dry_run=True)
    assert not out.exists() and calls(tmp_path) == dict.fromkeys(STAGE_NAMES, 0)
    assert caplog.text.count("RUN") == 4 and "never run" in caplog.text


def test_unknown_stage_errors(fakes, tmp_path, capsys):
    with pytest.raises(C.RecipeError) as e:
        run(fakes, tmp_path / "run", stages="reward,calibraton")
    assert "calibraton" in str(e.value) and "reward, calibration, align, report" in str(e.value)
    rc = R.main(["--recipe", str(fakes / "fake.yaml"), "--output-dir", str(tmp_path / "r"), "--stages", "sft"])
    assert rc == 2 and "unknown stage(s) sft" in capsys.readouterr().err


def test_cli_overrides_and_unknown_key(fakes, tmp_path, capsys):
    out = tmp_path / "run"
    assert R.main(["--recipe", str(fakes / "fake.yaml"), "--output-dir", str(out), "reward.steps=9"]) == 0
    assert json.loads((out / "reward" / "result.json").read_text())["steps"] == 9
    rc = R.main(["--recipe", str(fakes / "fake.yaml"), "--output-dir", str(out), "reward.stepz=9"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown key 'reward.stepz'" in err and "reward.steps" in err and "sleep" in err


def test_main_for_stage(fakes, tmp_path):
    out = tmp_path / "run"
    argv = ["--recipe", str(fakes / "fake.yaml"), "--output-dir", str(out)]
    assert R.main_for_stage("reward", argv) == 0
    assert R.main_for_stage("reward", argv) == 0  # up to date: skipped
    assert calls(tmp_path) == {"reward": 1, "calibration": 0, "align": 0, "report": 0}
    assert R.main_for_stage("reward", [*argv, "--force"]) == 0
    assert calls(tmp_path)["reward"] == 2
    with pytest.raises(ValueError, match="unknown stage"):
        R.main_for_stage("sft", argv)


def test_print_recipe_and_show_keys(fakes, tmp_path, capsys):
    assert R.main(["--recipe", str(fakes / "fake.yaml"), "--print-recipe", "reward.steps=4"]) == 0
    text = capsys.readouterr().out
    import yaml

    assert yaml.safe_load(text)["reward"]["steps"] == 4
    assert R.main(["--show-keys"]) == 0
    keys = capsys.readouterr().out
    assert "data.inner.depth" in keys and "reward.sleep" in keys and "seconds to sleep" in keys


def test_corrupt_manifest_is_a_clear_error(fakes, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text("{oops")
    with pytest.raises(C.RecipeError, match="manifest.json is not valid JSON"):
        run(fakes, out)


def test_second_run_in_the_same_directory_is_refused(fakes, tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running pipeline.run holds
        with pytest.raises(C.RecipeError, match="another pipeline.run is working in"):
            run(fakes, out)
    run(fakes, out)  # released (the kernel also releases it when the holder is killed)
    assert calls(tmp_path) == dict.fromkeys(STAGE_NAMES, 1)


def test_artifact_outside_run_dir_or_missing_fails(fakes, tmp_path, monkeypatch):

    set_stage_run(monkeypatch, "align", lambda recipe, run_dir, force=False: ["align/nothing.json"])
    with pytest.raises(RuntimeError, match="did not write: align/nothing.json"):
        run(fakes, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["stages"]["align"]["status"] == "failed"


# ---------------------------------------------------------------------------------------------------
# Crash safety: kill -9 and Ctrl-C in the middle of a stage, then the same command again


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out waiting for {text!r} in {path}")


def _sigint_default():  # preexec_fn: the child starts with SIGINT at its default (Python's KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _sigint_ignored():  # preexec_fn: what `nohup cmd &` from a non-interactive shell gives the child
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_ignored_sigint_is_respected_and_sigterm_interrupts(fakes, tmp_path):
    """A run started with SIGINT ignored (nohup) keeps going on SIGINT; SIGTERM still stops it cleanly (130)."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(fakes / "runner.py"),
        "--recipe",
        str(fakes / "fake.yaml"),
        "--output-dir",
        str(out),
        "calibration.sleep=120",
    ]
    proc = subprocess.Popen(
        cmd,
        env=fakes_env(fakes, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_ignored,
    )
    _wait_for(tmp_path / "calls.log", "calibration sleeping", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    # issue 28, item 10: the log says at start which signals stop the run (the SIGINT above did nothing)
    assert f"to stop this run: kill {proc.pid} (SIGTERM). SIGINT is ignored in this process" in err
    entry = json.loads((out / "manifest.json").read_text())["stages"]["calibration"]
    assert entry["status"] == "interrupted" and entry["error"] == "interrupted (terminated by signal 15)"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupt_mid_stage_then_resume(fakes, tmp_path, sig):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(fakes / "runner.py"),
        "--recipe",
        str(fakes / "fake.yaml"),
        "--output-dir",
        str(out),
        "calibration.sleep=120",
    ]
    env = fakes_env(fakes, tmp_path)
    # SIGINT's disposition is set for the child, as an interactive shell does for its foreground job: under
    # `nohup pytest &` it would otherwise inherit "ignored" and the Ctrl-C below would never arrive.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default
    )
    _wait_for(tmp_path / "calls.log", "calibration sleeping", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    m = json.loads((out / "manifest.json").read_text())
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert m["stages"]["calibration"]["status"] == "running"
    else:
        assert proc.returncode == 130, err
        assert "run the same command again" in err
        assert f"to stop this run: Ctrl-C (SIGINT) or kill {proc.pid} (SIGTERM)" in err
        assert m["stages"]["calibration"]["status"] == "interrupted"  # an interruption is not a failure
        assert m["stages"]["calibration"]["error"] == "interrupted (Ctrl-C)"
    assert m["stages"]["reward"]["status"] == "done"
    assert (out / "calibration" / ".result.json.x1y2z3.tmp").exists()  # the half-written file

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr and "failed" not in done.stderr
    assert calls(tmp_path, "end") == dict.fromkeys(STAGE_NAMES, 1)  # nothing finished twice
    assert calls(tmp_path, "start") == {"reward": 1, "calibration": 2, "align": 1, "report": 1}
    m = json.loads((out / "manifest.json").read_text())
    assert all(m["stages"][s]["status"] == "done" for s in STAGE_NAMES)
    assert json.loads((out / "calibration" / "result.json").read_text())["resumed"] is True
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    for s in STAGE_NAMES:
        json.loads((out / s / "result.json").read_text())  # every artifact complete


# ---------------------------------------------------------------------------------------------------
# Several processes: every rank runs every stage; only the main process writes the manifest


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_accelerate_then_torchrun(fakes, tmp_path):
    """accelerate_configs/cpu_2proc.yaml really starts 2 processes; a torchrun rerun skips on both ranks."""
    out = tmp_path / "run"
    env = fakes_env(fakes, tmp_path)
    env["FAKE_MANIFEST_WRITES"] = str(tmp_path / "writes.log")
    env["OMP_NUM_THREADS"] = "1"
    args = [str(fakes / "runner.py"), "--recipe", str(fakes / "fake.yaml"), "--output-dir", str(out)]
    p = accelerate_launch_2proc(args, env, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = (tmp_path / "calls.log").read_text().split("\n")
    for s in STAGE_NAMES:
        for rank in ("0", "1"):
            assert f"{s} end {rank}" in lines, (s, rank)
    writes = (tmp_path / "writes.log").read_text().split()
    assert len(writes) >= 8 and set(writes) == {"0"}  # only the main process wrote the manifest
    m = json.loads((out / "manifest.json").read_text())
    assert all(m["stages"][s]["status"] == "done" and m["stages"][s]["world_size"] == 2 for s in STAGE_NAMES)

    # Rerun with torchrun: the main process decides, both ranks skip every stage.
    (tmp_path / "calls.log").unlink()
    p = torchrun_fakes(args, env, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (tmp_path / "calls.log").exists()
    assert p.stderr.count("SKIP") == 4  # logged once, by the main process


# ---------------------------------------------------------------------------------------------------
# Output directories that cannot be written (issue 12)


@contextlib.contextmanager
def read_only(directory: Path, monkeypatch):
    """Make `directory` read-only: chmod, and (root ignores permissions) refuse every write under it."""
    import builtins

    directory = directory.resolve()
    inside = lambda p: str(Path(os.fsdecode(p)).resolve()).startswith(str(directory))  # noqa: E731
    real_os_open, real_open = os.open, builtins.open

    def os_open(path, flags, *a, **k):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(13, "Permission denied", str(path))
        return real_os_open(path, flags, *a, **k)

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and inside(file) and set(mode) & set("wax+"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *a, **k)

    modes = {p: p.stat().st_mode for p in [directory, *directory.rglob("*")]}
    for p in modes:
        p.chmod(p.stat().st_mode & ~0o222)
    with monkeypatch.context() as m:
        m.setattr(os, "open", os_open)
        m.setattr(builtins, "open", open_)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)


def test_read_only_run_dir_up_to_date_writes_nothing_else_one_clear_error(fakes, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["--recipe", str(fakes / "fake.yaml"), "--output-dir", str(out)]
    assert R.main(argv) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with read_only(out, monkeypatch):
        assert R.main(argv) == 0  # every stage is up to date: nothing to write
        assert calls(tmp_path) == dict.fromkeys(STAGE_NAMES, 1)
        rc = R.main([*argv, "reward.steps=5"])  # reward must rerun: one line, before any work
    err = capsys.readouterr().err
    assert rc == 2 and "is not writable" in err and "reward, calibration, align, report must run" in err
    assert "Fix:" in err and "Traceback" not in err
    assert calls(tmp_path, "start") == dict.fromkeys(STAGE_NAMES, 1)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_output_dir_that_is_a_file_is_one_clear_error(fakes, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for extra in ([], ["--dry-run"]):
        rc = R.main(["--recipe", str(fakes / "fake.yaml"), "--output-dir", str(tmp_path / "afile"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "afile" in err and "is a file" in err and "Fix:" in err and "Traceback" not in err
    rc = R.main(["--recipe", str(fakes / "fake.yaml"), "--output-dir", str(tmp_path / "afile" / "sub")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot create the run directory" in err and "Traceback" not in err


def test_overrides_may_come_before_and_after_options(capsys):
    rc = R.main(["seed=3", "--recipe", "tiny-cpu", "--print-recipe", "reward.peft=none"])
    out = capsys.readouterr().out
    assert rc == 0 and "\nseed: 3\n" in out and "peft: none" in out


def test_judge_budget_exhausted_is_one_line_not_a_traceback(fakes, tmp_path, monkeypatch, capsys):

    from pipeline.align.judge import JudgeBudgetExhausted

    def exhausted(recipe, run_dir, *, force=False):
        raise JudgeBudgetExhausted(
            "the judge request budget (align.judge.max_requests=4) is exhausted; raise "
            "align.judge.max_requests and rerun the same command"
        )

    set_stage_run(monkeypatch, "align", exhausted)
    monkeypatch.delenv("PIPELINE_TRACEBACK", raising=False)
    rc = R.main(["--recipe", str(fakes / "fake.yaml"), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "JudgeBudgetExhausted: the judge request budget" in err and "max_requests" in err
    assert "Traceback" not in err
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["align"]["status"] == "failed"


def test_dry_run_fails_for_a_data_path_that_does_not_exist(tmp_path, capsys):
    argv = ["--recipe", "tiny-cpu", "--output-dir", str(tmp_path / "run"), "--dry-run", "--stages", "reward"]
    argv.append("data.per_source_batch=1")  # the file below has one pair (a larger batch is refused since issue 29)
    missing = tmp_path / "nope" / "hh.jsonl"
    rc = R.main([*argv, f"data.sources=[{{name: mine, format: jsonl, path: {missing}}}]"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "data.sources[0] ('mine', format jsonl)" in err and str(missing) in err and "does not exist" in err
    missing.parent.mkdir()
    missing.write_text(json.dumps({"prompt": "Hi", "chosen": " a", "rejected": " b"}) + "\n")
    assert R.main([*argv, f"data.sources=[{{name: mine, format: jsonl, path: {missing}}}]"]) == 0
    assert not (tmp_path / "run").exists()


def test_planned_reward_steps_match_the_trainers_formula_by_hand():
    from pipeline.reward.stage import planned_steps

    base = ["data.synthetic.n_train=100", "data.per_source_batch=4", "reward.methods=[more,multitask]"]
    # 5 sources x 100 pairs, 20 pairs per batch: 25 batches per epoch
    assert planned_steps(C.load_recipe("tiny-cpu", base)) == {"more": 25, "multitask": 25}
    r = C.load_recipe(
        "tiny-cpu", [*base, "reward.train.gradient_accumulation_steps=2", "reward.train.num_train_epochs=1.5"]
    )
    assert planned_steps(r) == {"more": 20, "multitask": 20}  # ceil(1.5 x ceil(25 / 2))
    assert planned_steps(r, world=2) == {"more": 11, "multitask": 11}  # ceil(1.5 x ceil(13 / 2))
    r = C.load_recipe("tiny-cpu", [*base, "reward.train.max_steps=7"])
    assert planned_steps(r) == {"more": 7, "multitask": 7}
    # 102 pairs per source: balanced mixing fills blocks to 104 each (26 full batches); multitask's 510 pairs make
    # 25 full batches of 20, and the length-grouped sampler (the default) yields full batches only
    odd = ["data.synthetic.n_train=102", *base[1:]]
    assert planned_steps(C.load_recipe("tiny-cpu", odd)) == {"more": 26, "multitask": 25}
    no_grouping = C.load_recipe("tiny-cpu", [*odd, "reward.train.length_grouping=false"])
    assert planned_steps(no_grouping) == {"more": 26, "multitask": 26}  # the default sampler keeps the last one


def test_dry_run_prints_step_counts_and_an_estimate_only_from_measurements(tmp_path, caplog):
    out = tmp_path / "run"
    ov = ["data.synthetic.n_train=100", "reward.methods=[more,multitask]", "align.warm_start_steps=40"]
    argv = ["--recipe", "tiny-cpu", "--output-dir", str(out), "--dry-run", *ov]
    caplog.set_level("INFO", logger="pipeline.run")
    assert R.main(argv) == 0
    text = caplog.text
    assert "2 RMs, 50 optimizer steps (RM 1 of 2 more: 25, RM 2 of 2 multitask: 25)" in text
    assert "training time unknown (no step time measured in this directory yet)" in text
    assert "40 warm-start steps" in text and "time unknown (never run in this directory)" in text
    # a previous run measured 0.5 s/step and the align stage took 2:05
    for rm in ("more", "multitask"):
        (out / "reward" / rm).mkdir(parents=True)
        (out / "reward" / rm / "train_log.json").write_text(
            json.dumps([{"loss": 1}, {"train_runtime": 12.5, "step": 25}])
        )
    align = {"status": "done", "started": "2026-01-01T00:00:00.000+00:00", "finished": "2026-01-01T00:02:05.000+00:00"}
    (out / "manifest.json").write_text(json.dumps({"stages": {"align": align}}))
    caplog.clear()
    assert R.main(argv) == 0
    assert "training about 0:25 at the 0.5 s/step measured in this directory" in caplog.text
    assert "its last run here took 2:05" in caplog.text


# ---------------------------------------------------------------------------------------------------
# Issue 28, item 7: every rerun reason, short, naming the key or the file; an interruption is one


def _plan_line(text: str, stage: str) -> str:
    return next(line for line in text.splitlines() if f"  {stage:12s} RUN" in line)


def test_rerun_reasons_name_the_interruption_and_the_config_change(fakes, tmp_path, caplog):
    out = tmp_path / "run"
    run(fakes, out)
    m = json.loads((out / "manifest.json").read_text())
    m["stages"]["calibration"].update(status="interrupted", error="interrupted (Ctrl-C)")
    m["stages"]["align"].update(status="failed", error="RuntimeError: " + "a long explanation " * 25)
    (out / "manifest.json").write_text(json.dumps(m))
    caplog.set_level("INFO", logger="pipeline.run")
    caplog.clear()
    run(fakes, out, "calibration.steps=7", dry_run=True)
    cal, align = _plan_line(caplog.text, "calibration"), _plan_line(caplog.text, "align")
    assert "interrupted (Ctrl-C) last time: resuming" in cal and "config changed: calibration.steps: 1 -> 7" in cal
    assert "failed" not in cal
    assert "failed last time (RuntimeError: a long explanation" in align and "...): retrying" in align
    assert "calibration.steps: 1 -> 7" in align and "upstream stage calibration reruns" in align
    assert len(align) < 320  # not the whole 475-character error


def test_a_data_file_edited_in_place_is_named(fakes, tmp_path, caplog):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    out = tmp_path / "run"
    run(fakes, out, f"data.sources.1.path={data}")
    st = data.stat()
    data.write_text('{"prompt": "a", "chosen": "c", "rejected": "b"}\n')  # same size
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    caplog.set_level("INFO", logger="pipeline.run")
    caplog.clear()
    run(fakes, out, f"data.sources.1.path={data}", dry_run=True)
    line = _plan_line(caplog.text, "reward")
    assert f"input changed: {data} (content)" in line and "size or modification time" not in line


# ---------------------------------------------------------------------------------------------------
# Issue 28, item 1: a downstream rerun on a recipe that disagrees with the saved RMs; recipe.yaml per stage


def _reward_records_its_steps(monkeypatch) -> None:
    """The fake reward stage's `mismatch`: its result.json records the steps it ran with (as an RM's
    fingerprint.json records its settings)."""
    import dataclasses

    import pipeline.stages as stages

    def mismatch(recipe, run_dir):
        done = json.loads((Path(run_dir) / "reward" / "result.json").read_text())["steps"]
        if done == recipe.reward.steps:
            return []
        return [{"key": "reward.steps", "recipe": recipe.reward.steps, "recorded": {json.dumps(done): ["r1", "r2"]}}]

    table = tuple(
        dataclasses.replace(s, mismatch=mismatch, results="RMs") if s.name == "reward" else s for s in stages.STAGES
    )
    monkeypatch.setattr(stages, "STAGES", table)


def test_a_downstream_rerun_on_rms_of_other_settings_is_refused_unless_allowed(
    fakes, tmp_path, monkeypatch, caplog, capsys
):
    import yaml

    out = tmp_path / "run"
    run(fakes, out)
    _reward_records_its_steps(monkeypatch)
    before = calls(tmp_path)
    for dry_run in (True, False):
        with pytest.raises(C.RecipeError) as e:
            run(fakes, out, "reward.steps=5", stages="calibration,report", dry_run=dry_run)
        msg = str(e.value)
        assert "\n" not in msg and f"disagrees with the RMs in {out / 'reward'} that calibration, report" in msg
        assert "reward.steps: 2 in RMs r1, r2 vs 5 in the recipe" in msg
        assert "repeat the settings they were produced with (reward.steps=2)" in msg
        assert "rerun the reward stage with this recipe (--stages reward,calibration,report)" in msg
        assert "--allow-stale-upstream" in msg
    assert calls(tmp_path) == before  # refused before any work
    argv = ["--recipe", str(fakes / "fake.yaml"), "--output-dir", str(out), "--stages", "calibration,report"]
    assert R.main([*argv, "reward.steps=5"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "reward.steps: 2 in RMs r1, r2 vs 5" in err
    assert "--allow-stale-upstream" in R.build_parser().format_help()

    caplog.set_level("INFO", logger="pipeline.run")
    run(fakes, out, "reward.steps=5", stages="calibration,report", allow_stale_upstream=True)
    assert calls(tmp_path)["calibration"] == before["calibration"] + 1
    assert (
        "WARNING (--allow-stale-upstream): calibration runs on the RMs in reward/, produced with other" in caplog.text
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["stages"]["calibration"]["upstream_mismatch"] == {
        "stage": "reward",
        "results": "RMs",
        "keys": "reward.steps: 2 in RMs r1, r2 vs 5 in the recipe",
    }
    assert "upstream_mismatch" not in m["stages"]["reward"]
    # recipe.yaml states what the RMs were made with, not the last command's reward section
    assert yaml.safe_load((out / "recipe.yaml").read_text())["reward"]["steps"] == 2
    run(fakes, out, "reward.steps=2", stages="calibration")  # the settings repeated: no refusal, no warning
    assert "upstream_mismatch" not in json.loads((out / "manifest.json").read_text())["stages"]["calibration"]


def test_recipe_yaml_holds_each_stages_settings_as_it_ran_and_reruns_exactly(fakes, tmp_path):
    import yaml

    out = tmp_path / "run"
    run(fakes, out, stages="reward,calibration")  # align and the report never run here
    text = (out / "recipe.yaml").read_text()
    assert text.startswith("# The settings this run directory's results were produced with")
    y = yaml.safe_load(text)
    assert y["stages"] == ["reward", "calibration"] and "align" not in y and "report" not in y
    run(fakes, out, "calibration.steps=7", stages="calibration")
    run(fakes, out, "reward.steps=9", "calibration.steps=1", stages="reward")  # calibration is now STALE
    text = (out / "recipe.yaml").read_text()
    assert "# Note: calibration is STALE (upstream stage reward reruns): its results were computed before" in text
    y = yaml.safe_load(text)
    assert y["reward"]["steps"] == 9 and y["calibration"]["steps"] == 7  # as each last ran, not the command's 1
    again = C.load_recipe(str(out / "recipe.yaml"))
    steps = P.plan(again, out, json.loads((out / "manifest.json").read_text()), ["calibration"], [])
    assert [s["action"] for s in steps] == ["exclude", "run", "exclude", "exclude"]  # the stale one
    R.run_pipeline(again, out, stages="calibration")
    steps = P.plan(again, out, json.loads((out / "manifest.json").read_text()), list(y["stages"]), [])
    assert [s["action"] for s in steps] == ["skip", "skip", "exclude", "exclude"]
