"""MORERewardTrainer refuses per-pair columns that would train a wrong RM silently (issue 29, item 4): a
non-finite `margin` (+inf gave a loss of 0.0 at every step, NaN made the weights NaN, and training "finished"),
a `source_id` out of range (a raw IndexError in the loss) or a float one (truncated by int()). One ValueError
naming the dataset, the column and the first bad row, before any tokenization; streaming data batch by batch."""

from __future__ import annotations

import math

import pytest

from pipeline.reward.trainer import MORERewardTrainer
from tests import reward_helpers as H


@pytest.fixture(scope="module")
def tok():
    return H.tokenizer()


def _with(column: str, values: dict, n_blocks: int = 2):
    ds = H.balanced_pairs(n_blocks)
    col = list(ds[column]) if column in ds.column_names else [0.0] * len(ds)
    for i, v in values.items():
        col[i] = v
    ds = ds.remove_columns([column]) if column in ds.column_names else ds
    return ds.add_column(column, col)


@pytest.mark.parametrize("method", ["more", "multitask"])
@pytest.mark.parametrize("bad", [math.inf, math.nan, -math.inf])
def test_a_non_finite_margin_is_refused_naming_the_column_and_row(tok, tmp_path, method, bad):
    cfg = H.config(tmp_path, method, balanced_batches=False)
    with pytest.raises(
        ValueError, match=r"train_dataset: column 'margin', row 3: .* is not a finite number \(and 1 more"
    ):
        MORERewardTrainer(
            H.model("gpt_neox", tok), cfg, train_dataset=_with("margin", {3: bad, 7: bad}), processing_class=tok
        )
    cfg = H.config(tmp_path, method, balanced_batches=False, source_names=None) if method == "multitask" else cfg
    with pytest.raises(ValueError, match=r"eval_dataset\['a'\]: column 'margin', row 0"):
        MORERewardTrainer(
            H.model("gpt_neox", tok),
            cfg,
            train_dataset=_with("margin", {}),
            eval_dataset={"a": _with("margin", {0: bad})},
            processing_class=tok,
        )


@pytest.mark.parametrize("bad", [3, -1, 1.5, math.nan])
def test_a_source_id_that_is_not_an_index_of_the_sources_is_refused(tok, tmp_path, bad):
    cfg = H.config(tmp_path, "more", balanced_batches=False)
    ds = H.balanced_pairs(2).remove_columns(["source_id"])
    ids = [i % 3 for i in range(len(ds))]
    ids = [float(i) for i in ids] if isinstance(bad, float) else ids
    ids[5] = bad
    with pytest.raises(
        ValueError,
        match=r"train_dataset: column 'source_id', row 5: .* is not an integer 0..2, the index of one of the 3 "
        r"source_names",
    ):
        MORERewardTrainer(
            H.model("gpt_neox", tok), cfg, train_dataset=ds.add_column("source_id", ids), processing_class=tok
        )


def test_integral_float_source_ids_train(tok, tmp_path):
    cfg = H.config(tmp_path, "more", balanced_batches=False, max_steps=1)
    ds = H.balanced_pairs(2)
    ds = ds.remove_columns(["source_id"]).add_column("source_id", [float(i) for i in ds["source_id"]])
    MORERewardTrainer(H.model("gpt_neox", tok), cfg, train_dataset=ds, processing_class=tok).train()


@pytest.mark.parametrize("packing", [True, False])
def test_streaming_data_is_checked_batch_by_batch(tok, tmp_path, packing):
    cfg = H.config(tmp_path, "more", balanced_batches=False, max_steps=2, packing=packing)
    stream = _with("margin", {1: math.inf}).to_iterable_dataset()
    t = MORERewardTrainer(H.model("gpt_neox", tok), cfg, train_dataset=stream, processing_class=tok)
    with pytest.raises(ValueError, match=r"a training batch: column 'margin' holds inf, not a finite number"):
        t.train()
    stream = _with("source_id", {2: 7}).to_iterable_dataset()
    t = MORERewardTrainer(H.model("gpt_neox", tok), cfg, train_dataset=stream, processing_class=tok)
    with pytest.raises(
        ValueError, match=r"a training batch: column 'source_id' holds 7, which is not an integer 0..2"
    ):
        t.train()
