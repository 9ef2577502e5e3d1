"""Where this process sits in a `torchrun` launch, read from the environment without importing torch.

One `Dist` serves every command that can run on many processes: `cliviz sweep` checks the launch
before its first file is touched, `cliviz train` before the model loads, and
`cliviz.train.distributed.init_distributed` joins the process group it describes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cliviz.errors import CLIVizError


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        """`RANK`, `WORLD_SIZE` and `LOCAL_RANK` as torchrun sets them; a plain run is rank 0 of 1.
        A launch that contradicts itself is a CLIVizError, not a hang at the first collective."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1") or 1)
            rank = int(os.environ.get("RANK", "0") or 0)
            local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        except ValueError:
            raise CLIVizError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (launch with torchrun)") from None
        if world < 1 or not 0 <= rank < world or local_rank < 0:
            raise CLIVizError(f"inconsistent launch: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}")
        return cls(rank, world, local_rank)
