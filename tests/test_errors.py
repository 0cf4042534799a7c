"""One-line errors (exit code 2, naming the key, file or model and the fix) for what a user can cause, and
the resume hint only where a rerun resumes (issue 17, items 4 and 5)."""

from __future__ import annotations

import errno
import json

import pytest

import pipeline.run as R
from tests.test_run import fakes  # noqa: F401 - the fixture of fake stages


TINY_REWARD_RECIPE = """\
name: t
seed: 0
stages: [reward]
data:
  synthetic: {n_train: 48, n_valid: 16, n_test: 16}
  n_train_per_source: 16
  per_source_batch: 2
  max_length: 96
reward:
  methods: [more]
  tokenizer_vocab_size: 400
  train:
    max_steps: 4
    learning_rate: 1.0e-3
    report_to: none
    disable_tqdm: true
    save_strategy: steps
    save_steps: 2
"""


def _main(tmp_path, *overrides, recipe=TINY_REWARD_RECIPE):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    return R.main(["--recipe", str(path), "--output-dir", str(tmp_path / "run"), *overrides])


@pytest.mark.slow
def test_disk_full_while_checkpointing_is_one_line_and_recorded(tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    def disk_full(self, output_dir):
        raise OSError(errno.ENOSPC, "No space left on device", str(output_dir) + "/rng_state.pth")

    monkeypatch.setattr(Trainer, "_save_rng_state", disk_full)
    monkeypatch.delenv("PIPELINE_TRACEBACK", raising=False)
    assert _main(tmp_path) == 2
    err = capsys.readouterr().err
    ckpts = tmp_path / "run" / "reward" / ".checkpoints" / "more"
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in err, err
    assert "ran out of disk space writing in" in line[0] and str(ckpts) in line[0]
    assert "needs about" in line[0] and "4x the" in line[0] and "--output-dir" in line[0]
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["reward"]
    assert entry["status"] == "failed" and "ran out of disk space" in entry["error"]


def test_disk_full_behind_a_wrapped_error_is_one_line(fakes, tmp_path, monkeypatch, capsys):  # noqa: F811
    """What torch's checkpoint writer does: a RuntimeError raised while handling the OSError(ENOSPC)."""
    import fake_reward

    def full(recipe, run_dir):
        (run_dir / "reward").mkdir()
        (run_dir / "reward" / "part.bin").write_bytes(b"x" * 3000)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from None

    monkeypatch.setattr(fake_reward, "run", full)
    monkeypatch.delenv("PIPELINE_TRACEBACK", raising=False)
    assert R.main(["--recipe", str(fakes / "fake.yaml"), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert f"ran out of disk space writing in {tmp_path / 'run'} (" in err and "needs about 2.9 KB more" in err
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["reward"]
    assert entry["status"] == "failed" and "ran out of disk space" in entry["error"]


def test_the_resume_hint_is_only_for_interruptions(fakes, tmp_path, monkeypatch, capsys, caplog):  # noqa: F811
    import fake_align

    def bad(recipe, run_dir):
        raise ValueError("align.x: a value a rerun cannot fix")

    monkeypatch.setattr(fake_align, "run", bad)
    monkeypatch.delenv("PIPELINE_TRACEBACK", raising=False)
    caplog.set_level("INFO", logger="pipeline.run")
    args = ["--recipe", str(fakes / "fake.yaml"), "--output-dir", str(tmp_path / "run")]
    assert R.main(args) == 2
    assert "a rerun cannot fix" in caplog.text and "resumes" not in caplog.text + capsys.readouterr().err

    def ctrl_c(recipe, run_dir):
        raise KeyboardInterrupt()

    monkeypatch.setattr(fake_align, "run", ctrl_c)
    caplog.clear()
    assert R.main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted (Ctrl-C); run the same command again to resume" in err and "()" not in err
    assert "[align] interrupted (Ctrl-C); the same command resumes it" in caplog.text
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["align"]
    assert entry["error"] == "KeyboardInterrupt: interrupted (Ctrl-C)"


@pytest.mark.parametrize(
    "template,expected",
    [("{% for m in messages %}{{ m.content }", "does not parse"), ("{{ raise_exception('no') }}", "raises")],
)
def test_a_broken_chat_template_is_one_line(tmp_path, monkeypatch, capsys, template, expected):
    monkeypatch.delenv("PIPELINE_TRACEBACK", raising=False)
    (tmp_path / "t.jinja").write_text(template)
    assert _main(tmp_path, f"reward.chat_template={tmp_path / 't.jinja'}") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"reward.chat_template ({tmp_path / 't.jinja'}): the chat template" in err
    assert expected in err and "reward.chat_template=none" in err
