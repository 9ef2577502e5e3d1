"""Batch sizes from the model's shapes and the free memory; halving and retrying on out-of-memory."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cliviz.errors import CLIVizError
from cliviz.memory import auto_batch_size, in_batches, prompt_tokens_estimate, row_bytes, with_oom_retry

GB = 2**30


def llava15_7b_shape():
    """The LLaVA-1.5-7B shapes, as a model stand-in that carries only what the estimate reads."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from cliviz.model.configuration import CLIConfig

    base = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ),
        text_config=LlamaConfig(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32064
        ),
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    layers = {"vision_layers": list(range(1, 25)), "injection_layers": list(range(1, 32))}
    config = CLIConfig(base_config=base.to_dict(), **layers)
    return SimpleNamespace(config=config, dtype=torch.bfloat16, device=torch.device("cpu"))


def test_seven_b_batches_fit_the_memory_they_are_given():
    model = llava15_7b_shape()
    tokens = prompt_tokens_estimate(model.config)
    assert tokens == 576 + 64
    per_row = row_bytes(model, tokens, 256, 256)
    kv_cache = 2 * 32 * 4096 * 2 * (tokens + 256)  # bf16 keys and values of every layer
    assert kv_cache < per_row < 4 * kv_cache
    fits_24 = auto_batch_size(model, tokens, 256, 256, free=24 * GB - 14 * GB)  # 14 GB of bf16 weights
    fits_80 = auto_batch_size(model, tokens, 256, 256, free=80 * GB - 14 * GB)
    assert 1 <= fits_24 < 16 and fits_24 < fits_80  # the old default of 64 rows does not fit 24 GB
    assert fits_24 * per_row <= 10 * GB and fits_80 * per_row <= 66 * GB
    assert auto_batch_size(model, tokens, 256, free=1) == 1


def test_the_bundled_model_keeps_the_cap(tiny_cli):
    model, _ = tiny_cli
    assert auto_batch_size(model, prompt_tokens_estimate(model.config), 4, free=2 * GB) == 64


def test_in_batches_halves_on_out_of_memory_and_keeps_the_order():
    notes = []

    def run(chunk):
        if len(chunk) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in chunk]

    done = list(in_batches(list(range(20)), 16, run, note=notes.append))
    assert [x for _, result in done for x in result] == [x * 10 for x in range(20)]
    assert max(len(chunk) for chunk, _ in done) == 2
    assert notes == [f"out of memory at batch size {b}; retrying with {b // 2}" for b in (16, 8, 4)]


def test_other_errors_pass_and_one_row_that_does_not_fit_is_one_line():
    with pytest.raises(ValueError):
        list(in_batches([1, 2], 2, lambda chunk: (_ for _ in ()).throw(ValueError("bad")), note=print))

    def cpu_oom(batch):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(CLIVizError, match="out of memory with one row"):
        with_oom_retry(cpu_oom, 4, note=lambda _: None)
    sizes = []

    def fits_at_two(batch):
        sizes.append(batch)
        if batch > 2:
            raise torch.OutOfMemoryError("out of memory")
        return batch

    assert with_oom_retry(fits_at_two, 8, note=lambda _: None) == 2 and sizes == [8, 4, 2]
