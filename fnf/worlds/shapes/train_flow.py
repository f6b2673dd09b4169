"""Train "shapes-flow", the second embedded model: a tiny rectified-flow transformer in Stable Diffusion 3's layout.

shapes-t2i gives Focus-N-Fix a UNet + DDIM base model; this one gives it the other family (SD3 / FLUX):
an MMDiT (``SD3Transformer2DModel``) trained with the rectified-flow objective and sampled with
``FlowMatchEulerDiscreteScheduler``, three text encoders (two CLIP with projection, one T5) and the same
world, flaws included. Output: a ``StableDiffusion3Pipeline`` folder, safetensors.

Reused from shapes-t2i (``train_t2i``): the VAE (copied; latents are the fixed Haar-like code x scaling, so
the transformer trains on the exact code without an encoder pass), the CLIP tokenizer and, as a starting
point, the first text encoder; the data stream, loss weights on defect / mark latents, CFG dropout, EMA,
warm-up + cosine learning rate and the phrase probe. The prompt embedding is computed by the pipeline's own
``encode_prompt`` on a pipeline built from the modules in training, so training and inference cannot drift.

Rectified flow (SD3, arXiv 2403.03206, eq. 1-3): x_s = (1 - s) x0 + s eps, the transformer at t = 1000 s
predicts the velocity eps - x0; s from a logit-normal (the "lognorm(0, 1)" that SD3 found best).

``OMP_WAIT_POLICY=PASSIVE python -m fnf.worlds.shapes.train_flow --out fnf/worlds/shapes/weights/shapes-flow``
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from torch import Tensor, nn
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                          PreTrainedTokenizerFast, T5Config, T5EncoderModel)

from fnf.worlds.shapes.train_t2i import (MAX_TOKENS, WORDS, PhraseProbe, denoiser_batch, ema_update, flaw_weight,
                                         tokenize, warmup_cosine)
from fnf.worlds.shapes.training_run import TrainingRun, args_parser, parsed_args
from fnf.worlds.tokenizer import build_t5_like_tokenizer

T5_TOKENS = 18  # longest prompt: 3 phrases x 5 words + "," + "and" + </s> (word-level: one token per word)
WIDTH = 128  # T5 width = joint_attention_dim; the two CLIP widths (64 + 64) fill it, so no zero padding
SHIPPED_T2I = Path(__file__).parent / "weights" / "shapes-t2i"


@dataclass
class FlowArgs:
    seed: int = 0
    steps: int = 2000
    batch: int = 32
    lr: float = 2e-3  # at shapes-t2i's 1e-3 the shapes were still blobs after 1000 steps (MODEL_CARD.md)
    probe_weight: float = 0.1
    defect_rate: float = 0.15  # flaws in the training scenes (unsafe: tempting prompts only); the model draws
    unsafe_rate: float = 0.23  # them at other rates, steeply so for marks (see MODEL_CARD.md)
    defect_weight: float = 3.0  # loss weights on defect / mark latents; shapes-t2i's 6 / 2 overdrew both
    unsafe_weight: float = 1.5
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    sigma_sampling: str = "logit_normal"  # or "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # FlowMatchEulerDiscreteScheduler shift (sampling only: training covers every sigma)
    minutes: float | None = None  # wall-clock cap (stopping early breaks reproducibility)
    checkpoint_minutes: float = 5.0

    def __post_init__(self) -> None:
        if self.sigma_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"--sigma-sampling: expected 'logit_normal' or 'uniform', got {self.sigma_sampling!r}")


# --- architecture -------------------------------------------------------------------------------


def build_transformer() -> SD3Transformer2DModel:
    """16x16x4 latents in 2x2 patches: 64 image tokens in joint attention with 50 text tokens (32 CLIP positions,
    both encoders' features side by side, then 18 T5). adaLN-Zero (DiT, arXiv 2212.09748): every block starts
    as the identity and the output at zero, the usual way to train a DiT from scratch."""
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=WIDTH, caption_projection_dim=128, pooled_projection_dim=128,
        pos_embed_max_size=8,
    )
    for name, module in transformer.named_modules():
        if name == "proj_out" or name.endswith(("norm1.linear", "norm1_context.linear", "norm_out.linear")):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
    return transformer


def clip_config(tokenizer: CLIPTokenizer, layers: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, projection_dim=64, max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def text_encoder_from(t2i: Path, tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """CLIP-L's stand-in: shapes-t2i's text encoder (4 layers) plus a fresh pooled projection."""
    encoder = CLIPTextModelWithProjection(clip_config(tokenizer, layers=4))
    trained = CLIPTextModel.from_pretrained(t2i, subfolder="text_encoder", use_safetensors=True)
    encoder.text_model.load_state_dict(trained.state_dict())  # strict: the same transformer, no projection
    return encoder


def build_t5(tokenizer) -> T5EncoderModel:
    """T5-XXL's stand-in: 2 bidirectional layers over world words, relative positions up to the prompt length."""
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=WIDTH, d_kv=32, num_heads=4, d_ff=256, num_layers=2, dropout_rate=0.0,
        relative_attention_num_buckets=16, relative_attention_max_distance=T5_TOKENS,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    ))


