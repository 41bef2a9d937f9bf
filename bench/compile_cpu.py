"""Per-denoising-step latency and peak memory on CPU: FP32 eager and compiled, bf16 autocast, and
lowbit W8A8 / W4A8 through ``torch.compile(backend="lowbit")`` (int8 GEMMs via torch._int_mm).

All variants run side by side in one process, interleaved round by round so that a busy
machine slows them alike; the table gives medians and ratios against FP32 eager.

Models: (a) a PixArt-alpha-shaped transformer block (hidden 1152, 16 heads, MLP 4608; one block of
diffusers' PixArtTransformer2DModel with its embeddings and caption projection) at batch 2 with
1,024 and 4,096 image tokens, each with a caption of 120 tokens of width 1152 (PixArt-alpha's T5)
and of 16 tokens of width 64; (b) an SD-1.x-shaped
UNet down block (CrossAttnDownBlock2D, 320 channels, 64x64 latent, 77 text tokens of width 768,
with the timestep embedding in front); (c) the shipped reference model at CFG batch 2.

    .venv/bin/python bench/compile_cpu.py                  # all three, writes bench/results/compile_cpu.md
    .venv/bin/python bench/compile_cpu.py --models block --tokens 1024 --rounds 5
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import gc
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch._inductor.config
from diffusers import PixArtTransformer2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D

import lowbit
from lowbit.evaluation.run import calibrate_reference
from lowbit.models.reference import load_reference_model
from lowbit.recipes.builtin import get_recipe

RESULTS = Path(__file__).parent / "results" / "compile_cpu.md"
CALIBRATION_TIMESTEPS = (900.0, 500.0, 100.0)


class SDDownBlock(torch.nn.Module):
    """An SD-1.x down block with the UNet's timestep embedding, so it takes a diffusion timestep."""

    def __init__(self):
        super().__init__()
        self.time_proj = Timesteps(320, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(320, 1280)
        self.block = CrossAttnDownBlock2D(in_channels=320, out_channels=320, temb_channels=1280, num_layers=2,
                                          cross_attention_dim=768, num_attention_heads=8, add_downsample=True)

    def forward(self, sample, timestep, encoder_hidden_states):
        temb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))  # as UNet2DConditionModel casts it
        return self.block(sample, temb, encoder_hidden_states)[0]


def pixart_block(tokens: int, caption: tuple[int, int] = (120, 1152)) -> tuple[torch.nn.Module, Callable[[torch.Generator, float], dict]]:
    """The block at ``tokens`` image tokens, its caption ``caption`` = (tokens, width) (projected to 1152)."""
    side = int(tokens**0.5) * 2  # latent side; patch size 2
    caption_tokens, caption_width = caption
    model = PixArtTransformer2DModel(num_layers=1, num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                     out_channels=8, sample_size=side, patch_size=2, cross_attention_dim=1152,
                                     caption_channels=caption_width, use_additional_conditions=False).eval()

    def inputs(g: torch.Generator, t: float) -> dict:
        return dict(hidden_states=torch.randn(2, 4, side, side, generator=g),
                    encoder_hidden_states=torch.randn(2, caption_tokens, caption_width, generator=g), timestep=torch.full((2,), t))

    return model, inputs


def sd_down_block(side: int = 64) -> tuple[torch.nn.Module, Callable[[torch.Generator, float], dict]]:
    """The block with its inputs at a ``side`` x ``side`` latent."""
    def inputs(g: torch.Generator, t: float) -> dict:
        return dict(sample=torch.randn(2, 320, side, side, generator=g), timestep=torch.full((2,), t),
                    encoder_hidden_states=torch.randn(2, 77, 768, generator=g))

    return SDDownBlock().eval(), inputs


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out.sample if hasattr(out, "sample") else out


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap() -> None:
    """Hand glibc's free heap pages back to the system (``malloc_trim``), so that memory a step
    reuses from the heap counts in its resident-set growth like memory it maps anew. The timing
    rounds run under glibc's default allocator settings, as a user's process does."""
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def peak_step_bytes(step: Callable[[], object]) -> int:
    """Peak resident memory during one step above what the process held before it, sampled every
    0.2 ms from /proc (see _release_free_heap)."""
    gc.collect()
    _release_free_heap()
    before, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(2e-4)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        step()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss()) - before


