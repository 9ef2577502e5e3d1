"""Turn images and questions into model inputs, the same way for training, tracing and the app."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from cliviz.model.configuration import CLIConfig


def image_size(config: CLIConfig) -> int:
    return int(config.base_config.vision_config.image_size)


def n_image_tokens(config: CLIConfig) -> int:
    """Image placeholder tokens per image: one per patch (the CLS token is dropped by "default")."""
    vc = config.base_config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if config.base_config.vision_feature_select_strategy == "full":
        n += 1
    return n


def pixel_values(images: list[Image.Image], config: CLIConfig) -> torch.Tensor:
    """RGB images -> `[B, 3, S, S]` in [-1, 1] (images are resized to the tower's size S)."""
    size = image_size(config)
    arrays = []
    for image in images:
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, 3, S, S]
    return batch / 127.5 - 1.0


def prompt_ids(tokenizer, question: str, config: CLIConfig) -> list[int]:
    """`<bos> <image>*N question-words` — the answer follows directly."""
    ids = tokenizer(question, add_special_tokens=False).input_ids
    return [tokenizer.bos_token_id] + [config.base_config.image_token_id] * n_image_tokens(config) + ids


def batch_prompts(tokenizer, questions: list[str], config: CLIConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask` `[B, T]` for batched generation."""
    rows = [prompt_ids(tokenizer, q, config) for q in questions]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask
