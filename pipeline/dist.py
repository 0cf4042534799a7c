"""Processes of one run (a leaf): the main process decides and writes, every rank runs the stages.

Under `accelerate launch` / `torchrun` the environment names the process (RANK, WORLD_SIZE); `Processes`
gives the rank, barriers and a broadcast from the main process (a no-op without torch.distributed), and
`shutdown_distributed` tears the process group down in an order that does not abort at exit. The sweep and
the orchestrator ask the same questions here.
"""

from __future__ import annotations

import os
import sys
import threading


def world_size() -> int:
    """Processes of this launch (WORLD_SIZE; 1 when not launched by accelerate/torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def threading_is_main() -> bool:
    """Signal handlers can only be installed from the main thread."""
    return threading.current_thread() is threading.main_thread()


class Processes:
    """Rank info and collectives; a no-op for a single process (no torch import)."""

    def __init__(self):
        self.state = None
        if world_size() > 1:
            import torch
            from accelerate import PartialState

            # Without cpu=True, accelerate treats a CPU-only torchrun as ONE process (DistributedType.NO).
            # PartialState is a shared singleton: the stages' own PartialState()/Trainer reuse this one.
            self.state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    @property
    def rank(self) -> int:
        return 0 if self.state is None else self.state.process_index

    @property
    def world(self) -> int:
        return 1 if self.state is None else self.state.num_processes

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def broadcast(self, obj):
        """Main process's `obj` on every rank."""
        if self.state is None:
            return obj
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def shutdown_distributed(clean: bool = True) -> None:
    """Tear down DeepSpeed engines and the process group before the interpreter exits.

    Left to interpreter shutdown, the order in which the gloo communicator threads and the engines'
    hooks are destroyed varies, and a rank can abort at exit ("terminate called without an active
    exception", SIGABRT) after all its work is done. `clean`: the ranks meet at a barrier first (only
    when none of them failed, or it would wait for a dead rank)."""
    if "torch" not in sys.modules:
        return
    import gc

    import torch.distributed as dist

    gc.collect()  # drop trainers/engines (and their communication hooks) that are no longer referenced
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer already gone: still release this rank's group
            pass
    dist.destroy_process_group()
