"""Load a CLI model folder (config.json + model.safetensors + tokenizer) with clear errors."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from cliviz.errors import CLIVizError
from cliviz.model.configuration import CLIConfig
from cliviz.model.modeling import CLIForConditionalGeneration
from cliviz.model.safety import no_stdin, refuse_remote_code
from cliviz.model.validation import read_config
from cliviz.model.weights import check_finite_parameters, check_weights
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
    """Refuse missing, incomplete, foreign, code-bearing or implausible folders before transformers sees them."""
    if not path.exists():
        raise CLIVizError(f"model folder not found: {path}")
    if not path.is_dir():
        raise CLIVizError(f"model path is not a folder: {path}")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        hint = (
            " (weights must be safetensors)"
            if "model.safetensors" in missing and (path / "pytorch_model.bin").exists()
            else ""
        )
        raise CLIVizError(f"model folder {path} is incomplete: missing {', '.join(missing)}{hint}")
    refuse_remote_code(path)
    read_config(path / "config.json")  # type and range of every field cliviz uses, before anything is built
    try:
        with no_stdin():
            return CLIConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - past validation, any failure is still this file's content
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIVizError(f"model folder {path} has an invalid config: {first}") from None


def load_model(
    path: str | Path | None = None, device: str = "auto", dtype: str = "auto"
) -> tuple[CLIForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load model + tokenizer in eval mode.

    A real LLaVA folder also brings its chat template (used by `processing.prompt_ids`) and its
    image processor, stored as `model.config.image_processor` (runtime-only, never saved) where
    `processing.pixel_values(images, model.config)` finds it. The folder's `generation_config.json`
    is never read: cliviz decides its own decoding (greedy, `inference.generation_kwargs`). Example::

        model, tokenizer = load_model()              # bundled cli-tiny on the best device
        model, tokenizer = load_model("assets/models/projector-tiny", device="cpu")
    """
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = resolve_model_dir(path)
    config = check_model_dir(folder)
    dev, dt = resolve_device(device, dtype)
    set_dtype(config, dt)
    check_weights(folder / "model.safetensors", config)
    try:
        with no_stdin():
            model, info = CLIForConditionalGeneration.from_pretrained(
                folder,
                config=config,
                use_safetensors=True,
                dtype=dt,
                device_map=dev,  # each tensor from the file straight to `dev`: no host copy of a GPU model
                output_loading_info=True,
                trust_remote_code=False,
                generation_config=GenerationConfig(do_sample=False, num_beams=1),
            )
    except Exception as err:  # noqa: BLE001 - the checks above cover the known cases; anything left is the folder's
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "above report" in first:  # transformers points at a report it logged, which cliviz keeps quiet
            first = "transformers refused them (weights and config.json do not match)"
        raise CLIVizError(f"cannot load weights from {folder / 'model.safetensors'}: {first}") from None
    problems = [
        f"{k}: {', '.join(sorted(v)[:3])}"
        for k, v in info.items()
        if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    ]
    if problems:
        raise CLIVizError(f"weights in {folder} do not match its config ({'; '.join(problems)})")
    tokenizer = load_tokenizer(folder, config)
    processor = load_image_processor(folder, config)
    if processor is not None:
        model.config.image_processor = processor  # runtime-only: see `processing.image_processor`
    model.name_or_path = str(folder)
    model = model.to(dev).eval()
    check_finite_parameters(model, folder / "model.safetensors")
    return model, tokenizer


def set_dtype(config: CLIConfig, dtype: torch.dtype) -> None:
    """The requested dtype on the config and every config nested in it.

    transformers builds each sub-model (vision tower, LLM) in its own sub-config's dtype, and a
    checkpoint saved in float16 records float16 in each of them: setting the top level alone
    would leave part of the model in float16 ("mat1 and mat2 must have the same dtype").
    """
    stack: list[PretrainedConfig] = [config]
    while stack:
        cfg = stack.pop()
        cfg.dtype = dtype
        stack += [value for value in vars(cfg).values() if isinstance(value, PretrainedConfig)]


