"""Dispatch-bound proxy of the GPU step on a CPU: the fnf step's levers vs a hand-written loop, in one process.

    OMP_NUM_THREADS=1 python benchmarks/dispatch.py                       # batch 1 and 4, 1 warm-up + 5 timed steps
    OMP_NUM_THREADS=1 python benchmarks/dispatch.py --batch 1 --steps 2   # quick check
    OMP_NUM_THREADS=1 python benchmarks/dispatch.py --compile --top-ops 25 --model-dir /tmp/proxy  # + torch.compile

The model has Stable Diffusion 1.5's exact topology (UNet: 4 levels, 2 layers per block, 3 cross-attention
down / up blocks, 8 heads; VAE: 4 levels, 2 layers per block, factor 8; 12-layer CLIP text encoder) with
~10x narrower channels and 8x8 latents (64² images), random weights, built once (``--model-dir`` keeps it).
A UNet call is then ~1 600 aten ops (2 900 with the LoRA) whose dispatch and surrounding Python dominate its
time at batch 1 (4x the rows cost ~1.5x), as on a GPU where SD1.5's kernels are short: the ms per UNet call
and the aten ops per step are the numbers to move. (CPU caveat: AdamW runs per tensor here, ~3 k ops a step,
where CUDA's default foreach path takes a few dozen.)

Settings: 20 DDIM steps, CFG 7.5, DRaFT-K (K = 2), LoRA rank 64 on to_q/to_k/to_v/to_out.0, ColorRegion
reward with its heatmap mask, λ = 0.1, AdamW. Every variant trains its own copy (same LoRA init) on the same
prompts and seeds; all run in this process, one step each in turn (the order rotates every step), so drifts
in machine load hit all of them. The hand-written step is speed.py's ``HandWrittenLoop``, with diffusers as
shipped (it inspects attention processor signatures on every call; fnf's model stops that process-wide). fnf
variants run without a Trainer loop: ``setup("fit")`` once with a bare ``lightning.Trainer`` attached (it applies
ComputeArgs), then per step ``training_step`` (``log``/``log_dict`` patched to no-ops), backward,
``on_before_optimizer_step`` (the gradient norm, as Lightning calls it), AdamW step, zero_grad.

Columns: ms per top-level UNet call (forward hooks; checkpointed steps add their recompute calls), UNet calls per
step, aten ops per step (a TorchDispatchMode counting every op below autograd, forward, backward and optimizer, in
one extra untimed step, with every variant's gradient-free steps under no_grad: in inference mode the counter is
handed composite ops undecomposed (``linear`` instead of ``t``/``view``/``mm``), fewer counts for the same kernels;
none for the compiled variant), median step time over the timed steps, first-step time
(includes torch.compile's compilation), ratios to the hand-written step's time and to the flags-off op count,
and the last step's loss (equal across fnf variants up to float rounding: the levers change cost, not math;
plain DRaFT has no fidelity term).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from collections import Counter
from functools import partial
from pathlib import Path
from unittest.mock import patch

import lightning as L
import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.utils import logging as transformers_logging

from provenance import provenance
from unet_shaped import SD15_TEXT, SD15_UNET, SD15_VAE, build_sd
from speed import PROMPTS, HandWrittenLoop

from fnf.compute import ComputeArgs
from fnf.data import collate
from fnf.masks import MaskArgs
from fnf.module import FocusNFix, RewardTerm
from fnf.pipeline import LoraArgs, Text2ImageModel
from fnf.rewards import ColorRegion
from fnf.sampling import SamplerArgs

PROXY_UNET = SD15_UNET | dict(sample_size=8, block_out_channels=(32, 64, 128, 128), cross_attention_dim=64,
                              norm_num_groups=32)
PROXY_VAE = SD15_VAE | dict(block_out_channels=(16, 32, 64, 64), norm_num_groups=16, sample_size=64)
PROXY_TEXT = SD15_TEXT | dict(hidden_size=64, intermediate_size=256, num_attention_heads=4)
OFF = dict(fused_base=False, fold_lora=False, fold_lora_grad=False, checkpointing="per_step", inference_mode=False)
FNF_VARIANTS = [  # (name, SamplerArgs flags, ComputeArgs kwargs or None for the defaults)
    ("fnf (before: flags off)", OFF, None),
    ("+ fused base", OFF | dict(fused_base=True), None),
    ("+ folded LoRA", OFF | dict(fold_lora=True), None),
    ("+ folded LoRA in grad steps", OFF | dict(fold_lora_grad=True), None),
    ("+ checkpointing off", OFF | dict(checkpointing="off"), None),
    ("+ inference mode", OFF | dict(inference_mode=True), None),
    ("all default levers on", dict(), None),
    ("all on + checkpointing off", dict(checkpointing="off"), None),
    ("plain DRaFT-K, all default levers (λ = 0, no I0)", dict(lam=0.0, train_base="if_needed"), None),
]
COMPILE_VARIANTS = [("all on + compile", dict(), dict(compile="unet")),
                    ("all on + checkpointing off + compile", dict(checkpointing="off"), dict(compile="unet"))]
BASELINE = FNF_VARIANTS[0][0]
NOTES: dict[str, None] = {}
"""Skipped or dropped variants, printed under the table (and at once on stderr)."""


diffusers_logging.disable_progress_bar()  # no "Loading weights" bars between the table's lines
transformers_logging.disable_progress_bar()
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # each bare Trainer's banner


def build_model(directory: Path) -> Path:
    """Save the SD1.5-topology, narrow proxy pipeline with random (seeded) weights in diffusers format."""
    return build_sd(directory, PROXY_UNET, PROXY_VAE, PROXY_TEXT)


class OpCounter(TorchDispatchMode):
    """Counts every aten op that reaches the dispatcher's Python mode (forward, backward, optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


