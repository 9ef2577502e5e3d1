"""Turn images and questions into model inputs, the same way for training, tracing and the app.

Two pipelines, chosen by what the model folder holds (see `cliviz.model.loading.load_model`):

- the bundled tiny models (word-level tokenizer, no chat template, no preprocessor config):
  `<bos> <image>*N question-words`, pixels scaled to [-1, 1] — exactly what they were trained on;
- a real LLaVA checkpoint (subword tokenizer with a chat template, `preprocessor_config.json`):
  the prompt is the tokenizer's chat template (user turn = image + question, generation prompt
  appended), the single image token expanded to `n_image_tokens` placeholders as `LlavaProcessor`
  does, and the pixels come from the checkpoint's own image processor (resize, crop, CLIP mean/std).

Either way a prompt ends right before the answer and holds exactly `n_image_tokens` image ids.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from cliviz.errors import CLIVizError
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


def chat_text(tokenizer, question: str, image_token: str) -> str:
    """The chat template rendered for one user turn (image, then question) plus the generation prompt.

    Multimodal templates (LLaVA-1.5's among them) take structured content, `[{"type": "image"},
    {"type": "text", ...}]`, as `LlavaProcessor.apply_chat_template` passes it; plain-text templates
    get the image token written before the question instead. The structured form is used when it
    renders the image token exactly once and the question verbatim.
    """
    structured = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    try:
        text = tokenizer.apply_chat_template(structured, add_generation_prompt=True, tokenize=False)
        if isinstance(text, str) and text.count(image_token) == 1 and question in text:
            return text
    except Exception:  # a plain-text template may fail on list content (jinja raises many types)
        pass
    plain = [{"role": "user", "content": f"{image_token}\n{question}"}]
    try:
        return tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIVizError(f"the tokenizer's chat template cannot render a question: {first}") from None


def chat_prompt_ids(tokenizer, question: str, config: CLIConfig) -> list[int]:
    """Chat-template prompt with the image token expanded to `n_image_tokens` placeholders.

    Special tokens are added by the tokenizer (e.g. Llama's `<s>`) unless the template already
    starts with bos: the rule `ProcessorMixin.apply_chat_template` follows.
    """
    image_id = int(config.base_config.image_token_id)
    text = chat_text(tokenizer, question, tokenizer.convert_ids_to_tokens(image_id))
    add_special = not (tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token))
    ids = list(tokenizer(text, add_special_tokens=add_special).input_ids)
    if ids.count(image_id) != 1:
        raise CLIVizError(f"the chat prompt holds {ids.count(image_id)} image tokens, expected 1 (check the question)")
    at = ids.index(image_id)
    return ids[:at] + [image_id] * n_image_tokens(config) + ids[at + 1 :]


def prompt_ids(tokenizer, question: str, config: CLIConfig) -> list[int]:
    """Prompt ids for one question; the answer follows directly.

    A tokenizer with a chat template gets `chat_prompt_ids`; the bundled word-level one gets
    `<bos> <image>*N question-words`.
    """
    if getattr(tokenizer, "chat_template", None):
        return chat_prompt_ids(tokenizer, question, config)
    ids = tokenizer(question, add_special_tokens=False).input_ids
    return [tokenizer.bos_token_id] + [config.base_config.image_token_id] * n_image_tokens(config) + ids


def pad_id(tokenizer) -> int:
    """Padding id: the tokenizer's pad, else eos (many LLaMA tokenizers have no pad), else 0."""
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def batch_prompts(tokenizer, questions: list[str], config: CLIConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask` `[B, T]` for batched generation."""
    rows = [prompt_ids(tokenizer, q, config) for q in questions]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask
