"""The model card's scoring section: the code that reads an RM's reward as the pipeline does
(`pipeline.data.tokenize.encode_left`'s rule, written out with the tokenizer's own special tokens)."""

from __future__ import annotations

from pipeline.data.tokenize import special_affixes


SCORING_SNIPPET = '''## Scoring a text

The reward of a text is read as the pipeline reads it: the text tokenized without special tokens, cut
from the LEFT to {max_length} tokens, this tokenizer's own special tokens added around it and an EOS
appended where the tokenizer closes a text with nothing of its own (as TRL does), then the model's output
at the last token that is not its pad token. `model(**tok(text))` skips the EOS and the cut and gives
other numbers. With this project installed, `pipeline.scoring.score_texts(model, tok, texts,
max_length={max_length})` does the same in batches.

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = "."  # this directory
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
PREFIX, SUFFIX, EOS = {prefix}, {suffix}, {eos}  # what this tokenizer adds around a plain text
MAX_LENGTH = {max_length}  # longer texts lose tokens from the left


def reward(text: str, templated: bool = False) -> float:
    """text: prompt + response in the plain layout ('\\n\\nHuman: ...\\n\\nAssistant: ...'); for chat data,
    tok.apply_chat_template(messages, tokenize=False) with templated=True (the template writes its own
    special tokens, so nothing is added)."""
    pre, suf, eos = ([], [], []) if templated else (PREFIX, SUFFIX, EOS)
    body = tok(text, add_special_tokens=False)["input_ids"]
    if MAX_LENGTH is not None:
        body = body[max(0, len(body) - (MAX_LENGTH - len(pre) - len(suf) - len(eos))) :]
    ids = pre + body + suf
    if eos and ids[-1:] != eos:
        ids = ids + eos
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()
```
'''


def scoring_snippet(tokenizer, max_length: int | None) -> str:
    """The model card's scoring section, with this tokenizer's special tokens written in (`encode_left`'s rule):
    running its code on `prompt + response` gives the pipeline's reward for that pair side."""
    prefix, suffix = special_affixes(tokenizer)
    eos = [tokenizer.eos_token_id] if (not suffix and tokenizer.eos_token_id is not None) else []
    return SCORING_SNIPPET.format(prefix=prefix, suffix=suffix, eos=eos, max_length=max_length)
