"""`pipeline.export`: RMs exported for TRL, OpenRLHF and verl, each certified on the input the engine builds.

Three tiny RMs built from configs (no hub): a Llama-style RM whose tokenizer puts a BOS before every text, a
GPT-NeoX-style RM with its own pad token, and an RM that pads with EOS (tokenizer pad == EOS == the model's pad id).
TRL's reward is TRL's own code (`RLOOTrainer._calculate_rewards`, also through `GRPOTrainer`). OpenRLHF and verl
are not installable here: their read-outs are written out below, unbatched, after their source, and the
package's batched implementations (what export.json records) must agree with them:

* OpenRLHF (OpenRLHF/OpenRLHF): `openrlhf/models/model.py` at 707b1060c9167b94a2faf974c07d3165b4ca4841
  (`_get_reward_model`: the base model plus a bias-free `score` head, the value at the last attended token,
  `(r - mean) / std` under `--normalize_reward`), on the input of `openrlhf/cli/serve_rm.py` at
  58ec6ffd957e617b7dbb14596a22de99d9a75617 (`add_special_tokens=False`), the query ending with the EOS of a finished
  rollout (`openrlhf/trainer/ppo_utils/experience_maker.py` at 89308a0b768dec168dff240ae746710fc967a49b).
* verl (volcengine/verl): `verl/workers/fsdp_workers.py` at b38119fa248231a6e1c6198d08c0a4e46354dd01
  (`RewardModelWorker`: `AutoModelForTokenClassification` with `num_labels=1`, `_switch_chat_template` with
  `add_special_tokens=False`, the score at the last valid token).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, pipeline_cli, subprocess_env


STYLES = ("llama", "neox", "eos")
TOL = 1e-4
# What the README's table says each engine's input lacks, per RM style ("identical": the pipeline's own ids)
EXPECTED = {
    "trl": {"llama": "no BOS, no EOS", "neox": "no EOS", "eos": "identical"},
    "trl-chat": {"llama": "identical", "neox": "identical", "eos": "identical"},
    "openrlhf": {
        "llama": "no BOS",
        "neox": "identical",
        "eos": "read at the trailing pad token (here the EOS), which the pipeline's read-out skips",
    },
    "verl": {"llama": "identical", "neox": "identical", "eos": "identical"},
}


@pytest.fixture(scope="module")
def base_tokenizer_dir(tmp_path_factory):
    from pipeline.data.synthetic import SyntheticConfig, synthetic_corpus
    from pipeline.models import tiny_tokenizer

    d = tmp_path_factory.mktemp("tok")
    tiny_tokenizer(list(synthetic_corpus(SyntheticConfig()))[:3000], vocab_size=400).save_pretrained(d)
    return d


def build_rm(style: str, base_tokenizer_dir: Path, out: Path) -> Path:
    """A tiny random RM of `style`, its head scaled so that rewards spread (differences are then visible)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from pipeline.models import TinyModelSpec, tiny_model

    tok = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    if style == "llama":  # Llama's tokenizers put a BOS before every text
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
        )
    if style == "eos":
        tok.pad_token = tok.eos_token
    model = tiny_model(TinyModelSpec(arch="llama" if style == "llama" else "gpt_neox"), tok, task="reward", seed=1)
    with torch.no_grad():
        model.score.weight.mul_(30)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pairs():
    from pipeline.data import DataConfig, build_splits
    from pipeline.data.synthetic import SyntheticConfig

    splits = build_splits(DataConfig(synthetic=SyntheticConfig(n_train=8, n_valid=8, n_test=8), max_length=96))
    out = []
    for dd in splits.values():
        for row in dd["test"].select(range(3)):
            out.append({k: row.get(k) or "" for k in ("prompt", "chosen", "rejected", "conversation")})
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, base_tokenizer_dir, pairs):
    """{style: (source RM dir, exported folder, export.json record)}, certified on 15 held-out pairs."""
    from pipeline.export import export_rm

    out = {}
    for style in STYLES:
        root = tmp_path_factory.mktemp(style)
        src = build_rm(style, base_tokenizer_dir, root / "rm")
        record = export_rm(src, root / "export", pairs=pairs, max_length=96, name=style)
        out[style] = (src, root / "export", record)
    return out


