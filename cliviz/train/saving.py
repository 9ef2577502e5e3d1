"""How a run's model folder is finished so that a kill or a full disk at any moment loses nothing.

The order (main process; the gathers before it are collectives every process joins):
1. the training state at the final step is written (atomically) into `--out`: from here on the run
   can always be carried on with `--resume`, whatever happens to the other files;
2. the finished folder is assembled in a hidden staging folder inside `--out` (`.finishing-<hex>`):
   config, weights, tokenizer, processor files, summary, model card;
3. each staged file is renamed over its target (each rename is atomic); the staging folder goes;
4. the folder is verified (config readable, every tensor present with its shape and dtype, tokenizer
   readable); only then is the training state deleted (a run stopped with `--stop-step` keeps it).
A kill before 4 ends leaves the state (resumable: a resume at the final step only finishes again);
after it, a complete model. A staging folder a kill left behind is removed by the next writer.

The frozen base is never round-tripped through the compute dtype: its tensors are copied from the
checkpoint the run started from (`copy_base_tensors`), so a bf16 run on a float16 base saves the
base bit for bit as it was stored.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cliviz.atomic import check_free_space, fault_point, fsync_path, write_error
from cliviz.errors import CLIVizError

STAGING_PREFIX = ".finishing-"


def staging_folder(out: Path) -> Path:
    """A fresh hidden folder inside `out` to assemble the finished files in; older ones are removed."""
    remove_stale_staging(out)
    folder = out / f"{STAGING_PREFIX}{secrets.token_hex(6)}"
    folder.mkdir(parents=True)
    return folder


def remove_stale_staging(out: Path) -> None:
    if out.is_dir():
        for old in out.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(old, ignore_errors=True)


def model_bytes(state: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Bytes of `state` saved with its floating tensors in `dtype` (the largest write of a finish)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(v.numel() * (size if v.is_floating_point() else v.element_size()) for v in state.values())


def stage_model(
    staging: Path,
    model,
    tokenizer,
    state: dict[str, torch.Tensor],
    save_dtype: torch.dtype,
    trained: set[str],
    init_from: Path | None,
) -> None:
    """Write the model (weights in `save_dtype`, the frozen base copied from `init_from`), its tokenizer
    and the side files of `init_from` into `staging`. A failed write is one CLIVizError."""
    check_free_space(staging, model_bytes(state, save_dtype), "finished model")
    cast = {k: (v.to(save_dtype) if v.is_floating_point() else v) for k, v in state.items()}
    try:
        with quiet_progress():
            model.save_pretrained(staging, state_dict=cast)
        tokenizer.save_pretrained(staging)
        if init_from is not None:
            copy_base_tensors(staging, init_from, model, {k: v for k, v in cast.items() if k in trained}, save_dtype)
            carry_side_files(init_from, staging)
        for path in sorted(staging.iterdir()):
            fault_point(f"staged {path.name}")
    except (OSError, SafetensorError) as err:
        reason = write_error(err) if isinstance(err, OSError) else str(err)
        raise CLIVizError(f"cannot write the finished model into {staging.parent}: {reason}") from None


@contextmanager
def quiet_progress() -> Iterator[None]:
    """No "Writing model shards" bar from transformers: the command's own lines say what was saved."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def copy_base_tensors(
    staging: Path, source: Path, model, trained: dict[str, torch.Tensor], save_dtype: torch.dtype
) -> int:
    """Replace every frozen tensor of the staged weights by the source checkpoint's own (cast to
    `save_dtype` from the stored values when the two dtypes differ); the number of tensors replaced.

    Saved names are the checkpoint's (transformers renames on save): the trained parameters' saved
    names come from the same renaming, everything else is frozen and looked up in `source` under its
    own name or without the CLI model's `base.` prefix (a plain LLaVA folder).
    """
    from transformers.core_model_loading import revert_weight_conversion

    trained_saved = set(revert_weight_conversion(model, dict(trained)))
    originals = _tensor_index(source)
    replaced = 0
    for file in sorted(staging.glob("*.safetensors")):
        tensors = load_file(file)
        changed = False
        for key, value in tensors.items():
            if key in trained_saved:
                continue
            where = originals.get(key) or originals.get(key.removeprefix("base."))
            if where is None:
                continue
            with safe_open(str(where[0]), framework="pt") as f:
                original = f.get_tensor(where[1])
            if original.shape != value.shape:
                continue
            if original.is_floating_point() and original.dtype != save_dtype:
                original = original.to(save_dtype)
            if original.dtype != value.dtype or not _same_bits(original, value):
                tensors[key] = original.contiguous()
                changed = True
                replaced += 1
        if changed:
            save_file(tensors, str(file), metadata={"format": "pt"})
    return replaced


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(width), b.contiguous().view(width))
    return torch.equal(a, b)


