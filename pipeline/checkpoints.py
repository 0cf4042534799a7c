"""Checkpoint files of the pipeline's training loops (the RMs' Trainer, the policy stage's warm start): the
completion marker written last, so an interrupted save is never resumed from, and MORE's gradient momentum
beside each RM Trainer checkpoint (a leaf: imports torch and safetensors only)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch


MORE_STATE = "more_state.safetensors"  # MORE's gradient momentum, inside each Trainer checkpoint
LEGACY_MORE_STATE = "more_state.pt"  # written by older versions (a pickle; read with weights_only=True)
CHECKPOINT_COMPLETE = "checkpoint_complete.json"  # written last: a checkpoint without it is incomplete


def save_more_state(checkpoint: str | Path, momentum: torch.Tensor) -> Path:
    """MORE's momentum as safetensors (no pickle), written to a temporary name then renamed."""
    from safetensors.torch import save_file

    path = Path(checkpoint) / MORE_STATE
    tmp = path.with_name(f".{MORE_STATE}.tmp")
    save_file({"momentum": momentum.detach().float().cpu().contiguous()}, str(tmp))
    os.replace(tmp, path)
    return path


def load_more_state(checkpoint: str | Path) -> torch.Tensor | None:
    """The momentum saved in a checkpoint, or None when it holds none."""
    ckpt = Path(checkpoint)
    if (ckpt / MORE_STATE).is_file():
        from safetensors.torch import load_file

        return load_file(str(ckpt / MORE_STATE))["momentum"]
    if (ckpt / LEGACY_MORE_STATE).is_file():
        return torch.load(ckpt / LEGACY_MORE_STATE, weights_only=True)["momentum"]
    return None


def checkpoint_problem(
    checkpoint: str | Path, method: str | None = None, required: tuple[str, ...] = ("trainer_state.json",)
) -> str | None:
    """Why a checkpoint directory cannot be resumed from, or None when it is complete (`required`: the files a
    complete one holds besides the marker; a Trainer's by default)."""
    ckpt = Path(checkpoint)
    if not (ckpt / CHECKPOINT_COMPLETE).is_file():
        return f"no {CHECKPOINT_COMPLETE} (its save was interrupted)"
    for name in required:
        if not (ckpt / name).is_file():
            return f"no {name}"
    if method == "more" and not ((ckpt / MORE_STATE).is_file() or (ckpt / LEGACY_MORE_STATE).is_file()):
        return f"no {MORE_STATE} (MORE's momentum)"
    return None


def list_checkpoints(folder: str | Path) -> list[Path]:
    """checkpoint-<step> directories of `folder`, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def last_complete_checkpoint(
    folder: str | Path, method: str | None = None, required: tuple[str, ...] = ("trainer_state.json",)
) -> str | None:
    """The newest checkpoint of `folder` that is complete (see `checkpoint_problem`), or None."""
    for ckpt in list_checkpoints(folder):
        if checkpoint_problem(ckpt, method, required) is None:
            return str(ckpt)
    return None
