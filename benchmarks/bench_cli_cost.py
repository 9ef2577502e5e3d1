"""What CLI costs on top of its base, with `cliviz attach`'s defaults (every vision layer, every
LLM layer but the first):

1. parameters added to LLaVA-1.5-7B, LLaVA-OV-0.5B and LLaVA-OV-7B (configs built here, models
   instantiated on the meta device: nothing is downloaded or allocated) — target <= 1%;
2. analytic FLOPs per decoded token, CLI's extra over the base decode, at each model's image-token
   count — target <= +10%; checked against torch's `FlopCounterMode` on the mid-size model;
3. the read's key/value cache per image (bf16);
4. measured `generate` time CLI / base on a mid-size random LLaVA (CLIP 24 layers, 144 patches,
   Llama 8 x 512, vocab 32k), 64 new tokens, interleaved, medians — target <= 1.3x;
5. trace / plain generate on that model, 128 new tokens — target <= 1.05x.

The full read of the first design (`agf_read="full"`, D-wide maps per layer, keys/values of the
memory recomputed at every token) is shown beside the light read for comparison.

    python benchmarks/bench_cli_cost.py --repeats 7
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch: idle OpenMP threads must not spin on a shared box
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

PARAM_TARGET, FLOP_TARGET, TIME_TARGET, TRACE_TARGET = 0.01, 0.10, 1.3, 1.05


# ================================================================================ real shapes


def llava15_7b():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def onevision(size: str):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
    )
    if size == "0.5b":
        text = Qwen2Config(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151647,
            tie_word_embeddings=True,
        )
    else:
        text = Qwen2Config(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152128,
            tie_word_embeddings=False,
        )
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=151646,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def image_tokens(base, size: tuple[int, int] | None) -> int:
    """Image features the LLM reads for one image: fixed for LLaVA, by image size for OneVision."""
    from types import SimpleNamespace

    from cliviz.model.processing import n_image_tokens, onevision_token_count

    cfg = SimpleNamespace(base_config=base, base_model_type=base.model_type)
    return n_image_tokens(cfg) if size is None else onevision_token_count(cfg, size)


def count_params(base, agf_read: str) -> tuple[int, int, object]:
    """(base parameters, CLI parameters, CLI config), instantiated on the meta device."""
    from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    from cliviz.model import CLIConfig, CLIForConditionalGeneration

    classes = {"llava": LlavaForConditionalGeneration, "llava_onevision": LlavaOnevisionForConditionalGeneration}
    with torch.device("meta"):
        plain = classes[base.model_type](base)
        config = CLIConfig(base_config=base, agf_read=agf_read, amp_norm=agf_read == "full")
        cli = CLIForConditionalGeneration(config)
    return sum(p.numel() for p in plain.parameters()), sum(p.numel() for p in cli.parameters()), config


def read_positions(config, n_memory: int) -> int:
    """Memory positions the read attends over: the light read pools to `read_max_tokens`."""
    cap = config.read_max_tokens if config.agf_read == "light" else None
    return n_memory if cap is None else min(n_memory, cap)


def decode_flops(config, n_memory: int, context: int) -> tuple[float, float]:
    """(base, CLI extra) FLOPs for one decoded token; a multiply-add counts 2.

    Base: every LLM weight once (embedding lookup excluded, LM head included) plus attention over
    the `context` tokens. CLI, per injection layer: two LayerNorms, gate (D -> K), query (D -> r),
    attention over the K x N memory (scores and weighted sum), the K-way mix and W_o (r -> D). The
    full read also re-projects the memory's keys and values (2 x K x N x D x D) at every token.
    """
    text = config.base_config.text_config
    d, n_layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    kv_dim = d // text.num_attention_heads * text.num_key_value_heads
    per_layer = 2 * (d * d * 2 + d * kv_dim * 2 + 3 * d * text.intermediate_size)  # q,o + k,v + MLP
    base = n_layers * (per_layer + 4 * d * context) + 2 * d * vocab
    k, r, n_inj = len(config.vision_layers), config.read_width, len(config.injection_layers)
    n_memory = read_positions(config, n_memory)
    read = 2 * d * k + 2 * d * r + 4 * k * n_memory * r + 2 * k * r + 2 * r * d + 10 * d
    if config.agf_read == "full":
        read += 2 * 2 * k * n_memory * d * d
    return float(base), float(n_inj * read)


def kv_cache_bytes(config, n_memory: int) -> int:
    """Keys + values of one image's memory in bf16 (shared across layers for the light read)."""
    k, r = len(config.vision_layers), config.read_width
    copies = 1 if config.agf_read == "light" else len(config.injection_layers)
    return 2 * k * read_positions(config, n_memory) * r * 2 * copies


