"""Reward functions for alignment: a trained RM (cross-tokenizer, calibrated) and gold references.

Every reward here is a callable `reward(prompts, responses) -> np.ndarray` (float64, one score per
pair), the contract `train_ppo`, best-of-n and rejection sampling use; `as_trl_reward` adapts one to
TRL's reward-function signature (`prompts=..., completions=..., **columns -> list[float]`).

The policy and the RM may use different tokenizers (Alpaca-7B's LLaMA vs a Pythia RM): an RM never
sees the policy's token ids. The response is decoded to text by the sampler, joined to the dataset
prompt (the HH layout the RM was trained on, NOT the policy's Alpaca-formatted prompt), and
re-tokenized by the RM's own tokenizer with its own rules (`pipeline.scoring.score_texts`: left
truncation to `max_length`, EOS appended for decoder tokenizers, batches sorted by length).

Calibration: when the RM directory holds `temperature.json` (`{"temperature": T}`, written by the
calibration stage), rewards are divided by T, so `sigmoid(r_a - r_b)` is the calibrated preference
probability. Pass `temperature=1.0` to use the raw rewards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.data.tokenize import encode_responses
from pipeline.scoring import score_ids, score_texts


RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def read_temperature(rm_dir: str | os.PathLike) -> float | None:
    """The calibration temperature stored in `<rm_dir>/temperature.json`, or None when there is none."""
    path = Path(rm_dir) / "temperature.json"
    if not path.is_file():
        return None
    try:
        value = float(json.loads(path.read_text())["temperature"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{path}: expected {{"temperature": <positive float>}}, could not read it ({e})') from e
    if not value > 0:
        raise ValueError(f"{path}: the temperature must be > 0, got {value}")
    return value


class RMReward:
    """A reward model as a reward function: `RMReward(dir)(prompts, responses) -> rewards / T`.

    `rm` is a directory written by the reward stage (or any save_pretrained sequence-classification
    checkpoint, or a hub id), or an already loaded model together with its `tokenizer`.
    `temperature="auto"` reads `<dir>/temperature.json` (1.0 when absent); a number overrides it.
    `conversations` maps a prompt text to its messages (``'{"prompt": [...]}'``, the align stage's prompt
    records): such a prompt and its response are re-rendered as messages under THIS RM's chat template
    (`pipeline.data.render.render_response`), whatever template the policy generated with; other prompts
    are scored as ``prompt + response`` text.
    """

    def __init__(
        self,
        rm,
        tokenizer=None,
        *,
        max_length: int | None = 512,
        batch_size: int = 16,
        temperature: float | str = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None | str = "auto",
        bits: int | None = None,
        name: str | None = None,
        conversations: dict | None = None,
    ):
        from pipeline.models import copy_pad_token_id, load_reward_model, load_tokenizer

        self.path = None
        if isinstance(rm, (str, os.PathLike)):
            self.path = str(rm)
            try:
                self.model = load_reward_model(self.path, bits=bits)
                self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.path)
                copy_pad_token_id(self.model, self.tokenizer, key=f"reward model {self.path}")
            except (OSError, ValueError) as e:
                raise type(e)(f"cannot load the reward model at {self.path!r} for alignment: {e}") from e
        else:
            if tokenizer is None:
                raise ValueError("RMReward: pass the RM's tokenizer together with a loaded RM model")
            self.model, self.tokenizer = rm, tokenizer
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                "RMReward: the RM tokenizer has no pad token (load it with pipeline.models.load_tokenizer)"
            )
        if device is not None and not bits:
            self.model.to(device)
        self.model.eval()
        self.model.requires_grad_(False)
        if temperature == "auto":
            temperature = (read_temperature(self.path) if self.path else None) or 1.0
        self.temperature = float(temperature)
        self.max_length, self.batch_size, self.dtype = max_length, batch_size, dtype
        self.name = name or (Path(self.path).name if self.path else "rm")
        self.conversations = conversations if conversations is not None else {}
        self.__name__ = self.name  # TRL logs rewards/<callable name>

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"RMReward: {len(prompts)} prompts but {len(responses)} responses")
        if not len(prompts):
            return np.zeros(0, dtype=np.float64)
        if self.conversations:
            ids = encode_responses(
                self.tokenizer, prompts, responses, [self.conversations.get(p) for p in prompts], self.max_length
            )
            return score_ids(
                self.model,
                ids,
                self.tokenizer.pad_token_id,
                batch_size=self.batch_size,
                temperature=self.temperature,
                dtype=self.dtype,
            )
        texts = [p + r for p, r in zip(prompts, responses)]
        return score_texts(
            self.model,
            self.tokenizer,
            texts,
            max_length=self.max_length,
            batch_size=self.batch_size,
            temperature=self.temperature,
            dtype=self.dtype,
        )


class ImplicitReward:
    """An implicit RM (the reward stage's DPO policy, DIR/reward/<name>/implicit.json) as a reward function:
    beta * (log pi(y|x) - log pi_ref(y|x)) of each (dataset prompt, response), summed over the response tokens
    (`pipeline.implicit.implicit_rewards`: the prompt + response text with the policy tokenizer's special tokens
    and an EOS appended, as TRL's DPOTrainer trained it; a conversational prompt rendered with the policy's chat
    template), divided by the calibration temperature like `RMReward`. The policy and its reference are loaded
    on the first call (two models at once) and kept; `policy_path` is the DPO policy itself (the align method
    `policy` samples from it)."""

    def __init__(
        self,
        spec: dict,
        rm_dir: str | os.PathLike,
        *,
        max_length: int | None = 512,
        batch_size: int = 16,
        temperature: float | str = "auto",
        device: str | torch.device | None = None,
        name: str | None = None,
        conversations: dict | None = None,
    ):
        self.spec, self.policy_path = spec, spec["policy"]
        if temperature == "auto":
            temperature = read_temperature(rm_dir) or 1.0
        self.temperature = float(temperature)
        self.max_length, self.batch_size, self.device = max_length, batch_size, device
        self.name = name or Path(rm_dir).name
        self.conversations = conversations if conversations is not None else {}
        self.__name__ = self.name
        self._loaded = None

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        from pipeline.data.render import render_response
        from pipeline.implicit import implicit_rewards, load_implicit_rm

        if len(prompts) != len(responses):
            raise ValueError(f"ImplicitReward: {len(prompts)} prompts but {len(responses)} responses")
        if not len(prompts):
            return np.zeros(0, dtype=np.float64)
        if self._loaded is None:
            self._loaded = load_implicit_rm(self.spec, device=self.device or "cpu", key=f"implicit RM {self.name}")
        policy, reference, tok, beta = self._loaded
        rendered = [render_response(tok, p, r, self.conversations.get(p)) for p, r in zip(prompts, responses)]
        rewards = implicit_rewards(
            policy,
            reference,
            tok,
            [(p, r) for p, r, _ in rendered],
            beta,
            batch_size=self.batch_size,
            max_length=self.max_length,
            templated=[t for _, _, t in rendered],
        )
        return np.asarray(rewards, dtype=np.float64) / self.temperature


class GoldReward:
    """The synthetic benchmark's shared reward r* (`pipeline.data.synthetic.gold_reward`), on any text."""

    __name__ = "gold"

    def __init__(self):
        from pipeline.data.synthetic import gold_reward

        self._gold = gold_reward

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"gold reward: {len(prompts)} prompts but {len(responses)} responses")
        return np.asarray([self._gold(p, r) for p, r in zip(prompts, responses)], dtype=np.float64)


def gold_reward_fn(gold: str, **rm_kwargs) -> RewardFn:
    """The gold judge's reward: "synthetic" (r* of the synthetic benchmark) or a user-given RM directory."""
    if gold == "synthetic":
        return GoldReward()
    if not gold:
        raise ValueError("align.judge.gold_rm is empty: use 'synthetic' or the path of a reward-model directory")
    return RMReward(gold, name="gold", **rm_kwargs)


def as_trl_reward(reward: RewardFn, name: str | None = None, prompt_column: str = "raw_prompt"):
    """Adapt `reward(prompts, responses)` to TRL's reward-function signature.

    TRL calls `f(prompts=..., completions=..., completion_ids=..., **dataset_columns)`; when the dataset
    has a `raw_prompt` column (the dataset prompt before `format_prompt`), the RM scores that instead of
    the policy-formatted prompt.
    """

    def trl_reward(prompts, completions, **kwargs) -> list[float]:
        context = kwargs.get(prompt_column) or prompts
        return [float(x) for x in reward(list(context), list(completions))]

    trl_reward.__name__ = name or getattr(reward, "__name__", "reward")
    return trl_reward