def difference_of(entry: dict) -> str:
    if entry["identical_inputs"] == entry["n_sides"]:
        return "identical"
    assert len(entry["differences"]) == 1, entry["differences"]
    ((why, n),) = entry["differences"].items()
    assert n == entry["n_sides"] - entry["identical_inputs"]
    return why


@pytest.mark.parametrize("style", STYLES)
def test_the_certificate_per_engine(exported, style, one_thread):
    """Every engine's read-out computes the pipeline's reward on the engine's own input (1e-4), except OpenRLHF on
    an RM that pads with EOS: it reads the EOS, which that RM's read-out skips (measured, published). Where the
    input is the pipeline's own, the reward IS the pipeline's; elsewhere the gap is measured and explained."""
    _, folder, record = exported[style]
    engines = record["certificate"]["engines"]
    assert set(engines) == set(EXPECTED)
    for engine, expected in EXPECTED.items():
        entry = engines[engine]
        assert "error" not in entry, entry
        assert entry["n_sides"] == 30
        assert difference_of(entry) == expected[style], (engine, entry)
        assert entry["certified"] == (expected[style] != EXPECTED["openrlhf"]["eos"]), (engine, entry)
        if entry["certified"]:
            assert entry["readout_max_abs_diff"] <= TOL
        if expected[style] == "identical":
            assert entry["gap_max_abs"] <= TOL, (engine, entry)
        else:
            assert entry["gap_max_abs"] > 10 * TOL, (engine, entry)  # the published gap is real
    saved = json.loads((folder / "export.json").read_text())
    assert saved["certificate"]["engines"] == json.loads(json.dumps(engines))
    assert saved["temperature_folded"] is False


@pytest.mark.parametrize("style", STYLES)
def test_the_folder_loads_as_a_sequence_classifier_with_the_pad_trl_sets(exported, style):
    """AutoModelForSequenceClassification + AutoTokenizer load the folder with the model's pad id equal to the
    tokenizer's pad (so TRL's `model.config.pad_token_id = tokenizer.pad_token_id` changes nothing), the EOS for the
    EOS-padded RM; verl's token-classification class loads its head from the folder, nothing initialised afresh."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    _, folder, record = exported[style]
    tok = AutoTokenizer.from_pretrained(folder)
    model, info = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, output_loading_info=True)
    assert not info["missing_keys"]
    assert model.config.pad_token_id == tok.pad_token_id is not None
    assert (tok.pad_token_id == tok.eos_token_id) == (style == "eos") == record["pad"]["pad_is_eos"]
    _, info = AutoModelForTokenClassification.from_pretrained(folder, num_labels=1, output_loading_info=True)
    assert not info["missing_keys"], info
    assert record["verl_head_keys"] == (
        ["score.bias"] if style == "llama" else ["classifier.bias", "classifier.weight"]
    )
    assert tok.chat_template and record["tokenizer"]["chat_template"] == "plain layout"


def openrlhf_reference(folder: Path, texts: list[str]) -> tuple[list[float], list[list[int]]]:
    """OpenRLHF's reward of each query, one at a time: the base model (AutoModel, the checkpoint's base weights)
    and the `score` head (no bias) at the last token of `tokenizer(query + eos, add_special_tokens=False)`;
    config.json holds no mean/std, so `--normalize_reward` divides by 1 (sources: the module docstring)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    assert not hasattr(config, "mean") and not hasattr(config, "std")
    base = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    w = load_file(folder / "model.safetensors")["score.weight"].double()
    rewards, ids = [], []
    for text in texts:
        row = tok(text + tok.eos_token, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            h = base(torch.tensor([row])).last_hidden_state[0, -1].double()
        rewards.append(float(h @ w[0]))
        ids.append(row)
    return rewards, ids


def verl_reference(folder: Path, chats: list[list[dict]]) -> tuple[list[float], list[list[int]]]:
    """verl's reward of each conversation, one at a time: the RM tokenizer's chat template, no special tokens added,
    `AutoModelForTokenClassification(num_labels=1)`'s score at the last token (sources: the module docstring)."""
    from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    config.num_labels, config.classifier_dropout = 1, 0.0
    model = AutoModelForTokenClassification.from_pretrained(folder, config=config).eval()
    rewards, ids = [], []
    for chat in chats:
        chat = chat[:-1] + [{"role": "assistant", "content": chat[-1]["content"].replace(tok.eos_token, "")}]
        row = tok(tok.apply_chat_template(chat, add_generation_prompt=False, tokenize=False), add_special_tokens=False)
        with torch.no_grad():
            rewards.append(float(model(torch.tensor([row["input_ids"]])).logits[0, -1, 0]))
        ids.append(row["input_ids"])
    return rewards, ids


@pytest.mark.parametrize("style", STYLES)
def test_openrlhf_and_verl_read_outs_agree_with_their_sources(exported, pairs, style, one_thread):
    """The package's batched OpenRLHF/verl read-outs (left- and right-padded batches) equal the unbatched readings
    of their sources above, ids included; on those ids the pipeline's reward is theirs, but for OpenRLHF on the
    EOS-padded RM, which reads the trailing EOS."""
    from pipeline.export.certify import pair_sides
    from pipeline.export.engines import openrlhf_rewards, verl_rewards
    from pipeline.models import load_reward_model, load_tokenizer
    from pipeline.scoring import score_ids

    src, folder, _ = exported[style]
    run_tok = load_tokenizer(str(src))
    run_model = load_reward_model(str(src)).eval()
    sides = pair_sides(run_tok, pairs)
    ref_o, ids_o = openrlhf_reference(folder, [s.prompt + s.response for s in sides])
    got_o, got_ids_o = openrlhf_rewards(folder, sides)
    assert got_ids_o == ids_o
    np.testing.assert_allclose(got_o, ref_o, atol=1e-5)
    ref_v, ids_v = verl_reference(folder, [s.messages for s in sides])
    got_v, got_ids_v = verl_rewards(folder, sides)
    assert got_ids_v == ids_v
    np.testing.assert_allclose(got_v, ref_v, atol=1e-5)
    pipe_o = score_ids(run_model, ids_o, run_tok.pad_token_id, dtype=None)
    pipe_v = score_ids(run_model, ids_v, run_tok.pad_token_id, dtype=None)
    np.testing.assert_allclose(ref_v, pipe_v, atol=TOL)
    if style == "eos":
        assert all(row[-1] == run_tok.eos_token_id for row in ids_o)
        assert np.abs(np.asarray(ref_o) - pipe_o).min() > TOL
    else:
        np.testing.assert_allclose(ref_o, pipe_o, atol=TOL)


def test_grpo_trainer_scores_like_rloo_trainer(exported, pairs, one_thread):
    """TRL's GRPOTrainer runs the same reward code as RLOOTrainer: the same rewards and ids from the same folder."""
    from pipeline.export.certify import pair_sides
    from pipeline.export.engines import trl_rewards
    from pipeline.models import load_tokenizer

    src, folder, _ = exported["eos"]
    sides = pair_sides(load_tokenizer(str(src)), pairs[:4])
    for conversational in (False, True):
        r_rloo, ids_rloo = trl_rewards(folder, sides, conversational=conversational, kind="rloo")
        r_grpo, ids_grpo = trl_rewards(folder, sides, conversational=conversational, kind="grpo")
        assert ids_rloo == ids_grpo
        np.testing.assert_allclose(r_rloo, r_grpo, atol=1e-6)


def test_fold_temperature_divides_the_head_and_the_reward(exported, base_tokenizer_dir, pairs, tmp_path, one_thread):
    """--fold-temperature: the head's weight is the source's divided by T (exactly the same float operation), every
    engine's reward is the pipeline's r / T, and r / T of the unfolded export up to fp32 rounding."""
    from safetensors.torch import load_file

    from pipeline.export import export_rm

    src, plain, plain_record = exported["neox"]
    T = 2.5
    record = export_rm(src, tmp_path / "folded", pairs=pairs, max_length=96, name="neox", temperature=T, fold=True)
    assert record["temperature_folded"] is True and record["temperature"] == T
    w_src = load_file(src / "model.safetensors")["score.weight"]
    folded = load_file(tmp_path / "folded" / "model.safetensors")
    assert torch.equal(folded["score.weight"], w_src / T)
    assert torch.equal(folded["classifier.weight"], w_src / T)  # verl's head folded too
    for engine, entry in record["certificate"]["engines"].items():
        assert entry["certified"] == plain_record["certificate"]["engines"][engine]["certified"], engine
        plain_gap = plain_record["certificate"]["engines"][engine]["gap_max_abs"]
        assert entry["gap_max_abs"] == pytest.approx(plain_gap / T, rel=1e-4, abs=1e-6), engine
    from pipeline.export.certify import pair_sides
    from pipeline.export.engines import verl_rewards
    from pipeline.models import load_tokenizer

    sides = pair_sides(load_tokenizer(str(src)), pairs)
    r_plain, _ = verl_rewards(plain, sides)
    r_folded, _ = verl_rewards(tmp_path / "folded", sides)
    np.testing.assert_allclose(r_folded, r_plain / T, rtol=1e-5, atol=1e-6)


def test_without_verl_head_verl_scores_a_fresh_head(exported, pairs, tmp_path, one_thread):
    """Why the export writes verl's head: without it verl's AutoModelForTokenClassification initialises a fresh
    `classifier` for a GPT-NeoX RM, and the certificate says so."""
    from pipeline.export import export_rm

    src, _, _ = exported["neox"]
    record = export_rm(src, tmp_path / "nohead", pairs=pairs[:3], max_length=96, engines=["verl"], verl_head=False)
    entry = record["certificate"]["engines"]["verl"]
    assert record["verl_head_keys"] == []
    assert not entry["certified"] and entry["readout_max_abs_diff"] > 10 * TOL


def test_left_truncation_is_measured_not_hidden(exported, pairs, tmp_path, one_thread):
    """Sides longer than the pipeline's max_length: the pipeline cut them from the left, the engines keep them whole;
    the certificate counts them and keeps the gap on the others at zero."""
    from pipeline.export import export_rm

    src, _, _ = exported["neox"]
    record = export_rm(src, tmp_path / "cut", pairs=pairs, max_length=24, engines=["verl"])
    entry = record["certificate"]["engines"]["verl"]
    assert entry["certified"] and entry["n_truncated_by_pipeline"] > 0
    why = "cut from the left by the pipeline (max_length); the engine keeps the whole text"
    assert entry["differences"] == {why: entry["n_truncated_by_pipeline"]}
    assert entry["gap_max_abs_untruncated"] <= TOL < entry["gap_max_abs"]


def test_readme_table_is_what_the_certificate_finds():
    """The README's per-engine table of input differences is the certificate's finding for each RM style."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Export an RM for RL engines", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`([a-z-]+)`", cells[0]) if len(cells) >= 5 else None
        if m and m.group(1) in EXPECTED:
            rows[m.group(1)] = dict(zip(STYLES, cells[-3:]))
    assert rows == EXPECTED


@pytest.mark.slow
def test_a_tiny_pipeline_run_exports_end_to_end(tmp_path):
    """`python -m pipeline.export` on a run directory the pipeline wrote (reward + calibration, shortened tiny-cpu):
    every RM exported with its temperature folded, certified for every engine, the log saying so; then the errors
    a user can cause, one line each."""
    env = subprocess_env(REPO, keep_pythonpath=False, OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    small = [
        "data.synthetic.n_train=40",
        "data.synthetic.n_valid=20",
        "data.synthetic.n_test=24",
        "calibration.bootstrap_samples=20",
        "calibration.plots=false",
        "reward.methods=[more,multitask]",
    ]
    p = pipeline_cli("tiny-cpu", run, "--stages", "reward", *small, env=env)
    assert p.returncode == 0, p.stderr[-3000:]

    def export(*args):
        cmd = [sys.executable, "-m", "pipeline.export", "--run-dir", str(run), *args]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    p = export("--out", str(tmp_path / "x"), "--fold-temperature")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "no fitted temperature" in p.stderr and "--stages calibration" in p.stderr
    assert not (tmp_path / "x").exists()
    p = pipeline_cli("tiny-cpu", run, "--stages", "calibration", *small, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "exported"
    p = export("--out", str(out), "--fold-temperature", "--pairs", "8")
    assert p.returncode == 0, p.stderr[-3000:]
    temps = json.loads((run / "calibration" / "temperatures.json").read_text())
    summary = json.loads((out / "export.json").read_text())
    assert set(summary) == {"more", "multitask"}
    for name, record in summary.items():
        folder = out / name
        assert record["temperature"] == temps[name] and record["temperature_folded"]
        fp = json.loads((run / "reward" / name / "fingerprint.json").read_text())["fingerprint"]
        assert record["fingerprint"] == fp
        assert json.loads((folder / "export.json").read_text())["certificate"] == record["certificate"]
        for engine, entry in record["certificate"]["engines"].items():
            assert entry["certified"], (name, engine, entry)
            assert f"[export] {name} {engine}: certified" in p.stderr + p.stdout
    p = export("--out", str(run / "reward"))
    assert p.returncode == 2 and "would overwrite the run's RM" in p.stderr and "Traceback" not in p.stderr
    assert (run / "reward" / "more" / "model.safetensors").is_file()
    p = export("--out", str(tmp_path / "y"), "--rm", "nope")
    assert p.returncode == 2 and "--rm: ['nope'] not in" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.export", "--run-dir", str(tmp_path), "--out", str(tmp_path / "z")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "recipe.yaml not found" in p.stderr


def test_verl_head_goes_into_a_sharded_checkpoint_too(base_tokenizer_dir, tmp_path):
    """A checkpoint saved in shards gets verl's head as one more shard listed in its index."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    from pipeline.export.folder import add_verl_head

    src = build_rm("neox", base_tokenizer_dir, tmp_path / "rm")
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert add_verl_head(model, tmp_path / "sharded") == ["classifier.bias", "classifier.weight"]
    tc, info = AutoModelForTokenClassification.from_pretrained(tmp_path / "sharded", output_loading_info=True)
    assert not info["missing_keys"] and torch.equal(tc.classifier.weight, model.score.weight)
    _, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "sharded", output_loading_info=True)
    assert not info["missing_keys"]


