"""`attach`: turn a stock LLaVA / LLaVA-OneVision model into a CLI model equal to it at init.

Equality holds because every injection is scaled by `tanh(alpha)` with `alpha = 0`, and the
base's own weights and forward pass are untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

from cliviz.errors import CLIVizError
from cliviz.model.configuration import FUSIONS, CLIConfig
from cliviz.model.modeling import BASE_CLASSES, CLIForConditionalGeneration
from cliviz.model.safety import no_stdin, refuse_remote_code

# Files next to the weights that a user's tokenizer/processor needs; copied as they are.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


def attach(
    base: LlavaForConditionalGeneration | LlavaOnevisionForConditionalGeneration,
    fusion: str = "cli",
    vision_layers: list[int] | None = None,
    injection_layers: list[int] | None = None,
    lora_rank: int = 8,
    gate_temperature: float = 1.0,
    read_width: int | None = None,
    read_heads: int | None = None,
    read_position_code: bool = True,
) -> CLIForConditionalGeneration:
    """Wrap `base` (its modules are re-used, not copied) in a CLI model with the light read. Example::

    base = LlavaForConditionalGeneration.from_pretrained("assets/models/llava-tiny-base", use_safetensors=True,
                                                         trust_remote_code=False)
    model = attach(base, vision_layers=[2, 4, 6])
    """
    if base.config.model_type not in BASE_CLASSES:
        raise CLIVizError(f"cannot attach to model_type {base.config.model_type!r}; expected llava or llava_onevision")
    config = CLIConfig(
        base_config=base.config,
        fusion=fusion,
        vision_layers=vision_layers,
        injection_layers=injection_layers,
        lora_rank=lora_rank,
        gate_temperature=gate_temperature,
        read_width=read_width,
        read_heads=read_heads,
        read_position_code=read_position_code and fusion in ("cli", "shallow"),
    )
    model = CLIForConditionalGeneration(config, base=base)
    # PreTrainedModel.to is wrapped by functools.wraps, which typeshed does not type as a method
    return model.to(dtype=base.dtype, device=base.device).eval()  # type: ignore[call-arg]


def attach_folder(base_dir: Path, out: Path, **options) -> CLIForConditionalGeneration:
    """`cliviz attach`: load a local LLaVA folder (safetensors only), attach CLI, save to `out`.
    A folder that asks for its own code to run is refused first (`safety.refuse_remote_code`)."""
    refuse_remote_code(base_dir)
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise CLIVizError(f"base model folder {base_dir} has no config.json")
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as err:
        raise CLIVizError(f"unreadable {config_path}: {err}") from None
    if model_type not in (*BASE_CLASSES, CLIConfig.model_type):
        raise CLIVizError(f"{base_dir} holds model_type {model_type!r}; cliviz attaches to llava or llava_onevision")
    if options.get("fusion", "cli") not in FUSIONS:
        raise CLIVizError(f"unknown fusion {options['fusion']!r}; choose one of {', '.join(FUSIONS)}")
    if not any(base_dir.glob("*.safetensors")):
        raise CLIVizError(f"{base_dir} has no .safetensors weights (pickled weights are never loaded)")
    try:
        with no_stdin():
            base = _load_base(base_dir, model_type)
        model = attach(base, **options)
    except (ValueError, OSError, RuntimeError) as err:
        raise CLIVizError(f"cannot attach to {base_dir}: {str(err).splitlines()[0]}") from None
    save_folder(model, base_dir, out)
    return model


def save_folder(model: CLIForConditionalGeneration, base_dir: Path, out: Path) -> None:
    """Write the attached model into `out` as `train` finishes a run: assembled in a hidden staging
    folder, renamed file by file into `out`, verified; a full disk is one CLIVizError and leaves
    whatever `out` held before untouched."""
    from safetensors import SafetensorError

    from cliviz.atomic import write_error
    from cliviz.train import saving

    out.mkdir(parents=True, exist_ok=True)
    staging = saving.staging_folder(out)
    try:
        state = model.state_dict()
        from cliviz.atomic import check_free_space

        check_free_space(out, saving.model_bytes(state, model.dtype), "attached model")
        with saving.quiet_progress():
            model.save_pretrained(staging)
        for name in SIDE_FILES:
            if (base_dir / name).is_file() and name != "generation_config.json":
                shutil.copy2(base_dir / name, staging / name)
        _ensure_fast_tokenizer(base_dir, staging)
        expected = saving.saved_shapes(staging)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        reason = write_error(err) if isinstance(err, OSError) else str(err)
        raise CLIVizError(f"cannot write the attached model into {out}: {reason}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    saving.commit(staging, out)
    saving.verify_model_folder(out, expected)


def _load_base(
    base_dir: Path, model_type: str
) -> LlavaForConditionalGeneration | LlavaOnevisionForConditionalGeneration:
    """The LLaVA model in `base_dir`: a stock folder, or the base inside a cliviz `projector` model (a
    stage-2 model of the staged recipe gets CLI attached the same way as a downloaded LLaVA)."""
    if model_type in BASE_CLASSES:
        return BASE_CLASSES[model_type].from_pretrained(base_dir, use_safetensors=True, trust_remote_code=False)
    wrapped = CLIForConditionalGeneration.from_pretrained(base_dir, use_safetensors=True, trust_remote_code=False)
    if wrapped.config.fusion != "projector":
        raise CLIVizError(
            f"{base_dir} is a cliviz {wrapped.config.fusion} model; attach takes a LLaVA or a projector model"
        )
    return wrapped.base


def carried_files(out: Path) -> list[str]:
    """The tokenizer, chat-template and processor files an attached folder holds."""
    return [name for name in SIDE_FILES if (out / name).is_file() and name != "generation_config.json"]


def _ensure_fast_tokenizer(base_dir: Path, out: Path) -> None:
    """A base whose tokenizer exists only in slow form (e.g. `tokenizer.model`) is converted once,
    so that `out` has the `tokenizer.json` that `load_model` requires."""
    slow = [n for n in ("tokenizer.model", "vocab.json", "vocab.txt") if (base_dir / n).is_file()]
    if (out / "tokenizer.json").is_file() or not slow:
        return
    from transformers import AutoTokenizer

    try:
        with no_stdin():
            AutoTokenizer.from_pretrained(base_dir, local_files_only=True, trust_remote_code=False).save_pretrained(out)
    except Exception as err:  # noqa: BLE001 - tokenizers/sentencepiece raise many types
        raise CLIVizError(
            f"cannot convert the tokenizer in {base_dir} ({', '.join(slow)}) to tokenizer.json: {err}"
        ) from None