def _tensor_index(folder: Path) -> dict[str, tuple[Path, str]]:
    """Tensor name -> (file, name) over every safetensors file of a checkpoint folder."""
    index = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    index[key] = (file, key)
        except (SafetensorError, OSError):
            continue
    return index


def carry_side_files(source: Path, out: Path) -> None:
    """The tokenizer, processor and chat-template files of the starting checkpoint (not its generation
    config: that is the model's own), where the saved tokenizer did not write one."""
    from cliviz.model.attach import SIDE_FILES

    for name in SIDE_FILES:
        if (source / name).is_file() and name != "generation_config.json" and not (out / name).exists():
            shutil.copy2(source / name, out / name)


def commit(staging: Path, out: Path) -> list[str]:
    """Rename every staged file over its target in `out` (each rename atomic), then remove `staging`."""
    names = sorted(p.name for p in staging.iterdir())
    for path in sorted(staging.iterdir()):
        fsync_path(path)
    for name in names:
        fault_point(f"rename {name}")
        os.replace(staging / name, out / name)
    fsync_path(out)
    fault_point("remove staging folder")
    shutil.rmtree(staging, ignore_errors=True)
    return names


def verify_model_folder(out: Path, expected: dict[str, tuple[tuple[int, ...], str]] | None = None) -> None:
    """CLIVizError unless `out` holds a readable config, weights with every `expected` tensor (saved
    name -> shape, dtype) and a readable tokenizer: what loading the folder needs."""
    problem = _folder_problem(out, expected)
    if problem is not None:
        raise CLIVizError(f"the finished model in {out} did not verify ({problem}); its training state is kept")


def _folder_problem(out: Path, expected: dict | None) -> str | None:
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"config.json: {err}"
    if not isinstance(config, dict) or "model_type" not in config:
        return "config.json names no model_type"
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    files = sorted(out.glob("*.safetensors"))
    if not files:
        return "no weights"
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    found[key] = (tuple(piece.get_shape()), piece.get_dtype())
        except (SafetensorError, OSError) as err:
            return f"{file.name}: {err}"
    for key, (shape, dtype) in (expected or {}).items():
        if key not in found:
            return f"tensor {key} missing"
        if found[key] != (tuple(shape), dtype):
            return f"tensor {key} is {found[key]}, expected {(tuple(shape), dtype)}"
    tokenizer = out / "tokenizer.json"
    if tokenizer.exists():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(tokenizer))
        except Exception as err:  # noqa: BLE001 - tokenizers raises its own exception type
            return f"tokenizer.json: {err}"
    return None


def saved_shapes(staging: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Saved name -> (shape, dtype) of the staged weights: what the committed folder must hold."""
    shapes = {}
    for file in sorted(staging.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                shapes[key] = (tuple(piece.get_shape()), piece.get_dtype())
    return shapes


def delete_state(out: Path, state_file: str) -> None:
    """The last step of a finish: nothing left to resume."""
    fault_point(f"delete {state_file}")
    (out / state_file).unlink(missing_ok=True)
    fsync_path(out)
