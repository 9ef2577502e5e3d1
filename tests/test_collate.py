"""Conversations -> model inputs: hand-checked label masks for a LLaVA-1.5-like and a ChatML template,
the word-level layout bit for bit as `make_batch`, image expansion per image, truncation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conversation_data import CHATML_TEMPLATE, chatml_tokenizer, word_level
from PIL import Image

from cliviz.data.collate import IGNORE, ChatEncoder, ConversationCollator, collator_for_model, expand_image
from cliviz.data.conversations import Conversation
from cliviz.errors import CLIVizError

from factories import LLAVA15_TEMPLATE as CHAT_TEMPLATE
from factories import llava15_tokenizer as llava_tokenizer

TURNS = (
    ("user", "what color is the circle ?"),
    ("assistant", "red"),
    ("user", "how many shapes are there ?"),
    ("assistant", "two shapes"),
)
EOS = object()  # stands for the inserted eos in a segment list


def conversation(turns=TURNS, image=None) -> Conversation:
    return Conversation("c", image if image is not None else Image.new("RGB", (32, 32), (200, 30, 30)), turns)


def expected_from_segments(tok, segments, add_bos: bool) -> tuple[list[int], list[int]]:
    """Ids and labels from hand-written `(text, labelled)` segments, each tokenised on its own."""
    ids, labels = ([tok.bos_token_id], [IGNORE]) if add_bos else ([], [])
    for text, labelled in segments:
        part = [tok.eos_token_id] if text is EOS else tok(text, add_special_tokens=False).input_ids
        ids += part
        labels += part if labelled else [IGNORE] * len(part)
    return ids, labels


def test_llava15_template_labels_answers_and_an_inserted_eos():
    """`USER: <image>\\nQ ASSISTANT: A USER: ...`: the template writes no `</s>` after an answer, so eos is
    inserted and labelled; the space the model says first (after `ASSISTANT:`) is labelled with the answer."""
    tok = llava_tokenizer()
    assert tok.chat_template == CHAT_TEMPLATE
    encoder = ChatEncoder(tok, tok.convert_tokens_to_ids("<image>"))
    assert encoder.structured  # LLaVA-1.5's template takes [{"type": "image"}, {"type": "text"}] content
    got = encoder(conversation())
    ids, labels = expected_from_segments(
        tok,
        [
            ("USER: <image>\nwhat color is the circle ? ASSISTANT:", False),
            (" red", True),
            (EOS, True),
            (" USER: how many shapes are there ? ASSISTANT:", False),
            (" two shapes", True),
            (EOS, True),
            (" ", False),
        ],
        add_bos=True,
    )
    assert got.ids == ids and got.labels == labels
    assert tok.decode([t for t, lab in zip(got.ids, got.labels) if lab != IGNORE]) == " red</s> two shapes</s>"


def test_chatml_template_labels_answers_through_im_end_only():
    """Qwen2-style: `<|im_start|>assistant\\nA<|im_end|>\\n`: the answer and `<|im_end|>` are labelled,
    the newline after it and the default system prompt are not; no bos, nothing inserted."""
    tok = chatml_tokenizer()
    encoder = ChatEncoder(tok, tok.convert_tokens_to_ids("<image>"))
    assert not encoder.structured  # plain string content
    got = encoder(conversation())
    ids, labels = expected_from_segments(
        tok,
        [
            (
                "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
                "what color is the circle ?<|im_end|>\n<|im_start|>assistant\n",
                False,
            ),
            ("red<|im_end|>", True),
            ("\n<|im_start|>user\nhow many shapes are there ?<|im_end|>\n<|im_start|>assistant\n", False),
            ("two shapes<|im_end|>", True),
            ("\n", False),
        ],
        add_bos=False,
    )
    assert got.ids == ids and got.labels == labels
    assert [got.labels[e - 1] for e in got.answer_ends] == [tok.eos_token_id] * 2


def test_a_system_turn_replaces_the_default_one():
    tok = chatml_tokenizer()
    encoder = ChatEncoder(tok, tok.convert_tokens_to_ids("<image>"))
    got = encoder(conversation((("system", "Be brief."),) + TURNS[:2]))
    text = tok.decode(got.ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "helpful" not in text
    assert tok.decode([t for t, lab in zip(got.ids, got.labels) if lab != IGNORE]) == "red<|im_end|>"


@pytest.mark.parametrize("make_tok", [llava_tokenizer, chatml_tokenizer])
def test_one_turn_training_prompt_is_the_inference_prompt(make_tok):
    """Everything before the first label equals `processing.chat_prompt_ids`: train and ask see one format."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from cliviz.model.configuration import CLIConfig
    from cliviz.model.processing import chat_prompt_ids

    tok = make_tok()
    image_id = tok.convert_tokens_to_ids("<image>")
    base = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tok)),
        image_token_index=image_id,
        vision_feature_select_strategy="default",
    )
    config = CLIConfig(base_config=base)
    collator = collator_for_model(config, tok)
    batch = collator([conversation(TURNS[:2])]).inputs
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert ids[:first] == chat_prompt_ids(tok, TURNS[0][1], config)
    assert ids.count(image_id) == 16 and all(lab == IGNORE for i, lab in zip(ids, labels) if i == image_id)


