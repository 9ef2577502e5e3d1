"""Shared by the benchmark scripts: the bundled model, loaded the way users load it, and the
mid-size random LLaVA shape the cost and training benchmarks time."""

from __future__ import annotations


def bundled_model(device: str = "cpu"):
    """The bundled cli-tiny in fp32: `(model, tokenizer, label)`."""
    from cliviz.model.loading import load_model

    model, tok = load_model(device=device, dtype="float32")
    return model, tok, "bundled cli-tiny"


def mid_size_llava_config(tok, **text_extra):
    """The mid-size LLaVA-1.5 shape named in the issues: CLIP 24 x 256 at 192 px (144 patches, read at
    layer -2), Llama 8 x 512 with a 32k vocabulary, the special ids of `tok`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=24,
        num_attention_heads=4,
        image_size=192,
        patch_size=16,
    )
    text = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **text_extra,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
