"""Check `model.safetensors` against its config before transformers loads it.

A truncated, empty or random file, a pickle renamed `.safetensors`, a missing or extra tensor and
a tensor of the wrong shape each become one line naming the file and the problem. The header is
read with the `safetensors` library (which also checks that its offsets cover the file exactly);
the expected tensors come from the model built on the `meta` device, which allocates nothing, so a
config that promises 72B parameters next to a 5 MB file is refused before any memory is spent.

Checkpoint keys go through transformers' own renaming (the legacy LLaVA layout
`base.language_model.model.*` is stored, `base.model.language_model.*` is built); where that
internal API is missing the check falls back to comparing the multiset of shapes.

The injection gains `agf.<j>.injection.alpha` are one-element vectors `[1]`; checkpoints of the first
design store them as scalars `[]`. Both fit: `vector_alphas` hands transformers the file's tensors
with each scalar gain as a vector (the same number), so every model holds the same shape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cliviz.errors import CLIVizError
from cliviz.model.modeling import CLIForConditionalGeneration

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
ALPHA = ".injection.alpha"  # the injection gain: [1] in the model, [] or [1] in a checkpoint
PICKLE_MAGIC = tuple(bytes([0x80, p]) for p in range(2, 6))
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format


@dataclass(frozen=True)
class Stored:
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]


def check_weights(path: Path, config) -> None:
    """CLIVizError naming `path` when it is not a safetensors file that fits the model `config` builds."""
    stored = read_header(path)
    model = meta_model(config)
    expected = {k: (tuple(t.shape), t.is_floating_point()) for k, t in model.state_dict().items()}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    rename = _renamer(model, expected)
    if rename is None:
        _compare_shapes(path, stored, expected, tied)
        return
    renamed: dict[str, tuple[str, Stored]] = {}
    for key, info in stored.items():
        renamed[rename(key)] = (key, info)
    missing = [k for k in expected if k not in renamed and not (k in tied and tied[k] in renamed)]
    unexpected = [key for new, (key, _) in renamed.items() if new not in expected]
    wrong = [
        f"{key}: {list(info.shape)} in the file, {list(expected[new][0])} expected"
        for new, (key, info) in renamed.items()
        if new in expected and info.shape != expected[new][0] and not _scalar_alpha(key, info)
    ]
    dtypes = [
        f"{key} is stored as {info.dtype}"
        for new, (key, info) in renamed.items()
        if new in expected and expected[new][1] and info.dtype not in FLOAT_DTYPES
    ]
    _report(path, missing, unexpected, wrong, dtypes)


def _scalar_alpha(key: str, info: Stored) -> bool:
    return key.endswith(ALPHA) and info.shape == ()


def vector_alphas(path: Path) -> dict[str, torch.Tensor] | None:
    """The checkpoint's tensors with each scalar injection gain as the `[1]` vector the model holds,
    for `from_pretrained(..., state_dict=...)`; None when the file has no scalar gain (it then loads
    as it is, memory-mapped by transformers)."""
    if not path.is_file() or not any(_scalar_alpha(k, info) for k, info in read_header(path).items()):
        return None
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return {k: t.reshape(1) if k.endswith(ALPHA) and t.dim() == 0 else t for k, t in tensors.items()}


def read_header(path: Path) -> dict[str, Stored]:
    """Tensor names, dtypes and shapes from a safetensors header; CLIVizError when the file is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
    except PermissionError:
        raise CLIVizError(f"cannot read {path} (permission denied)") from None
    except OSError as err:
        raise CLIVizError(f"cannot read {path}: {err.strerror or err}") from None
    if size == 0:
        raise CLIVizError(f"weights file {path} is empty")
    if head.startswith(PICKLE_MAGIC) or head.startswith(ZIP_MAGIC):
        raise CLIVizError(
            f"weights file {path} is a pickled PyTorch file renamed .safetensors; cliviz loads "
            "safetensors only and never unpickles"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: Stored(str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except SafetensorError as err:
        why = str(err).removeprefix("Error while deserializing header: ")
        raise CLIVizError(
            f"weights file {path} is not a valid safetensors file ({why}; truncated or corrupt?)"
        ) from None
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CLIVizError(f"weights file {path} cannot be read ({first})") from None


def meta_model(config) -> PreTrainedModel:
    """The model `config` describes, on the meta device: every tensor has a shape and no storage."""
    try:
        with torch.device("meta"):
            return CLIForConditionalGeneration(config)
    except Exception as err:  # noqa: BLE001 - whatever the config breaks, it is the config's fault
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIVizError(f"cannot build a model from this config.json: {first}") from None


def _renamer(model: PreTrainedModel, expected: dict) -> Callable[[str], str] | None:
    """transformers' checkpoint-key renaming for `model`, or None when this transformers has no such API."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - an internal API: absent or changed means "fall back"
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key: str) -> str:
        try:
            return rename_source_key(key, renamings, converters, prefix, expected)[0]
        except Exception:  # noqa: BLE001
            return key

    return rename


def _compare_shapes(path: Path, stored: dict[str, Stored], expected: dict, tied: dict) -> None:
    """Fallback without key renaming: the same shapes, as many times each."""
    want = Counter(shape for k, (shape, _) in expected.items() if k not in tied)
    have = Counter(info.shape for info in stored.values())
    if want != have:
        lost, extra = want - have, have - want
        parts = []
        if lost:
            parts.append(f"{sum(lost.values())} expected tensor shape(s) missing (e.g. {list(next(iter(lost)))})")
        if extra:
            parts.append(f"{sum(extra.values())} unexpected tensor shape(s) (e.g. {list(next(iter(extra)))})")
        raise CLIVizError(f"weights file {path} does not fit its config.json: {'; '.join(parts)}")


def _report(path: Path, missing: list[str], unexpected: list[str], wrong: list[str], dtypes: list[str]) -> None:
    parts = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", wrong),
        ("not floating point", dtypes),
    ):
        if items:
            more = f" and {len(items) - 2} more" if len(items) > 2 else ""
            parts.append(f"{len(items)} {label} ({', '.join(items[:2])}{more})")
    if parts:
        raise CLIVizError(f"weights file {path} does not fit its config.json: {'; '.join(parts)}")


def check_finite_parameters(model: torch.nn.Module, path: Path) -> None:
    """CLIVizError naming the first parameter holding NaN or Inf (checked in slices: no full-size copy)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        flat = tensor.detach().reshape(-1)
        for part in flat.split(1 << 24):
            if not bool(torch.isfinite(part).all()):
                raise CLIVizError(f"weights file {path} holds NaN or infinite values (in {name}); the model is broken")