def load_tokenizer(folder: Path, config: CLIConfig) -> PreTrainedTokenizerBase:
    """The folder's tokenizer, checked against the model's vocabulary, with its chat template.

    The config is passed in: AutoConfig does not know `cliviz_cli`, and without it AutoTokenizer
    falls back to a generic config and warns that the model type does not match.
    """
    try:
        with no_stdin():
            tokenizer = AutoTokenizer.from_pretrained(
                folder, config=config, trust_remote_code=False, local_files_only=True
            )
    except Exception as err:  # noqa: BLE001 - tokenizers raises a zoo of types on a broken file
        raise CLIVizError(f"cannot load the tokenizer in {folder}: {err}") from None
    if len(tokenizer) > config.base_config.text_config.vocab_size:
        raise CLIVizError(f"tokenizer in {folder} has {len(tokenizer)} tokens, more than the model's vocabulary")
    load_chat_template(folder, tokenizer)
    return tokenizer


def load_chat_template(folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer the folder's chat template when only the processor file holds it.

    transformers reads `chat_template.jinja` (and `tokenizer_config.json`) into the tokenizer;
    older LLaVA checkpoints keep theirs in the processor's `chat_template.json` only.
    """
    legacy = folder / "chat_template.json"
    if getattr(tokenizer, "chat_template", None) or not legacy.is_file():
        return
    try:
        template = json.loads(legacy.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise CLIVizError(f"unreadable {legacy} ({err})") from None
    if isinstance(template, str) and template.strip():
        tokenizer.chat_template = template


def has_image_processor_config(folder: Path) -> bool:
    """`preprocessor_config.json` (hub LLaVA checkpoints), or an `image_processor` entry inside
    `processor_config.json` (where transformers 5 `LlavaProcessor.save_pretrained` puts it)."""
    if (folder / "preprocessor_config.json").is_file():
        return True
    path = folder / "processor_config.json"
    try:
        return path.is_file() and isinstance(json.loads(path.read_text(encoding="utf-8")).get("image_processor"), dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise CLIVizError(f"unreadable {path} ({err})") from None


def load_image_processor(folder: Path, config: CLIConfig):
    """The checkpoint's image processor (see `has_image_processor_config`), or None when it has none.

    Bundled tiny models have none and keep their own [-1, 1] scaling. LLaVA: the processor must
    turn any image, square or not, into the tower's `S x S`. LLaVA-OneVision cannot run without
    its anyres processor (crops and `image_sizes`), so a OneVision folder must have one. The PIL
    implementation is asked for by name: it needs no torchvision, and transformers itself prefers
    it for these processors to keep outputs identical.
    """
    onevision = config.base_model_type == "llava_onevision"
    if not has_image_processor_config(folder):
        if onevision:
            raise CLIVizError(
                f"{folder} is a LLaVA-OneVision model without its image processor: copy the base "
                "checkpoint's preprocessor_config.json (and processor_config.json) into it"
            )
        return None
    from PIL import Image
    from transformers import AutoImageProcessor

    try:
        with no_stdin():
            processor = AutoImageProcessor.from_pretrained(
                folder, local_files_only=True, backend="pil", trust_remote_code=False
            )
    except Exception as err:  # noqa: BLE001 - unknown class, remote code, broken JSON: all one message
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIVizError(f"cannot load the image processor in {folder}: {first}") from None
    size = int(config.base_config.vision_config.image_size)
    if onevision and not getattr(processor, "image_grid_pinpoints", None):
        raise CLIVizError(
            f"the image processor in {folder} is {type(processor).__name__}, not LLaVA-OneVision's anyres processor"
        )
    try:
        shape = tuple(processor(Image.new("RGB", (2 * size, size)), return_tensors="pt")["pixel_values"].shape)
    except Exception as err:  # noqa: BLE001 - a processor may fail on the test image in any way
        raise CLIVizError(f"the image processor in {folder} fails on a test image: {err}") from None
    crop = shape[-3:] if onevision else shape
    want = (3, size, size) if onevision else (1, 3, size, size)
    if crop != want:
        raise CLIVizError(
            f"the image processor in {folder} makes pixel_values {list(shape)}, but the vision tower "
            f"expects {'crops of ' if onevision else ''}{list(want)} (check size/crop_size in preprocessor_config.json)"
        )
    return processor


@torch.no_grad()
def config_hash(model: CLIForConditionalGeneration) -> str:
    import hashlib

    return hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
