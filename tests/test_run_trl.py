"""End to end: the `trl-conversational` recipe (TRL conversational data in hub layout from a local directory,
split into sources by group_by, a chat-templated tiny RM) trains MORE and MultiTask and calibrates them with
one `python -m pipeline.run`; the same with the implicit-prompt jsonl. Sizes shrunk by overrides."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import pipeline_cli


SMALL = [
    "data.n_train_per_source=24",
    "data.n_test_per_source=20",
    "reward.train.max_steps=4",
    "calibration.bootstrap_samples=10",
    "align.warm_start_steps=10",
    "align.warm_start_prompts=20",
    "align.n_prompts=8",
    "align.n_eval_prompts=4",
    "align.n_ppl=4",
    "align.max_new_tokens=8",
    "align.n=2",
]
IMPLICIT = [
    "data.sources.0.path=pkg:pipeline/recipes/data/trl-demo/implicit.jsonl.gz",
    "data.sources.0.split=null",
    "data.sources.0.test_split=null",
]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return pipeline_cli("trl-conversational", out, *SMALL, *extra)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["explicit-hub-dir", "implicit-jsonl"])
def test_trl_conversational_end_to_end(tmp_path, layout):
    out = tmp_path / "run"
    extra = [*IMPLICIT, "--stages", "reward,calibration,report"] if layout == "implicit-jsonl" else []
    p = _run(out, *extra)
    assert p.returncode == 0, p.stderr[-4000:]
    m = json.loads((out / "manifest.json").read_text())
    done = [s for s, e in m["stages"].items() if e["status"] == "done"]
    # the policy stage runs because align reads its base policy
    assert done == (
        ["reward", "calibration", "report"] if extra else ["policy", "reward", "calibration", "align", "report"]
    )
    groups = ["demo/harmless", "demo/helpful", "demo/oasst1", "demo/summarize", "demo/webgpt"]
    index = json.loads((out / "reward" / "index.json").read_text())
    assert set(index) == {"more", "multitask"} and index["more"]["sources"] == groups
    for rm in index:  # the RM's tokenizer carries the template calibration scores with
        cfg = json.loads((out / "reward" / rm / "tokenizer_config.json").read_text())
        template = out / "reward" / rm / "chat_template.jinja"
        assert "<|im_start|>" in (template.read_text() if template.exists() else cfg.get("chat_template", ""))
    metrics = json.loads((out / "calibration" / "metrics.json").read_text())
    assert set(groups) <= set(metrics["more"]) and "all_average" in metrics["more"]
    if not extra:  # the policy generated from prompts under ITS template and RJS trained a policy
        cands = [json.loads(x) for x in (out / "align" / "base" / "train_candidates.jsonl").read_text().splitlines()]
        assert all(c["policy_prompt"].startswith("<|begin_of_text|><|start_header_id|>user") for c in cands)
        assert (out / "align" / "more" / "rjs" / "policy" / "config.json").exists()
