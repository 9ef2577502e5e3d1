"""Word-level tokenizer for ShapesVQA, built with `tokenizers` and saved next to the weights."""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from cliviz.data.questions import vocabulary

PAD, UNK, BOS, IMAGE, EOS = "[PAD]", "[UNK]", "<bos>", "<image>", "<eos>"
SPECIALS = (PAD, UNK, BOS, IMAGE, EOS)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fixed vocabulary: specials first (pad=0, unk=1, bos=2, image=3, eos=4), then ShapesVQA words."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *vocabulary()])}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
    )
