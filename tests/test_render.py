"""pipeline.data.render (hand-checked strings) and its use where text meets a tokenizer (training ids,
left truncation, calibration scoring)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.data import render as R
from tests.helpers import CHATML


U = {"role": "user", "content": "Hi there "}
A1 = {"role": "assistant", "content": " Hello."}
U2 = {"role": "user", "content": "What is 2+2?"}
SYS = {"role": "system", "content": "Be brief."}
GOOD = {"role": "assistant", "content": "4"}
BAD = {"role": "assistant", "content": "5"}


def conv_row(prompt=(SYS, U, A1, U2), chosen=(GOOD,), rejected=(BAD,)):
    prompt, chosen, rejected = list(prompt), list(chosen), list(rejected)
    return {
        "prompt": R.plain_prompt(prompt),
        "chosen": R.plain_response(chosen),
        "rejected": R.plain_response(rejected),
        "conversation": R.encode_conversation(prompt, chosen, rejected),
    }


def test_plain_layout_by_hand():
    assert R.plain_prompt([SYS, U, A1, U2]) == (
        "\n\nSystem: Be brief.\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: What is 2+2?\n\nAssistant:"
    )
    assert R.plain_response([GOOD]) == " 4"
    assert R.plain_response([GOOD, U2, BAD]) == " 4\n\nHuman: What is 2+2?\n\nAssistant: 5"
    # the one-turn plain layout is the HH layout the paper's loaders produce
    from pipeline.data.formats.base import hh_prompt

    assert R.plain_prompt([U]) == hh_prompt("Hi there ")


def test_chatml_pair_by_hand(chat_tok):
    p, c, r = R.templated_pair(chat_tok, [U, A1, U2], [GOOD], [BAD])
    assert p == (
        "<|im_start|>user\nHi there <|im_end|>\n<|im_start|>assistant\n Hello.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert c == "4<|im_end|>\n" and r == "5<|im_end|>\n"
    assert R.templated_prompt(chat_tok, [U, A1, U2]) == p
    assert R.end_of_turn_text(chat_tok) == "<|im_end|>"


def test_render_pair_kinds(chat_tok, tiny_tok):
    row = conv_row()
    templated = R.render_pair(chat_tok, **row)
    assert templated.templated and templated.prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    plain = R.render_pair(tiny_tok, **row)  # no template: the plain layout stored in the row
    assert not plain.templated and (plain.prompt, plain.chosen) == (row["prompt"], row["chosen"])
    text = R.render_pair(chat_tok, "Q?", " a", " b", "")  # text rows are never templated (TRL's rule)
    assert (text.prompt, text.chosen, text.rejected, text.templated) == ("Q?", " a", " b", False)


def test_render_prompt_and_response(chat_tok, llama3_tok):
    row = conv_row(prompt=(U,))
    assert R.render_prompt(chat_tok, row["prompt"], row["conversation"]) == (
        "<|im_start|>user\nHi there <|im_end|>\n<|im_start|>assistant\n",
        True,
    )
    assert R.render_prompt(chat_tok, "plain", "") == ("plain", False)
    # a policy response (plain text) re-rendered as an assistant message under ANOTHER template
    p, c, t = R.render_response(llama3_tok, row["prompt"], " It is 4. ", row["conversation"])
    assert t and p == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there <|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert c == "It is 4.<|eot_id|>"


def test_set_chat_template(tmp_path, tiny_tok):
    import copy

    tok = copy.deepcopy(tiny_tok)
    assert R.set_chat_template(tok, None).chat_template is None
    R.set_chat_template(tok, CHATML)
    assert tok.chat_template == CHATML
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}")
    assert R.set_chat_template(tok, str(f)).chat_template == "{{ messages[0]['content'] }}"
    assert R.set_chat_template(tok, "none").chat_template is None
    with pytest.raises(ValueError, match="neither a Jinja template"):
        R.set_chat_template(tok, "no/such/file.jinja", where="reward.chat_template")
    assert R.template_special_tokens(CHATML) == ["<|im_start|>", "<|im_end|>"]


def test_chat_markers_are_single_tokens(chat_tok):
    ids = chat_tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    assert ids[0] == chat_tok.convert_tokens_to_ids("<|im_start|>")


def test_encode_pairs_templated_and_text_rows(chat_tok):
    from pipeline.data.tokenize import encode_left, encode_pairs

    row = conv_row()
    c, r, cut = encode_pairs(
        chat_tok,
        [row["prompt"], "Q?"],
        [row["chosen"], " a"],
        [row["rejected"], " b"],
        [row["conversation"], ""],
        max_length=None,
    )
    p, ct, _ = R.templated_pair(chat_tok, [SYS, U, A1, U2], [GOOD], [BAD])
    # templated: exactly the template's tokens (no EOS appended, no extra BOS)
    assert c[0] == chat_tok(p + ct, add_special_tokens=False)["input_ids"]
    # text row: unchanged path (EOS appended)
    assert c[1] == encode_left(chat_tok, ["Q? a"], None)[0][0]
    assert c[1][-1] == chat_tok.eos_token_id and cut == [False, False]


def test_left_truncation_keeps_final_turn_markers(chat_tok):
    """Cutting a long conversation from the left keeps the final assistant turn's header and end markers, so
    the reward head reads the same last token as without truncation."""
    from pipeline.data.tokenize import encode_pairs

    long_history = [U, {"role": "assistant", "content": "word " * 200}]
    row = conv_row(prompt=[*long_history, U2], chosen=[{"role": "assistant", "content": "It is four."}])
    full, _, _ = encode_pairs(chat_tok, [row["prompt"]], [row["chosen"]], [row["rejected"]], [row["conversation"]])
    cut, _, flags = encode_pairs(
        chat_tok, [row["prompt"]], [row["chosen"]], [row["rejected"]], [row["conversation"]], max_length=24
    )
    full, cut = full[0], cut[0]
    assert flags == [True] and len(cut) == 24 and len(full) > 100
    assert cut == full[-24:]
    assert cut[-1] == full[-1]  # the reward head's token
    tail = chat_tok("<|im_start|>assistant\nIt is four.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert cut[-len(tail) :] == tail
    im_end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    assert cut[-2] == im_end and chat_tok.eos_token_id not in cut


def _conv_dataset(n=12):
    import datasets

    rows = []
    for i in range(n):
        q = {"role": "user", "content": f"How many legs has a horse got? {i}"}
        rows.append(
            {
                **conv_row(
                    prompt=[q],
                    chosen=[{"role": "assistant", "content": "It is 4."}],
                    rejected=[{"role": "assistant", "content": f"It is {i % 3}."}],
                ),
                "source": "a" if i % 2 else "b",
            }
        )
    rows.append(
        {
            "prompt": "\n\nHuman: Hi\n\nAssistant:",
            "chosen": " Hello.",
            "rejected": " Go.",
            "conversation": "",
            "source": "b",
        }
    )
    return datasets.Dataset.from_list(rows)


def test_tokenize_pairs_renders_conversations(chat_tok, tiny_tok):
    from pipeline.data.tokenize import tokenize_pairs

    ds = _conv_dataset()
    templated, _ = tokenize_pairs(ds, chat_tok, 64)
    plain, _ = tokenize_pairs(ds, tiny_tok, 64)
    im_start = chat_tok.convert_tokens_to_ids("<|im_start|>")
    assert all(im_start in ids for ids in templated["chosen_ids"][:-1])
    assert im_start not in templated["chosen_ids"][-1]  # the text row
    assert "conversation" not in templated.column_names
    assert plain["chosen_ids"][0] == tiny_tok(ds[0]["prompt"] + ds[0]["chosen"], add_special_tokens=False)[
        "input_ids"
    ] + [tiny_tok.eos_token_id]


def test_reward_trainer_trains_on_templated_ids(tmp_path, chat_tok, one_thread):
    from pipeline.models import TinyModelSpec, tiny_model
    from pipeline.reward.trainer import MORERewardConfig, MORERewardTrainer

    ds = _conv_dataset().add_column("source_id", [0] * 13)
    args = MORERewardConfig(
        output_dir=str(tmp_path),
        method="multitask",
        max_steps=1,
        bf16=False,
        report_to="none",
        save_strategy="no",
        max_length=64,
        disable_tqdm=True,
        per_device_train_batch_size=4,
        use_cpu=True,
    )
    trainer = MORERewardTrainer(
        tiny_model(TinyModelSpec(), chat_tok, task="reward"), args, train_dataset=ds, processing_class=chat_tok
    )
    im_start = chat_tok.convert_tokens_to_ids("<|im_start|>")
    assert im_start in trainer.train_dataset[0]["chosen_ids"]


def test_calibration_scores_with_the_rm_template(chat_tok, one_thread):
    """score_rm (the calibration stage) renders conversational rows with the RM's template, packed pairs
    included: rewards equal scoring the templated ids one by one, and differ from the plain layout's."""
    import torch

    from pipeline.calibration.config import CalibrationConfig
    from pipeline.models import TinyModelSpec, tiny_model
    from pipeline.scoring import score_ids, score_rm

    torch.manual_seed(0)
    model = tiny_model(TinyModelSpec(), chat_tok, task="reward", seed=1).eval()
    ds = _conv_dataset()
    cfg = CalibrationConfig(dtype="fp32", batch_size=8)
    ((rc, rr),) = score_rm(model, chat_tok, {"s": {"test": ds}}, cfg, 64)["s"].values()
    ids = [
        chat_tok(
            R.render_pair(chat_tok, **{k: row[k] for k in ("prompt", "chosen", "rejected", "conversation")}).prompt
            + R.render_pair(chat_tok, **{k: row[k] for k in ("prompt", "chosen", "rejected", "conversation")}).chosen,
            add_special_tokens=False,
        )["input_ids"]
        for row in ds.select(range(12))
    ]
    ref = score_ids(model, ids, chat_tok.pad_token_id, dtype=None)
    np.testing.assert_allclose(rc[:12], ref, atol=1e-4)
    plain = ds.map(lambda _: {"conversation": ""})
    ((pc, _),) = score_rm(model, chat_tok, {"s": {"test": plain}}, cfg, 64)["s"].values()
    assert not np.allclose(pc[:12], rc[:12])
    assert json.loads(ds[0]["conversation"])["prompt"][0]["role"] == "user"


