"""Data parallelism through accelerate (one full model per process), or a single process without it.

``accelerate launch -m dkvcache.eval …`` starts N processes; each gets a shard of the batches. On CPU:
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m dkvcache.eval …``
(``--cpu --num_processes 2`` silently runs one process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: Any = "cpu"
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]


def init(device: str | None = None) -> Dist:
    """This process's rank, world size and device (``device`` overrides accelerate's choice)."""
    try:
        from accelerate import PartialState
    except ImportError:
        return Dist(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    use_cpu = device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or (
        int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    state = PartialState(cpu=use_cpu)  # PartialState() alone ignores ACCELERATE_USE_CPU (Accelerator reads it)
    return Dist(rank=state.process_index, world=state.num_processes, device=torch.device(device or state.device),
                state=state)