def test_a_collated_batch_runs_through_a_real_llava_and_its_loss_is_on_the_answers():
    """A tiny random llava-hf LLaVA-1.5 with its CLIP image processor: the batch's image placeholders
    match the image features (else transformers raises), and transformers' own loss on `labels` is
    the cross-entropy over exactly the labelled (answer + eos) tokens."""
    from torch.nn import functional as F

    from cliviz.model.configuration import CLIConfig

    from factories import llava15_base as build_base
    from factories import llava15_image_processor as build_image_processor

    tok = llava_tokenizer()
    base = build_base(tok)
    config = CLIConfig(base_config=base.config)
    config.image_processor = build_image_processor()  # what load_model attaches for a real folder
    rows = [conversation(), conversation(TURNS[:2], image=Image.new("RGB", (50, 30), (10, 200, 10)))]
    batch = collator_for_model(config, tok)(rows).inputs
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    out = base(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        labels=batch["labels"],
    )
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]  # [B, T-1, V], [B, T-1]
    manual = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)

    def n(text):
        return len(tok(text, add_special_tokens=False).input_ids)

    assert torch.allclose(out.loss, manual) and (labels != IGNORE).sum() == 2 * (n(" red") + 1) + n(" two shapes") + 1
    out.loss.backward()
    assert base.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_word_level_layout_is_make_batch_bit_for_bit():
    """The ShapesVQA scenes through the collator give exactly `make_batch`'s tensors (ids, labels,
    mask, pixels, auxiliary patch targets), so the tiny trainer can switch over."""
    from reference_batch import make_batch

    from cliviz.data.questions import parse_extra_questions
    from cliviz.data.sources import ShapesSceneSource

    tok, config = word_level()
    collator = collator_for_model(config, tok)
    for seed, extra in ((7, None), (1_000_020, parse_extra_questions("relation:2,position:1"))):
        source = ShapesSceneSource(seed, offset=40, extra_questions=extra)
        conversations = [source.parse(raw, i) for i, raw in zip(range(5), source.raw_rows())]
        got = collator(conversations)
        want = make_batch(tok, config, seed, list(range(40, 45)), extra)
        assert sorted(got.inputs) == sorted(want) and not got.skipped
        for key, value in want.items():
            assert torch.equal(got.inputs[key], value), key


def test_word_level_out_of_vocabulary_is_a_skipped_row():
    tok, config = word_level()
    unknown_word = conversation((("user", "what colour is the circle ?"), ("assistant", "red")))
    collated = collator_for_model(config, tok)([unknown_word, conversation(TURNS[:2])])
    assert collated.skipped == Counter({"unknown_words": 1}) and collated.inputs["input_ids"].shape[0] == 1


class VaryingEncoder:
    """A OneVision-like encoder: the placeholder count depends on the image (width / 8), and the
    inputs carry `image_sizes` next to `pixel_values`."""

    def __call__(self, images):
        pixels = torch.stack([torch.full((3, 4, 4), float(im.width)) for im in images])  # [B, 3, 4, 4]
        sizes = torch.tensor([[im.height, im.width] for im in images])  # [B, 2]
        return {"pixel_values": pixels, "image_sizes": sizes}, [im.width // 8 for im in images]


def test_placeholders_per_image_and_truncation():
    """Each row gets its own image's count; `max_length` cuts after the last answer that fits and
    drops a row (and its image tensors) whose first answer does not fit."""
    tok = chatml_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    rows = [conversation(image=Image.new("RGB", (w, 8))) for w in (16, 40, 400)]  # 2, 5, 50 placeholders
    full = ConversationCollator(tok, image_id, VaryingEncoder())(rows)
    assert [r.count(image_id) for r in full.inputs["input_ids"].tolist()] == [2, 5, 50]
    length_one = full.inputs["attention_mask"][0].sum().item()
    encoder = ChatEncoder(tok, image_id)
    first_end = encoder(rows[0]).answer_ends[0] + 1  # + (2 placeholders - 1 image token)
    cut = ConversationCollator(tok, image_id, VaryingEncoder(), max_length=first_end + 10)(rows)
    assert cut.skipped == Counter({"too_long": 1}) and cut.truncated == 2 and cut.ids == ["c", "c"]
    assert cut.inputs["image_sizes"].tolist() == [[8, 16], [8, 40]]  # the dropped row's image went with it
    assert cut.inputs["pixel_values"][:, 0, 0, 0].tolist() == [16.0, 40.0]
    first_row = cut.inputs["input_ids"][0][cut.inputs["attention_mask"][0].bool()].tolist()
    assert len(first_row) == first_end < length_one
    first_labels = cut.inputs["labels"][0].tolist()
    assert tok.decode([t for t, lab in zip(first_row, first_labels) if lab != IGNORE]) == "red<|im_end|>"


def test_expand_image_refuses_when_nothing_fits():
    from cliviz.data.collate import TokenizedConversation
    from cliviz.data.conversations import BadRow

    tokens = TokenizedConversation([1, 9, 5, 6, 2], [IGNORE, IGNORE, IGNORE, 6, 2], [5])
    ids, labels, cut = expand_image(tokens, 9, 3, None)
    assert ids == [1, 9, 9, 9, 5, 6, 2] and labels == [IGNORE] * 5 + [6, 2] and not cut
    with pytest.raises(BadRow, match="too_long"):
        expand_image(tokens, 9, 3, 6)


def test_templates_that_cannot_be_trained_on():
    """A template whose prefixes render differently is refused up front with one clear error;
    a template that fails on one row only makes that row a counted `template_mismatch`."""
    counting = "{{ messages | length }}" + CHATML_TEMPLATE
    with pytest.raises(CLIVizError, match="cannot be split into turns"):
        ChatEncoder(chatml_tokenizer(counting), 3)
    picky = (
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no') }}{% endif %}"
        "{% endfor %}" + CHATML_TEMPLATE
    )
    tok = chatml_tokenizer(picky)
    collator = ConversationCollator(tok, tok.convert_tokens_to_ids("<image>"), VaryingEncoder())
    out = collator([conversation((("user", "a forbidden question"), ("assistant", "red"))), conversation(TURNS[:2])])
    assert out.skipped == Counter({"template_mismatch": 1}) and out.inputs["input_ids"].shape[0] == 1