# Where a step's time goes: each profiler event's self time, by what it computes. Inductor's kernels
# (``torch._inductor.config.cpp.enable_kernel_profile``) are named after the ops they fuse; the rest
# are ops by name.
PROFILE_CATEGORIES = ("attention", "GEMMs", "convolutions", "quantizers", "casts and layout copies",
                      "other ops (norms, GELU, adds)", "framework (dynamo, graph calls, op wrappers)")
_OPS = (("attention", ("attention", "_softmax", "flex")),
        ("GEMMs", ("qlinear", "_int_mm", "int4_linear", "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                   "mkldnn::_linear")),
        ("convolutions", ("convolution", "qconv")),
        ("casts and layout copies", ("copy", "clone", "contiguous", "transpose", "aten::to")),
        ("other ops (norms, GELU, adds)", ("aten::",)))
_LAYOUT_OPS = {"clone", "copy", "_to_copy", "permute", "transpose", "view", "unsafe_view", "cat", "expand"}


def _category(name: str) -> str:
    if name.startswith(("graph_", "cpp_fused")):  # an inductor kernel: cpp_fused_<op>_<op>..._<n>
        fused = set(name.split("cpp_fused_", 1)[-1].rsplit("_", 1)[0].split("_"))
        if "softmax" in fused:
            return "attention"
        if "round" in fused:
            return "quantizers"
        return "casts and layout copies" if fused <= _LAYOUT_OPS | {"to", "unsafe", ""} else "other ops (norms, GELU, adds)"
    return next((category for category, keys in _OPS if any(k in name for k in keys)), PROFILE_CATEGORIES[-1])


def profile_step(step: Callable[[], object]) -> dict[str, float]:
    """Milliseconds of one step per category of PROFILE_CATEGORIES."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    totals = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    for event in prof.key_averages():
        totals[_category(event.key)] += event.self_cpu_time_total / 1e3
    return totals


def _weight_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def variants(model: torch.nn.Module, calibration: list, interior: bool = False) -> dict[str, tuple[Callable, torch.nn.Module]]:
    """name -> (callable taking the model's keyword inputs, the module whose weights it holds). With
    ``interior`` the model is a piece cut from inside a larger one (the SD down block), whose first and
    last layers are interior layers there: the recipes quantize them, as in the whole UNet, instead of
    keeping them in float as a model's input and output layers (``keep_io_layers``)."""
    out: dict[str, tuple[Callable, torch.nn.Module]] = {"FP32 eager": (model, model),
                                                        "FP32 compiled (inductor)": (torch.compile(model), model)}

    def bf16(**kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**kw)

    out["bf16 autocast"] = (bf16, model)
    for name in ("minmax-w8a8", "minmax-w4a8"):
        recipe = get_recipe(name)
        if interior:
            recipe = dataclasses.replace(recipe, precision=dataclasses.replace(recipe.precision, keep_io_layers=False))
        qmodel = lowbit.quantize(model, recipe, calibration, progress=False)
        out[f"lowbit {name.split('-')[1].upper()} (backend=lowbit)"] = (torch.compile(qmodel, backend="lowbit"), qmodel.graph_module)
    return out


def measure(title: str, model: torch.nn.Module, make_inputs: Callable, rounds: int, calibration: list | None = None,
            profile: bool = False, interior: bool = False) -> list[str]:
    g = torch.Generator().manual_seed(0)
    calibration = calibration or [((), make_inputs(g, t)) for t in CALIBRATION_TIMESTEPS]
    step_inputs = calibration[len(calibration) // 2][1]
    runs = variants(model, calibration, interior)
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, (fn, _) in runs.items():  # warm-up: compiles, and the first call's allocations
            start = time.perf_counter()
            outputs[name] = _output(fn(**step_inputs)).float()
            print(f"  {title}: {name} warm-up {time.perf_counter() - start:.1f} s", flush=True)
        for _ in range(rounds):
            for name, (fn, _) in runs.items():
                start = time.perf_counter()
                fn(**step_inputs)
                times[name].append(time.perf_counter() - start)
        peaks = {name: peak_step_bytes(lambda fn=fn: fn(**step_inputs)) for name, (fn, _) in runs.items()}
        profiles = {name: profile_step(lambda fn=fn: fn(**step_inputs)) for name, (fn, _) in runs.items()} if profile else {}
    base = statistics.median(times["FP32 eager"])
    reference = outputs["FP32 eager"]
    lines = [f"### {title}", "",
             "| variant | ms / step | speed-up vs FP32 eager | peak step memory (MiB) | weights (MiB) | rel. L2 error vs FP32 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, (_, holder) in runs.items():
        ms = statistics.median(times[name]) * 1e3
        err = ((outputs[name] - reference).norm() / reference.norm()).item()
        lines.append(f"| {name} | {ms:.1f} | {base * 1e3 / ms:.2f}x | {peaks[name] / 2**20:.1f} | "
                     f"{_weight_bytes(holder) / 2**20:.1f} | {err:.4f} |")
    if profiles:
        columns = list(PROFILE_CATEGORIES)
        lines += ["", f"Where one step's time goes (ms, torch.profiler self time by op, one profiled step): {title}", "",
                  "| variant | " + " | ".join(columns) + " | total |", "| --- |" + " ---: |" * (len(columns) + 1)]
        for name, totals in profiles.items():
            lines.append(f"| {name} | " + " | ".join(f"{totals[c]:.1f}" for c in columns) + f" | {sum(totals.values()):.1f} |")
    print("\n".join(lines), flush=True)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["block", "unet", "reference"], choices=["block", "unet", "reference"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--captions", nargs="+", default=["120x1152", "16x64"],
                        help="the block's caption shapes, TOKENSxWIDTH (PixArt-alpha's 120 T5 tokens; a short caption of a small text encoder)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--profile", action="store_true", help="add each variant's per-op breakdown of one step")
    args = parser.parse_args()
    torch._inductor.config.cpp.enable_kernel_profile = args.profile
    load_at_start = os.getloadavg()[0]
    torch.manual_seed(0)
    sections = []
    if "block" in args.models:
        for tokens in args.tokens:
            for caption in args.captions:
                caption_tokens, caption_width = (int(n) for n in caption.split("x"))
                model, make_inputs = pixart_block(tokens, (caption_tokens, caption_width))
                sections += measure(f"PixArt-alpha-shaped block, batch 2, {tokens} tokens, caption {caption_tokens} tokens "
                                    f"of width {caption_width}", model, make_inputs, args.rounds, profile=args.profile)
    if "unet" in args.models:
        model, make_inputs = sd_down_block()
        sections += measure("SD-1.x-shaped UNet down block (CrossAttnDownBlock2D), batch 2, 64x64, every layer quantized as in "
                            "the UNet", model, make_inputs, args.rounds, profile=args.profile, interior=True)
    if "reference" in args.models:
        model = load_reference_model()
        calibration = calibrate_reference(model, prompts=4, steps=5, progress=False)
        sections += measure("shipped reference model, CFG batch 2 x 2 prompts", model, None, args.rounds, calibration, args.profile)
    write_results(args.out, "bench/compile_cpu.py", load_at_start, sections)


def write_results(out: Path, script: str, load_at_start: float, sections: list[str]) -> None:
    """The tables under a header naming the device, the load average at both ends and the command."""
    load = os.getloadavg()[0]
    header = [f"Device: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}. "
              f"Load average (1 min) at the start {load_at_start:.1f}, at the end {load:.1f} (a load above "
              f"{os.cpu_count()} means other processes shared the cores, which slows every variant and compresses the ratios).", "",
              f"Command: `{' '.join(['.venv/bin/python', script, *sys.argv[1:]])}`", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header + sections))
    print(f"wrote {out}")


def cpu_name() -> str:
    """The CPU and the vector ISA ATen dispatches to on it: int8 and bf16 speed depend on the latter."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        name = next((line.split(":", 1)[1].strip() + f" ({platform.machine()})" for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")), name)
    return f"{name}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}"


if __name__ == "__main__":
    main()