# ---------------------------------------------------------------------------------------------------
# Templates shipped inside a tokenizer, and the time limit of the check (issue 29, item 7)

RAISES_ON_ASSISTANT = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise_exception('no assistant turns here') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NESTED_LOOPS = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% for m in messages %}{{ m['content'] }}{% endfor %}"
)


def _model_with_template(tmp_path, tiny_tok, template: str):
    from tests.helpers import save_tiny_rm

    path = tmp_path / "model"
    save_tiny_rm(tiny_tok, path, seed=0, head_scale=1.0)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(path)
    tok.chat_template = template
    tok.save_pretrained(path)
    return path


def test_a_tokenizer_template_that_raises_is_refused_like_a_recipe_template(tmp_path, tiny_tok):
    """With reward.chat_template=null the tokenizer's own template renders conversational data; one that raises
    gave a raw jinja2 traceback from render.templated_prompt. Now --dry-run refuses it (read from the model's
    files), the stage refuses it when it loads the tokenizer, and an error on the data itself is one line."""
    from pipeline.config import load_recipe
    from pipeline.errors import RecipeError
    from pipeline.models import load_tokenizer
    from pipeline.reward import stage
    from pipeline.run import run_pipeline

    path = _model_with_template(tmp_path, tiny_tok, RAISES_ON_ASSISTANT)
    needle = (
        rf"the chat template 'default' shipped with reward.model_name_or_path \({path}\) \(used because "
        r"reward.chat_template is null\): the chat template raises on a user/assistant turn.*no assistant turns here"
    )
    recipe = load_recipe("trl-conversational", [f"reward.model_name_or_path={path}", "reward.chat_template=null"])
    with pytest.raises(RecipeError, match=needle + r".*Fix: set reward.chat_template to a template of your own"):
        run_pipeline(recipe, tmp_path / "run", stages=["reward"], dry_run=True)
    with pytest.raises(ValueError, match=needle.replace("'default' ", "")):
        stage.build_tokenizer(recipe, None, tmp_path / "run")
    run_pipeline(  # the recipe's own template replaces it: accepted
        load_recipe("trl-conversational", [f"reward.model_name_or_path={path}"]),
        tmp_path / "run",
        stages=["reward"],
        dry_run=True,
    )
    from pipeline.calibration.stage import run as calibrate
    from tests.helpers import calibration_recipe

    with pytest.raises(
        ValueError, match=rf"the chat template 'default' shipped with calibration.external_rms.x \({path}\)"
    ):
        calibrate(calibration_recipe(external_rms={"x": str(path)}), tmp_path / "cal")
    assert not (tmp_path / "cal" / "calibration").exists()
    tok = load_tokenizer(str(path))
    with pytest.raises(ValueError, match=r"the chat template of the tokenizer .*raises on a conversation of the data"):
        R.render_pair(
            tok,
            "",
            "",
            "",
            R.encode_conversation([{"role": "user", "content": "q"}], *[[{"role": "assistant", "content": "a"}]] * 2),
        )


