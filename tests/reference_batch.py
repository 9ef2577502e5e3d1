"""The tiny models' training layout, written out plainly: `<bos> <image>*N (question answer <eos>)*`.

This is the function the bundled models were trained with before the trainer moved onto the
conversation data pipeline (`cliviz.data.collate`); the tests hold the collator to it bit for bit,
and use it where they need a quick batch of ShapesVQA scenes.
"""

from __future__ import annotations

import numpy as np
import torch

from cliviz.data.dataset import scene_with_questions
from cliviz.data.questions import training_questions
from cliviz.data.scenes import patch_labels
from cliviz.model.configuration import CLIConfig
from cliviz.model.processing import n_image_tokens, pixel_values

PATCH = 8


def make_batch(
    tokenizer, config: CLIConfig, seed: int, indices: list[int], extra: dict[str, int] | None = None
) -> dict[str, torch.Tensor]:
    """One multi-turn sequence per scene: `<bos> <image>*N (question answer <eos>)*`."""
    n_img = n_image_tokens(config)
    image_id = config.base_config.image_token_id
    rows, targets, images, aux = [], [], [], {}
    for index in indices:
        scene, qas = scene_with_questions(seed, index)
        if extra:
            qas = training_questions(scene, qas, extra, np.random.default_rng([seed, index, 1]))
        ids = [tokenizer.bos_token_id] + [image_id] * n_img
        tgt = [-100] * len(ids)
        for qa in qas:
            q = tokenizer(qa.question, add_special_tokens=False).input_ids
            a = tokenizer.convert_tokens_to_ids(qa.answer)
            ids += q + [a, tokenizer.eos_token_id]
            tgt += [-100] * len(q) + [a, tokenizer.eos_token_id]  # label at its own position; shifted in the loss
        rows.append(ids)
        targets.append(tgt)
        images.append(scene.image)
        for name, grid in patch_labels(scene, PATCH).items():
            aux.setdefault(name, []).append(torch.from_numpy(grid.reshape(-1)))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, tgt) in enumerate(zip(rows, targets)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(tgt)] = torch.tensor(tgt)
        mask[i, : len(row)] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": pixel_values(images, config),
    }
    batch.update({f"aux_{k}": torch.stack(v) for k, v in aux.items()})
    return batch
