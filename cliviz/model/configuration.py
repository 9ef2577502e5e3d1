"""`CLIConfig`: a transformers config that wraps a LLaVA-family config and adds CLI's knobs.

Kept as a plain `PretrainedConfig` so that `save_pretrained`/`from_pretrained` work on a local
folder exactly as users of transformers expect (config.json + model.safetensors).
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, LlavaConfig, LlavaOnevisionConfig, PretrainedConfig

FUSIONS = ("projector", "shallow", "deepstack", "cli")
BASE_CONFIGS = {"llava": LlavaConfig, "llava_onevision": LlavaOnevisionConfig}
RUNTIME_ONLY = ("image_processor",)  # attributes set after loading, never serialised


class CLIConfig(PretrainedConfig):
    """Config of a Cross-Layer-Injection model.

    Args:
        base_config: the wrapped LLaVA / LLaVA-OneVision config (object or dict).
        fusion: one of `projector`, `shallow`, `deepstack`, `cli`.
        vision_layers: indices into the vision tower's `hidden_states` (0 = patch embedding).
        injection_layers: LLM decoder layers whose *input* receives the injection.
        lora_rank: rank of the per-vision-layer LoRA in AMP.
        gate_temperature: softmax temperature of the AGF gate.
        read_heads: heads of the AGF multi-head read (default: the LLM's attention heads).
    """

    model_type = "cliviz_cli"
    sub_configs = {"base_config": AutoConfig}

    def __init__(
        self,
        base_config: PretrainedConfig | dict[str, Any] | None = None,
        fusion: str = "cli",
        vision_layers: list[int] | None = None,
        injection_layers: list[int] | None = None,
        lora_rank: int = 8,
        gate_temperature: float = 1.0,
        read_heads: int | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(base_config, dict):
            base_type = base_config.get("model_type", "llava")
            if base_type not in BASE_CONFIGS:
                raise ValueError(f"unsupported base model_type {base_type!r}; expected one of {sorted(BASE_CONFIGS)}")
            base_config = BASE_CONFIGS[base_type](**base_config)
        elif base_config is None:
            base_config = LlavaConfig()
        else:
            # PretrainedConfig.__init__ rewrites sub-configs (e.g. the attention implementation);
            # never let that reach the config object a live base model is still using.
            base_config = copy.deepcopy(base_config)
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {', '.join(FUSIONS)}")
        self.base_config = base_config
        self.fusion = fusion
        n_vision = base_config.vision_config.num_hidden_layers
        n_text = base_config.text_config.num_hidden_layers
        if vision_layers is None:
            vision_layers = [n_vision] if fusion == "deepstack" else list(range(1, n_vision + 1))
        if injection_layers is None:
            injection_layers = [] if fusion == "projector" else list(range(1, n_text))
        self.vision_layers = [int(k) for k in vision_layers]
        self.injection_layers = [int(i) for i in injection_layers]
        for k in self.vision_layers:
            if not 0 <= k <= n_vision:
                raise ValueError(f"vision layer {k} outside 0..{n_vision}")
        for i in self.injection_layers:
            if not 0 <= i < n_text:
                raise ValueError(f"injection layer {i} outside 0..{n_text - 1}")
        self.lora_rank = int(lora_rank)
        self.gate_temperature = float(gate_temperature)
        self.read_heads = int(read_heads or base_config.text_config.num_attention_heads)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """As transformers serialises it, minus runtime-only attributes.

        `load_model` may set `image_processor` (the checkpoint's transformers image processor) on the
        config object so that every consumer of `pixel_values(images, config)` reaches it; it lives
        in `preprocessor_config.json` next to the weights, so it never goes into config.json or the
        config hash.
        """
        out = super().to_dict()
        for key in RUNTIME_ONLY:
            out.pop(key, None)
        return out

    @property
    def base_model_type(self) -> str:
        return self.base_config.model_type

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        return self.base_config.get_text_config()

    def shallow_map(self) -> list[int]:
        """Position in `vision_layers` that each injection layer reads in the static one-to-one wiring.

        Shallow LLM layers read shallow vision layers, spread evenly: the wiring the paper's
        "shallow-layer injection" baseline uses.
        """
        n_inj, k = len(self.injection_layers), len(self.vision_layers)
        if n_inj <= 1:
            return [0] * n_inj
        return [round(j * (k - 1) / (n_inj - 1)) for j in range(n_inj)]
