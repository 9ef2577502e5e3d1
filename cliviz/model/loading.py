"""Load a CLI model folder (config.json + model.safetensors + tokenizer) with clear errors."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoTokenizer

from cliviz.errors import CLIVizError
from cliviz.model.configuration import CLIConfig
from cliviz.model.modeling import CLIForConditionalGeneration
from cliviz.runtime import resolve_device

DEFAULT_MODEL = "cli-tiny"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def bundled_models_dir() -> Path:
    """`assets/models/` in a checkout, or inside the installed wheel."""
    return Path(str(resources.files("cliviz.assets"))) / "models"


def resolve_model_dir(path: str | Path | None) -> Path:
    """`None` -> the bundled cli-tiny; a bare bundled name (e.g. `projector-tiny`) also works."""
    if path is None:
        return bundled_models_dir() / DEFAULT_MODEL
    path = Path(path)
    if not path.exists() and (bundled_models_dir() / path.name).exists() and len(path.parts) == 1:
        return bundled_models_dir() / path.name
    return path


def check_model_dir(path: Path) -> CLIConfig:
    """Refuse missing, incomplete or foreign folders before transformers sees them."""
    if not path.exists():
        raise CLIVizError(f"model folder not found: {path}")
    if not path.is_dir():
        raise CLIVizError(f"model path is not a folder: {path}")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        hint = " (weights must be safetensors)" if "model.safetensors" in missing and (path / "pytorch_model.bin").exists() else ""
        raise CLIVizError(f"model folder {path} is incomplete: missing {', '.join(missing)}{hint}")
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CLIVizError(f"model folder {path} has an unreadable config.json ({err})") from None
    if raw.get("model_type") != CLIConfig.model_type:
        raise CLIVizError(
            f"{path} is not a cliviz CLI model (model_type={raw.get('model_type')!r}); "
            "turn a LLaVA checkpoint into one with `cliviz attach`"
        )
    try:
        return CLIConfig.from_pretrained(path)
    except (ValueError, TypeError, KeyError) as err:
        raise CLIVizError(f"model folder {path} has an invalid config: {err}") from None


def load_model(
    path: str | Path | None = None, device: str = "auto", dtype: str = "auto"
) -> tuple[CLIForConditionalGeneration, object]:
    """Load model + tokenizer in eval mode. Example::

        model, tokenizer = load_model()              # bundled cli-tiny on the best device
        model, tokenizer = load_model("assets/models/projector-tiny", device="cpu")
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = resolve_model_dir(path)
    config = check_model_dir(folder)
    dev, dt = resolve_device(device, dtype)
    try:
        model, info = CLIForConditionalGeneration.from_pretrained(
            folder, config=config, use_safetensors=True, dtype=dt, output_loading_info=True
        )
    except (OSError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIVizError(f"cannot load weights from {folder}: {first}") from None
    problems = [f"{k}: {', '.join(v[:3])}" for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v]
    if problems:
        raise CLIVizError(f"weights in {folder} do not match its config ({'; '.join(problems)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # tokenizers raises a zoo of types on a broken file
        raise CLIVizError(f"cannot load the tokenizer in {folder}: {err}") from None
    if len(tokenizer) > config.base_config.text_config.vocab_size:
        raise CLIVizError(f"tokenizer in {folder} has {len(tokenizer)} tokens, more than the model's vocabulary")
    model.name_or_path = str(folder)
    return model.to(dev).eval(), tokenizer


@torch.no_grad()
def config_hash(model: CLIForConditionalGeneration) -> str:
    import hashlib

    return hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
