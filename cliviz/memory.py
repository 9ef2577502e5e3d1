"""Batch sizes that fit: chosen from the model's shapes and the device's free memory, halved on OOM.

A batch size that suits the bundled 2 MB model (64 rows) fills a 24 GB GPU with a 7B model's KV
cache alone. `auto_batch_size` estimates what one row costs beyond the weights — the KV cache of its
prompt and answer, one decoder layer's transient activations, the vision tower's hidden states that
CLI reads (every layer of the image, kept for AMP), the visual memory, and float32 logits at the
positions scored — and fits as many rows as `free_memory_bytes()` allows, with headroom.
`in_batches` runs a function over chunks and, when one runs out of memory anyway, halves the chunk
and retries it with a one-line note, down to one row.

Every batched command uses the same two functions (eval, ablate; a sweep calls
`auto_batch_size(model, prompt_tokens, new_tokens)` once and runs its chunks through `in_batches`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch

from cliviz.errors import CLIVizError

if TYPE_CHECKING:
    from cliviz.model.modeling import CLIForConditionalGeneration

T = TypeVar("T")
R = TypeVar("R")
HEADROOM = 0.7  # of the free memory: allocator fragmentation and what the estimate leaves out
CPU_FALLBACK_BYTES = 8 * 2**30  # when the host's free memory cannot be read


def free_memory_bytes(device: torch.device | str) -> int:
    """Free memory of `device`: CUDA's own count, or the host's MemAvailable for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return CPU_FALLBACK_BYTES


def row_bytes(model: CLIForConditionalGeneration, tokens: int, new_tokens: int = 0, scored_positions: int = 1) -> int:
    """Bytes one row of a batch needs beyond the weights (an estimate that errs on the large side)."""
    cfg = model.config.base_config
    text, vision = cfg.text_config, cfg.vision_config
    elem = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 4
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    length = tokens + new_tokens
    kv_cache = 2 * text.num_hidden_layers * kv_heads * head_dim * elem * length
    layer = tokens * (3 * text.intermediate_size + 6 * text.hidden_size) * elem  # one layer's transients
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    crops = max(1, tokens // patches) if cfg.model_type == "llava_onevision" else 1  # anyres: several crops
    k = len(getattr(model.config, "vision_layers", ()))
    tower = crops * patches * vision.hidden_size * (vision.num_hidden_layers + 1) * elem  # hidden states kept
    memory = k * min(tokens, crops * patches) * text.hidden_size * elem  # AMP's output [K, N, D]
    logits = scored_positions * text.vocab_size * 4 * 2  # float32 logits and their log-softmax
    return kv_cache + layer + tower + memory + logits


def prompt_tokens_estimate(config, text_tokens: int = 64) -> int:
    """Tokens of one prompt: the image's placeholders (OneVision: its largest anyres grid) plus text."""
    from cliviz.model.processing import n_image_tokens

    n = n_image_tokens(config)
    base = config.base_config
    if base.model_type == "llava_onevision":
        size = base.vision_config.image_size
        crops = max((h // size) * (w // size) for h, w in base.image_grid_pinpoints)
        n *= 1 + crops
    return n + text_tokens


def auto_batch_size(
    model,
    tokens: int,
    new_tokens: int = 0,
    scored_positions: int = 1,
    *,
    cap: int = 64,
    free: int | None = None,
) -> int:
    """Rows per batch that fit the device's free memory (at least 1, at most `cap`)."""
    free = free_memory_bytes(model.device) if free is None else free
    per_row = max(row_bytes(model, tokens, new_tokens, scored_positions), 1)
    return int(max(1, min(cap, HEADROOM * free // per_row)))


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's "can't allocate memory"."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def note_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def in_batches(
    items: Sequence[T],
    batch_size: int,
    run: Callable[[Sequence[T]], R],
    *,
    note: Callable[[str], None] = note_to_stderr,
) -> Iterator[tuple[Sequence[T], R]]:
    """`(chunk, run(chunk))` over consecutive chunks of `items`; a chunk that runs out of memory is
    halved and retried (one line through `note`), and later chunks keep the smaller size."""
    start = 0
    while start < len(items):
        chunk = items[start : start + batch_size]
        try:
            result = run(chunk)
        except Exception as err:  # noqa: BLE001 - only out-of-memory is retried (`_halved` re-raises the rest)
            batch_size = _halved(err, min(batch_size, len(chunk)), note)
            continue
        yield chunk, result
        start += len(chunk)


def with_oom_retry(run: Callable[[int], R], batch_size: int, *, note: Callable[[str], None] = note_to_stderr) -> R:
    """`run(batch_size)`; after an out-of-memory error, again with half the batch size."""
    while True:
        try:
            return run(batch_size)
        except Exception as err:  # noqa: BLE001 - only out-of-memory is retried (`_halved` re-raises the rest)
            batch_size = _halved(err, batch_size, note)


def _halved(err: Exception, batch_size: int, note: Callable[[str], None]) -> int:
    if not is_out_of_memory(err):
        raise err
    if batch_size <= 1:
        raise CLIVizError("out of memory with one row per batch: use a smaller model, dtype or input") from None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    note(f"out of memory at batch size {batch_size}; retrying with {batch_size // 2}")
    return batch_size // 2
