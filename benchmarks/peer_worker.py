"""One variant of benchmarks/peer_alignprop.py in its own process (and venv): steps when told, reports time and memory.

``alignprop`` runs in the peer's venv (.venv-peer: trl's AlignPropTrainer), the ``fnf*`` variants in fnf's.
Protocol: the worker sends one ``@@ {json}`` line when ready, then per ``step`` line on stdin runs one optimizer
step and sends its time; ``stop`` gets peak memory growth and the call counts of the last step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter

import torch

from peak_memory import PeakMemory

PROMPTS = ["a red circle top left", "a blue square bottom right", "a green circle", "a red square"]
VARIANTS = ("alignprop", "fnf", "fnf-cached", "fnf-draft")
PROTOCOL = "@@ "  # worker -> orchestrator lines; anything else a library prints goes to the worker's stderr


class CallCounter:
    """Forward calls per module during one step: (name, autograd on?) -> count (checkpoint recomputes count too)."""

    def __init__(self, modules: dict) -> None:
        self.counts: Counter = Counter()
        for name, module in modules.items():
            module.register_forward_pre_hook(
                lambda m, a, name=name: self.counts.update([(name, torch.is_grad_enabled())]))

    def summary(self) -> dict:
        return {name: {"calls": sum(n for (m, _), n in self.counts.items() if m == name),
                       "with_autograd": self.counts[(name, True)]}
                for name in sorted({m for m, _ in self.counts})}


def reward_color_region(images: torch.Tensor) -> torch.Tensor:
    """fnf's ColorRegion() score, written out for the peer venv: −mean squared distance to red, top-left quarter."""
    _, _, height, width = images.shape
    region = torch.zeros(1, 1, height, width, device=images.device, dtype=images.dtype)
    region[..., : height // 2, : width // 2] = 1
    color = torch.tensor([1.0, 0.0, 0.0], device=images.device, dtype=images.dtype)[None, :, None, None]
    distance = ((images - color) ** 2).mean(dim=1, keepdim=True)
    return -(distance * region).sum(dim=(1, 2, 3)) / region.sum()


class Channel:
    """stdin commands in, protocol lines out on the real stdout; fd 1 itself goes to stderr."""

    def __init__(self) -> None:
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, **message) -> None:
        self.out.write(PROTOCOL + json.dumps(message) + "\n")

    @staticmethod
    def receive() -> str:
        return sys.stdin.readline().strip()


