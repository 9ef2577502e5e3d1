"""Turn images and questions into model inputs, the same way for training, tracing and the app.

Two pipelines, chosen by what the model folder holds (see `cliviz.model.loading.load_model`):

- the bundled tiny models (word-level tokenizer, no chat template, no preprocessor config):
  `<bos> <image>*N question-words`, pixels scaled to [-1, 1] — exactly what they were trained on;
- a real LLaVA checkpoint (subword tokenizer with a chat template, `preprocessor_config.json`):
  the prompt is the tokenizer's chat template (user turn = image + question, generation prompt
  appended), the single image token expanded to `n_image_tokens` placeholders as `LlavaProcessor`
  does, and the pixels come from the checkpoint's own image processor (resize, crop, CLIP mean/std).

Either way a prompt ends right before the answer and holds exactly as many image ids as the
image has features: `n_image_tokens(config)` for LLaVA, and for LLaVA-OneVision a count that
depends on the image's size (anyres crops, unpadding, newline tokens), given by `image_inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from PIL import Image

from cliviz.errors import CLIVizError
from cliviz.model.configuration import CLIConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def image_size(config: CLIConfig) -> int:
    return int(config.base_config.vision_config.image_size)


def is_onevision(config: CLIConfig) -> bool:
    return config.base_model_type == "llava_onevision"


def n_image_tokens(config: CLIConfig) -> int:
    """Image placeholder tokens per image: one per patch (the CLS token is dropped by "default").

    Fixed for LLaVA; for LLaVA-OneVision this is the base crop only — the count of a real image
    comes from `image_inputs` (`onevision_token_count`).
    """
    vc = config.base_config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if config.base_config.vision_feature_select_strategy == "full":
        n += 1
    return n


def image_processor(config: CLIConfig):
    """The checkpoint's transformers image processor, or None (bundled models).

    `load_model` sets it as a runtime-only attribute of the config (never saved to config.json),
    because the config is what every caller of `pixel_values` already passes.
    """
    return getattr(config, "image_processor", None)


def pixel_values(images: list[Image.Image], config: CLIConfig) -> torch.Tensor:
    """RGB images -> `[B, 3, S, S]` for the vision tower of size S.

    With an image processor: its own resize / center-crop / mean-std normalisation. Without one
    (bundled models): a bicubic resize to S x S and a scale to [-1, 1].
    """
    processor = image_processor(config)
    if processor is not None:
        rgb = [image.convert("RGB") for image in images]
        return processor(rgb, return_tensors="pt")["pixel_values"].float()  # [B, 3, S, S]
    size = image_size(config)
    arrays = []
    for image in images:
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, 3, S, S]
    return batch / 127.5 - 1.0


@dataclass
class ImageInputs:
    """What the model needs of a batch of images, and how many placeholder tokens each one takes."""

    pixel_values: torch.Tensor  # [B, 3, S, S]; OneVision: [B, max_crops, 3, S, S], unused crops zero
    image_sizes: torch.Tensor | None  # [B, 2] (height, width) of each original image, OneVision only
    token_counts: list[int]

    def to_model(self, device, dtype) -> dict[str, torch.Tensor]:
        """The `forward`/`generate` keyword arguments on a device (pixels in the model's dtype)."""
        out = {"pixel_values": self.pixel_values.to(device, dtype)}
        if self.image_sizes is not None:
            out["image_sizes"] = self.image_sizes.to(device)
        return out

    def select(self, rows) -> ImageInputs:
        """The inputs of some rows, in that order (rows may repeat)."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        sizes = None if self.image_sizes is None else self.image_sizes[index]
        return ImageInputs(self.pixel_values[index], sizes, [self.token_counts[int(i)] for i in index])


def image_inputs(images: list[Image.Image], config: CLIConfig) -> ImageInputs:
    """Pixels (and OneVision's `image_sizes`) plus each image's placeholder count.

    LLaVA / bundled models: `pixel_values` and the fixed `n_image_tokens`. LLaVA-OneVision: the
    checkpoint's own anyres image processor (crops padded to the batch's largest count, as the
    processor pads them) and `onevision_token_count` per image.
    """
    if not is_onevision(config):
        pixels = pixel_values(images, config)
        return ImageInputs(pixels, None, [n_image_tokens(config)] * len(images))
    processor = image_processor(config)
    if processor is None:
        raise CLIVizError("a LLaVA-OneVision model needs its image processor (preprocessor_config.json)")
    out = processor([image.convert("RGB") for image in images], return_tensors="pt")
    sizes = torch.as_tensor(out["image_sizes"]).long()  # [B, 2]
    counts = [onevision_token_count(config, (int(h), int(w))) for h, w in sizes.tolist()]
    return ImageInputs(out["pixel_values"].float(), sizes, counts)


def onevision_token_count(config: CLIConfig, size: tuple[int, int]) -> int:
    """Features LLaVA-OneVision makes of one image of `size` (height, width): the base crop, the
    unpadded anyres grid (downscaled past `vision_aspect_ratio`) and one newline per row.

    Counted by transformers' own `pack_image_features` on a one-channel dummy of the right crop
    count, so it equals, by construction, the number of features the model puts into the prompt
    (and the number `LlavaOnevisionProcessor` expands `<image>` to; tests hold all three equal).
    """
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        LlavaOnevisionModel,
        image_size_to_num_patches,
    )

    base = config.base_config
    vc = base.vision_config
    crops = image_size_to_num_patches(list(size), base.image_grid_pinpoints, vc.image_size)
    side = vc.image_size // vc.patch_size
    dummy = torch.zeros(crops, side * side, 1)  # [crops, patches, 1]
    holder: Any = SimpleNamespace(config=base)  # pack_image_features reads nothing but the config
    _, lengths = LlavaOnevisionModel.pack_image_features(
        holder,
        [dummy],
        torch.tensor([list(size)]),
        image_newline=torch.zeros(1),
        vision_aspect_ratio=base.vision_aspect_ratio,
    )
    return int(lengths[0])


def chat_text(tokenizer: PreTrainedTokenizerBase, question: str, image_token: str) -> str:
    """The chat template rendered for one user turn (image, then question) plus the generation prompt.

    Multimodal templates (LLaVA-1.5's among them) take structured content, `[{"type": "image"},
    {"type": "text", ...}]`, as `LlavaProcessor.apply_chat_template` passes it; plain-text templates
    get the image token written before the question instead. The structured form is used when it
    renders the image token exactly once and the question verbatim.
    """
    structured: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    try:
        text = tokenizer.apply_chat_template(structured, add_generation_prompt=True, tokenize=False)
        if isinstance(text, str) and text.count(image_token) == 1 and question in text:
            return text
    except Exception:  # noqa: BLE001 - a plain-text template may fail on list content (jinja)
        pass
    plain = [{"role": "user", "content": f"{image_token}\n{question}"}]
    try:
        # tokenize=False renders the template to one string (transformers types every return form)
        return cast(str, tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False))
    except Exception as err:  # noqa: BLE001 - jinja raises many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIVizError(f"the tokenizer's chat template cannot render a question: {first}") from None


def chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, question: str, config: CLIConfig, n_image: int | None = None
) -> list[int]:
    """Chat-template prompt with the image token expanded to `n_image` placeholders.

    Special tokens are added by the tokenizer (e.g. Llama's `<s>`) unless the template already
    starts with bos: the rule `ProcessorMixin.apply_chat_template` follows.
    """
    image_id = int(config.base_config.image_token_id)
    image_token = cast(str, tokenizer.convert_ids_to_tokens(image_id))  # one id in, one token out
    text = chat_text(tokenizer, question, image_token)
    add_special = not (tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token))
    ids = list(tokenizer(text, add_special_tokens=add_special).input_ids)
    if ids.count(image_id) != 1:
        raise CLIVizError(f"the chat prompt holds {ids.count(image_id)} image tokens, expected 1 (check the question)")
    at = ids.index(image_id)
    return ids[:at] + [image_id] * _image_count(config, n_image) + ids[at + 1 :]


def _image_count(config: CLIConfig, n_image: int | None) -> int:
    if n_image is not None:
        return int(n_image)
    if is_onevision(config):
        raise ValueError("a LLaVA-OneVision prompt needs the image's token count (see image_inputs)")
    return n_image_tokens(config)


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, question: str, config: CLIConfig, n_image: int | None = None
) -> list[int]:
    """Prompt ids for one question; the answer follows directly. `n_image`: placeholders for the
    image (default `n_image_tokens`, fixed for LLaVA; OneVision's come from `image_inputs`).

    A tokenizer with a chat template gets `chat_prompt_ids`; the bundled word-level one gets
    `<bos> <image>*N question-words`.
    """
    if getattr(tokenizer, "chat_template", None):
        return chat_prompt_ids(tokenizer, question, config, n_image)
    ids = tokenizer(question, add_special_tokens=False).input_ids
    return [tokenizer.bos_token_id] + [config.base_config.image_token_id] * _image_count(config, n_image) + ids


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Padding id: the tokenizer's pad, else eos (many LLaMA tokenizers have no pad), else 0."""
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def batch_prompts(
    tokenizer: PreTrainedTokenizerBase, questions: list[str], config: CLIConfig, n_images: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask` `[B, T]` for batched generation."""
    counts = n_images if n_images is not None else [None] * len(questions)
    rows = [prompt_ids(tokenizer, q, config, n) for q, n in zip(questions, counts)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask
