"""DPO policies evaluated as implicit reward models by the calibration stage (calibration.implicit_rms).

The stage's rewards are checked against a computation written here (the policy's and the reference's float64
forward of each sequence alone, TRL's tokenization: prompt, then prompt + response + EOS), metrics.json's rows
against formulas applied to those rewards, and the fitted effective beta, table.md, comparisons against a classic
RM, config errors, --dry-run checks and one end-to-end `python -m pipeline.run`.

The distributed test launches THIS file as the worker script:
    PYTHONPATH=. torchrun --nproc_per_node 2 tests/test_calibration_implicit.py RUN_DIR MODELS_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.calibration.stage import run
from tests.helpers import calibration_recipe, pipeline_cli, save_tiny_rm, subprocess_env, torchrun_worker


def save_lm(tok, path: Path, seed: int, with_tokenizer: bool = True):
    from pipeline.models import TinyModelSpec, tiny_model

    model = tiny_model(TinyModelSpec(arch="llama", size="tiny"), tok, task="causal_lm", seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(5.0)
    model.save_pretrained(path)
    if with_tokenizer:
        tok.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tok):
    root = tmp_path_factory.mktemp("implicit")
    save_lm(tiny_tok, root / "policy", seed=1)
    save_lm(tiny_tok, root / "ref", seed=2, with_tokenizer=False)
    save_tiny_rm(tiny_tok, root / "rm", seed=5, head_scale=15.0)
    return root


def implicit_cfg(root: Path) -> dict:
    return {
        "dpo": {"policy": str(root / "policy"), "reference": str(root / "ref"), "beta": 0.5},
        "free": {"policy": str(root / "policy"), "beta": 0.01, "reference_free": True},
    }


def recipe_for(root: Path, **cal):
    return calibration_recipe(
        implicit_rms=implicit_cfg(root), external_rms={"rm": str(root / "rm")}, compare=["dpo vs rm"], **cal
    )


def exact_rewards(policy64, ref64, tok, prompts, responses, beta) -> np.ndarray:
    """beta * (log pi - log pi_ref) of each response: TRL's tokenization (the prompt, then prompt + response + the
    EOS text), each sequence alone, float64, the log-softmax written out."""
    out = []
    for p, r in zip(prompts, responses):
        ids = tok(p + r + tok.eos_token)["input_ids"]
        first = len(tok(p)["input_ids"])
        total = 0.0
        for model, sign in ((policy64, 1.0), (ref64, -1.0)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            lse = torch.logsumexp(logits, dim=-1)
            total += sign * sum(float(logits[t - 1, ids[t]] - lse[t - 1]) for t in range(first, len(ids)))
        out.append(beta * total)
    return np.array(out)


@pytest.fixture(scope="module")
def evaluated(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        artifacts = run(recipe_for(models, max_length=512), out)
    finally:
        torch.set_num_threads(threads)
    return out, artifacts


def test_implicit_rms_are_scored_like_classic_ones(evaluated, models, tiny_tok, one_thread):
    """scores.npz holds the exact rewards; metrics.json's rows follow from them; the temperature fitted is beta's
    scale (effective beta = beta / T in temperature_fits.json and table.md); dpo vs rm is a paired comparison."""
    from pipeline.calibration import metrics as M
    from pipeline.calibration.overlap import eval_splits
    from pipeline.models import load_tokenizer

    out, artifacts = evaluated
    cal = out / "calibration"
    recipe = recipe_for(models, max_length=512)
    data = eval_splits(recipe, recipe.calibration)
    tok = load_tokenizer(str(models / "policy"))
    from transformers import AutoModelForCausalLM

    policy64 = AutoModelForCausalLM.from_pretrained(models / "policy", dtype=torch.float64).eval()
    ref64 = AutoModelForCausalLM.from_pretrained(models / "ref", dtype=torch.float64).eval()
    scores = np.load(cal / "scores.npz")
    metrics = json.loads((cal / "metrics.json").read_text())
    assert list(metrics) == ["rm", "dpo", "free"]
    for source, by_split in data.items():
        ds = by_split["test"]
        rc = exact_rewards(policy64, ref64, tok, ds["prompt"], ds["chosen"], 0.5)
        rr = exact_rewards(policy64, ref64, tok, ds["prompt"], ds["rejected"], 0.5)
        np.testing.assert_allclose(scores[f"dpo::{source}::test::chosen"], rc, atol=1e-5)
        np.testing.assert_allclose(scores[f"dpo::{source}::test::rejected"], rr, atol=1e-5)
        row = metrics["dpo"][source]
        d = rc - rr
        assert row["n_pairs"] == len(ds)
        assert row["accuracy"] == pytest.approx(np.mean((d > 0) + 0.5 * (d == 0)), abs=1e-9)
        assert row["nll"] == pytest.approx(np.mean(np.log1p(np.exp(-d))), abs=1e-6)
        assert row["brier"] == pytest.approx(np.mean((1 - 1 / (1 + np.exp(-d))) ** 2), abs=1e-6)
        assert row["ece_10"] == pytest.approx(M.pairwise_ece(rc, rr, 10), abs=1e-6)
        assert "temperature_scaled" in row and "truth" in row
    fits = json.loads((cal / "temperature_fits.json").read_text())
    temps = json.loads((cal / "temperatures.json").read_text())
    assert fits["dpo"]["beta"] == 0.5 and fits["dpo"]["effective_beta"] == pytest.approx(0.5 / temps["dpo"])
    assert fits["free"]["effective_beta"] == pytest.approx(0.01 / temps["free"])
    comps = json.loads((cal / "comparisons.json").read_text())
    assert list(comps) == ["dpo vs rm"]
    assert comps["dpo vs rm"]["all_average"]["ece_10"]["a"] == pytest.approx(metrics["dpo"]["all_average"]["ece_10"])
    table = (cal / "table.md").read_text()
    assert "## Implicit reward models (DPO policies)" in table
    assert f"| dpo | `{models / 'policy'}` | `{models / 'ref'}` | 0.5 | {temps['dpo']:.3f} |" in table
    assert "| free |" in table and "none (reference-free: beta * log pi)" in table
    assert "Reference-free (asked for with reference_free: true): free" in table
    assert any(p.endswith("reliability.png") for p in artifacts)
    config = json.loads((cal / "config.json").read_text())
    assert config["implicit"]["free"]["reference"] is None and config["implicit"]["free"]["reference_free"] is True
    # the trained-prompt record of a policy folder is read like an RM's (none here: not checked)
    assert metrics["dpo"]["train_overlap"]["excluded"] is True


def test_by_default_each_dpo_policy_is_compared_with_more_and_multitask(models, tiny_tok, tmp_path, one_thread):
    """Beside RMs trained in the run (reward/index.json: more, multitask) and with calibration.compare null, each
    implicit RM gets paired comparisons against MORE and MultiTask; table.md has its per-source ECE row."""
    run_dir = tmp_path / "run"
    index = {}
    for i, name in enumerate(("more", "multitask")):
        save_tiny_rm(tiny_tok, run_dir / "reward" / name, seed=10 + i, head_scale=15.0)
        index[name] = {"path": name, "method": name, "sources": ["helpful", "harmless", "webgpt"]}
    (run_dir / "reward" / "index.json").write_text(json.dumps(index))
    recipe = calibration_recipe(
        implicit_rms={"dpo": implicit_cfg(models)["dpo"]}, max_pairs_per_split=6, bootstrap_samples=10, plots=False
    )
    run(recipe, run_dir)
    comps = json.loads((run_dir / "calibration" / "comparisons.json").read_text())
    assert list(comps) == ["more vs multitask", "dpo vs more", "dpo vs multitask"]
    assert set(comps["dpo vs more"]) == {"helpful", "harmless", "webgpt", "all_average", "hh_average"}
    metrics = json.loads((run_dir / "calibration" / "metrics.json").read_text())
    row = "| dpo | " + " | ".join(f"{metrics['dpo'][s]['ece_10']:.4f}" for s in ("helpful", "harmless", "webgpt"))
    assert row in (run_dir / "calibration" / "table.md").read_text()


def test_the_stage_cuts_from_the_left_and_says_so(models, tmp_path, capsys, one_thread):
    from pipeline.implicit import encode_rows, implicit_rewards, load_implicit_rm

    recipe = calibration_recipe(
        implicit_rms={"dpo": implicit_cfg(models)["dpo"]}, max_length=24, max_pairs_per_split=4
    )
    run(recipe, tmp_path / "run")
    said = capsys.readouterr().out
    assert f"implicit RM 'dpo': policy {models / 'policy'} against reference {models / 'ref'}, beta 0.5" in said
    assert "sequences cut from the left to 24 tokens" in said
    policy, ref, tok, beta = load_implicit_rm(implicit_cfg(models)["dpo"])
    from pipeline.calibration.overlap import eval_splits

    ds = eval_splits(recipe, recipe.calibration)["helpful"]["test"]
    rows = list(zip(ds["prompt"], ds["chosen"]))
    assert any(encode_rows(tok, rows, 24)[2])
    scores = np.load(tmp_path / "run" / "calibration" / "scores.npz")
    np.testing.assert_allclose(
        scores["dpo::helpful::test::chosen"], implicit_rewards(policy, ref, tok, rows, beta, max_length=24), atol=1e-5
    )


def test_conversational_rows_use_the_policys_chat_template(chat_tok, tmp_path, one_thread):
    """A conversational row (its `conversation` column) is rendered with the POLICY's chat template; a text row
    beside it stays text (EOS appended)."""
    from datasets import Dataset

    from pipeline.calibration.config import CalibrationConfig
    from pipeline.calibration.implicit_rms import implicit_entries, score_implicit
    from pipeline.data.render import encode_conversation, templated_pair
    from pipeline.implicit import implicit_rewards

    policy, ref = save_lm(chat_tok, tmp_path / "policy", 1), save_lm(chat_tok, tmp_path / "ref", 2, False)
    user, good, bad = [{"role": "user", "content": "hello there"}], "fine thanks", "go away"
    conv = encode_conversation(user, [{"role": "assistant", "content": good}], [{"role": "assistant", "content": bad}])
    ds = Dataset.from_dict(
        {
            "prompt": ["\n\nHuman: hello there\n\nAssistant:"] * 2,
            "chosen": [" " + good] * 2,
            "rejected": [" " + bad] * 2,
            "conversation": [conv, ""],
        }
    )
    cfg = CalibrationConfig(
        implicit_rms={"dpo": {"policy": str(tmp_path / "policy"), "reference": str(tmp_path / "ref"), "beta": 0.3}},
        progress=False,
    )
    entry = implicit_entries(cfg, [])["dpo"]
    rc, rr = score_implicit("dpo", entry, {"s": {"test": ds}}, cfg, None)["s"]["test"]
    p, c, r = templated_pair(
        chat_tok, user, [{"role": "assistant", "content": good}], [{"role": "assistant", "content": bad}]
    )
    assert "<|im_start|>assistant" in p and c.startswith("fine thanks<|im_end|>")
    want = implicit_rewards(policy, ref, chat_tok, [(p, c), (p, r)], 0.3, templated=True)
    np.testing.assert_allclose([rc[0], rr[0]], want, atol=1e-6)
    text = implicit_rewards(policy, ref, chat_tok, [(ds["prompt"][1], ds["chosen"][1])], 0.3)
    np.testing.assert_allclose(rc[1], text[0], atol=1e-6)
    assert abs(rc[0] - rc[1]) > 1e-3  # the template matters
    assert entry["truncated_sequences"] == 0 and entry["scored_sequences"] == 4


def test_bad_implicit_entries_fail_before_any_work(models, tmp_path, tiny_tok):
    from pipeline.config import load_recipe
    from pipeline.errors import RecipeError
    from pipeline.run import run_pipeline

    pol = models / "policy"
    with pytest.raises(ValueError, match=r"calibration.implicit_rms.x.reference: missing.*reference_free=true"):
        calibration_recipe(implicit_rms={"x": {"policy": str(pol), "beta": 0.1}})
    with pytest.raises(RecipeError, match=r"calibration.implicit_rms.x.reference: missing"):
        load_recipe("tiny-cpu", [f"calibration.implicit_rms={{x: {{policy: {pol}, beta: 0.1}}}}"])
    with pytest.raises(RecipeError, match=r"calibration.implicit_rms.x.beta = -1.0 .* is out of range"):
        load_recipe("tiny-cpu", [f"calibration.implicit_rms={{x: {{policy: {pol}, reference: {pol}, beta: -1}}}}"])
    with pytest.raises(RecipeError, match=r"unknown key 'calibration.implicit_rms.x.betta'"):
        load_recipe("tiny-cpu", [f"calibration.implicit_rms={{x: {{policy: {pol}, reference: {pol}, betta: 1}}}}"])
    with pytest.raises(ValueError, match=r"the name 'rm' is already used"):
        calibration_recipe(implicit_rms={"rm": implicit_cfg(models)["dpo"]}, external_rms={"rm": str(models / "rm")})
    # --dry-run: a missing folder, a policy without tokenizer files, a classifier given as reference
    out = tmp_path / "run"
    bare = tmp_path / "bare"
    save_lm(tiny_tok, bare, seed=3, with_tokenizer=False)
    cases = [
        ({"policy": str(tmp_path / "nowhere"), "reference": str(pol)}, r"x.policy: .*nowhere is neither an existing"),
        ({"policy": str(bare), "reference": str(pol)}, rf"x.policy: {bare} has no tokenizer files"),
        (
            {"policy": str(pol), "reference": str(models / "rm")},
            r"x.reference: .*ForSequenceClassification checkpoint",
        ),
    ]
    for spec, message in cases:
        recipe = load_recipe("tiny-cpu", [f"calibration.implicit_rms={{x: {json.dumps({**spec, 'beta': 0.1})}}}"])
        with pytest.raises(RecipeError, match=message + r".*\(in the command-line override"):
            run_pipeline(recipe, out, stages=["calibration"], dry_run=True)
    assert not out.exists() or not (out / "calibration").exists()


def test_show_keys_documents_the_entries_and_the_truncation():
    from pipeline.config_keys import describe_keys

    rows = {k: (t, d, h) for k, t, d, h in describe_keys()}
    assert "cut from the LEFT" in rows["calibration.implicit_rms"][2]
    assert "one model in memory at a time" in rows["calibration.implicit_rms"][2]
    assert rows["calibration.implicit_rms.<name>.beta"][1:] == (
        "required",
        rows["calibration.implicit_rms.<name>.beta"][2],
    ) and rows["calibration.implicit_rms.<name>.beta"][2].endswith("Allowed: a finite number with 0 < value.")
    assert rows["calibration.implicit_rms.<name>.reference_free"][:2] == ("bool", "false")
    assert "Required unless reference_free" in rows["calibration.implicit_rms.<name>.reference"][2]


def test_implicit_models_are_stage_inputs(models, tmp_path):
    """Replacing the reference's weights at the same path changes the calibration stage's hash."""
    import shutil

    from pipeline.config import load_recipe
    from pipeline.models import load_tokenizer
    from pipeline.plan import stage_config_hash

    ref = tmp_path / "ref"
    shutil.copytree(models / "ref", ref)
    spec = f"{{x: {{policy: {models / 'policy'}, reference: {ref}, beta: 0.1}}}}"
    recipe = load_recipe("tiny-cpu", [f"calibration.implicit_rms={spec}"])
    before = stage_config_hash(recipe, "calibration")
    save_lm(load_tokenizer(str(models / "policy")), ref, seed=9, with_tokenizer=False)
    assert stage_config_hash(recipe, "calibration") != before


@pytest.mark.slow
def test_end_to_end_through_pipeline_run(models, tmp_path):
    """`python -m pipeline.run --stages calibration,report` with a DPO policy (and a reference-free one) beside a
    classic RM: metrics.json, comparisons.json and report.md carry them; the report states reference-free."""
    env = subprocess_env(Path(__file__).resolve().parents[1], keep_pythonpath=False, OMP_NUM_THREADS="1")
    spec = json.dumps(implicit_cfg(models))
    out = tmp_path / "run"
    args = [
        "--stages",
        "calibration,report",
        "data.synthetic.n_valid=12",
        "data.synthetic.n_test=16",
        "calibration.bootstrap_samples=20",
        "calibration.progress=false",
        f"calibration.implicit_rms={spec}",
        f"calibration.external_rms={{rm: {models / 'rm'}}}",
        "calibration.compare=[dpo vs rm, free vs rm]",
    ]
    p = pipeline_cli("tiny-cpu", out, *args, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    metrics = json.loads((out / "calibration" / "metrics.json").read_text())
    assert set(metrics) == {"rm", "dpo", "free"}
    comps = json.loads((out / "calibration" / "comparisons.json").read_text())
    assert list(comps) == ["dpo vs rm", "free vs rm"]
    md = (out / "report.md").read_text()
    assert (
        "Implicit reward models (DPO policies)" in md and "Reference-free (asked for with reference_free: true)" in md
    )
    assert "(DPO policies, `calibration.implicit_rms`;" in md
    assert f"free (policy `{models / 'policy'}`, REFERENCE-FREE: beta * log pi alone, beta 0.01)" in md
    assert "| dpo | no (DPO policy) |" in md
    assert "implicit RM 'free'" in p.stdout and "REFERENCE-FREE" in p.stdout
    # unchanged inputs: the stage is up to date on a rerun
    again = pipeline_cli("tiny-cpu", out, *args, env=env)
    assert again.returncode == 0 and "all selected stages are done" in again.stdout + again.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_score_implicit_rms_like_one(models, tmp_path):
    single = tmp_path / "single"
    run(recipe_for(models), single)
    out = tmp_path / "multi"
    ranks = torchrun_worker(Path(__file__).resolve(), out, models, timeout=300)
    assert [r["world"] for r in ranks] == [2, 2]
    a, b = np.load(single / "calibration" / "scores.npz"), np.load(out / "calibration" / "scores.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_allclose(b[key], a[key], atol=1e-5)


if __name__ == "__main__":  # the torchrun worker of the distributed test
    from accelerate import PartialState

    out, root = Path(sys.argv[1]), Path(sys.argv[2])
    artifacts = run(recipe_for(root), out)
    state = PartialState()
    (out / f"rank{state.process_index}.json").write_text(
        json.dumps({"world": state.num_processes, "artifacts": artifacts})
    )
    from pipeline.dist import shutdown_distributed

    shutdown_distributed()