def report_real_shapes() -> None:
    cases = [
        ("LLaVA-1.5-7B", llava15_7b(), None, "576 patches"),
        ("LLaVA-OV-0.5B", onevision("0.5b"), (384, 384), "384x384 (base + 1 crop)"),
        ("LLaVA-OV-0.5B", onevision("0.5b"), (1080, 1920), "1920x1080 (anyres max)"),
        ("LLaVA-OV-7B", onevision("7b"), (384, 384), "384x384 (base + 1 crop)"),
        ("LLaVA-OV-7B", onevision("7b"), (480, 640), "640x480 photo"),
        ("LLaVA-OV-7B", onevision("7b"), (1080, 1920), "1920x1080 (anyres max)"),
    ]
    print("1-3. parameters, FLOPs per decoded token and read cache, attach defaults (meta device)")
    header = (
        f"{'model':<14} {'image':<24} {'read':<5} {'base params':>12} {'+params':>10} {'+%':>7} "
        f"{'N img':>6} {'base GF/tok':>11} {'+GF/tok':>8} {'+%':>7} {'kv MB':>8}"
    )
    print(header)
    print("-" * len(header))
    counted: dict[tuple[str, str], tuple] = {}
    for name, base, size, label in cases:
        n_mem = image_tokens(base, size)
        for read in ("light", "full"):
            if (name, read) not in counted:
                counted[(name, read)] = count_params(base, read)
            base_params, cli_params, config = counted[(name, read)]
            added = cli_params - base_params
            flops, extra = decode_flops(config, n_mem, context=n_mem + 64)
            p_ok = "" if read == "full" else (" ok" if added / base_params <= PARAM_TARGET else " OVER")
            f_ok = "" if read == "full" else (" ok" if extra / flops <= FLOP_TARGET else " OVER")
            print(
                f"{name:<14} {label:<24} {read:<5} {base_params / 1e9:>11.3f}B {added / 1e6:>9.1f}M "
                f"{100 * added / base_params:>6.2f}%{p_ok:<3} {n_mem:>6} {flops / 1e9:>11.2f} {extra / 1e9:>8.3f} "
                f"{100 * extra / flops:>6.1f}%{f_ok:<3} {kv_cache_bytes(config, n_mem) / 2**20:>8.1f}"
            )
    print(f"targets (light read): +params <= {PARAM_TARGET:.0%}, +FLOPs per decoded token <= {FLOP_TARGET:.0%}\n")


# ================================================================================ measured


def midsize(seed: int = 0):
    """(base LLaVA, CLI attached with alpha opened, tokenizer): CLIP 24 layers at 192 px / patch 16
    (144 patches), Llama 8 x 512, vocab 32k — the shape named in the issue."""
    from transformers import LlavaForConditionalGeneration

    from cliviz.data.tokenizer import build_tokenizer
    from cliviz.model.attach import attach

    from common import mid_size_llava_config

    torch.manual_seed(seed)
    tok = build_tokenizer()
    cfg = mid_size_llava_config(tok, max_position_embeddings=1024)
    base = LlavaForConditionalGeneration(cfg).eval()
    cli = attach(base).eval()
    with torch.no_grad():
        for layer in cli.agf:  # a fresh attach injects nothing: open alpha so the read does real work
            layer.injection.alpha.fill_(0.5)
    return base, cli, tok


