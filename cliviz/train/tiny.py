"""The tiny from-scratch job: the bundled architecture and the ShapesVQA auxiliary objective.

What makes a ~1 M-parameter VLM learn on two CPU cores (see the model card for numbers):
- init scale 0.1 instead of transformers' 0.02 (0.02 stays at chance);
- every question about an image in one sequence (loss on answers only): about 8 answers per image
  (`cliviz.data.sources.ShapesSceneSource` with extra relation/position questions);
- an auxiliary per-patch loss on one vision layer (colour, shape, digit under each patch, the
  patch's row and column, and the centre of the object under it), so the vision features are
  useful before the language model has learned to route. It plays the part of the vision tower's
  pretraining objective, which in CLIP also sits on the last layer while LLaVA reads the
  penultimate one (`vision_feature_layer=-2`). It applies only while the tower is trained.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from cliviz.data.scenes import CENTER_BIN, COLORS, IMAGE_SIZE, SHAPES
from cliviz.model.configuration import CLIConfig

PATCH = 8
VISION_LAYERS = 6  # encoder layers of the tiny CLIP tower: hidden_states 0 (patch embedding) .. 6


def scene_seed(seed: int) -> int:
    """The generated-scene stream of a run seed (the tiny models have always drawn their scenes so)."""
    return seed * 1_000_003 + 17


def tiny_config(fusion: str, vocab_size: int, image_token_id: int, pad_token_id: int) -> CLIConfig:
    """The bundled tiny architecture: CLIP 64 px / patch 8 (6 layers) + Llama 128-d (4 layers)."""
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        initializer_range=0.1,
    )
    text = LlamaConfig(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
    )
    base = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return CLIConfig(
        base_config=base,
        fusion=fusion,
        lora_rank=8,
        gate_temperature=1.0,
        read_position_code=fusion in ("cli", "shallow"),
    )


class AuxHeads(nn.Module):
    """Per-patch classifiers on the final vision layer; training-only, never saved with the model."""

    def __init__(self, hidden: int, position: bool = True) -> None:
        super().__init__()
        self.position = position
        self.color = nn.Linear(hidden, len(COLORS) + 1)
        self.shape = nn.Linear(hidden, len(SHAPES) + 1)
        self.digit = nn.Linear(hidden, 11)
        self.row = nn.Linear(hidden, IMAGE_SIZE // PATCH)  # keeps where a patch is in its features
        self.col = nn.Linear(hidden, IMAGE_SIZE // PATCH)
        self.center_x = nn.Linear(hidden, IMAGE_SIZE // CENTER_BIN + 1)  # where its object is
        self.center_y = nn.Linear(hidden, IMAGE_SIZE // CENTER_BIN + 1)


def aux_loss(heads: AuxHeads, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-patch classification losses on one vision layer's patch states `hidden` `[B, N, Dv]`."""
    loss = _patch_loss(heads.color(hidden), batch["aux_color"])  # logits [B, N, C]
    for name in ("shape", "digit"):
        loss = loss + _patch_loss(getattr(heads, name)(hidden), batch[f"aux_{name}"])
    if not heads.position:
        return loss
    grid = IMAGE_SIZE // PATCH
    index = torch.arange(grid * grid, device=hidden.device)  # raster order of the patches
    for name, target in (("row", index // grid), ("col", index % grid)):
        logits = getattr(heads, name)(hidden)  # [B, N, grid]
        loss = loss + F.cross_entropy(logits.reshape(-1, grid), target.repeat(hidden.shape[0]))
    for name in ("center_x", "center_y"):
        loss = loss + _patch_loss(getattr(heads, name)(hidden), batch[f"aux_{name}"])  # logits [B, N, bins + 1]
    return loss


def _patch_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of per-patch `logits [B, N, C]` against their classes `target [B, N]`."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


class TowerHeads(nn.Module):
    """Stage 1 of the staged recipe: image-level heads on the mean-pooled last vision layer (which
    shape each colour has, the object count), as a CLIP-like tower learns whole-picture semantics."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.shape_of_color = nn.Linear(hidden, len(COLORS) * (len(SHAPES) + 1))
        self.count = nn.Linear(hidden, 5)  # 0..4 objects


def tower_loss(
    heads: TowerHeads, states: tuple[torch.Tensor, ...], batch: dict, smooth_from: int, smooth_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-level cross-entropies on the last layer's mean patch token, plus `smooth_weight` times
    the spread of patch tokens around their mean in every layer from `smooth_from` on.

    The spread term is the tiny tower's stand-in for what contrastive pretraining does to a real
    CLIP's last layers: their patch tokens collapse toward a global summary and lose local detail
    (where things are, small print) — the bottleneck that CLI's access to shallow layers removes.
    It is measured relative to the tokens' own size, so the tower cannot shrink it by scaling.
    Returns the loss and the accuracy of the shape named for each colour present (what stage 1
    must learn before the tower is frozen).
    """
    pooled = states[-1][:, 1:].mean(1)  # [B, Dv], CLS dropped
    n_colors, n_classes = len(COLORS), len(SHAPES) + 1
    logits = heads.shape_of_color(pooled).view(-1, n_colors, n_classes)  # [B, colours, classes]
    target = batch["aux_scene_shape_of_color"]  # [B, colours]
    loss = F.cross_entropy(logits.reshape(-1, n_classes), target.reshape(-1))
    present = target > 0
    accuracy = (logits.argmax(-1)[present] == target[present]).float().mean()
    loss = loss + F.cross_entropy(heads.count(pooled), batch["aux_scene_count"].reshape(-1))
    for layer in range(smooth_from, len(states)):
        tokens = states[layer][:, 1:]  # [B, N, Dv]
        spread = (tokens - tokens.mean(1, keepdim=True)).pow(2).sum(-1).mean()
        loss = loss + smooth_weight * spread / tokens.pow(2).sum(-1).mean().clamp_min(1e-6)
    return loss, accuracy


def sincos_position_code(grid: int, dim: int) -> torch.Tensor:
    """2-D sin-cos position code of a `grid x grid` patch raster, `[grid*grid, dim]`, rows of norm 1
    (half the channels encode the row, half the column, at `dim/4` frequencies each: MAE's code)."""
    quarter = dim // 4
    freqs = 1.0 / (10_000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))  # [dim/4]
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )

    def encode(x: torch.Tensor) -> torch.Tensor:
        angles = x.reshape(-1, 1) * freqs  # [grid*grid, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [grid*grid, dim/2]

    code = torch.cat([encode(rows), encode(cols)], dim=1)  # [grid*grid, dim]
    if code.shape[1] < dim:
        code = torch.nn.functional.pad(code, (0, dim - code.shape[1]))
    return code / code.norm(dim=1, keepdim=True)
