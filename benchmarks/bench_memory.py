"""Memory at 7B width without a GPU: live-tensor bytes counted on the CPU, extrapolated per layer.

A `TorchDispatchMode` sees every tensor an operator returns; each new storage is counted until its
last tensor dies, and the peak is kept. Weights built before the count are not counted, so the
figures are activations, caches, logits and gradients — what comes on top of the weights.

Models: a Llama at LLaVA-1.5-7B width (hidden 4096, MLP 11008, 32 heads, 32k vocabulary) with 2 and 3
decoder layers, a CLIP-L/14-336-shaped tower (1024 wide, 577 tokens) with 2 layers, CLI attached
(every vision layer, every LLM layer but the first: 1 and 2 AGF layers), weights stored in bfloat16.
The difference between the two gives the bytes of one LLM layer and of one AGF layer (the base alone,
injection off, separates them); a 32-layer model is the 2-layer one plus 30 such layers.

Phases: `prefill` (one forward, no gradient), `trace` (`cliviz.trace`, a few new tokens, every gate
recorded, causal check included), `ablate` (the batched engine: reference + injection off + two
knockouts, one sample), `train` (one CLI-only training step: bf16 base, fp32 CLI weights, bf16
autocast, loss on the answer tokens; with and without `--gradient-checkpointing`).

    python benchmarks/bench_memory.py            # a few minutes on a loaded 2-core CPU
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import weakref  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

MB = 2**20


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode while any of their tensors lives; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}  # storage pointer -> live tensors on it
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, size
            self.current += size
            self.peak = max(self.peak, self.current)
        self.refs[key] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.sizes.pop(key)
            del self.refs[key]


def build(llm_layers: int, vision_layers: int, seed: int = 0):
    """(CLI model, tokenizer) at LLaVA-1.5-7B width, bf16 weights, `llm_layers` decoder layers."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from cliviz.data.tokenizer import build_tokenizer
    from cliviz.model.attach import attach

    torch.manual_seed(seed)
    tok = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=vision_layers,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=llm_layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.device("meta"):
        base = LlavaForConditionalGeneration(cfg)
    base = base.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0, 0.02)
        base.lm_head.weight[len(tok) :] = 0  # answers stay inside the small tokenizer's words
    cli = attach(base).eval()
    with torch.no_grad():
        for layer in cli.agf:
            layer.injection.alpha.fill_(0.5)
    return cli, tok


def sample_inputs(model, tok, answer_tokens: int):
    from PIL import Image

    from cliviz.inference import prepare_inputs

    image = Image.new("RGB", (336, 336), (120, 60, 200))
    inputs = prepare_inputs(model, tok, [image], ["what color is the triangle ?"])
    answer = torch.full((1, answer_tokens), tok.convert_tokens_to_ids("red"))
    ids = torch.cat([inputs["input_ids"], answer], dim=1)  # [1, T]
    labels = torch.full_like(ids, -100)
    labels[:, -answer_tokens:] = answer
    return image, {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def measure(phase: str, model, tok, image, inputs, checkpointing: bool = False) -> int:
    """Peak live bytes of one phase on top of the weights."""
    from cliviz.train.loop import Trainee, chunked_cross_entropy
    from cliviz.train.setup import select_trainable

    counter = LiveBytes()
    if phase == "prefill":
        with torch.no_grad(), counter:
            model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=True)
    elif phase == "trace":
        from cliviz.tracing import trace

        with counter:
            trace(model, tok, image, "what color is the triangle ?", max_new_tokens=4)
    elif phase == "ablate":
        from cliviz.analyses.ablations import Ablation, score_conditions

        conditions = [None, Ablation("injection_off"), Ablation("knockout", None, [1]), Ablation("knockout", None, [2])]
        with counter:
            try:
                score_conditions(model, tok, [image], ["what color is the triangle ?"], None, conditions)
            except TypeError:  # every forward ran; only naming a token past the small vocabulary failed
                pass
    else:
        select_trainable(model, "cli")
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        trainee = Trainee(model, None, -1)
        # the base alone has nothing to train: a gradient from the embeddings on keeps its layers' activations
        # exactly as CLI's trained modules would
        embed = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_())
        try:
            with counter, torch.autocast("cpu", dtype=torch.bfloat16):
                out = trainee(inputs)
                labels = inputs["labels"][:, 1:][out["scored"][:, :-1]]
                loss = chunked_cross_entropy(out["logits"], labels)
                torch.autograd.backward(loss)
        finally:
            embed.remove()
        model.zero_grad(set_to_none=True)
        model.eval()
    return counter.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--phases", default="prefill,trace,ablate,train,train-gc")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    phases = args.phases.split(",")
    results: dict[tuple[str, int, str], int] = {}
    tokens = 0
    for layers in (2, 3):
        model, tok = build(layers, vision_layers=2)
        image, inputs = sample_inputs(model, tok, args.answer_tokens)
        tokens = inputs["input_ids"].shape[1]
        for phase in phases:
            for kind in ("base", "cli"):
                if kind == "base" and phase in ("trace", "ablate"):
                    continue  # need the injection; the LLM layer is taken from prefill/train
                import cliviz.model.modeling as modeling

                gc = phase == "train-gc"
                ctx_token = modeling._CURRENT.set(None)
                try:
                    if kind == "base":  # the base alone: hooks see no context, nothing injected
                        model._inject, saved = (lambda j, h, c: h), model._inject
                    peak = measure(phase.removesuffix("-gc"), model, tok, image, inputs, checkpointing=gc)
                finally:
                    modeling._CURRENT.reset(ctx_token)
                    if kind == "base":
                        model._inject = saved
                results[(phase, layers, kind)] = peak
                per_token = peak / tokens / 1024
                print(f"{phase:9s} L={layers} {kind:4s} peak {peak / MB:9.1f} MB  ({per_token:7.1f} KB/token)")
        del model
    print(f"\nper token at LLaVA-1.5-7B width ({tokens} tokens: 576 image + prompt + {args.answer_tokens} answer):")
    for phase in phases:
        one, two = results[(phase, 2, "cli")], results[(phase, 3, "cli")]
        line = f"{phase:9s} 2 layers {one / tokens / 1024:8.1f} KB"
        if (phase, 2, "base") in results:
            llm = results[(phase, 3, "base")] - results[(phase, 2, "base")]
            agf = (two - one) - llm
            line += f"  per LLM layer {llm / tokens / 1024:7.1f} KB  per AGF layer {agf / tokens / 1024:7.1f} KB"
            line += f"  -> 32 layers (31 AGF): {(one + 30 * (two - one)) / 2**30:6.2f} GB"
        else:
            line += f"  per LLM+AGF layer {(two - one) / tokens / 1024:7.1f} KB"
            line += f"  -> 32 layers: {(one + 30 * (two - one)) / 2**30:6.2f} GB"
        print(line)


if __name__ == "__main__":
    main()
