"""Faster reward-model batches: pairs packed with one copy of their prompt, and length-grouped balanced batches.

* `PackedPairCollator` lays a batch of preference pairs out as few rows as possible: each pair is packed
  as prompt + chosen continuation + rejected continuation (the layout `pipeline.scoring` scores with, see
  `pipeline.layout.pack_pair_rows`), and pairs are placed first-fit-decreasing into rows of at most
  `max_tokens` tokens, so a batch carries almost no padding and every prompt is encoded once instead of
  twice. A 4D attention mask keeps pairs and the two continuations apart and position ids restart, so
  rewards, loss and gradients equal those of each sequence's own forward pass (tested to 1e-5 in fp32). The
  mask is boolean; the trainer hands it to the model through `pipeline.layout.packed_attention_mask` (the
  model's sliding window, an additive mask for eager attention).
  It works on token ids only: how texts were rendered and tokenized does not matter.
* `LengthGroupedBalancedSampler` orders a training set so that every batch holds exactly
  `per_source_batch` pairs of every source (what MORE needs), pairs of similar length share a batch
  (less padding, evenly filled packed rows), and the batch order is shuffled every epoch with the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.layout import pack_pair_rows, packed_length
from pipeline.reward.columns import margin_tensor, source_id_tensor


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bin packing of items into rows of at most `budget` tokens (an item longer than that gets its own row).

    Items are taken longest first and go to the first row with room. Returns rows of item indices; within a
    row, items keep the longest-first order. Deterministic.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


@dataclass
class PackedPairCollator:
    """Collates `chosen_ids` / `rejected_ids` pairs (plus optional `source_id`, `margin`) into packed rows.

    Output keys: `input_ids` [B, W], `position_ids` [B, W], `attention_mask` [B, 1, W, W] (bool, 4D),
    `readout` [2, P] (flat indices into the B*W positions of each pair's chosen and rejected pooling token,
    in example order), `num_pair_tokens` (tokens of the unpacked pairs, what TRL counts), and `source_id`,
    `margin` when the examples have them. `readout_pad_id` is the pad id of the MODEL's config (where it
    pools); `pad_token_id` fills the rows. `max_tokens`: tokens per row (None: the batch's longest pair).
    """

    pad_token_id: int
    readout_pad_id: int | None
    max_tokens: int | None = None
    num_sources: int = 0  # source_id must index one of them (0: any integer); see pipeline.reward.columns

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        pairs = [(list(e["chosen_ids"]), list(e["rejected_ids"])) for e in examples]
        lengths = [packed_length(c, r) for c, r in pairs]
        # Default budget: the batch's longest packed pair. Rows then are no wider than that pair needs anyway
        # (attention cost grows with the row width squared) and shorter pairs fill the rows' room.
        rows = first_fit_decreasing(lengths, self.max_tokens or max(lengths))
        ids, pos, mask, read_c, read_r = pack_pair_rows(
            [[pairs[i] for i in row] for row in rows], self.pad_token_id, self.readout_pad_id
        )
        where = [i for row in rows for i in row]  # the packed order of the examples
        readout = torch.empty(2, len(pairs), dtype=torch.long)
        readout[0, where] = torch.tensor(read_c)
        readout[1, where] = torch.tensor(read_r)
        batch = {
            "input_ids": ids,
            "position_ids": pos,
            "attention_mask": mask,
            "readout": readout,
            "num_pair_tokens": torch.tensor(sum(len(c) + len(r) for c, r in pairs)),
        }
        if "source_id" in examples[0]:
            batch["source_id"] = source_id_tensor(examples, self.num_sources)
        if "margin" in examples[0]:
            batch["margin"] = margin_tensor(examples)
        return batch


class LengthGroupedBalancedSampler(torch.utils.data.Sampler):
    """Indices in batches of `num_sources * per_source_batch` (or `per_source_batch` without sources), each
    holding exactly `per_source_batch` pairs of every source, pairs of similar length together, then ONE
    incomplete last batch with the pairs left over (the same number from every source, fewer than
    `per_source_batch`), so no pair of an equal-sized (balanced) set is left out and an epoch has as many
    batches as TRL's sampler gives (ceil(pairs / batch size) without sources).

    Per epoch (seed, epoch): each source's pairs are shuffled, the first `n_batches * per_source_batch` of
    them are cut into mega-chunks of `mega_batches * per_source_batch` pairs, sorted by length inside a chunk
    and cut into groups of `per_source_batch`; batch j of chunk m takes the j-th group of chunk m of every
    source (similar length quantiles), and the full batches are shuffled; the remaining pairs form the last
    batch. A source with more pairs than the smallest one contributes a random subset of the smallest one's
    size each epoch (a `mix(strategy='balanced')` set has equal sizes; nothing is dropped there); how many
    pairs that leaves out per epoch is `n_left_out`. Lengths are what a pair costs: packed tokens.
    Deterministic for a (seed, epoch).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        source_ids: Sequence[int] | None,
        per_source_batch: int,
        *,
        seed: int = 0,
        mega_batches: int = 50,
    ):
        if per_source_batch < 1:
            raise ValueError(f"per_source_batch must be >= 1, got {per_source_batch}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        sids = np.zeros(len(self.lengths), dtype=np.int64) if source_ids is None else np.asarray(source_ids)
        if len(sids) != len(self.lengths):
            raise ValueError("lengths and source_ids differ in length")
        if len(self.lengths) == 0:
            raise ValueError("no pairs to sample from")
        self.by_source = [np.flatnonzero(sids == k) for k in np.unique(sids)]
        self.psb = int(per_source_batch)
        self.per_source = min(len(ix) for ix in self.by_source)  # pairs of every source read per epoch
        self.n_batches = self.per_source // self.psb  # full batches
        self.n_left_out = len(self.lengths) - self.per_source * len(self.by_source)
        self.seed, self.mega, self.epoch = int(seed), int(mega_batches), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_source * len(self.by_source)

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        chunk = self.mega * self.psb
        n_full = self.n_batches * self.psb
        groups, rest = [], []  # groups[k][b]: the b-th length-sorted group of source k; rest[k]: its leftovers
        for ix in self.by_source:
            ix = rng.permutation(ix)[: self.per_source]
            ix, left = ix[:n_full], ix[n_full:]
            out = []
            for s in range(0, len(ix), chunk):
                part = ix[s : s + chunk]
                part = part[np.argsort(-self.lengths[part], kind="stable")]
                out += [part[j : j + self.psb] for j in range(0, len(part), self.psb)]
            groups.append(out)
            rest.append(left)
        batches = [np.concatenate([g[b] for g in groups]).tolist() for b in range(self.n_batches)]
        batches = [batches[i] for i in rng.permutation(self.n_batches)]
        if len(rest[0]):  # the incomplete last batch, as balanced as the remaining pairs allow
            batches.append(np.concatenate(rest).tolist())
        return batches

    def __iter__(self):
        for batch in self.batches():
            yield from batch