def model_fingerprint(unet, vae, text_encoder, tokenizer) -> dict:
    """Same weights and tokens in both venvs? Weight sums per part and |sum| of one prompt's text embedding."""
    def total(module) -> float:
        return round(sum(p.double().sum().item() for n, p in module.named_parameters() if "lora_" not in n), 4)

    with torch.no_grad():
        ids = tokenizer([PROMPTS[0]], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        text = text_encoder(ids.to(text_encoder.device))[0].double().abs().sum().item()
    return {"unet": total(unet), "vae": total(vae), "text_encoder": total(text_encoder),
            "text_embedding": round(text, 3), "ids": ids[0, :8].tolist()}


def serve(channel: Channel, step, memory: PeakMemory, counter: CallCounter, n: int, device: str) -> list[float]:
    """Run ``n`` steps, each when the orchestrator says so; report its time."""
    times = []
    for _ in range(n):
        if channel.receive() != "step":
            raise SystemExit("worker: expected 'step'")
        times.append(timed(step, memory, counter, device))
        channel.send(time=times[-1])
    return times


def timed(step, memory: PeakMemory, counter: CallCounter, device: str) -> float:
    counter.counts.clear()
    memory.resume()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    memory.pause()
    return elapsed


def finish(channel: Channel, memory: PeakMemory, counter: CallCounter) -> None:
    if channel.receive() != "stop":
        raise SystemExit("worker: expected 'stop'")
    channel.send(peak_mb=memory.growth() / 2**20, work=counter.summary())


def worker_alignprop(args, channel: Channel) -> None:
    from importlib.metadata import version

    from accelerate import PartialState

    PartialState()  # trl's pipeline logs through accelerate's logger before the trainer makes its Accelerator
    from peft import LoraConfig
    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline

    class Pipeline(DefaultDDPOStableDiffusionPipeline):
        def get_trainable_layers(self):
            """trl's own code with the rank made a setting (trl hard-codes r = alpha = 4)."""
            self.sd_pipeline.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                                         target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
            for param in self.sd_pipeline.unet.parameters():
                if param.requires_grad:
                    param.data = param.to(torch.float32)
            return self.sd_pipeline.unet

    calls = iter(range(10**9))

    def prompt_fn():  # the same 4 prompts per batch as fnf's DataLoader
        return PROMPTS[next(calls) % len(PROMPTS)], {}

    def reward_fn(images, prompts, metadata):
        return reward_color_region(images), {}

    last = args.num_steps - args.k  # steps i >= last keep their gradient: the last K
    with tempfile.TemporaryDirectory() as logdir:
        config = AlignPropConfig(
            sample_num_steps=args.num_steps, sample_eta=0.0, sample_guidance_scale=args.guidance,
            train_batch_size=args.batch, train_learning_rate=3e-4, train_adam_weight_decay=0.1,
            truncated_backprop_rand=False, truncated_backprop_timestep=last, truncated_rand_backprop_minmax=(last, last),
            mixed_precision="no", log_with=None, logdir=logdir, project_kwargs={"project_dir": logdir},
            accelerator_kwargs={"cpu": args.device == "cpu"}, num_epochs=1, seed=0,
        )
        pipeline = Pipeline(args.model, use_lora=True)
        trainer = AlignPropTrainer(config, reward_fn, prompt_fn, pipeline)  # its __init__ runs the text encoder once
        pipeline.set_progress_bar_config(disable=True)  # trl leaves a tqdm bar per sampling loop on; fnf has none
        counter = CallCounter({"unet": pipeline.unet, "vae_decoder": pipeline.vae.decoder,
                               "text_encoder": pipeline.text_encoder})
        channel.send(ready=True, versions={p: version(p) for p in ("trl", "diffusers", "peft", "transformers",
                                                                   "accelerate", "torch")},
                     lora_params=sum(p.numel() for p in trainer.trainable_layers),
                     fingerprint=model_fingerprint(pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer))
        memory = PeakMemory(args.device)
        memory.start(sampling=False)  # serve() samples during each step only
        state = {"global_step": 0}

        def step():  # epoch 0: AlignPropTrainer.step saves a checkpoint only for epoch != 0
            state["global_step"] = trainer.step(0, state["global_step"])

        serve(channel, step, memory, counter, args.warmup + args.steps, args.device)
        finish(channel, memory, counter)


def worker_fnf(args, channel: Channel, variant: str) -> None:
    from functools import partial
    from importlib.metadata import version

    import lightning as L
    from torch.utils.data import DataLoader

    from fnf.data import collate
    from fnf.masks import MaskArgs
    from fnf.module import FocusNFix, RewardTerm
    from fnf.pipeline import LoraArgs
    from fnf.rewards import ColorRegion
    from fnf.sampling import SamplerArgs

    module = FocusNFix(
        rewards=[RewardTerm(ColorRegion(), mask="heatmap")], pretrained=args.model, lam=0.0,
        sampler=SamplerArgs(num_steps=args.num_steps, k=args.k, guidance_scale=args.guidance),
        masks=MaskArgs(threshold=0.5, dilation=1), lora=LoraArgs(rank=args.rank),
        optimizer=partial(torch.optim.AdamW, lr=3e-4, weight_decay=0.1),
        base_cache="memory" if variant == "fnf-cached" else "off",
        train_base="if_needed" if variant == "fnf-draft" else "always",
    )
    model = module.model
    counter = CallCounter({"unet": model.unet, "vae_decoder": model.vae.decoder, "text_encoder": model.text_encoder})
    memory = PeakMemory(args.device)
    n = args.warmup + args.steps
    if variant == "fnf-cached":  # one fixed batch: I0 and its mask are sampled at the first step, then read from the cache
        items = [{"prompt": PROMPTS[j % len(PROMPTS)], "seed": j} for j in range(args.batch)] * n
    else:  # as speed.py: a new seed per item, so every step samples I0
        items = [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(n * args.batch)]

    class Steps(L.Callback):
        """A step's time runs from one step's end to the next one's: Lightning's batch fetch and loop are in it, as
        the whole step is in AlignProp's and the hand-written loop's."""

        def on_train_start(self, trainer, module):
            with torch.no_grad():  # same state as AlignProp's at its first step: one text-encoder call done
                module.model.encode_prompts([""])
            memory.start(sampling=False)  # sampled during each step only
            self.begin()

        def begin(self):
            if channel.receive() != "step":
                raise SystemExit("worker: expected 'step'")
            counter.counts.clear()
            memory.resume()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if args.device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - self.start
            memory.pause()
            channel.send(time=elapsed)
            if batch_idx + 1 < n:
                self.begin()  # the next step's command comes before its batch is fetched

    channel.send(ready=True, versions={p: version(p) for p in ("diffusers", "peft", "transformers", "lightning",
                                                               "torch")},
                 lora_params=sum(p.numel() for p in model.lora_parameters()),
                 fingerprint=model_fingerprint(model.unet, model.vae, model.text_encoder, model.tokenizer))
    L.Trainer(max_steps=n, accelerator=args.device, logger=False, enable_checkpointing=False, callbacks=[Steps()],
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(
        module, DataLoader(items, batch_size=args.batch, collate_fn=collate))
    finish(channel, memory, counter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", required=True)
    for name in ("batch", "num-steps", "k", "rank", "warmup", "steps"):
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--guidance", type=float, required=True)
    args = parser.parse_args()
    channel = Channel()
    torch.manual_seed(0)
    if args.variant == "alignprop":
        worker_alignprop(args, channel)
    else:
        worker_fnf(args, channel, args.variant)


if __name__ == "__main__":
    main()