def midsize_inputs(cli, tok, batch: int = 1) -> dict:
    from cliviz.data import iter_samples
    from cliviz.inference import prepare_inputs

    samples = list(iter_samples(batch, seed=7))
    return prepare_inputs(cli, tok, [s.image for s in samples], [s.question for s in samples])


def interleaved(variants: dict, repeats: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def counted_decode_ratio(base, cli, inputs) -> tuple[float, float]:
    """FLOPs of one decode step, base vs CLI, counted by torch's FlopCounterMode (matmuls and SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for name, model in (("base", base), ("cli", cli)):
        with torch.no_grad():
            first = model(**inputs, use_cache=True)
            step = {
                "input_ids": inputs["input_ids"][:, -1:],
                "cache": first.cache,
                "attention_mask": torch.cat([inputs["attention_mask"], inputs["attention_mask"][:, -1:]], 1),
            }
            if name == "cli":
                step["vision_kv"] = first.vision_kv
            with FlopCounterMode(display=False) as counter:
                model(**step, use_cache=True)
        out[name] = counter.get_total_flops()
    return out["base"], out["cli"] - out["base"]


def report_measured(repeats: int, warmup: int) -> None:
    from cliviz.inference import generation_kwargs
    from cliviz.tracing.record import _record

    base, cli, tok = midsize()
    inputs = midsize_inputs(cli, tok)
    n_mem = int((inputs["input_ids"] == cli.image_token_id).sum())
    flops, extra = decode_flops(cli.config, n_mem, context=inputs["input_ids"].shape[1])
    counted_base, counted_extra = counted_decode_ratio(base, cli, inputs)
    print(
        "4. mid-size random LLaVA (CLIP 24 x 256, 144 patches; Llama 8 x 512, vocab 32k), light read "
        f"r={cli.config.read_width}, {len(cli.config.vision_layers)} vision x {len(cli.agf)} injection layers"
    )
    print(
        f"   FLOPs per decoded token: analytic +{100 * extra / flops:.1f}%, FlopCounterMode "
        f"+{100 * counted_extra / counted_base:.1f}% (matmul/SDPA only)"
    )
    new = 64
    kw = {**generation_kwargs(tok, new), "min_new_tokens": new}
    with torch.no_grad():
        med = interleaved(
            {"base": lambda: base.generate(**inputs, **kw), "cli": lambda: cli.generate(**inputs, **kw)},
            repeats,
            warmup,
        )
    ratio = med["cli"] / med["base"]
    print(
        f"   generate {new} tokens: base {med['base'] * 1e3:.0f} ms, CLI {med['cli'] * 1e3:.0f} ms, "
        f"CLI/base {ratio:.2f}x (target <= {TIME_TARGET}x: {'ok' if ratio <= TIME_TARGET else 'OVER'})"
    )
    new = 128
    kw = {**generation_kwargs(tok, new), "min_new_tokens": new}
    with torch.no_grad():
        med = interleaved(
            {"plain": lambda: cli.generate(**inputs, **kw), "trace": lambda: _record(cli, inputs, kw, new)},
            repeats,
            warmup,
        )
    ratio = med["trace"] / med["plain"]
    print(
        f"5. trace (every gate + injection norm, every step, through nnsight) / plain generate, {new} tokens: "
        f"{med['plain'] * 1e3:.0f} ms vs {med['trace'] * 1e3:.0f} ms, {ratio:.3f}x "
        f"(target <= {TRACE_TARGET}x: {'ok' if ratio <= TRACE_TARGET else 'OVER'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-measured", action="store_true", help="only the meta-device and analytic part")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report_real_shapes()
    if not args.skip_measured:
        report_measured(args.repeats, args.warmup)
    print(f"\n{torch.get_num_threads()} threads; medians of {args.repeats} interleaved rounds")


if __name__ == "__main__":
    main()
