"""Check a model folder's config.json before anything is built from it.

transformers trusts its configs: a `num_attention_heads` of 0 divides by zero, a string `hidden_size`
fails deep in a module, `num_hidden_layers: 1000000` allocates for minutes, an `image_token_index`
past the vocabulary is an IndexError at the first question. Here every field cliviz relies on is
checked for type and range, with limits far above any real checkpoint (7B-72B LLaVA-1.5 and
LLaVA-OneVision: hidden sizes to 16k, 80-odd layers, vocabularies to 250k), and the first wrong
field is named by its path (`base_config.text_config.num_attention_heads`).

Only known fields are checked, and only when present (transformers fills in defaults for absent
ones); unknown keys are left alone, so fields added to the cliviz config later pass through.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TypeGuard

from cliviz.errors import CLIVizError
from cliviz.model.safety import read_bounded_json

MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32
MAX_PARAMETERS = 1e12  # ten times the largest LLaVA-family checkpoint

FUSIONS = ("projector", "shallow", "deepstack", "cli")  # as cliviz.model.configuration.FUSIONS
BASE_TYPES = ("llava", "llava_onevision")

# field -> (lowest, highest) for integer fields; checked wherever the sub-config holds them.
TEXT_INTS = {
    "hidden_size": (1, 65_536),
    "intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 256),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 4096),
    "vocab_size": (1, 2_000_000),
    "max_position_embeddings": (1, 1 << 25),
}
VISION_INTS = {
    "hidden_size": (1, 32_768),
    "intermediate_size": (1, 1 << 19),
    "num_hidden_layers": (1, 256),
    "num_attention_heads": (1, 1024),
    "image_size": (1, 8192),
    "patch_size": (1, 8192),
    "num_channels": (3, 3),
}
EPSILONS = ("rms_norm_eps", "layer_norm_eps")
MAX_PATCHES = 1 << 16  # image tokens per crop
MAX_PINPOINTS = 1024


class ConfigProblem(CLIVizError):
    """One wrong field of a config, named by its dotted path."""


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict, after the size / syntax / nesting / finiteness checks and `validate_config`."""
    raw = read_bounded_json(path, MAX_CONFIG_BYTES, "a model config")
    try:
        validate_config(raw)
    except ConfigProblem as err:
        raise CLIVizError(f"{path}: {err}") from None
    return raw


def validate_config(raw: Any) -> None:
    """Raise `ConfigProblem` naming the first field of a cliviz config dict that cannot be right."""
    if not isinstance(raw, dict):
        raise ConfigProblem(f"the config must be a JSON object, not {_kind(raw)}")
    _check_tree(raw, "", 0)
    if raw.get("model_type") != "cliviz_cli":
        raise ConfigProblem(
            f"model_type is {raw.get('model_type')!r}, not 'cliviz_cli': not a cliviz CLI model "
            "(turn a LLaVA checkpoint into one with `cliviz attach`)"
        )
    base = _object(raw, "base_config", "")
    base_type = base.get("model_type", "llava")
    if base_type not in BASE_TYPES:
        raise ConfigProblem(f"base_config.model_type is {base_type!r}; expected one of {', '.join(BASE_TYPES)}")
    text = _object(base, "text_config", "base_config.")
    vision = _object(base, "vision_config", "base_config.")
    _check_text(text, "base_config.text_config.")
    _check_vision(vision, "base_config.vision_config.")
    _check_base(base, text, vision, "base_config.")
    _check_cli(raw, text, vision)
    _check_size(text, vision)


# ----------------------------------------------------------------------------------------- parts


def _check_text(cfg: dict, where: str) -> None:
    _model_type(cfg, where)
    for name, (lo, hi) in TEXT_INTS.items():
        _int(cfg, name, where, lo, hi)
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise ConfigProblem(f"{where}num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    hidden = cfg.get("hidden_size")
    if cfg.get("head_dim") is None and isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise ConfigProblem(f"{where}hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    _epsilons(cfg, where)
    _activation(cfg, "hidden_act", where)
    _positive_float(cfg, "rope_theta", where)


def _check_vision(cfg: dict, where: str) -> None:
    _model_type(cfg, where)
    for name, (lo, hi) in VISION_INTS.items():
        _int(cfg, name, where, lo, hi)
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise ConfigProblem(f"{where}hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    size, patch = cfg.get("image_size"), cfg.get("patch_size")
    if isinstance(size, int) and isinstance(patch, int):
        if patch > size:
            raise ConfigProblem(f"{where}patch_size ({patch}) is larger than image_size ({size})")
        if (size // patch) ** 2 > MAX_PATCHES:
            raise ConfigProblem(
                f"{where}image_size / patch_size gives {(size // patch) ** 2:,} patches (limit {MAX_PATCHES:,})"
            )
    _epsilons(cfg, where)
    _activation(cfg, "hidden_act", where)


def _check_base(base: dict, text: dict, vision: dict, where: str) -> None:
    vocab = text.get("vocab_size")
    # video tokens are never fed (cliviz asks about images) and tiny OneVision configs keep the 151k default
    for name in ("image_token_index", "image_token_id"):
        _int(base, name, where, 0, (vocab - 1) if isinstance(vocab, int) else 2_000_000)
    n_vision = vision.get("num_hidden_layers")
    if "vision_feature_layer" in base:
        layer = base["vision_feature_layer"]
        if not _is_int(layer):
            raise ConfigProblem(
                f"{where}vision_feature_layer must be one integer (CLI reuses the LLaVA projector), got {_show(layer)}"
            )
        if _is_int(n_vision) and not -(n_vision + 1) <= layer <= n_vision:
            raise ConfigProblem(f"{where}vision_feature_layer {layer} is outside -{n_vision + 1}..{n_vision}")
    strategy = base.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigProblem(f"{where}vision_feature_select_strategy must be 'default' or 'full', got {_show(strategy)}")
    _activation(base, "projector_hidden_act", where)
    _int(base, "image_seq_length", where, 0, 1 << 20)
    if "image_grid_pinpoints" in base:
        _pinpoints(base["image_grid_pinpoints"], f"{where}image_grid_pinpoints")


def _check_cli(raw: dict, text: dict, vision: dict) -> None:
    fusion = raw.get("fusion", "cli")
    if fusion not in FUSIONS:
        raise ConfigProblem(f"fusion must be one of {', '.join(FUSIONS)}, got {_show(fusion)}")
    n_vision, n_text = vision.get("num_hidden_layers"), text.get("num_hidden_layers")
    vision_layers = _int_list(raw, "vision_layers", 0, n_vision)
    _int_list(raw, "injection_layers", 0, n_text - 1 if _is_int(n_text) else None)
    if fusion != "projector" and vision_layers is not None and not vision_layers:
        raise ConfigProblem(f"vision_layers is empty, but fusion {fusion!r} reads vision layers")
    _int(raw, "lora_rank", "", 1, 65_536)
    if raw.get("read_heads") is not None:
        _int(raw, "read_heads", "", 1, 4096)
    if "gate_temperature" in raw:
        tau = raw["gate_temperature"]
        if not _is_number(tau) or not 1e-3 <= tau <= 1e3:
            raise ConfigProblem(
                f"gate_temperature must be a number in 0.001..1000 (the gate divides by it), got {_show(tau)}"
            )


def _check_size(text: dict, vision: dict) -> None:
    """Refuse configs that describe an absurd model even when each field is within its own range."""

    def get(cfg: dict, name: str, default: int) -> float:
        value = cfg.get(name, default)
        return float(value) if _is_int(value) else float(default)

    h, i, n, v = (
        get(text, "hidden_size", 4096),
        get(text, "intermediate_size", 11008),
        get(text, "num_hidden_layers", 32),
        get(text, "vocab_size", 32000),
    )
    hv, iv = get(vision, "hidden_size", 1024), get(vision, "intermediate_size", 4096)
    nv = get(vision, "num_hidden_layers", 24)
    total = n * (4 * h * h + 3 * h * i) + 2 * v * h + nv * (4 * hv * hv + 2 * hv * iv)
    if total > MAX_PARAMETERS:
        raise ConfigProblem(
            f"the config describes a model of about {total:.2g} parameters, beyond any real "
            f"checkpoint (limit {MAX_PARAMETERS:.0g})"
        )


# ----------------------------------------------------------------------------------------- helpers


def _check_tree(value: Any, path: str, depth: int) -> None:
    """Nesting depth and finite numbers everywhere (JSON has no NaN; Python's parser accepts it)."""
    if depth > MAX_DEPTH:
        raise ConfigProblem(f"{path or 'the config'} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigProblem(f"{path} is {value}, not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_tree(item, f"{path}.{key}" if path else str(key), depth + 1)
    elif isinstance(value, list):
        for k, item in enumerate(value):
            _check_tree(item, f"{path}[{k}]", depth + 1)


def _object(cfg: dict, name: str, where: str) -> dict:
    value = cfg.get(name)
    if not isinstance(value, dict):
        raise ConfigProblem(f"{where}{name} must be a JSON object, got {_show(value)}")
    return value


def _model_type(cfg: dict, where: str) -> None:
    kind = cfg.get("model_type")
    if kind is None:
        return
    from transformers import CONFIG_MAPPING

    if not isinstance(kind, str) or kind not in CONFIG_MAPPING:
        raise ConfigProblem(f"{where}model_type {_show(kind)} is not a model type transformers knows")


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(cfg: dict, name: str, where: str, lo: int, hi: int) -> None:
    if name not in cfg or (cfg[name] is None and name in ("head_dim", "num_key_value_heads", "image_token_id")):
        return
    value = cfg[name]
    if not _is_int(value):
        raise ConfigProblem(f"{where}{name} must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise ConfigProblem(f"{where}{name} is {value:,}, outside {lo:,}..{hi:,}")


def _int_list(cfg: dict, name: str, lo: int, hi: Any) -> list[int] | None:
    if name not in cfg or cfg[name] is None:
        return None
    values = cfg[name]
    if not isinstance(values, list) or not all(_is_int(v) for v in values):
        raise ConfigProblem(f"{name} must be a list of integers, got {_show(values)}")
    if _is_int(hi):
        bad = [v for v in values if not lo <= v <= hi]
        if bad:
            raise ConfigProblem(f"{name} holds {bad[0]}, outside {lo}..{hi}")
    if len(set(values)) != len(values):
        raise ConfigProblem(f"{name} lists a layer twice: {values}")
    return values


def _epsilons(cfg: dict, where: str) -> None:
    for name in EPSILONS:
        if name in cfg and not (_is_number(cfg[name]) and 0 < cfg[name] < 1):
            raise ConfigProblem(f"{where}{name} must be a number between 0 and 1, got {_show(cfg[name])}")


def _positive_float(cfg: dict, name: str, where: str) -> None:
    if name in cfg and cfg[name] is not None and not (_is_number(cfg[name]) and cfg[name] > 0):
        raise ConfigProblem(f"{where}{name} must be a positive number, got {_show(cfg[name])}")


def _activation(cfg: dict, name: str, where: str) -> None:
    if name not in cfg:
        return
    from transformers.activations import ACT2CLS

    if not isinstance(cfg[name], str) or cfg[name] not in ACT2CLS:
        raise ConfigProblem(f"{where}{name} {_show(cfg[name])} is not an activation transformers knows")


def _pinpoints(value: Any, where: str) -> None:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PINPOINTS:
        raise ConfigProblem(f"{where} must be a list of 1..{MAX_PINPOINTS} [height, width] pairs, got {_show(value)}")
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(x) and 1 <= x <= 16_384 for x in pair)):
            raise ConfigProblem(f"{where} holds {_show(pair)}, not a [height, width] pair of sizes 1..16384")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number"
    )


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
