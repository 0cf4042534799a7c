"""MORE, MultiTask and Uniform reward-model training as a subclass of TRL's `RewardTrainer`.

- `multitask`: TRL's own Bradley-Terry loss on a plain mixture (the paper's baseline).
- `uniform`:   L = sum_i (1/K) BT_loss_i on balanced batches (equals `multitask` there; a sanity check).
- `more`:      L = sum_i lambda_i BT_loss_i, lambda from the min-norm solve over the smoothed, normalised
               per-source head gradients (pipeline.reward.more).

The head gradients come from the pooled features the forward pass already computed (captured by a
forward hook on the reward head), so MORE costs no second forward, no CPU copies of features or weights,
and no gathering of partitioned parameters under ZeRO-3. In data-parallel runs the per-source sums are
all-reduced before the solve, so every rank uses the same lambda.

Every method trains on packed batches where that is exact (`packing`, pipeline.reward.packing: one copy of
each pair's prompt, several pairs per row) and on length-grouped batches (`length_grouping`, still
balanced per source for more/uniform); rewards and features are then read from the head's per-position
outputs and inputs at each side's pooling token.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from trl import RewardConfig, RewardTrainer
from trl.data_utils import get_dataset_column_names, is_conversational
from trl.trainer.reward_trainer import DataCollatorForPreference
from trl.trainer.utils import get_config_model_id

from pipeline.checkpoints import (
    CHECKPOINT_COMPLETE,
    MORE_STATE,
    last_complete_checkpoint,
    load_more_state,
    save_more_state,
)
from pipeline.data.tokenize import special_affixes, tokenize_pairs, truncated_pair
from pipeline.io import atomic_write_text
from pipeline.layout import (
    find_reward_head,
    packed_attention_mask,
    packed_length,
    packing_problem,
    pool_features,
)
from pipeline.reward.card import scoring_snippet
from pipeline.reward.columns import check_pair_columns, margin_tensor, source_id_tensor
from pipeline.reward.more import NORMALIZE_MODES, head_gradient_sums, more_weights, two_source_note
from pipeline.reward.packing import LengthGroupedBalancedSampler, PackedPairCollator


METHODS = ("more", "multitask", "uniform")
TRUNCATION_MODES = ("drop", "left")  # what happens to a pair longer than max_length
SINGLE_SOURCE = "all"  # the name of the one source of a dataset without a source_id column

logger = logging.getLogger(__name__)


@dataclass
class MORERewardConfig(RewardConfig):
    r"""Configuration for [`MORERewardTrainer`]: TRL's `RewardConfig` plus the multi-source options.

    Pairs longer than `max_length` are dropped, as TRL does (counted and logged), in every layout; with
    `truncation="left"` they are kept and cut from the LEFT instead (the oldest turns go; the response and a
    chat template's end-of-turn markers survive), in every layout alike. The pipeline's recipes set "left".
    `source_names` may be omitted for a dataset without a `source_id` column: it is then one source, named
    'all' (MORE's weight is 1, its loss TRL's).
    """

    method: str = field(
        default="more",
        metadata={
            "help": "more (min-norm source weights), multitask (plain mixture, TRL's loss) or uniform "
            "(fixed equal source weights on balanced batches).",
            "choices": list(METHODS),
        },
    )
    alpha: float = field(
        default=0.99,
        metadata={"help": "MORE: EMA weight on the NEW per-source head gradient (m <- (1-alpha) m + alpha g)."},
    )
    normalize: str = field(
        default="l2",
        metadata={
            "help": "MORE: scaling of each source's gradient before the solve: l2, none or loss. With exactly two "
            "sources l2 makes MORE the uniform baseline (both weights 0.5 at every step).",
            "choices": list(NORMALIZE_MODES),
        },
    )
    source_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names of the sources, indexed by the dataset's integer `source_id` column. Needed "
            "for more/uniform on data with a source_id column (without one the data is one source, 'all'); "
            "used for per-source logging in every method."
        },
    )
    balanced_batches: bool = field(
        default=False,
        metadata={
            "help": "The train set is laid out in balanced blocks (pipeline.data.mix(strategy='balanced')):"
            " read it in order so every batch holds the same number of pairs from every source."
        },
    )
    packing: bool = field(
        default=True,
        metadata={
            "help": "Pack each pair as prompt + chosen + rejected continuation (one copy of the shared prompt)"
            " and several pairs per row up to packing_max_tokens, behind a 4D attention mask with restarted "
            "positions: the same loss and gradients as padded batches, fewer tokens. Used where exact "
            "(decoder RMs with sdpa/eager attention, full or sliding-window: GPT-NeoX, Llama, Mistral, Qwen, "
            "Gemma-2, GPT-2); others (BERT-like encoders, flash/flex kernels, attention patterns the packed "
            "mask does not replicate) fall back to padded batches, see pipeline.layout.packing_problem."
        },
    )
    packing_max_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Packing: tokens per packed row (a longer pair gets a row of its own). None: the batch's "
            "longest packed pair, so no row is wider than one pair needs (attention cost grows with the "
            "row width squared) and shorter pairs share rows (padding-free up to the last row's tail)."
        },
    )
    # TRL's RewardConfig defaults the deprecated alias `gradient_checkpointing` to True, so transformers 5 warned
    # "`gradient_checkpointing` is deprecated" on every RM although no recipe set it. Both default to None here
    # and __post_init__ sets TRL's default (on) under the new name; a user who sets the old name still gets
    # transformers' warning (it is theirs to act on), and it still takes effect.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (transformers 5)."}
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in the backward pass to save memory (TRL's RewardConfig default: "
            "on when neither this nor gradient_checkpointing is set)."
        },
    )
    truncation: str = field(
        default="drop",
        metadata={
            "help": "A pair longer than max_length: 'drop' it (TRL's rule; counted and logged) or cut it from "
            "the 'left' (the oldest dialogue turns go, the response survives), in every data layout alike.",
            "choices": list(TRUNCATION_MODES),
        },
    )
    length_grouping: bool = field(
        default=True,
        metadata={
            "help": "Group pairs of similar length into the same batch (per source with balanced_batches: "
            "every batch still holds per_device_train_batch_size / len(source_names) pairs of every "
            "source); batch order is shuffled per epoch with the seed."
        },
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")
        if self.truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {self.truncation!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.balanced_batches and self.method in ("more", "uniform") and not self.source_names:
            raise ValueError(f"method={self.method!r} with balanced_batches needs source_names (one per source_id)")
        if self.packing_max_tokens is not None and self.packing_max_tokens < 4:
            raise ValueError(f"packing_max_tokens must be at least 4, got {self.packing_max_tokens}")
        if self.balanced_batches:
            self.train_sampling_strategy = "sequential"
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        super().__post_init__()


@dataclass
class SourceAwareCollator(DataCollatorForPreference):
    """TRL's preference collator that also carries the integer `source_id` of every pair (an index of the
    `num_sources` sources; 0: any integer) and refuses a non-finite `margin` (`pipeline.reward.columns`)."""

    num_sources: int = 0

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if "margin" in examples[0]:
            batch["margin"] = margin_tensor(examples)
        if "source_id" in examples[0]:
            batch["source_id"] = source_id_tensor(examples, self.num_sources)
        return batch


def is_text_pair_dataset(dataset) -> bool:
    """True for an in-memory dataset of text pairs (`chosen`/`rejected` strings, with or without a `prompt`
    column), which `tokenize_pairs` tokenizes; False for conversational, pre-tokenized or streaming data."""
    if not isinstance(dataset, Dataset) or len(dataset) == 0:
        return False
    cols = dataset.column_names
    if "chosen_ids" in cols or "chosen_input_ids" in cols or not {"chosen", "rejected"} <= set(cols):
        return False
    first = dataset[0]
    return all(isinstance(first[c], str) for c in ("prompt", "chosen", "rejected") if c in cols)


class _WithoutMaxLength:
    """The trainer's args as TRL's dataset preparation reads them, with no max_length: TRL then keeps every
    pair, and `truncation="left"` cuts the long ones afterwards instead of TRL dropping them."""

    max_length = None

    def __init__(self, args):
        self._args = args

    def __getattr__(self, name):
        return getattr(self._args, name)


class MORERewardTrainer(RewardTrainer):
    """A `RewardTrainer` that trains on several preference sources with MORE, MultiTask or Uniform weights."""

    _tag_names = ["trl", "reward-trainer", "more"]
    _name = "MORE Reward"

    def __init__(
        self,
        model,
        args: MORERewardConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *pos,
        **kwargs,
    ):
        """TRL's signature and defaults: `args=None` builds a default `MORERewardConfig` (method 'more' on
        one source unless the data has a `source_id` column), `model` may be an id, `processing_class` is
        loaded from the model when omitted. Without a `data_collator`, batches keep `source_id` and are packed
        where that is exact (`pipeline.layout.packing_problem`)."""
        if args is None:  # TRL's default: '<model name>-Reward'
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = MORERewardConfig(f"{name.split('/')[-1]}-Reward")
        if not isinstance(args, MORERewardConfig):
            raise TypeError(
                f"MORERewardTrainer needs a MORERewardConfig, got {type(args).__name__}; "
                "build one with MORERewardConfig(**your_config.to_dict())"
            )
        check_pair_columns(train_dataset, "train_dataset", len(args.source_names or []))
        for key, ds in eval_dataset.items() if isinstance(eval_dataset, dict) else [("", eval_dataset)]:
            check_pair_columns(ds, f"eval_dataset[{key!r}]" if key else "eval_dataset", len(args.source_names or []))
        if isinstance(train_dataset, Dataset | IterableDataset) and args.method in ("more", "uniform"):
            if not args.source_names and "source_id" in get_dataset_column_names(train_dataset):
                raise ValueError(
                    f"method={args.method!r}: the train set has a source_id column but the config has no "
                    "source_names; pass source_names (one name per source_id)"
                )
        self.n_truncated: dict[str, int] = {}
        self.n_dropped: dict[str, int] = {}
        self._max_length = args.max_length
        user_collator = data_collator is not None
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, *pos, **kwargs)
        self.num_sources = len(args.source_names or [])
        self.packed, why_not = False, None
        if not user_collator:
            # TRL's collator drops source_id; ours keeps it (TRL has set the tokenizer's pad token by now)
            self.data_collator = SourceAwareCollator(
                pad_token_id=self.processing_class.pad_token_id,
                pad_to_multiple_of=args.pad_to_multiple_of,
                num_sources=self.num_sources,
            )
            if not args.packing:
                why_not = "packing=False"
            elif (problem := packing_problem(self.model)) is not None:
                why_not = problem
            else:
                self.packed = True
        else:
            why_not = "a data_collator was passed"
        if self.packed:
            self.data_collator = PackedPairCollator(
                pad_token_id=self.processing_class.pad_token_id,
                max_tokens=args.packing_max_tokens,
                readout_pad_id=self.model.config.get_text_config().pad_token_id,
                num_sources=self.num_sources,
            )
            # A packed batch cannot be concatenated with others and re-split (accelerate's dispatch of streaming
            # datasets does that): every process reads its own batches, as TRL sets for a streaming train set.
            args.accelerator_config.dispatch_batches = False
            self.accelerator.dataloader_config.dispatch_batches = False
            logger.info("[reward] packing on: pairs packed with one copy of their prompt")
        elif args.packing:
            logger.warning(f"[reward] packing off: {why_not}; training on padded batches")
        else:
            logger.info("[reward] packing off: packing=False")
        self.packing_status = "on" if self.packed else f"off: {why_not}"
        if args.length_grouping and train_dataset is not None and not isinstance(self.train_dataset, Dataset):
            logger.warning(
                f"[reward] length_grouping off: the train set is a {type(self.train_dataset).__name__} (no length);"
                " its pairs are read in their own order, as TRL does"
            )
        if args.method == "more" and (note := two_source_note(len(args.source_names or []), args.normalize)):
            logger.warning(f"[reward] {note}")
        self._momentum: torch.Tensor | None = None
        self._features: torch.Tensor | None = None
        self._head_output: torch.Tensor | None = None
        self._last_lambda: torch.Tensor | None = None
        self._hook = find_reward_head(self.model).register_forward_hook(self._capture_head_input)

    # ---------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Token ids for every TRL layout. Text rows (`chosen`/`rejected` strings, with or without a `prompt`
        column) are tokenized by the project's `tokenize_pairs` (the same ids as TRL); every other layout
        (conversational message lists with `tools` / `chat_template_kwargs`, pre-tokenized `chosen_ids` or legacy
        `chosen_input_ids` columns, streaming datasets) by TRL's own `RewardTrainer._prepare_dataset`. Then a
        pair longer than `max_length` is dropped (`truncation="drop"`, TRL's rule) or cut from the left
        (`truncation="left"`), in every layout alike; how many is logged and kept in `n_dropped` /
        `n_truncated`."""
        m = self._max_length
        left = args.truncation == "left" and m is not None
        if is_text_pair_dataset(dataset):
            dataset, n_trunc = tokenize_pairs(dataset, processing_class, m if left else None)
            if left:
                return self._count_truncated(dataset_name, len(dataset), n_trunc, dataset)
            return self._drop_long(dataset, dataset_name, m)
        if not left:
            n_before = len(dataset) if isinstance(dataset, Dataset) else None
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)  # drops (TRL)
            if m is not None and n_before is None:
                logger.warning(
                    f"[reward] {dataset_name}: a streaming dataset; pairs longer than max_length={m} tokens are "
                    "dropped (TRL's rule), their number is not known in advance"
                )
            elif m is not None:
                self._count_dropped(dataset_name, n_before, n_before - len(dataset))
            return dataset
        # a chat template writes its own special tokens, which the cut does not single out (as the data layer's
        # templated rows); other ids keep the tokenizer's leading special token ([CLS]), as `encode_left` does
        templated = isinstance(dataset, Dataset) and len(dataset) > 0 and is_conversational(dataset[0])
        prefix = [] if templated else special_affixes(processing_class)[0]
        dataset = super()._prepare_dataset(dataset, processing_class, _WithoutMaxLength(args), dataset_name)
        cut = dataset.map(lambda c, r: truncated_pair(c, r, m, prefix), input_columns=["chosen_ids", "rejected_ids"])
        if not isinstance(cut, Dataset):
            return cut
        n_trunc = sum(
            len(a) < len(b) or len(c) < len(d)
            for a, b, c, d in zip(
                cut["chosen_ids"], dataset["chosen_ids"], cut["rejected_ids"], dataset["rejected_ids"]
            )
        )
        return self._count_truncated(dataset_name, len(cut), n_trunc, cut)

    def _drop_long(self, dataset: Dataset, dataset_name: str, m: int | None) -> Dataset:
        """TRL's rule on tokenized pairs: keep a pair only when both sides fit in `m` tokens."""
        if m is None:
            return dataset
        kept = dataset.filter(lambda c, r: len(c) <= m and len(r) <= m, input_columns=["chosen_ids", "rejected_ids"])
        self._count_dropped(dataset_name, len(dataset), len(dataset) - len(kept))
        return kept

    def _count_dropped(self, dataset_name: str, n_before: int, n_dropped: int) -> None:
        self.n_dropped[dataset_name] = n_dropped
        if n_dropped:
            logger.warning(
                f"[reward] {dataset_name}: {n_dropped} of {n_before} pairs longer than max_length="
                f"{self._max_length} tokens dropped (TRL's rule; truncation='left' keeps them, cut from the left)"
            )

    def _count_truncated(self, dataset_name: str, n: int, n_trunc: int, dataset=None):
        self.n_truncated[dataset_name] = n_trunc
        if n_trunc:
            logger.warning(
                f"[reward] {dataset_name}: {n_trunc} of {n} pairs truncated from the left to {self._max_length} tokens"
            )
        return dataset

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches (per source with balanced_batches), see `LengthGroupedBalancedSampler`."""
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.length_grouping or ds is None:
            return super()._get_train_sampler(train_dataset)
        if not isinstance(ds, Dataset):  # a streaming dataset has no length (logged in __init__)
            return super()._get_train_sampler(train_dataset)
        cols = ds.column_names
        lengths = [
            packed_length(c, r) if self.packed else max(len(c), len(r))
            for c, r in zip(ds["chosen_ids"], ds["rejected_ids"])
        ]
        sources, psb = None, self.args.per_device_train_batch_size
        if self.args.balanced_batches and "source_id" in cols:
            k = self.num_sources or len(set(ds["source_id"]))
            if psb % k:
                raise ValueError(
                    f"balanced_batches: per_device_train_batch_size={psb} is not a multiple of the {k} sources"
                )
            sources, psb = ds["source_id"], psb // k
        sampler = LengthGroupedBalancedSampler(lengths, sources, psb, seed=self.args.seed)
        if sampler.n_left_out:
            logger.warning(
                f"[reward] balanced_batches: the sources differ in size; each epoch reads {sampler.per_source} "
                f"random pairs of every source and leaves {sampler.n_left_out} of {len(lengths)} pairs out"
            )
        return sampler

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "source_id"]

    # ---------------------------------------------------------------- loss
    def _capture_head_input(self, module, inputs, output):
        self._features = inputs[0]
        self._head_output = output

    def _packed_forward(self, model, inputs):
        """Rewards [2P] (chosen then rejected) and pooled features [2P, H] of a packed batch: the head's
        per-position outputs and inputs, read at each side's pooling token."""
        readout = inputs.pop("readout").reshape(-1)
        inputs.pop("num_pair_tokens", None)
        self._features = self._head_output = None
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=packed_attention_mask(model, inputs["attention_mask"], inputs["position_ids"]),
            position_ids=inputs["position_ids"],
            use_cache=False,
        )
        if self._head_output is None:
            raise RuntimeError("the reward head's forward hook did not fire on the packed batch")
        out, feats = self._head_output, self._features
        rewards = out.reshape(-1, out.shape[-1])[readout][:, 0]
        z = feats.reshape(-1, feats.shape[-1])[readout]
        self._features = self._head_output = None
        return outputs, rewards, z

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss and metrics, with per-source statistics (all-reduced over ranks) and, for `more` and
        `uniform`, the per-source weighting: L = sum_i lambda_i * (mean Bradley-Terry loss of source i)."""
        self._hook_after_deepspeed()
        source_ids = inputs.pop("source_id", None)
        packed = "readout" in inputs
        if source_ids is None and self.args.method == "multitask" and not packed and self.num_sources <= 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        source_ids = self._source_ids(source_ids, inputs, packed)
        mode = "train" if self.model.training else "eval"
        outputs, rewards, z, n_pair_tokens = self._rewards(model, inputs, packed)
        r_c, r_r = torch.chunk(rewards, 2)
        diff = r_c - r_r
        if "margin" in inputs:
            diff = diff - inputs["margin"]
        pair_loss = -F.logsigmoid(diff)
        k = max(self.num_sources, 1)
        stats = self._source_stats(inputs, packed, z, diff, r_c, r_r, pair_loss, source_ids, k, mode)
        g_counts, g_loss, g_correct = stats[:, -3], stats[:, -2], stats[:, -1]
        loss, lam = self._weighted_loss(stats, pair_loss, source_ids, k, mode)
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((r_c + r_r) ** 2)  # TRL's formula
        self._log_metrics(mode, n_pair_tokens, outputs, r_c, r_r, g_counts, g_loss, g_correct, lam, k)
        return (loss, outputs) if return_outputs else loss

    def _hook_after_deepspeed(self) -> None:
        if self.is_deepspeed_enabled and not getattr(self, "_hook_after_engine", False):
            # ZeRO-3 wraps module outputs in forward hooks (to re-gather the weights for backward); a packed
            # batch takes its rewards from the captured head output, so capture after DeepSpeed's hooks.
            self._hook.remove()
            self._hook = find_reward_head(self.model).register_forward_hook(self._capture_head_input)
            self._hook_after_engine = True

    def _source_ids(self, source_ids, inputs, packed: bool) -> torch.Tensor:
        """Each pair's source; every pair is source 0 when the data has one source (MORE's and Uniform's
        weight is then 1: TRL's loss), also for multitask without source_names."""
        if source_ids is not None:
            return torch.zeros_like(source_ids) if self.num_sources == 0 else source_ids
        if self.num_sources > 1:
            raise ValueError(
                f"method={self.args.method!r} with {self.num_sources} source_names needs a `source_id` column in "
                "the dataset"
            )
        n_pairs = inputs["readout"].shape[-1] if packed else inputs["input_ids"].shape[0] // 2
        return torch.zeros(n_pairs, dtype=torch.long, device=inputs["input_ids"].device)

    def _rewards(self, model, inputs, packed: bool):
        """(outputs, rewards [chosen; rejected], pooled features of a packed batch or None, pair tokens)."""
        if packed:
            from transformers.modeling_outputs import SequenceClassifierOutput

            n_pair_tokens = inputs["num_pair_tokens"]  # read first: the packed forward consumes the batch's keys
            _, rewards, z = self._packed_forward(model, inputs)
            return SequenceClassifierOutput(logits=rewards.unsqueeze(-1)), rewards, z, n_pair_tokens
        inputs["use_cache"] = False
        self._features = None
        outputs = model(**inputs)
        return outputs, outputs.logits.squeeze(-1), None, inputs["attention_mask"].sum()

    def _source_stats(self, inputs, packed, z, diff, r_c, r_r, pair_loss, source_ids, k: int, mode: str):
        """Per-source sums, reduced over data-parallel ranks: [MORE's head-gradient sums (more, training),
        counts, loss sums, correct counts], one row per source."""
        loss_sums = torch.zeros(k, device=pair_loss.device, dtype=torch.float32)
        loss_sums.index_add_(0, source_ids, pair_loss.detach().float())
        correct = torch.zeros(k, device=pair_loss.device, dtype=torch.float32)
        correct.index_add_(0, source_ids, ((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).detach())
        if self.args.method == "more" and mode == "train":
            if not packed:
                if self._features is None:
                    raise RuntimeError("the reward head's forward hook did not fire; cannot compute MORE weights")
                z = pool_features(
                    self._features, inputs["input_ids"], self.model.config.get_text_config().pad_token_id
                )
            z_c, z_r = torch.chunk(z, 2)
            grad_sums, counts = head_gradient_sums(z_c, z_r, diff, source_ids, k)
            stats = torch.cat([grad_sums, torch.stack([counts, loss_sums, correct], dim=1)], dim=1)
        else:
            counts = torch.bincount(source_ids, minlength=k).float()
            stats = torch.stack([counts, loss_sums, correct], dim=1)
        self._features = self._head_output = None
        return self.accelerator.reduce(stats, reduction="sum") if self.accelerator.num_processes > 1 else stats

    def _weighted_loss(self, stats, pair_loss, source_ids, k: int, mode: str):
        """(loss, lambda or None): the mean pair loss for multitask and in evaluation; else
        sum_i lambda_i * (global mean BT loss of source i), lambda from MORE's solve or uniform."""
        if self.args.method == "multitask" or mode == "eval":
            return pair_loss.mean(), None
        g_counts, g_loss = stats[:, -3], stats[:, -2]
        if self.args.method == "more":
            lam, self._momentum = more_weights(
                stats[:, :-3], g_counts, g_loss, self._momentum, alpha=self.args.alpha, normalize=self.args.normalize
            )
        else:
            present = g_counts > 0
            lam = present.float() / present.sum().clamp(min=1)
        # DDP averages gradients over ranks, hence the world-size factor on this rank's share of each source's sum.
        local_sums = torch.zeros(k, device=pair_loss.device, dtype=pair_loss.dtype)
        local_sums = local_sums.index_add(0, source_ids, pair_loss)
        scale = self.accelerator.num_processes / g_counts.clamp(min=1)
        self._last_lambda = lam.detach()
        return (lam.to(pair_loss.dtype) * local_sums * scale.to(pair_loss.dtype)).sum(), lam

    def _log_metrics(self, mode, n_pair_tokens, outputs, r_c, r_r, g_counts, g_loss, g_correct, lam, k: int):
        """TRL's own metrics (tokens, rewards, accuracy, margin) and per-source ones (loss, accuracy, lambda)."""
        if mode == "train":
            # tokens of the pairs as TRL counts them (chosen + rejected), packed or not
            n_tok = self.accelerator.gather_for_metrics(n_pair_tokens).sum().item()
            self._total_train_tokens += n_tok // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            all_rewards = self.accelerator.gather(outputs.logits)
            self._metrics[mode]["min_reward"].append(all_rewards.min().item())
            self._metrics[mode]["mean_reward"].append(all_rewards.mean().item())
            self._metrics[mode]["max_reward"].append(all_rewards.max().item())
            self._metrics[mode]["accuracy"].append((g_correct.sum() / g_counts.sum().clamp(min=1)).item())
            margin = self.accelerator.gather_for_metrics((r_c - r_r).mean()).mean()
            self._metrics[mode]["margin"].append(margin.item())
            names = self.args.source_names or ([SINGLE_SOURCE] if k == 1 else [str(i) for i in range(k)])
            for i in torch.nonzero(g_counts > 0).flatten().tolist():
                self._metrics[mode][f"loss/{names[i]}"].append((g_loss[i] / g_counts[i]).item())
                self._metrics[mode][f"accuracy/{names[i]}"].append((g_correct[i] / g_counts[i]).item())
            if lam is not None:
                for i, name in enumerate(names):
                    self._metrics[mode][f"more/lambda/{name}"].append(float(lam[i]))

    # ---------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint, then MORE's momentum, then (after every rank wrote its part) the completion
        marker; older checkpoints are rotated out only once the new one is complete."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate below, after the marker: never leave no complete checkpoint
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = self._get_output_dir(trial=trial)
        ckpt = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and self._momentum is not None:
            save_more_state(ckpt, self._momentum)
        self.accelerator.wait_for_everyone()  # every rank has written its shards
        if self.args.should_save:
            atomic_write_text(
                ckpt / CHECKPOINT_COMPLETE,
                json.dumps(
                    {
                        "global_step": self.state.global_step,
                        "method": self.args.method,
                        "more_state": self._momentum is not None,
                    }
                )
                + "\n",
            )
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer.train, also restoring MORE's gradient momentum from the checkpoint.

        `resume_from_checkpoint=True` picks the last COMPLETE checkpoint of output_dir (not merely the
        highest-numbered directory). A MORE checkpoint without its momentum is refused: resuming from it
        would silently reset MORE's source weights."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir, self.args.method)
        if isinstance(resume_from_checkpoint, str | Path):
            momentum = load_more_state(resume_from_checkpoint)
            if momentum is None and self.args.method == "more":
                raise ValueError(
                    f"{resume_from_checkpoint}: a MORE checkpoint without {MORE_STATE}; resuming from it would reset "
                    "MORE's gradient momentum. Delete this checkpoint directory to resume from an earlier one "
                    "(or from scratch)."
                )
            if momentum is not None:
                self._momentum = momentum.to(self.args.device)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---------------------------------------------------------------- saving
    def model_card_text(self, base_model: str | None = None) -> str:
        args = self.args
        sources = ", ".join(args.source_names or []) or "(not recorded)"
        details = (
            f"alpha (EMA weight on the new gradient) = {args.alpha}, normalize = {args.normalize}"
            if args.method == "more"
            else "fixed weights"
        )
        over = (
            "longer pairs were cut from the left"
            if args.truncation == "left"
            else "longer pairs were dropped from training (TRL's rule)"
        )
        return (
            "---\nlibrary_name: transformers\ntags: [reward-model, trl, more]\n---\n"
            f"# Reward model ({args.method})\n\n"
            f"A scalar-head `AutoModelForSequenceClassification` reward model trained with the `{args.method}` "
            f"method of the MORE pipeline (Zeng et al., *On Diversified Preferences of Large Language Model "
            f"Alignment*), on TRL.\n\n"
            f"- Method: **{args.method}** ({details})\n"
            f"- Sources: {sources}\n"
            f"- Base model: {base_model or 'in-process random init'}\n"
            f"- Max length: {self._max_length} tokens; {over}\n"
            f"- Learning rate {args.learning_rate}, epochs {args.num_train_epochs}, max_steps {args.max_steps}, "
            f"per-device batch {args.per_device_train_batch_size} pairs\n\n"
            + scoring_snippet(self.processing_class, self._max_length)
        )

    def save_with_card(self, output_dir: str | Path, base_model: str | None = None) -> None:
        """save_model + tokenizer + our model card (the main process writes the card)."""
        self.save_model(str(output_dir))
        if self.accelerator.is_main_process:
            atomic_write_text(Path(output_dir) / "README.md", self.model_card_text(base_model))
