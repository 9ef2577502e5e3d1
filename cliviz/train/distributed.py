"""Training past one process, on PyTorch's own stack: `torchrun` sets the environment, this module
joins the process group and wraps the model.

- `ddp` (DistributedDataParallel): every process holds the whole model and a slice of each global
  batch; gradients are averaged. Enough whenever the model and the (small) CLI optimiser state fit
  one GPU — LLaVA-7B in bf16 with CLI-only training does (`benchmarks/bench_train.py`).
- `fsdp` (FSDP2, `torch.distributed.fsdp.fully_shard`): parameters, gradients and optimiser state
  sharded across processes, for models whose full state does not fit one GPU (full fine-tuning,
  or 13B+ bases). Chosen over DeepSpeed ZeRO through `accelerate`: it is PyTorch's own, needs no
  extra dependency or config file, works under the same `torchrun` command, and its per-parameter
  sharding takes a frozen base beside trainable CLI modules as they are. Each decoder layer,
  vision layer and CLI module is its own shard unit, so the frozen base (bf16) and the trained
  CLI modules (fp32) never share a flat buffer.

Gradients must equal one process with the whole global batch: the loss of each process is its
sum over answer tokens divided by the global token count times the world size (`token_scale`),
so DDP's gradient average is exactly the mean over every answer token of the global batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from cliviz.launch import Dist

if TYPE_CHECKING:
    from cliviz.model.modeling import CLIForConditionalGeneration
    from cliviz.train.loop import Trainee


def init_distributed(device: torch.device) -> Dist:
    """Join the process group `torchrun` describes (gloo on CPU, nccl on GPU); a plain run is rank 0 of 1."""
    launch = Dist.from_env()
    if not launch.enabled:
        return launch
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), launch.local_rank)


def device_for(device: torch.device, where: Dist) -> torch.device:
    """Each process takes its own GPU (`LOCAL_RANK`); on CPU they share the host."""
    if device.type == "cuda" and where.enabled:
        torch.cuda.set_device(where.local_rank)
        return torch.device("cuda", where.local_rank)
    return device


def wrap(model: Trainee, where: Dist, mode: str, find_unused: bool = False) -> nn.Module:
    """The model as the optimiser and the loop will see it: itself, DDP-wrapped, or FSDP-sharded.

    `find_unused`: some trained parameters get no gradient (a trained vision tower: CLIP's
    `post_layernorm` and the layers above the ones LLaVA and AMP read never reach the loss); DDP must
    then look for them each step, or it waits for their gradients forever (an error at step 2)."""
    if not where.enabled:
        return model
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(next(model.parameters()).device.type, (where.world_size,))
        for unit in shard_units(model.model):  # the Trainee's CLI model
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    device_ids = [where.local_rank] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def shard_units(model: CLIForConditionalGeneration) -> list[nn.Module]:
    """Decoder layers, vision encoder layers and CLI modules: one FSDP unit each (uniform dtype)."""
    units = list(model.decoder_layers)
    tower = model.base.model.vision_tower
    encoder = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
    if encoder is not None:
        units += list(encoder.layers)
    units += [m for m in (model.amp, model.read_kv) if m is not None] + list(model.agf)
    return units


def token_scale(label_tokens: int, where: Dist, device: torch.device) -> tuple[float, int]:
    """(divisor for this process's summed loss, global label-token count) — see the module docstring."""
    total = torch.tensor([float(label_tokens)], device=device, dtype=torch.float64)
    if where.enabled:
        dist.all_reduce(total)
    count = int(total.item())
    return max(count, 1) / where.world_size, count


def all_sum(values: list[float], where: Dist, device: torch.device) -> list[float]:
    """Sums over processes (a collective: every process calls it with the same length)."""
    if not where.enabled:
        return values
    t = torch.tensor(values, device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier(where: Dist) -> None:
    if where.enabled:
        dist.barrier()


def shutdown(where: Dist) -> None:
    if where.enabled and dist.is_initialized():
        dist.destroy_process_group()
