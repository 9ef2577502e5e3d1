"""Conversations -> padded model inputs with labels on the answers only, in the model's own prompt format.

Two layouts, chosen by the tokenizer as `cliviz.model.processing` chooses them for inference:

- a checkpoint whose tokenizer has a chat template: the whole conversation rendered by that
  template (structured or plain content, whichever `processing.chat_text` picks, so that a
  one-turn training prompt is exactly the inference prompt), the image token expanded to the
  placeholders the image needs. Labels are the assistant turns' tokens — the answer and the
  template's end-of-turn token after it, so the model learns to stop; prompt, scaffolding and
  image positions are -100. Where the template writes no end-of-turn token after an answer
  (llava-hf's LLaVA-1.5 template writes `ASSISTANT: answer `), eos is inserted and labelled, as
  LLaVA's own training put `</s>` after every answer and generation stops on eos.
  Assistant spans are found by rendering prefixes of the conversation (up to each user turn with
  the generation prompt, and through each answer) and mapping those character spans onto the
  tokens of the full rendering with the tokenizer's offsets.
- the bundled word-level models (no template): `<bos> <image>*N (question answer <eos>)*`, the
  layout the tiny models were always trained on (`cliviz.train.tiny`).

Images are encoded by a callable the trainer passes in (`ImageEncoder`), which keeps the
model-specific part (pixel layout, tokens per image) in the model code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from cliviz.data.conversations import BadRow, Conversation, load_conversation_image
from cliviz.errors import CLIVizError
from cliviz.model.processing import chat_text, image_inputs, pad_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cliviz.model.configuration import CLIConfig

IGNORE = -100
# images -> (model inputs whose tensors have one row per image along dim 0, placeholder tokens per image)
ImageEncoder = Callable[[list[Image.Image]], tuple[dict[str, torch.Tensor], list[int]]]


class ModelImageEncoder:
    """The images of any model cliviz loads, as inference encodes them (`processing.image_inputs`):
    LLaVA / bundled `pixel_values` with a fixed token count, or LLaVA-OneVision's anyres crops plus
    `image_sizes` with a count per image."""

    def __init__(self, config) -> None:
        self.config = config

    def __call__(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[int]]:
        encoded = image_inputs(images, self.config)
        tensors = {"pixel_values": encoded.pixel_values}
        if encoded.image_sizes is not None:
            tensors["image_sizes"] = encoded.image_sizes
        return tensors, encoded.token_counts


@dataclass
class TokenizedConversation:
    """Token ids holding the image token once (not yet expanded), labels of the same length, and
    the index just past each answer (its labelled end-of-turn included): where a cut may fall."""

    ids: list[int]
    labels: list[int]
    answer_ends: list[int]


class WordLevelEncoder:
    """`<bos> <image> (question answer <eos>)*` for the bundled word-level tokenizers."""

    def __init__(self, tokenizer, image_token_id: int) -> None:
        self.tokenizer, self.image_token_id = tokenizer, image_token_id

    def __call__(self, conversation: Conversation) -> TokenizedConversation:
        tok = self.tokenizer
        ids, labels, ends = [tok.bos_token_id, self.image_token_id], [IGNORE, IGNORE], []
        for question, answer in conversation.pairs():  # a system turn has no place in this layout
            q = tok(question, add_special_tokens=False).input_ids
            a = tok(answer, add_special_tokens=False).input_ids
            if tok.unk_token_id is not None and tok.unk_token_id in q + a:
                raise BadRow("unknown_words")
            ids += q + a + [tok.eos_token_id]
            labels += [IGNORE] * len(q) + a + [tok.eos_token_id]  # label at its own position; shifted in the loss
            ends.append(len(ids))
        return TokenizedConversation(ids, labels, ends)


class ChatEncoder:
    """The conversation through the tokenizer's chat template, labels on the assistant turns."""

    PROBE = (
        ("user", "what is in the picture ?"),
        ("assistant", "a red circle"),
        ("user", "and where ?"),
        ("assistant", "on the left"),
    )

    def __init__(self, tokenizer, image_token_id: int) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise CLIVizError("training on a chat template needs a fast (tokenizers-backed) tokenizer for offsets")
        self.tokenizer, self.image_token_id = tokenizer, image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        reference = chat_text(tokenizer, self.PROBE[0][1], self.image_token)  # inference's prompt for one question
        self.structured = True
        if self._render_or_none(self.PROBE[:1], generation=True) != reference:
            self.structured = False
            if self._render_or_none(self.PROBE[:1], generation=True) != reference:
                raise CLIVizError(
                    "the chat template renders a question unlike the inference prompt; cannot train on it"
                )
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.special_ids = set(tokenizer.all_special_ids)
        self.special_ids |= {i for i, t in added.items() if getattr(t, "special", False)}
        self.special_ids.discard(image_token_id)
        self.unk_id = None  # the probe's words need not be in a word-level vocabulary
        try:
            self(Conversation("probe", b"", self.PROBE))
        except BadRow as bad:
            raise CLIVizError(f"the chat template cannot be split into turns for training ({bad})") from None
        from cliviz.inputs import is_word_level

        self.unk_id = tokenizer.unk_token_id if is_word_level(tokenizer) else None  # subwords spell anything

    def messages(self, turns: tuple[tuple[str, str], ...]) -> list[dict]:
        """Chat messages in the template's style; the image goes first in the first user turn."""
        out, image_placed = [], False
        for role, text in turns:
            with_image = role == "user" and not image_placed
            image_placed |= with_image
            if self.structured:
                image_part = [{"type": "image"}] if with_image else []
                content: list[dict] | str = image_part + [{"type": "text", "text": text}]
            else:
                content = f"{self.image_token}\n{text}" if with_image else text
            out.append({"role": role, "content": content})
        return out

    def _render(self, messages: list[dict], generation: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
        except Exception as err:  # noqa: BLE001 - jinja raises many types (template errors, raise_exception(...))
            raise BadRow("template_mismatch", str(err).strip().splitlines()[0] if str(err).strip() else "") from None
        if not isinstance(text, str):
            raise BadRow("template_mismatch", "the template did not render text")
        return text

    def _render_or_none(self, turns, generation: bool) -> str | None:
        try:
            return self._render(self.messages(turns), generation)
        except BadRow:
            return None

    def answer_spans(self, turns: tuple[tuple[str, str], ...]) -> tuple[str, list[tuple[int, int, int]]]:
        """The full rendering and, per answer, `(start, answer_end, content_end)` character offsets:
        where the generation prompt ends (what follows is the model's to say, a leading space
        included), where the answer's own text ends, where the turn's non-blank text ends."""
        messages = self.messages(turns)
        full = self._render(messages, generation=False)
        spans, cursor = [], 0
        for j, (role, text) in enumerate(turns):
            if role != "assistant":
                continue
            if j <= 2:  # the first exchange (and a system turn): rendered as prefixes of the conversation
                before = self._render(messages[:j], generation=True)
                through = self._render(messages[: j + 1], generation=False)
                if not (through.startswith(before) and full.startswith(through)):
                    raise BadRow("template_mismatch", "a prefix of the conversation renders differently")
                start, content_end = len(before), len(before) + len(through[len(before) :].rstrip())
            else:  # later ones: what the answer adds after its question alone, found after the last answer
                start, content_end = self._later_answer(full, messages[j - 1 : j + 1], cursor)
            at = full.find(text, start, content_end)
            answer_end = at + len(text) if at >= 0 else content_end  # not found: the template rewrote it
            spans.append((start, answer_end, content_end))
            cursor = content_end
        return full, spans

    def _later_answer(self, full: str, pair: list[dict], cursor: int) -> tuple[int, int]:
        """`(start, content_end)` of a later answer in `full`. The question and answer are rendered alone
        (the cost of a turn does not grow with the turns before it, so tokenising a conversation is
        linear in its turns, not quadratic): what the generation prompt adds, then what the answer
        adds after it, are found together after `cursor` (the end of the previous answer)."""
        question = self._render(pair[:1], generation=False)
        prompted = self._render(pair[:1], generation=True)
        through = self._render(pair, generation=False)
        if not (prompted.startswith(question) and through.startswith(prompted)):
            raise BadRow("template_mismatch", "a turn renders differently alone")
        prompt, added = prompted[len(question) :], through[len(prompted) :].rstrip()
        at = full.find(prompt + added, cursor) if added else -1
        if at < 0:
            raise BadRow("template_mismatch", "a later answer cannot be found in the rendering")
        start = at + len(prompt)
        return start, start + len(added)

    def __call__(self, conversation: Conversation) -> TokenizedConversation:
        tok = self.tokenizer
        full, spans = self.answer_spans(conversation.turns)
        add_special = not (tok.bos_token is not None and full.startswith(tok.bos_token))  # as chat_prompt_ids
        encoded = tok(full, add_special_tokens=add_special, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
        labelled: dict[int, bool] = {}  # token index -> whether eos must follow it (last token of an answer)
        for start, answer_end, content_end in spans:
            chosen = [k for k, (s, e) in enumerate(offsets) if e > s and s < content_end and e > start]
            for n, k in enumerate(chosen):  # stop at the first end-of-turn token after the answer text
                if ids[k] in self.special_ids and offsets[k][0] >= answer_end:
                    chosen = chosen[: n + 1]
                    break
            if not chosen:
                raise BadRow("template_mismatch", "an answer has no tokens of its own")
            ends_turn = ids[chosen[-1]] in self.special_ids and offsets[chosen[-1]][0] >= answer_end
            labelled.update({k: False for k in chosen})
            labelled[chosen[-1]] = not ends_turn and tok.eos_token_id is not None
        out_ids, labels, ends = [], [], []
        for k, token in enumerate(ids):
            out_ids.append(token)
            labels.append(token if k in labelled else IGNORE)
            if labelled.get(k):
                out_ids.append(tok.eos_token_id)
                labels.append(tok.eos_token_id)
            if k in labelled and (k + 1 not in labelled or labelled[k]):
                ends.append(len(out_ids))
        if out_ids.count(self.image_token_id) != 1:
            raise BadRow("extra_image_tokens", f"{out_ids.count(self.image_token_id)} image tokens after templating")
        if self.unk_id is not None and self.unk_id in out_ids:  # a word-level vocabulary lacks a word
            raise BadRow("unknown_words")
        return TokenizedConversation(out_ids, labels, ends)


def expand_image(
    tokens: TokenizedConversation, image_token_id: int, n_image: int, max_length: int | None
) -> tuple[list[int], list[int], bool]:
    """Image token -> `n_image` placeholders (labels -100); cut after the last answer that fits.

    Returns ids, labels and whether answers were cut off; `BadRow("too_long")` if none fits.
    """
    at = tokens.ids.index(image_token_id)
    ids = tokens.ids[:at] + [image_token_id] * n_image + tokens.ids[at + 1 :]
    labels = tokens.labels[:at] + [IGNORE] * n_image + tokens.labels[at + 1 :]
    if max_length is None or len(ids) <= max_length:
        return ids, labels, False
    fitting = [end + n_image - 1 for end in tokens.answer_ends if end + n_image - 1 <= max_length]
    if not fitting:
        raise BadRow("too_long", f"{len(ids)} tokens, limit {max_length}")
    return ids[: fitting[-1]], labels[: fitting[-1]], True


@dataclass
class Collated:
    """One batch: `inputs` (None when no sample survived), the kept samples' ids, rows skipped here."""

    inputs: dict[str, torch.Tensor] | None
    ids: list[str]
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    skipped_rows: list[tuple[int, str]] = field(default_factory=list)  # (position in the input, reason)


class ConversationCollator:
    """Conversations -> right-padded `input_ids`, `attention_mask`, `labels` `[B, T]` plus the image inputs.

    Rows that cannot be used (unreadable image, out-of-vocabulary word, too long...) are counted in
    `Collated.skipped`, never raised. Per-sample `extra` arrays become `aux_<name>` tensors.
    """

    def __init__(
        self,
        tokenizer,
        image_token_id: int,
        encode_images: ImageEncoder,
        max_length: int | None = None,
        max_side: int | None = None,
    ) -> None:
        self.tokenizer, self.image_token_id = tokenizer, image_token_id
        self.encode_images, self.max_length, self.max_side = encode_images, max_length, max_side
        chat = bool(getattr(tokenizer, "chat_template", None))
        encoder = ChatEncoder if chat else WordLevelEncoder
        self.encode_text = encoder(tokenizer, image_token_id)

    def __call__(self, conversations: list[Conversation]) -> Collated:
        skipped: Counter = Counter()
        rows_skipped: list[tuple[int, str]] = []  # (position in `conversations`, reason), any stage
        texts, images, kept, positions, cut_early = [], [], [], [], []
        for position, conversation in enumerate(conversations):
            try:
                short, cut = cap_characters(conversation, self.max_length)
                tokens = self.encode_text(short)  # text first: a bad row costs no image decode
                image = load_conversation_image(conversation, self.max_side)
            except BadRow as bad:
                skipped[bad.reason] += 1
                rows_skipped.append((position, bad.reason))
                continue
            texts.append(tokens)
            images.append(image)
            kept.append(conversation)
            positions.append(position)
            cut_early.append(cut)
        return self._collate(texts, images, kept, positions, cut_early, skipped, rows_skipped)

    def _collate(self, texts, images, kept, positions, cut_early, skipped: Counter, rows_skipped) -> Collated:
        """Pad the encoded rows and images of one batch; rows too long even when cut are skipped here."""
        if not kept:
            return Collated(None, [], skipped, 0, rows_skipped)
        image_inputs, counts = self.encode_images(images)
        rows, rows_kept, truncated = [], [], 0
        for i, (tokens, n_image) in enumerate(zip(texts, counts)):
            try:
                ids, labels, cut = expand_image(tokens, self.image_token_id, n_image, self.max_length)
            except BadRow as bad:
                skipped[bad.reason] += 1
                rows_skipped.append((positions[i], bad.reason))
                continue
            rows.append((ids, labels))
            rows_kept.append(i)
            truncated += cut or cut_early[i]
        if not rows:
            return Collated(None, [], skipped, truncated, rows_skipped)
        if len(rows_kept) < len(kept):
            index = torch.tensor(rows_kept)
            image_inputs = {k: v.index_select(0, index) for k, v in image_inputs.items()}
        kept = [kept[i] for i in rows_kept]
        inputs = self._pad(rows) | image_inputs
        names = set.intersection(*(set(c.extra) for c in kept))
        for name in sorted(names):
            inputs[f"aux_{name}"] = torch.stack([torch.from_numpy(np.asarray(c.extra[name])) for c in kept])
        return Collated(inputs, [c.id for c in kept], skipped, truncated, rows_skipped)

    def _pad(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad_id(self.tokenizer), dtype=torch.long)  # [B, T]
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
        for i, (ids, tgt) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(tgt)] = torch.tensor(tgt)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collator_for_model(
    model_config: CLIConfig, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None
) -> ConversationCollator:
    """The collator for any model cliviz loads (`ModelImageEncoder`); other architectures pass
    their own `ImageEncoder` to `ConversationCollator`.

    `max_length` defaults to the language model's context (`max_position_embeddings`): a row is
    never tokenised or trained beyond what the model can attend to. Images are decoded shrunk to
    `image_side_budget` (what the processor keeps of them), whatever size their files are."""
    image_token_id = int(model_config.base_config.image_token_id)
    if max_length is None:
        max_length = default_max_length(model_config)
    return ConversationCollator(
        tokenizer, image_token_id, ModelImageEncoder(model_config), max_length, image_side_budget(model_config)
    )


CHARS_PER_TOKEN = 16  # far above any tokenizer's average (~4 for BPE, ~5 for words): the cap never cuts a row
# that tokenises within the limit, and bounds the text handed to the tokenizer


def default_max_length(model_config) -> int | None:
    """The language model's context length, or None when its config does not say."""
    text = getattr(model_config.base_config, "text_config", None)
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def image_side_budget(model_config) -> int:
    """The longest image side worth decoding: 4x the tower's input for fixed-size processors (resize
    and crop keep less), the largest anyres grid for LLaVA-OneVision."""
    base = model_config.base_config
    side = 4 * int(base.vision_config.image_size)
    pinpoints = getattr(base, "image_grid_pinpoints", None) or []
    sides = [int(v) for point in pinpoints for v in point]
    return max([side, *sides])


def cap_characters(conversation: Conversation, max_length: int | None) -> tuple[Conversation, bool]:
    """The conversation cut after its last whole exchange within `max_length * CHARS_PER_TOKEN`
    characters, before any tokenising (a 100,000-character answer costs nothing); `BadRow("too_long")`
    when not even the first exchange fits. Returns the conversation and whether it was cut."""
    if max_length is None:
        return conversation, False
    budget, used, keep = max_length * CHARS_PER_TOKEN, 0, 0
    turns = conversation.turns
    for k, (role, text) in enumerate(turns):
        used += len(text)
        if used > budget:
            break
        if role == "assistant":
            keep = k + 1
    else:
        return conversation, False
    if keep == 0:
        raise BadRow("too_long", f"the first exchange alone is over {budget:,} characters")
    return Conversation(conversation.id, conversation.image, turns[:keep], conversation.extra), True
