"""Each RL engine's reward, computed from an exported folder on the input that engine builds.

Every function takes the exported folder and a list of `Side` (one scored text: a prompt and a response, as text
and as chat messages) and returns `(rewards, ids)`: the engine's reward of each side (float64) and the token ids
the engine fed the model (padding removed), so the certificate can score the same ids with the pipeline.
Everything runs in fp32 (engines that score in bf16 differ from these numbers by bf16 rounding).

* `trl_rewards`: TRL's own code. An `RLOOTrainer` (or `GRPOTrainer`) is built with `reward_funcs=[folder]`, so
  TRL loads the folder itself (`AutoModelForSequenceClassification`, `num_labels=1`, the model's pad set to the
  tokenizer's pad), and its `_calculate_rewards` scores the sides: ``prompt + completion`` for text prompts, the
  tokenizer's chat template for conversational ones, tokenized with `add_special_tokens=False`, right padding, no
  EOS appended, no truncation. The trainer's policy is a throwaway 1-layer model (TRL needs one to exist).
* `openrlhf_rewards`: OpenRLHF is not installable here; its documented read-out is implemented after its source
  (OpenRLHF/OpenRLHF): the reward model of `openrlhf/models/model.py` at commit
  707b1060c9167b94a2faf974c07d3165b4ca4841 (`_get_reward_model`: the base model `AutoModel._model_mapping[config]`
  plus a bias-free `score` head, `--value_head_prefix score`, position ids from the attention mask, the value at
  the last attended token, `(r - mean) / std` with mean/std from config.json under `--normalize_reward`), on the
  input of `openrlhf/cli/serve_rm.py` at 58ec6ffd957e617b7dbb14596a22de99d9a75617 (the query text tokenized with
  `add_special_tokens=False`, left padding, cut from the right at `--max_len`), the query being the rollout decoded
  with its special tokens (`openrlhf/trainer/ppo_utils/experience_maker.py` at
  89308a0b768dec168dff240ae746710fc967a49b: vLLM keeps the stop token, so a finished response ends with EOS).
* `verl_rewards`: verl's FSDP reward worker, after `verl/workers/fsdp_workers.py` (volcengine/verl) at
  b38119fa248231a6e1c6198d08c0a4e46354dd01: `RewardModelWorker._build_model` loads the folder with
  `AutoModelForTokenClassification` (`num_labels=1`, `classifier_dropout=0`); `_switch_chat_template` renders
  the prompt messages plus the response (EOS text removed) with the RM tokenizer's chat template, tokenizes with
  `add_special_tokens=False`, right padding, cut from the right at `max_length`; `_forward_micro_batch` reads the
  score at `argmax(position_ids * attention_mask)` with `compute_position_id_with_mask` of `verl/utils/model.py`
  (at ceaee54be633411b6a8e6acf5689024f42e43020: `clip(cumsum(mask) - 1, min=0)`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Side:
    """One scored text: `prompt` + `response` as the pipeline renders them for the RM's tokenizer, and the same
    conversation as chat `messages` (the prompt's turns, then the response as the assistant's)."""

    prompt: str
    response: str
    messages: list[dict] = field(default_factory=list)


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _unpadded(input_ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]


@contextlib.contextmanager
def _quiet(*names: str):
    """Library loggers at ERROR for the duration (construction warnings that do not concern the certificate)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---------------------------------------------------------------------------------------------------
# TRL: its own trainer, its own reward code


def trl_trainer(folder, output_dir, kind: str = "rloo"):
    """A TRL RLOOTrainer / GRPOTrainer with `reward_funcs=[folder]` (TRL loads the RM and its tokenizer), in fp32."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_cls, trainer_cls = {"rloo": (RLOOConfig, RLOOTrainer), "grpo": (GRPOConfig, GRPOTrainer)}[kind]
    tok = AutoTokenizer.from_pretrained(str(folder))  # the policy's processing class: TRL needs one
    special = tok.eos_token_id if tok.eos_token_id is not None else 0
    policy = AutoModelForCausalLM.from_config(
        GPT2Config(
            vocab_size=len(tok),
            n_embd=8,
            n_layer=1,
            n_head=1,
            n_positions=16,
            bos_token_id=special,
            eos_token_id=special,
        )
    )
    cuda = torch.cuda.is_available()
    args = config_cls(
        output_dir=str(output_dir),
        use_cpu=not cuda,
        bf16=False,
        report_to="none",
        save_strategy="no",
        beta=0.0,
        num_generations=2,
        per_device_train_batch_size=2,
        model_init_kwargs={"dtype": torch.float32},
        activation_checkpointing=False,
        disable_tqdm=True,
    )
    with _quiet("trl", "transformers"):
        return trainer_cls(
            model=policy,
            reward_funcs=[str(folder)],
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
            processing_class=tok,
        )


def trl_rewards(
    folder, sides: Sequence[Side], *, conversational: bool, kind: str = "rloo", batch_size: int = 16
) -> tuple[np.ndarray, list[list[int]]]:
    """Rewards from TRL's `_calculate_rewards` of an RLOOTrainer/GRPOTrainer loading `folder` (see the module
    docstring); the ids are captured on their way into the reward model."""
    with tempfile.TemporaryDirectory(prefix="export-trl-") as tmp:  # TRL wants an output_dir; nothing is saved
        return _trl_rewards(trl_trainer(folder, tmp, kind), sides, conversational, batch_size)


def _trl_rewards(trainer, sides: Sequence[Side], conversational: bool, batch_size: int):
    model = trainer.reward_funcs[0]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["input_ids"], kwargs["attention_mask"])), with_kwargs=True
    )
    rewards = []
    try:
        for batch in _batches(list(sides), batch_size):
            if conversational:
                prompts = [s.messages[:-1] for s in batch]
                completions = [s.messages[-1:] for s in batch]
            else:
                prompts = [s.prompt for s in batch]
                completions = [s.response for s in batch]
            inputs = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
            out = trainer._calculate_rewards(inputs, prompts, completions, [[] for _ in batch])
            rewards += out[:, 0].double().cpu().tolist()
    finally:
        hook.remove()
    ids = [row for input_ids, mask in seen for row in _unpadded(input_ids, mask)]
    return np.asarray(rewards, dtype=np.float64), ids


# ---------------------------------------------------------------------------------------------------
# OpenRLHF: its reward model class and its RM server's input, after its source (see the module docstring)


def openrlhf_model(folder, *, value_head_prefix: str = "score", normalize_reward: bool = False):
    """OpenRLHF's `get_llm_for_sequence_regression(folder, "reward", ...)` without DeepSpeed/LoRA: the base model
    class from `AutoModel._model_mapping` with a bias-free `value_head_prefix` head, loaded by `from_pretrained`."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(folder))
    config.normalize_reward = normalize_reward
    config._attn_implementation = "eager"  # OpenRLHF's choice without flash attention
    base_class = AutoModel._model_mapping[type(config)]

    class RewardModel(base_class.__base__):
        def __init__(self, config):
            super().__init__(config)
            setattr(self, self.base_model_prefix, base_class(config))
            self.value_head_prefix = value_head_prefix
            setattr(self, value_head_prefix, torch.nn.Linear(config.hidden_size, 1, bias=False))
            self.normalize_reward = config.normalize_reward
            self.register_buffer("mean", torch.zeros(1), persistent=False)
            self.register_buffer("std", torch.ones(1), persistent=False)
            if hasattr(config, "mean"):
                self.mean[0] = config.mean
                self.std[0] = config.std
            self.post_init()  # transformers 5 needs it (OpenRLHF's code predates it); weights come from the folder

        def forward(self, input_ids, attention_mask):
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
            outputs = getattr(self, self.base_model_prefix)(
                input_ids, attention_mask=attention_mask, position_ids=position_ids
            )
            values = getattr(self, self.value_head_prefix)(outputs["last_hidden_state"]).squeeze(-1)
            eos_indices = attention_mask.size(1) - 1 - attention_mask.long().fliplr().argmax(dim=1, keepdim=True)
            reward = values.gather(dim=1, index=eos_indices).squeeze(1)
            if not self.training and self.normalize_reward:
                reward = (reward - self.mean) / self.std
            return reward

    with _quiet("transformers"):
        model = RewardModel.from_pretrained(str(folder), config=config, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def openrlhf_rewards(
    folder, sides: Sequence[Side], *, max_len: int = 2048, batch_size: int = 16, normalize_reward: bool = False
) -> tuple[np.ndarray, list[list[int]]]:
    """OpenRLHF's remote-RM reward of `prompt + response + EOS` (a finished rollout decoded with its special
    tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"  # serve_rm: get_tokenizer(..., "left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = openrlhf_model(folder, normalize_reward=normalize_reward)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    rewards, ids = [], []
    for batch in _batches(list(sides), batch_size):
        queries = [s.prompt + s.response + (tok.eos_token or "") for s in batch]
        enc = tok(
            queries, return_tensors="pt", add_special_tokens=False, max_length=max_len, padding=True, truncation=True
        )
        r = model(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        rewards += r.double().cpu().tolist()
        ids += _unpadded(enc["input_ids"], enc["attention_mask"])
    return np.asarray(rewards, dtype=np.float64), ids


# ---------------------------------------------------------------------------------------------------
# verl: its FSDP reward worker's model class, chat-template switch and read-out (see the module docstring)


def verl_model(folder):
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(str(folder))
    config.num_labels = 1
    config.classifier_dropout = 0.0
    with _quiet("transformers"):
        model = AutoModelForTokenClassification.from_pretrained(str(folder), config=config, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def verl_rewards(
    folder, sides: Sequence[Side], *, max_length: int = 1 << 20, batch_size: int = 16
) -> tuple[np.ndarray, list[list[int]]]:
    """verl's reward of the conversation rendered by the RM tokenizer's chat template (`_switch_chat_template`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = verl_model(folder)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    rewards, ids = [], []
    for batch in _batches(list(sides), batch_size):
        rows = []
        for s in batch:
            chat = [
                *s.messages[:-1],
                {"role": "assistant", "content": s.messages[-1]["content"].replace(tok.eos_token, "")},
            ]
            text = tok.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
            rows.append(tok(text, add_special_tokens=False)["input_ids"][:max_length])  # truncation="right"
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left_pad=False: right padding
            input_ids[i, : len(r)] = torch.as_tensor(r)
            mask[i, : len(r)] = 1
        position_ids = torch.clip(torch.cumsum(mask, dim=-1) - 1, min=0, max=None)
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=False,
        )
        rm_score = out.logits.squeeze(-1)
        eos_mask_idx = torch.argmax(position_ids.to(device) * mask.to(device), dim=-1)
        rewards += rm_score[torch.arange(len(rows), device=device), eos_mask_idx].double().cpu().tolist()
        ids += rows
    return np.asarray(rewards, dtype=np.float64), ids
