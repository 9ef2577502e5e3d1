"""AGF — Adaptive Gating Fusion, one instance per injection layer.

For each token t with hidden state h_t at the input of LLM layer i:
1. `VisionRead`: a multi-head read distils every vision layer, `c_{t,k} = MHA(f(h_t), Vhat_k)`;
2. `Gate`: `g_{i,t} = softmax(W_g norm(h_t) / tau)` over the K vision layers — **the hook point**
   every analysis in cliviz reads or overrides (`agf.<j>.gate`, output `[batch, seq, K]`);
3. `Injection`: `tanh(alpha_i) W_o sum_k g_{t,k} c_{t,k}` is added to the residual stream
   (`agf.<j>.injection`, output `[batch, seq, D]`). `alpha_i = 0` at init: a freshly attached
   model equals its base.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Gate(nn.Module):
    """Softmax weights over the K vision layers for every token: `[B, T, D] -> [B, T, K]`.

    `to_logits` is its own module so that the pre-softmax logits are a hook point too.
    """

    def __init__(self, hidden: int, n_vision: int, temperature: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.to_logits = nn.Linear(hidden, n_vision)
        self.temperature = temperature

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.to_logits(self.norm(hidden))  # [B, T, K]
        return torch.softmax(logits.float() / self.temperature, dim=-1).to(hidden.dtype)


class StaticGate(nn.Module):
    """One-hot gate of the static one-to-one (`shallow`) or ungated (`deepstack`) wiring."""

    def __init__(self, n_vision: int, index: int) -> None:
        super().__init__()
        # Plain ints, not a buffer: from_pretrained builds modules on the meta device and would
        # leave an unsaved buffer uninitialised.
        self.n_vision = n_vision
        self.index = index

    @property
    def weights(self) -> torch.Tensor:
        return F.one_hot(torch.tensor(self.index), self.n_vision).float()  # [K]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.weights.to(hidden.device, hidden.dtype).expand(*hidden.shape[:-1], -1)  # [B, T, K]


class VisionRead(nn.Module):
    """Multi-head read of each vision layer separately; key/value maps shared across layers."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} not divisible by {heads} read heads")
        self.heads = heads
        self.norm = nn.LayerNorm(hidden)
        self.query = nn.Linear(hidden, hidden, bias=False)
        self.key = nn.Linear(hidden, hidden, bias=False)
        self.value = nn.Linear(hidden, hidden, bias=False)

    def forward(self, hidden: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, t, d = hidden.shape
        _, k, n, _ = memory.shape
        h, hd = self.heads, d // self.heads
        q = self.query(self.norm(hidden)).view(b, t, h, hd).transpose(1, 2)  # [B, H, T, hd]
        # Heads and vision layers folded into one axis: SDPA's fused kernels take 4-D inputs only
        # (a 5-D call falls back to the unfused math path, ~3x slower in training here).
        q = q.unsqueeze(2).expand(b, h, k, t, hd).reshape(b, h * k, t, hd)  # [B, H*K, T, hd]
        keys = self.key(memory).view(b, k, n, h, hd).permute(0, 3, 1, 2, 4).reshape(b, h * k, n, hd)  # [B, H*K, N, hd]
        values = self.value(memory).view(b, k, n, h, hd).permute(0, 3, 1, 2, 4).reshape(b, h * k, n, hd)  # [B, H*K, N, hd]
        read = F.scaled_dot_product_attention(q, keys, values).view(b, h, k, t, hd)  # [B, H, K, T, hd]
        return read.permute(0, 3, 2, 1, 4).reshape(b, t, k, d)  # [B, T, K, D]


class Injection(nn.Module):
    """What is added to the residual stream: `tanh(alpha) * W_o(mixed)`; alpha starts at 0."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.out_proj = nn.Linear(hidden, hidden, bias=False)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, mixed: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha).to(mixed.dtype) * self.out_proj(mixed)  # [B, T, D]


class AGFLayer(nn.Module):
    """Gate + read + injection for one LLM layer; returns the residual update `[B, T, D]`."""

    def __init__(self, hidden: int, n_vision: int, heads: int, temperature: float, static_index: int | None) -> None:
        super().__init__()
        self.gate = Gate(hidden, n_vision, temperature) if static_index is None else StaticGate(n_vision, static_index)
        self.read = VisionRead(hidden, heads)
        self.injection = Injection(hidden)

    def forward(self, hidden: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        gates = self.gate(hidden)  # [B, T, K]
        reads = self.read(hidden, memory)  # [B, T, K, D]
        mixed = torch.einsum("btk,btkd->btd", gates, reads)  # [B, T, D]
        return self.injection(mixed)


class DeepStackLayer(nn.Module):
    """DeepStack baseline: final-layer visual features added at image-token positions, ungated.

    The gate is a constant `[B, T, 1]` of ones (kept so that tracing code is uniform).
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gate = StaticGate(1, 0)
        self.norm = nn.LayerNorm(hidden)
        self.injection = Injection(hidden)

    def forward(self, hidden: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        gates = self.gate(hidden)  # [B, T, 1]
        return self.injection(gates * self.norm(image_features))  # [B, T, D]
