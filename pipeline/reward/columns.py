"""The per-pair columns `MORERewardTrainer` reads besides the tokens, checked before they reach the loss.

- `margin` (TRL's optional column, subtracted from the reward difference): a finite number. A margin of +inf
  gives a loss of 0 at every step (nothing is learnt), NaN makes the weights NaN; the data layer refuses both
  when it loads, and the trainer must too for data it is given directly.
- `source_id`: an integer index into `source_names` (0 .. K-1). An out-of-range id gave a raw IndexError deep
  in the loss, a float id was silently truncated by int().

`check_pair_columns` checks an in-memory Dataset at once (naming the column and the first bad row, before any
tokenization); `source_id_tensor` / `margin_tensor` check every batch a collator builds (streaming datasets,
whose rows are only seen when read). Each problem is one ValueError.

May import: pipeline leaves.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


MARGIN_WHY = (
    "a margin is subtracted from the reward difference: +inf gives a loss of 0 at every step, NaN makes the "
    "weights NaN. Fix: drop or repair those rows"
)


def _ids_meaning(num_sources: int) -> str:
    if num_sources:
        return f"an integer 0..{num_sources - 1}, the index of one of the {num_sources} source_names"
    return "an integer"


def _bad_source_id(value: Any, num_sources: int) -> bool:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return True
    if isinstance(value, (float, np.floating)) and not (math.isfinite(value) and float(value).is_integer()):
        return True
    return bool(num_sources) and not 0 <= value < num_sources


def _column(dataset, column: str) -> np.ndarray:
    return np.asarray(dataset.with_format("numpy", columns=[column])[column])


def check_pair_columns(dataset, name: str, num_sources: int) -> None:
    """One ValueError naming `name` (train_dataset, eval_dataset[...]), the column and the first bad row, for an
    in-memory Dataset with a non-finite `margin` or a `source_id` that is not an index of the sources
    (`num_sources` of them; 0: any integer). Other datasets (streaming) are checked batch by batch."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset) or len(dataset) == 0:
        return
    cols = dataset.column_names
    if "margin" in cols:
        values = _column(dataset, "margin")
        try:
            bad = np.flatnonzero(~np.isfinite(values.astype(np.float64)))
        except (TypeError, ValueError):  # strings, lists: not numbers at all
            bad = np.asarray([i for i, v in enumerate(values) if not _finite_number(v)])
        if bad.size:
            raise ValueError(
                f"{name}: column 'margin', row {int(bad[0])}: {values[bad[0]]!r} is not a finite number"
                f"{_more(bad)}; {MARGIN_WHY}"
            )
    if "source_id" in cols:
        values = _column(dataset, "source_id")
        bad = [i for i, v in enumerate(values.tolist()) if _bad_source_id(v, num_sources)]
        if bad:
            raise ValueError(
                f"{name}: column 'source_id', row {bad[0]}: {values[bad[0]]!r} is not {_ids_meaning(num_sources)}"
                f"{_more(bad)}. Fix: give every pair its source's index (an integer column)"
            )


def _finite_number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)


def _more(bad) -> str:
    return f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""


def source_id_tensor(examples: list[dict[str, Any]], num_sources: int) -> torch.Tensor:
    """The batch's `source_id`s as a long tensor; one ValueError for an id that is not an index of the sources."""
    ids = [e["source_id"] for e in examples]
    for v in ids:
        if _bad_source_id(v, num_sources):
            raise ValueError(
                f"a training batch: column 'source_id' holds {v!r}, which is not {_ids_meaning(num_sources)}. Fix: "
                "give every pair its source's index (an integer column)"
            )
    return torch.tensor([int(v) for v in ids], dtype=torch.long)


def margin_tensor(examples: list[dict[str, Any]]) -> torch.Tensor:
    """The batch's `margin`s as a float tensor; one ValueError for a value that is not a finite number."""
    for v in (e["margin"] for e in examples):
        if not _finite_number(v):
            raise ValueError(f"a training batch: column 'margin' holds {v!r}, not a finite number; {MARGIN_WHY}")
    return torch.tensor([e["margin"] for e in examples], dtype=torch.float)