class UnetClock:
    """Wall time and number of top-level UNet calls (recomputations in backward included), from module hooks."""

    def __init__(self, unet: torch.nn.Module, device: str) -> None:
        self.calls, self.seconds, self.device, self._starts = 0, 0.0, device, []
        unet.register_forward_pre_hook(self._pre)
        unet.register_forward_hook(self._post)

    def now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args) -> None:
        self._starts.append(self.now())

    def _post(self, module, args, output) -> None:
        self.seconds += self.now() - self._starts.pop()
        self.calls += 1


class Variant:
    """One trained model: ``step(i)`` trains on batch i; ``timed_step`` and ``count_ops`` measure it."""

    def __init__(self, name: str, step, unet: torch.nn.Module, device: str, compiled: bool = False) -> None:
        self.name, self.step, self.compiled = name, step, compiled
        self.clock, self.times, self.first, self.ops = UnetClock(unet, device), [], None, None
        self.unet_calls, self.unet_seconds, self.loss = 0, 0.0, None  # loss: fnf variants, last step (a tensor)

    def timed_step(self, i: int, timed: bool) -> None:
        calls, seconds = self.clock.calls, self.clock.seconds
        start = self.clock.now()
        self.step(i)
        wall = self.clock.now() - start
        self.first = wall if self.first is None else self.first
        if timed:
            self.times.append(wall)
            self.unet_calls += self.clock.calls - calls
            self.unet_seconds += self.clock.seconds - seconds

    def count_ops(self, i: int) -> None:
        no_grad = patch.object(Text2ImageModel, "gradient_free_mode", lambda model: torch.no_grad())
        with no_grad, OpCounter() as counter:
            self.step(i)
        self.ops = counter.counts


def hand_written(args, batch: int) -> Variant:
    torch.manual_seed(0)
    loop = HandWrittenLoop(Namespace(model=str(args.model_dir), device=args.device, num_steps=args.num_steps,
                                     rank=args.rank, batch=batch, guidance=args.guidance, k=args.k, lam=args.lam))
    return Variant("hand-written", loop.step, loop.unet, args.device)


def fnf_variant(args, batch: int, name: str, flags: dict, compute: dict | None) -> Variant:
    """A FocusNFix module with these sampler flags and speed levers (``fnf.compute.ComputeArgs``); the flag
    ``inference_mode: false`` runs gradient-free steps under no_grad, as before issue 12 (not a setting of fnf);
    ``lam`` and ``train_base`` go to the module (plain DRaFT: λ = 0 and no I0)."""
    flags = dict(flags)
    inference_mode = flags.pop("inference_mode", True)
    lam, train_base = flags.pop("lam", args.lam), flags.pop("train_base", "always")
    torch.manual_seed(0)  # the same LoRA initialisation as the hand-written loop
    module = FocusNFix(
        rewards=[RewardTerm(ColorRegion(), mask="heatmap")], pretrained=str(args.model_dir), lam=lam,
        sampler=SamplerArgs(num_steps=args.num_steps, k=args.k, guidance_scale=args.guidance, **flags),
        masks=MaskArgs(threshold=0.5, dilation=1), lora=LoraArgs(rank=args.rank), train_base=train_base,
        optimizer=partial(torch.optim.AdamW, lr=3e-4, weight_decay=0.1), compute=ComputeArgs(**(compute or {})))
    module.to(args.device).train()
    if not inference_mode:
        module.model.gradient_free_mode = torch.no_grad
    module.log = module.log_dict = lambda *a, **k: None  # no Trainer: Lightning's log would warn on every call
    module.trainer = L.Trainer(accelerator=args.device, devices=1, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False)
    module.setup("fit")  # the hook that applies ComputeArgs (dtype, layout, compile) needs the trainer's precision
    module.trainer = None
    optimizer = module.configure_optimizers()
    variant = None

    def step(i: int) -> None:
        items = [{"prompt": PROMPTS[(i * batch + j) % len(PROMPTS)], "seed": i * batch + j} for j in range(batch)]
        out = module.training_step(collate(items), i)
        out["loss"].backward()
        module.on_before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        variant.loss = out["loss"].detach()  # read after the run: no extra sync in the step

    variant = Variant(name, step, module.model.unet, args.device, compiled=bool((compute or {}).get("compile")))
    return variant