def test_a_template_that_runs_too_long_is_stopped_within_the_limit(tmp_path, tiny_tok, monkeypatch):
    """Nested huge loops hung --dry-run and the reward stage. The check's rendering stops after
    TEMPLATE_CHECK_SECONDS (10 s; shortened here), also outside the main thread, with one line naming the template."""
    import threading
    import time

    from pipeline.config import load_recipe
    from pipeline.errors import RecipeError
    from pipeline.run import run_pipeline

    assert R.TEMPLATE_CHECK_SECONDS == 10
    monkeypatch.setattr(R, "TEMPLATE_CHECK_SECONDS", 0.5)
    start = time.monotonic()
    recipe = load_recipe("trl-conversational", [f"reward.chat_template={json.dumps(NESTED_LOOPS)}"])
    with pytest.raises(
        RecipeError, match=r"reward.chat_template: the chat template did not finish rendering .* 0.5 s"
    ):
        run_pipeline(recipe, tmp_path / "run", stages=["reward"], dry_run=True)
    assert time.monotonic() - start < 30

    path = _model_with_template(tmp_path, tiny_tok, NESTED_LOOPS)  # shipped with the model, checked in a thread
    errors = []

    def check():
        try:
            R.check_tokenizer_templates((path / "chat_template.jinja").read_text(), f"the model ({path})", "k")
        except ValueError as e:
            errors.append(str(e))

    worker = threading.Thread(target=check)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and len(errors) == 1, errors
    assert errors[0].startswith(f"the chat template shipped with the model ({path}) (used because k is null): ")
    assert "did not finish rendering a two-turn check conversation within 0.5 s" in errors[0]
