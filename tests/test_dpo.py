"""The reward stage's `dpo` method (issue 30, item 2): a policy trained by TRL's DPOTrainer on the run's training
pairs, from and against the policy stage's base policy, saved like an RM and read as an implicit RM by the
calibration and align stages. The whole pipeline with dpo runs in tests/test_run_tiny_cpu.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import load_recipe
from pipeline.run import run_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [
    "data.synthetic.n_train=24",
    "data.synthetic.n_valid=8",
    "data.synthetic.n_test=8",
    "align.warm_start_steps=4",
    "align.warm_start_prompts=8",
    "align.warm_start_batch_size=8",
    "reward.methods=[dpo]",
    "reward.dpo.max_steps=3",
    "reward.dpo.batch_size=8",
    "reward.dpo.beta=0.2",
    "reward.dpo.learning_rate=5e-3",
]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """A run directory whose reward stage trained only dpo, with every DPOTrainer made recorded."""
    import trl

    made = []

    class Spy(trl.DPOTrainer):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(trl, "DPOTrainer", Spy)
    out = tmp_path_factory.mktemp("dpo") / "run"
    try:
        manifest = run_pipeline(load_recipe("tiny-cpu", SMALL), out, stages="reward")
    finally:
        mp.undo()
    return out, manifest, made


def test_dpo_trains_through_trls_dpotrainer_from_the_policy_stage(dpo_run):
    import torch

    from pipeline.policy.stage import read_policy

    out, manifest, made = dpo_run
    assert [s for s, e in manifest["stages"].items() if e["status"] == "done"] == ["policy", "reward"]
    assert len(made) == 1
    kwargs = made[0]
    assert kwargs["args"].beta == 0.2 and kwargs["args"].loss_type == ["sigmoid"] and kwargs["args"].use_cpu
    policy_path, _, _ = read_policy(out)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(policy_path).state_dict()
    ref = kwargs["ref_model"].state_dict()
    assert all(torch.equal(ref[k], base[k]) for k in base)  # the reference is the policy stage's model, untouched
    log = json.loads((out / "reward" / "dpo" / "train_log.json").read_text())
    assert log[-1]["step"] == 3 and any("rewards/margins" in row for row in log)  # TRL's DPO metrics


def test_the_dpo_policy_is_saved_like_an_rm_with_its_implicit_descriptor(dpo_run):
    out, _, _ = dpo_run
    d = out / "reward" / "dpo"
    for name in ("model.safetensors", "tokenizer.json", "README.md", "fingerprint.json", "train_prompts.json"):
        assert (d / name).is_file(), name
    assert json.loads((d / "implicit.json").read_text()) == {
        "policy": "reward/dpo",
        "reference": "policy",
        "beta": 0.2,
    }
    entry = json.loads((out / "reward" / "index.json").read_text())["dpo"]
    assert entry["kind"] == "implicit" and entry["implicit"] == "reward/dpo/implicit.json"
    assert entry["sources"] == ["helpful", "harmless", "oasst1", "webgpt", "summarize"]
    assert "implicit reward" in (d / "README.md").read_text()
    assert json.loads((d / "train_prompts.json").read_text())  # calibration's overlap guard reads it


def test_the_implicit_reward_of_the_reference_itself_is_zero_and_the_dpo_policys_is_not(dpo_run):
    from pipeline.implicit import implicit_rewards, load_implicit_rm
    from pipeline.reward.index import implicit_spec

    out, _, _ = dpo_run
    spec = implicit_spec(out, "dpo", {"path": str(out / "reward" / "dpo")})
    assert spec["reference"] == str(out / "policy")
    rows = [
        ("\n\nHuman: How many legs has a horse got?\n\nAssistant:", " It is 4."),
        ("\n\nHuman: Hi\n\nAssistant:", " Hello"),
    ]
    policy, reference, tok, beta = load_implicit_rm(spec)
    assert implicit_rewards(reference, reference, tok, rows, beta) == [0.0, 0.0]
    ref_only, _, _, _ = load_implicit_rm({**spec, "policy": spec["reference"]})
    assert implicit_rewards(ref_only, reference, tok, rows, beta) == [0.0, 0.0]  # the saved reference IS the base
    assert all(abs(r) > 0 for r in implicit_rewards(policy, reference, tok, rows, beta))


def test_calibration_scores_the_dpo_policy_by_its_implicit_reward(dpo_run):
    from datasets import Dataset

    from pipeline.calibration.config import CalibrationConfig
    from pipeline.calibration.implicit_rms import score_implicit, trained_implicit_entries
    from pipeline.implicit import implicit_rewards, load_implicit_rm
    from pipeline.reward.index import implicit_spec, read_index

    out, _, _ = dpo_run
    entries = trained_implicit_entries(out, read_index(out))
    assert list(entries) == ["dpo"] and entries["dpo"]["reference"] == str(out / "policy")
    assert entries["dpo"]["beta"] == 0.2 and entries["dpo"]["trained"]
    ds = Dataset.from_dict(
        {"prompt": ["\n\nHuman: Hi\n\nAssistant:"] * 2, "chosen": [" Hello there", " Hi"], "rejected": [" No", " ..."]}
    )
    cfg = CalibrationConfig(batch_size=4, load_dtype="float32")
    got = score_implicit("dpo", entries["dpo"], {"helpful": {"test": ds, "validation": None}}, cfg, 96)
    policy, reference, tok, beta = load_implicit_rm(implicit_spec(out, "dpo", {"path": str(out / "reward" / "dpo")}))
    rows = list(zip(ds["prompt"], ds["chosen"])) + list(zip(ds["prompt"], ds["rejected"]))
    want = implicit_rewards(policy, reference, tok, rows, beta, max_length=96)
    rc, rr = got["helpful"]["test"]
    np.testing.assert_allclose(np.concatenate([rc, rr]), want, rtol=0, atol=1e-9)