def unet_call_ops(args) -> dict[str, int]:
    """aten ops of one CFG UNet forward (batch 1, no grad): plain, with the LoRA, with the LoRA disabled."""
    unet = UNet2DConditionModel.from_pretrained(args.model_dir, subfolder="unet").requires_grad_(False)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(500)
    text = torch.randn(2, 77, PROXY_UNET["cross_attention_dim"])

    def count() -> int:
        with torch.no_grad(), OpCounter() as counter:
            unet(x, t, encoder_hidden_states=text)
        return sum(counter.counts.values())

    result = {"no LoRA": count()}
    unet.add_adapter(LoraArgs(rank=args.rank).to_peft())
    result["LoRA on"] = count()
    unet.disable_adapters()
    result["LoRA disabled"] = count()
    return result


def run(args, batch: int) -> list[Variant]:
    variants = [hand_written(args, batch)]
    specs = FNF_VARIANTS + (COMPILE_VARIANTS if args.compile else [])
    variants += [fnf_variant(args, batch, *spec) for spec in specs]
    n = args.warmup + args.steps
    for i in range(n):
        for v in variants[i % len(variants):] + variants[:i % len(variants)]:
            try:
                v.timed_step(i, timed=i >= args.warmup)
            except Exception as error:  # torch.compile's toolchain can fail on a machine: keep the other rows
                if not v.compiled:
                    raise
                note(f"dropped {v.name!r} at batch {batch}, step {i + 1}: {type(error).__name__}: {error}")
                variants.remove(v)
        print(f"# batch {batch}: step {i + 1}/{n} done", file=sys.stderr, flush=True)
    for v in variants:  # step n, untimed: op counts, and the loss every variant reports
        if v.compiled:  # compiled graphs under a dispatch mode would count (and recompile) eagerly
            v.step(n)
        else:
            v.count_ops(n)
    return variants


def note(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)
    NOTES[text] = None


def report(variants: list[Variant], batch: int) -> None:
    base_time = statistics.median(variants[0].times)
    baseline = next((v for v in variants if v.name == BASELINE), None)
    base_ops = sum(baseline.ops.values()) if baseline is not None else None
    for v in variants:
        median = statistics.median(v.times)
        calls = v.unet_calls / len(v.times)
        ops = sum(v.ops.values()) if v.ops is not None else None
        op_ratio = f"{ops / base_ops:.3f}" if ops is not None and base_ops else "—"
        loss = f"{v.loss.item():.5f}" if v.loss is not None else "—"
        print(f"| {v.name} | {batch} | {1e3 * v.unet_seconds / max(v.unet_calls, 1):.2f} | {calls:.0f} | "
              f"{ops if ops is not None else 'n/a'} | {median:.3f} | {v.first:.2f} | {median / base_time:.3f} | "
              f"{op_ratio} | {loss} |", flush=True)


def top_ops(variants: list[Variant], n: int) -> None:
    ours = next((v for v in variants if v.name == BASELINE), None)
    if ours is None or ours.ops is None:
        return
    ours, theirs = ours.ops, variants[0].ops
    print(f"\n| aten op (top {n} in {BASELINE}) | fnf per step | hand-written per step |\n|---|---|---|")
    for op, count in ours.most_common(n):
        print(f"| `{op}` | {count} | {theirs.get(op, 0)} |")
    print(f"| **all ({len(ours)} distinct)** | **{sum(ours.values())}** | **{sum(theirs.values())}** |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (the proxy's point) or cuda")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile variant (minutes on a CPU)")
    parser.add_argument("--top-ops", type=int, default=0, help="print the N commonest aten ops of the flags-off step")
    parser.add_argument("--model-dir", type=Path, default=None, help="keep the built model here (reused if present)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        args.model_dir = args.model_dir or Path(tmp) / "sd15-topology-proxy"
        if not (args.model_dir / "model_index.json").exists():
            build_model(args.model_dir)
        print(f"# SD1.5-topology proxy (UNet {PROXY_UNET['block_out_channels']}, 8x8 latents, 64² images) ready in "
              f"{time.perf_counter() - start:.0f} s\n# {provenance(args.device)}, "
              f"{torch.get_num_threads()} threads\n# {args.num_steps} DDIM steps, K={args.k}, CFG {args.guidance}, "
              f"LoRA rank {args.rank}, λ={args.lam}; {args.steps} timed steps after {args.warmup} warm-up", flush=True)
        ops = unet_call_ops(args)
        print("# aten ops per CFG UNet forward (batch 1, no grad): " + ", ".join(f"{k} {v}" for k, v in ops.items()) +
              f" (LoRA share {1 - ops['no LoRA'] / ops['LoRA on']:.0%})", flush=True)
        print("\n| variant | batch | ms / UNet call | UNet calls / step | aten ops / step | s / step (median) | "
              "first step s | time vs hand-written | ops vs flags off | loss (last step) |\n"
              "|---|---|---|---|---|---|---|---|---|---|", flush=True)
        first = None
        for batch in args.batch:
            variants = run(args, batch)
            report(variants, batch)
            first = first or variants
        if NOTES:
            print("".join(f"\n# {text}" for text in NOTES))
        if args.top_ops:
            top_ops(first, args.top_ops)
        print(f"\n# total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
