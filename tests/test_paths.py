"""Names from data never become paths as they are, nothing is written or deleted outside the run directory, and
the fingerprints of inputs cover their content (issue 17, items 1 and 3).

The hostile names are source names and `group_by` values holding `..`, an absolute path, `/`, NUL and more
than 255 bytes; they go through the real reward stage on a tiny recipe, with a sentinel tree around the run
directory that must come out untouched (also under `--force reward`, which deletes and retrains every RM)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from pipeline import io
from pipeline.data import DataConfig, SourceSpec
from pipeline.reward import index as index_mod
from pipeline.reward import stage
from pipeline.reward.config import RewardStageConfig
from pipeline.reward.fingerprint import base_model_record
from tests.helpers import CHATML, one_rm_recipe


HOSTILE = ["../../../../../x", "/../../../x", "/etc/passwd", "a/b", "a\x00b", "..", ".", "", "é" * 200, "x" * 300]


@pytest.mark.parametrize("name", HOSTILE)
def test_safe_component_is_one_harmless_component(name):
    comp = io.safe_component(name)
    assert comp not in (".", "..", "") and not comp.startswith(".")
    assert "/" not in comp and "\x00" not in comp and "\\" not in comp
    assert len(comp.encode()) <= 255
    assert io.safe_component(name) == comp  # deterministic: a rerun finds the same directory


def test_safe_component_keeps_plain_names_and_separates_the_others():
    for plain in ["more", "multitask", "single-helpful", "single-hh_rlhf.v2", "rm+1"]:
        assert io.safe_component(plain) == plain
    comps = [io.safe_component(n) for n in [*HOSTILE, "a_b", "a b", "a:b", "A/B"]]
    assert len(set(comps)) == len(comps)
    assert io.safe_component("a/b").startswith("a_b-")  # readable slug + hash


def test_inside_and_remove_tree_refuse_paths_leaving_the_root(tmp_path):
    root, outside = tmp_path / "run", tmp_path / "user"
    (root / "reward").mkdir(parents=True)
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    for bad in [root / "reward" / ".." / ".." / "user", outside, root, root / ".."]:
        with pytest.raises(io.UnsafePathError, match="outside"):
            io.remove_tree(bad, root)
    (root / "reward" / "link").symlink_to(outside)  # a symlink out of the run directory is not followed
    with pytest.raises(io.UnsafePathError):
        io.inside(root, root / "reward" / "link" / "precious.txt")
    io.remove_tree(root / "reward" / "link", root)  # unlinks the link only
    assert (outside / "precious.txt").read_text() == "keep me" and not (root / "reward" / "link").exists()
    (root / "reward" / "ok" / "sub").mkdir(parents=True)
    assert io.inside(root, root / "reward" / "ok") == root / "reward" / "ok"
    io.remove_tree(root / "reward" / "ok", root)
    assert not (root / "reward" / "ok").exists()
    io.remove_tree(root / "reward" / "missing", root)  # missing is fine


def _edit_in_place(path, old: bytes, new: bytes):
    """Same-size edit of a file in place, with its atime and mtime restored (what `cp --preserve`, rsync or a
    careless tool does)."""
    assert len(old) == len(new)
    st = path.stat()
    data = path.read_bytes()
    assert old in data
    with open(path, "r+b") as f:
        f.write(data.replace(old, new, 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_content_sha256_sees_same_size_edits_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MORE_PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(io, "_HASHED", {})
    f = tmp_path / "weights.bin"
    f.write_bytes(b"A" * 1000)
    reads = []
    orig = io.file_sha256
    monkeypatch.setattr(io, "file_sha256", lambda p, *a: reads.append(p) or orig(p, *a))
    h1 = io.content_sha256(f)
    assert h1 == orig(f) and len(reads) == 1
    monkeypatch.setattr(io, "_HASHED", {})  # a new process: served by the on-disk cache
    assert io.content_sha256(f) == h1 and len(reads) == 1
    _edit_in_place(f, b"A", b"B")
    h2 = io.content_sha256(f)
    assert h2 != h1 and h2 == orig(f) and len(reads) == 2


# ---------------------------------------------------------------------------------------------------
# The real reward stage on hostile names


def _pairs_file(path, groups: list[str], n: int = 24):
    rows = [
        {"prompt": f"\n\nHuman: question {g!r} number {i}?\n\nAssistant:", "chosen": f" yes {i}", "rejected": " no"}
        | {"grp": g}
        for g in groups
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _recipe(data_file, source_name: str, methods=("single",), **reward):
    data = DataConfig(
        sources=[SourceSpec(name=source_name, format="jsonl", path=str(data_file), options={"group_by": "grp"})],
        n_train_per_source=8,
        per_source_batch=2,
        max_length=48,
    )
    rcfg = RewardStageConfig(
        methods=list(methods),
        tokenizer_vocab_size=300,
        train={"max_steps": 1, "report_to": "none", "disable_tqdm": True, "save_strategy": "no", **reward},
    )
    return SimpleNamespace(name="test", seed=0, data=data, reward=rcfg)


def _tree(root):
    return {
        str(p.relative_to(root)): (p.is_dir(), p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.slow
def test_hostile_source_and_group_names_stay_inside_the_run_directory(tmp_path, capsys, one_thread):
    """Defect 1: a group value `../../../../../x` or a source name `/../../../x` made the stage write
    fingerprint.json outside the run directory and `--force reward` rmtree it; `a/b` failed after training."""
    sentinel = tmp_path / "sentinel"
    run_dir = sentinel / "a" / "b" / "c" / "d" / "run"
    run_dir.mkdir(parents=True)
    # what the hostile names pointed at before: user directories next to and above the run directory
    for d in [sentinel / "x", sentinel / "a" / "x", sentinel / "a" / "b" / "x", run_dir / "x", run_dir.parent / "x"]:
        d.mkdir(parents=True, exist_ok=True)
        (d / "precious.txt").write_text("user data")
    data_file = tmp_path / "pairs.jsonl"
    groups = ["../../../../../x", "a/b", "n\x00l" + "y" * 300]  # `..`, `/`, NUL and > 255 bytes
    _pairs_file(data_file, groups)
    before = {k: v for k, v in _tree(sentinel).items() if not k.startswith("a/b/c/d/run/")}

    recipe = _recipe(data_file, "/../../../x")
    stage.run(recipe, run_dir)
    index = json.loads((run_dir / "reward" / "index.json").read_text())
    assert sorted(index) == sorted(f"single-/../../../x/{g}" for g in groups)  # the original names, kept
    for name, entry in index.items():
        rm = run_dir / entry["path"]
        assert rm.parent == run_dir / "reward" and rm.name == io.safe_component(name)
        assert (rm / "fingerprint.json").is_file() and entry["sources"] == [name.removeprefix("single-")]
        assert len(rm.name.encode()) <= 255
    assert index_mod.resolve_rm_path(run_dir, name, entry["path"]) == rm
    assert not (run_dir / "reward" / ".checkpoints").exists() or not any(
        (run_dir / "reward" / ".checkpoints").iterdir()
    )  # no stray checkpoint directories

    capsys.readouterr()
    stage.run(recipe, run_dir)  # rerun: every RM found again and reused
    assert capsys.readouterr().out.count("already trained, skipping") == len(groups)
    stage.run(recipe, run_dir, force=True)  # --force reward deletes and retrains every RM, inside DIR only
    after = {k: v for k, v in _tree(sentinel).items() if not k.startswith("a/b/c/d/run/")}
    assert after == before


def test_stage_outputs_of_other_stages_use_the_safe_names(tmp_path):
    """Calibration's plots, align's directories and the report read/write `safe_component(rm)`, never the name;
    calibration does not write temperature.json into an RM directory outside the run directory."""
    from pipeline.report.sections import reward_section

    run_dir = tmp_path / "run"
    rm = run_dir / "reward" / io.safe_component("single-src/../../g")
    rm.mkdir(parents=True)
    (rm / "reward_info.json").write_text(json.dumps({"n_train_pairs": 7}))
    index = {"single-src/../../g": {"path": f"reward/{rm.name}", "method": "single", "sources": ["src/../../g"]}}
    (run_dir / "reward" / "index.json").write_text(json.dumps(index))
    assert "| 7 |" in "\n".join(reward_section(run_dir))
    assert index_mod.read_index(run_dir)["single-src/../../g"]["path"] == str(rm)
    moved = dict(index)
    moved["single-src/../../g"] = {**index["single-src/../../g"], "path": "/nonexistent/reward/elsewhere"}
    (run_dir / "reward" / "index.json").write_text(json.dumps(moved))
    assert index_mod.read_index(run_dir)["single-src/../../g"]["path"] == str(rm)  # the moved run finds its own copy


def test_calibration_never_writes_temperature_outside_the_run(tmp_path, capsys, one_thread):
    from pipeline.calibration.config import CalibrationConfig
    from pipeline.calibration.stage import run as calibrate

    recipe = one_rm_recipe(max_steps=1)
    other, mine = tmp_path / "other", tmp_path / "mine"
    stage.run(recipe, other)
    (mine / "reward").mkdir(parents=True)
    # an index naming another run's RM by absolute path (written by hand, or by an older version)
    index = json.loads((other / "reward" / "index.json").read_text())
    index["more"]["path"] = str(other / "reward" / "more")
    (mine / "reward" / "index.json").write_text(json.dumps(index))
    before = _tree(other)
    recipe.calibration = CalibrationConfig(dtype="fp32", bootstrap_samples=0, progress=False, plots=False)
    artifacts = calibrate(recipe, mine)
    assert _tree(other) == before
    assert "not writing temperature.json" in capsys.readouterr().out
    assert all(not a.startswith("/") for a in artifacts)
    assert "more" in json.loads((mine / "calibration" / "temperatures.json").read_text())


# ---------------------------------------------------------------------------------------------------
# Stale inputs: a base model's weights replaced and a template file edited at the same path


def _local_base(path):
    from pipeline.data.synthetic import SyntheticConfig, synthetic_corpus
    from pipeline.models import TinyModelSpec, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(synthetic_corpus(SyntheticConfig(n_train=48, n_valid=16, n_test=16)), vocab_size=300)
    tiny_model(TinyModelSpec(), tok, task="reward", seed=0).save_pretrained(path)
    tok.save_pretrained(path)


def _replace_weights_same_size(path):
    """Other weights written over the same file (same shapes, so the same size), mtime restored."""
    from safetensors.torch import load_file, save_file

    st = path.stat()
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_base_weights_replaced_or_template_edited_in_place_retrain(tmp_path, capsys, monkeypatch, one_thread):
    """Defect 3: the stage hash ignored reward.model_name_or_path, the RM fingerprint recorded weight sizes only
    and the template as its path, so both edits left reward (and calibration) 'up to date'."""
    import pipeline.config as C
    import pipeline.plan as P

    monkeypatch.setenv("MORE_PIPELINE_CACHE", str(tmp_path / "cache"))
    base, template = tmp_path / "base", tmp_path / "chat.jinja"
    _local_base(base)
    template.write_text(CHATML)
    overrides = [f"reward.model_name_or_path={base}", f"reward.chat_template={template}"]

    def hashes():
        r = C.load_recipe("tiny-cpu", overrides)
        return {s: P.stage_config_hash(r, s) for s in ("reward", "calibration")}

    def recipe():
        r = one_rm_recipe(max_steps=1)
        r.reward.model_name_or_path, r.reward.chat_template = str(base), str(template)
        return r

    run_dir = tmp_path / "run"
    stage.run(recipe(), run_dir)
    h0 = hashes()
    capsys.readouterr()
    stage.run(recipe(), run_dir)
    assert "already trained, skipping" in capsys.readouterr().out and hashes() == h0

    _edit_in_place(template, b"im_end", b"im_fin")
    h1 = hashes()
    assert all(h1[s] != h0[s] for s in h0)  # pipeline.run reruns reward and calibration
    stage.run(recipe(), run_dir)
    out = capsys.readouterr().out
    assert "training more" in out and "tokenizer_sha256" in out
    assert "im_fin" in (run_dir / "reward" / "more" / "chat_template.jinja").read_text()

    _replace_weights_same_size(base / "model.safetensors")
    h2 = hashes()
    assert all(h2[s] != h1[s] for s in h0)
    stage.run(recipe(), run_dir)
    out = capsys.readouterr().out
    assert "training more" in out and "base_model.weights.model.safetensors" in out
    stage.run(recipe(), run_dir)
    assert "already trained, skipping" in capsys.readouterr().out and hashes() == h2


def test_data_file_edited_in_place_changes_the_stage_hashes(tmp_path, monkeypatch):
    """The stage hash used the size and mtime of data files: a same-size edit with mtime restored was missed."""
    import pipeline.plan as P

    monkeypatch.setenv("MORE_PIPELINE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    d = {"data": {"sources": [{"name": "s", "format": "jsonl", "path": str(data)}]}}
    before = {s: P.local_input_stats(d, s) for s in ("reward", "calibration", "align")}
    _edit_in_place(data, b'"a"', b'"c"')
    assert all(P.local_input_stats(d, s) != before[s] for s in before)


def test_hub_ids_are_recorded_by_their_cached_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants

    import pipeline.plan as P

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    d = {"reward": {"model_name_or_path": "owner/model"}}
    assert P.local_input_stats(d, "reward") == {}  # not cached: nothing known
    ref = tmp_path / "hub" / "models--owner--model" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    assert P.local_input_stats(d, "reward") == {"owner/model": {"hub_revision": "a" * 40}}
    ref.write_text("b" * 40)  # the cache moved to a new commit
    assert P.local_input_stats(d, "reward") == {"owner/model": {"hub_revision": "b" * 40}}
    assert base_model_record("owner/model") == {"path": "owner/model", "revision": "b" * 40}


def test_data_mixing_is_refused_at_load_time():
    """data.mixing was validated and hashed but never read (each RM's method decides its mixing)."""
    import pipeline.config as C

    with pytest.raises(C.RecipeError, match=r"data.mixing .* no longer read: .*reward.methods") as e:
        C.load_recipe("tiny-cpu", ["data.mixing=concat"])
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------
# Issue 29, item 3 and its minor items: no write, delete or lock through a symlink out of the run directory


def test_a_symlinked_stage_folder_is_refused_before_anything_is_written(tmp_path):
    """run/reward linked to an outside folder: the tiny base model (.base/) was written there before `inside`
    refused reward/multitask with "report this as a bug". Now nothing is written and the error says symlink,
    in --dry-run too; a link under a stage folder is refused the same way, one that stays inside is fine."""
    from pipeline.config import load_recipe
    from pipeline.errors import RecipeError
    from pipeline.run import run_pipeline

    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    run_dir.mkdir()
    outside.mkdir()
    (run_dir / "reward").symlink_to(outside)
    recipe = load_recipe("tiny-cpu", ["reward.train.max_steps=1"])
    for dry in (True, False):
        with pytest.raises(RecipeError, match=r"reward is a symlink \(to .*outside\).*outside the run directory"):
            run_pipeline(recipe, run_dir, stages=["reward"], dry_run=dry)
    assert list(outside.iterdir()) == [] and not (run_dir / "manifest.json").exists()

    (run_dir / "reward").unlink()
    (run_dir / "reward" / ".checkpoints").mkdir(parents=True)
    (run_dir / "reward" / ".checkpoints" / "more").symlink_to(outside)
    with pytest.raises(RecipeError, match=r"more is a symlink"):
        run_pipeline(recipe, run_dir, stages=["reward"], dry_run=True)
    (run_dir / "reward" / ".checkpoints" / "more").unlink()
    (run_dir / "elsewhere").mkdir()
    (run_dir / "reward" / "kept").symlink_to(run_dir / "elsewhere")  # stays inside: not refused
    run_pipeline(recipe, run_dir, stages=["reward"], dry_run=True)


def test_the_reward_stage_writes_nothing_through_a_linked_folder(tmp_path):
    """Called directly (no orchestrator pre-check), the stage's first delete/write of reward/.base is checked
    before the model is saved, and the message names the link."""
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    run_dir.mkdir()
    outside.mkdir()
    (run_dir / "reward").symlink_to(outside)
    recipe = one_rm_recipe()
    with pytest.raises(io.UnsafePathError, match=r"reward is a symlink .*never writes or deletes through a link"):
        stage.base_model_path(recipe, stage.build_tokenizer(recipe, None, run_dir), run_dir)
    assert list(outside.iterdir()) == []


def test_remove_tree_unlinks_a_link_directly_under_the_root_and_inside_names_links(tmp_path):
    """remove_tree on run/link raised "report this as a bug" (it checked the link's parent, the root itself);
    inside() on a path through a link out of the root now says it is a symlink, not a bug."""
    root, outside = tmp_path / "run", tmp_path / "user"
    root.mkdir()
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    (root / "link").symlink_to(outside)
    with pytest.raises(io.UnsafePathError, match=r"link is a symlink \(to .*user\)") as e:
        io.inside(root, root / "link" / "sub")
    assert "report this as a bug" not in str(e.value)
    with pytest.raises(io.UnsafePathError, match="is a symlink"):
        io.remove_tree(root / "link" / "sub", root)  # missing, but checked: it would lie outside
    io.remove_tree(root / "link", root)
    assert not (root / "link").is_symlink() and (outside / "precious.txt").read_text() == "keep me"


def test_a_lock_symlink_to_a_missing_outside_path_is_refused(tmp_path):
    from pipeline.errors import RecipeError
    from pipeline.run import _lock_run_dir

    run_dir, target = tmp_path / "run", tmp_path / "outside" / "created"
    run_dir.mkdir()
    (tmp_path / "outside").mkdir()
    (run_dir / ".lock").symlink_to(target)
    with pytest.raises(RecipeError, match=r"\.lock is a symlink .*Fix: delete the link"):
        _lock_run_dir(run_dir)
    assert not target.exists()
