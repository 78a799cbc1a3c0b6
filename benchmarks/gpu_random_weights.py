"""Full-size Qwen-Image-Edit transformer and VAE with random weights: seconds per
forward, TFLOP/s and peak memory for each speed option Retouch offers.

Built on the meta device, materialised on the target device in bf16 and filled
with N(0, 0.02): the cost of a real checkpoint without downloading one. Each
measurement is written as one JSON line as soon as it is done, so a run cut
short keeps what it measured.

    python benchmarks/gpu_random_weights.py --out gpu.jsonl        # on a GPU
    python benchmarks/gpu_random_weights.py --tiny --device cpu    # anywhere

By default every variant the device can run: the FP8 ones need a CUDA GPU of compute
capability 8.9 or newer and are left out elsewhere (named with --variants, they are
tried and their error recorded).

Variants (in order of importance; compile and FP8 last, they are slow to build):
eager, refs3 (three reference images), vae, compiled, fp8_compiled, fp8_eager.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

FULL = {
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "axes_dims_rope": (16, 56, 56),
}
TINY = {
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "axes_dims_rope": (8, 4, 4),
}
TEXT_TOKENS = 220  # prompt + one condition image through the VL encoder
# bf16 on a GPU (what Retouch serves with); fp32 on the CPU, where bf16 convolutions crawl.
DTYPE = [torch.bfloat16]
ALL_VARIANTS = ["eager", "refs3", "vae", "compiled", "fp8_compiled", "fp8_eager"]


@dataclass(frozen=True)
class Shape:
    size: int
    refs: int
    text_tokens: int = TEXT_TOKENS

    @property
    def image_tokens(self) -> int:
        return (self.size // 16) ** 2

    @property
    def tokens(self) -> int:
        return self.image_tokens * (1 + self.refs) + self.text_tokens


def build_transformer(config: dict[str, Any], device: str, zero_cond_t: bool) -> Any:
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            guidance_embeds=False,
            zero_cond_t=zero_cond_t,
            **config,
        )
    model = model.to_empty(device=device).to(DTYPE[0])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    # The rotary table is a plain attribute, not a buffer: rebuild it for real.
    model.pos_embed = QwenEmbedRope(
        theta=10000, axes_dim=list(config["axes_dims_rope"]), scale_rope=True
    )
    return model.eval()


def forward_inputs(config: dict[str, Any], shape: Shape, device: str) -> dict[str, Any]:
    side = shape.size // 16
    tokens = shape.image_tokens * (1 + shape.refs)
    return {
        "hidden_states": torch.randn(1, tokens, 64, device=device, dtype=DTYPE[0]),
        "encoder_hidden_states": torch.randn(
            1, shape.text_tokens, config["joint_attention_dim"], device=device, dtype=DTYPE[0]
        ),
        # The pipeline's encode_prompt turns an all-true mask into None, which lets SDPA
        # pick a fused (flash) kernel: measure what production runs.
        "encoder_hidden_states_mask": None,
        "timestep": torch.tensor([0.5], device=device, dtype=DTYPE[0]),
        "img_shapes": [[(1, side, side)] * (1 + shape.refs)],
        "return_dict": False,
    }


def flops_per_forward(config: dict[str, Any], tokens: int) -> float:
    """Linear layers see each token in one stream; attention is joint over all of them."""
    dim = config["attention_head_dim"] * config["num_attention_heads"]
    linear_params = 12 * dim * dim  # qkv + out (4 d^2) and the MLP (8 d^2) per stream
    return config["num_layers"] * (2 * linear_params * tokens + 4 * tokens**2 * dim)


def synchronizer(device: str) -> Callable[[], None]:
    """Waits for `device` itself (a bare torch.cuda call would wait for cuda:0)."""
    if not device.startswith("cuda"):
        return lambda: None
    target = torch.device(device)
    return lambda: torch.cuda.synchronize(target)


def timed(device: str, run: Callable[[], Any], iterations: int) -> tuple[float, float]:
    """Seconds of the first (warm-up: compiles, autotunes) call, and the median
    seconds of `iterations` calls after it."""
    synchronize = synchronizer(device)
    synchronize()
    started = time.perf_counter()
    run()
    synchronize()
    warmup = time.perf_counter() - started
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        run()
        synchronize()
        samples.append(time.perf_counter() - started)
    return warmup, sorted(samples)[len(samples) // 2]


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_gib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**30, 2)


def peak_reserved_gib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_reserved(torch.device(device)) / 2**30, 2)


def measure_transformer(
    model: Any, config: dict[str, Any], shape: Shape, device: str, iterations: int
) -> dict[str, Any]:
    inputs = forward_inputs(config, shape, device)
    reset_peak(device)
    with torch.inference_mode():
        warmup, seconds = timed(device, lambda: model(**inputs), iterations)
    return {
        "tokens": shape.tokens,
        "s_per_forward": round(seconds, 4),
        "tflops": round(flops_per_forward(config, shape.tokens) / seconds / 1e12, 3),
        "peak_gib": peak_gib(device),
        "peak_reserved_gib": peak_reserved_gib(device),
        "true_cfg_40_steps_s": round(80 * seconds, 2),
        # The first forward: compilation (and autotuning) for compiled variants.
        "warmup_s": round(warmup, 1),
    }


def measure_vae(device: str, size: int, tiny: bool, iterations: int) -> dict[str, Any]:
    vae_config = {"base_dim": 8} if tiny else {}
    vae = AutoencoderKLQwenImage(**vae_config).to(device=device, dtype=DTYPE[0]).eval()
    image = torch.randn(1, 3, 1, size, size, device=device, dtype=DTYPE[0])
    with torch.inference_mode():
        latents = vae.encode(image).latent_dist.mode()
        _, encode = timed(device, lambda: vae.encode(image), iterations)
        _, decode = timed(device, lambda: vae.decode(latents), iterations)
    return {"vae_encode_s": round(encode, 4), "vae_decode_s": round(decode, 4)}


def quantize_fp8(model: Any) -> None:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def run_variant(name: str, args: argparse.Namespace, emit: Callable[..., None]) -> None:
    config = TINY if args.tiny else FULL
    shape = Shape(size=args.size, refs=3 if name == "refs3" else 1)
    if name == "vae":
        emit(name, **measure_vae(args.device, args.size, args.tiny, args.iterations))
        return
    started = time.perf_counter()
    model = build_transformer(config, args.device, args.zero_cond_t)
    if name.startswith("fp8"):
        quantize_fp8(model)
    if name.endswith("compiled"):
        model.compile_repeated_blocks(fullgraph=True)
    built = time.perf_counter() - started
    figures = measure_transformer(model, config, shape, args.device, args.iterations)
    figures["build_s"] = round(built, 1)
    figures["build_and_warmup_s"] = round(built + figures["warmup_s"], 1)
    emit(name, **figures)
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers

    device_name = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "config": "tiny" if args.tiny else "full",
        "dtype": str(DTYPE[0]).removeprefix("torch."),
        "size": args.size,
        "zero_cond_t": args.zero_cond_t,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny config (CPU-friendly)")
    parser.add_argument("--size", type=int, default=1024, help="output side in pixels")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument(
        "--variants", help=f"comma-separated, of {ALL_VARIANTS}; default: all the device runs"
    )
    parser.add_argument(
        "--zero-cond-t",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the transformer's zero_cond_t flag: true in Qwen-Image-Edit-2511, the default "
        "served model (--no-zero-cond-t for -2509 and the original Edit)",
    )
    parser.add_argument("--out", type=Path, help="append JSON lines here too")
    args = parser.parse_args(argv)
    if args.variants is None:
        runs_fp8 = args.device.startswith("cuda") and torch.cuda.get_device_capability(
            args.device
        ) >= (8, 9)
        args.variants = ",".join(v for v in ALL_VARIANTS if runs_fp8 or not v.startswith("fp8"))
    unknown = set(args.variants.split(",")) - set(ALL_VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {ALL_VARIANTS}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    DTYPE[0] = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    sinks: list[TextIO] = [sys.stdout]
    if args.out:
        sinks.append(args.out.open("a"))
    context = environment(args)

    def emit(variant: str, **figures: Any) -> None:
        line = json.dumps({"variant": variant, **figures, **context})
        for sink in sinks:
            print(line, file=sink, flush=True)

    failures = 0
    for name in args.variants.split(","):
        try:
            run_variant(name, args, emit)
        except Exception as exc:  # one variant failing (e.g. FP8 on an old GPU) is a result too
            failures += 1
            emit(name, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    emit("shapes", **asdict(Shape(args.size, 1)), tokens_one_ref=Shape(args.size, 1).tokens)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