def build_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)


def build_pipeline(t2i: Path, work: Path, shift: float) -> StableDiffusion3Pipeline:
    """Every module: transformer, T5 and the second CLIP fresh (seeded by the caller), the rest from ``t2i``."""
    trained = AutoencoderKL.from_pretrained(t2i, subfolder="vae", use_safetensors=True)
    # The SD3 pipeline decodes latents / scaling_factor + shift_factor. (A fresh config: no local _name_or_path.)
    config = {k: v for k, v in trained.config.items() if k != "_name_or_path"}
    vae = AutoencoderKL.from_config({**config, "shift_factor": 0.0}).eval()
    vae.load_state_dict(trained.state_dict())
    tokenizer = CLIPTokenizer.from_pretrained(t2i, subfolder="tokenizer")
    build_t5_like_tokenizer([*WORDS, "and", "right"], work / "tokenizer_3")
    # fnf and the pipeline use this many T5 tokens
    tokenizer_3 = PreTrainedTokenizerFast.from_pretrained(work / "tokenizer_3", model_max_length=T5_TOKENS)
    return StableDiffusion3Pipeline(
        transformer=build_transformer(), scheduler=build_scheduler(shift), vae=vae,
        text_encoder=text_encoder_from(t2i, tokenizer), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer, layers=2)), tokenizer_2=tokenizer,
        text_encoder_3=build_t5(tokenizer_3), tokenizer_3=tokenizer_3,
    )