def test_an_rm_with_its_own_chat_template(chat_tok, pairs, tmp_path, one_thread):
    """An RM trained on conversations keeps its chat template: TRL (text or conversational prompts) and verl build
    the pipeline's own ids; OpenRLHF's query ends with an EOS after the template's end of turn, measured."""
    from pipeline.data.render import encode_conversation, plain_to_messages
    from pipeline.export import export_rm
    from pipeline.models import TinyModelSpec, tiny_model

    src = tmp_path / "rm"
    model = tiny_model(TinyModelSpec(arch="gpt_neox"), chat_tok, task="reward", seed=2)
    with torch.no_grad():
        model.score.weight.mul_(30)
    model.save_pretrained(src)
    chat_tok.save_pretrained(src)

    def reply(text):
        return [{"role": "assistant", "content": text.strip()}]

    conv = [
        {
            **p,
            "conversation": encode_conversation(
                plain_to_messages(p["prompt"]), reply(p["chosen"]), reply(p["rejected"])
            ),
        }
        for p in pairs[:6]
    ]
    record = export_rm(src, tmp_path / "export", pairs=conv, max_length=256)
    assert record["tokenizer"] == {"chat_template": "the RM's own (kept)"}
    engines = record["certificate"]["engines"]
    assert all(entry["certified"] for entry in engines.values()), engines
    for engine in ("trl", "trl-chat", "verl"):
        assert difference_of(engines[engine]) == "identical", engine
    why = "an EOS after the chat template's end of turn, which the pipeline does not append"
    assert difference_of(engines["openrlhf"]) == why