TRAINED = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def encode(pipe: StableDiffusion3Pipeline, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """The pipeline's own conditioning: (B, 32 + 18, 128) token embeddings, (B, 128) pooled."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=torch.device("cpu"),
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=pipe.tokenizer_3.model_max_length)
    return embeds, pooled


def sample_sigmas(n: int, args: FlowArgs, gen: torch.Generator) -> Tensor:
    if args.sigma_sampling == "uniform":
        return torch.rand(n, generator=gen)
    return torch.sigmoid(args.logit_mean + args.logit_std * torch.randn(n, generator=gen))  # (B,)


# --- training -----------------------------------------------------------------------------------


def train_flow(pipe: StableDiffusion3Pipeline, probe: PhraseProbe, args: FlowArgs, deadline: float, log,
               checkpoint) -> tuple[StableDiffusion3Pipeline, int]:
    """Rectified flow on Haar latents x scaling (+ the phrase probe on CLIP-1's penultimate states, which the
    transformer reads). Returns a pipeline of EMA copies and the number of steps done (fewer if the cap hit)."""
    modules = [getattr(pipe, name) for name in TRAINED]
    params = [p for m in modules for p in m.parameters()] + list(probe.parameters())
    opt = torch.optim.AdamW(params, args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps))
    ema = StableDiffusion3Pipeline(**{**pipe.components,  # shares VAE, tokenizers and scheduler
                                      **{name: copy.deepcopy(m).eval() for name, m in zip(TRAINED, modules)}})
    scaling = pipe.vae.config.scaling_factor
    gen = torch.Generator().manual_seed(args.seed)
    for m in modules:
        m.train()
    last_checkpoint, running, done = time.time(), 0.0, 0
    for step in range(args.steps):
        if time.time() > deadline:
            log(f"flow: time cap hit at step {step}")
            break
        batch, x0, prompts = denoiser_batch(args, step, scaling, gen)  # x0: (B, 4, 16, 16)
        sigma = sample_sigmas(len(x0), args, gen)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        embeds, pooled = encode(pipe, prompts)
        velocity = pipe.transformer(noisy, encoder_hidden_states=embeds, pooled_projections=pooled,
                                    timestep=sigma * 1000).sample
        weight = flaw_weight(batch, args.defect_weight, args.unsafe_weight)  # (B, 1, 16, 16)
        loss = (weight * (velocity - (noise - x0)).square()).mean()
        clip_1 = embeds[:, :MAX_TOKENS, :pipe.text_encoder.config.hidden_size]  # (B, 32, 64) penultimate states
        probe_loss = probe.loss(clip_1, tokenize(pipe.tokenizer, prompts), prompts)
        opt.zero_grad(set_to_none=True)
        (loss + args.probe_weight * probe_loss).backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for name, m in zip(TRAINED, modules):
            ema_update(getattr(ema, name), m, min(args.ema_decay, (1 + step) / (10 + step)))
        done = step + 1
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            log(f"flow step {step} loss {running:.4f} probe {probe_loss.item():.3f} lr {sched.get_last_lr()[0]:.2e}")
        if time.time() - last_checkpoint > 60 * args.checkpoint_minutes:
            checkpoint(ema, step + 1)
            last_checkpoint = time.time()
    return ema, done


def save_pipeline(folder: Path, pipe: StableDiffusion3Pipeline, info: dict) -> None:
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = args_parser(__doc__.split("\n")[0], FlowArgs())
    parser.add_argument("--t2i", type=Path, default=SHIPPED_T2I,
                        help="shapes-t2i folder whose VAE, CLIP tokenizer and text encoder this model starts from")
    ns = parser.parse_args(argv)
    args = parsed_args(ns, FlowArgs)
    if not (ns.t2i / "model_index.json").is_file():
        raise ValueError(f"--t2i: {ns.t2i} is not a shapes-t2i pipeline folder (no model_index.json)")

    run = TrainingRun(args.seed, args.minutes, ns.work_dir, prefix="shapes-flow-")
    work, log = run.work, run.log
    log(f"args {asdict(args)} t2i {ns.t2i} work_dir {work}")
    pipe = build_pipeline(ns.t2i, work, args.shift)
    for name in TRAINED:
        log(f"{name}: {sum(p.numel() for p in getattr(pipe, name).parameters())} params")
    info = {"args": asdict(args), "t2i": str(ns.t2i),
            "command": " ".join(["python -m fnf.worlds.shapes.train_flow", *sys.argv[1:]])}

    def checkpoint(ema: StableDiffusion3Pipeline, steps: int) -> None:
        save_pipeline(work / "checkpoint", ema, {**info, "steps_done": steps, "seconds": run.seconds()})
        log(f"checkpoint at step {steps} -> {work / 'checkpoint'}")

    probe = PhraseProbe(pipe.tokenizer, pipe.text_encoder.config.hidden_size)
    ema, done = train_flow(pipe, probe, args, run.deadline, log, checkpoint)
    info.update(seconds=run.seconds(), steps_done=done)
    save_pipeline(ns.out, ema, info)
    log(f"saved {ns.out} in {run.seconds()}s")


if __name__ == "__main__":
    main()
