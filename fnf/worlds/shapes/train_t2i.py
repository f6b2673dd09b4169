"""Train "shapes-t2i", the embedded tiny Stable-Diffusion-shaped model, from scratch on 2 CPU cores.

Without a model hub, Focus-N-Fix needs a base model that (a) follows shapes-world prompts and (b) has
the flaws fine-tuning should fix: it learns the generator's defects and the unsafe mark on tempting
prompts because they are in its training data. Output: a StableDiffusionPipeline folder
(AutoencoderKL, from-scratch CLIPTextModel, CLIPTokenizer over the world's words, UNet2DConditionModel,
DDIM scheduler), safetensors, no safety checker.

Stages, all deterministic for a given ``--seed`` and step counts:

1. VAE. The latent space is *fixed* to a 2x2 Haar-like code of the image (LL colour minus the
   background per RGB channel, plus the HH "checker" band of the grey level, which is exactly what a
   defect is); the encoder is regressed onto it and the decoder learns to invert it. A fixed target
   decouples the UNet from the VAE (the UNet trains on the exact code, without an encoder pass) and
   converges in minutes, where a free KL-VAE needed far more steps than the CPU budget allows.
2. Text encoder: a short pre-training of the phrase probe (see ``PhraseProbe``).
3. Text encoder + UNet jointly: v-prediction on a zero-terminal-SNR schedule (sampling starts from
   pure noise at t=999, no signal leak at this tiny resolution), 10% empty prompts for CFG, EMA,
   the probe as an auxiliary loss and extra loss weight on defect / mark latents.

``OMP_WAIT_POLICY=PASSIVE python -m fnf.worlds.shapes.train_t2i --out fnf/worlds/shapes/weights/shapes-t2i``
(PASSIVE: on a shared CPU, spinning OpenMP threads made every step up to 30x slower.)
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from fnf.worlds.shapes.generator import BACKGROUND, COLOUR_NAMES, POSITIONS, SHAPES, make_batch, parse_prompt
from fnf.worlds.shapes.training_run import TrainingRun, args_parser, parsed_args
from fnf.worlds.tokenizer import build_clip_tokenizer

# One BPE token per world word except "and" and "right" (a few BPE pieces each): build_clip_tokenizer ranks
# merges alphabetically, so the ("a", "n") merge of "and" would split "orange" and ("r", "i") of "right"
# would split "triangle". The text encoder reads multi-piece words fine; prompts stay <= 29 pieces.
WORDS = ["a", ",", *COLOUR_NAMES, *SHAPES, "top", "bottom", "left"]
MAX_TOKENS = 32  # longest prompt: 29 BPE pieces + BOS/EOS
HH_GAIN = 3.0  # a defect's checker has HH = -0.3 in [-1, 1] units; gain brings it to the LL scale
LOGVAR_TARGET = -12.0  # near-deterministic posterior: sample() ~ mode()


@dataclass
class TrainArgs:
    seed: int = 0
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 2e-3
    unet_steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    text_pretrain_steps: int = 200
    probe_weight: float = 0.1
    defect_rate: float = 0.2  # flaws in the training scenes (unsafe: tempting prompts only); the model draws
    unsafe_rate: float = 0.28  # them more often than that (at 0.3 / 0.35: 50-53% defects, 31-61% marks)
    defect_weight: float = 6.0  # loss weights on defect / mark latents; with 1 the model draws them too rarely
    unsafe_weight: float = 2.0  # (6% / 14% at CFG 4); sampled rates vary a lot between runs (see MODEL_CARD.md)
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    minutes: float | None = None  # wall-clock cap over both stages (stopping early breaks reproducibility)
    checkpoint_minutes: float = 5.0


# --- architecture -------------------------------------------------------------------------------


def build_vae() -> AutoencoderKL:
    """Factor-2 VAE: 32x32x3 <-> 16x16x4; no mid-block attention (not needed, costly on CPU)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32, mid_block_add_attention=False,
    )


def build_text_encoder(tokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def build_unet() -> UNet2DConditionModel:
    """16 -> 8 -> 4 -> 2 (1.96M params). The 2x2 level is the scene grid: zero padding makes every cell
    distinct, so cross-attention queries at 2x2 and 4x4 know their position and can pick "their" phrase;
    the 16x16 and 8x8 levels only render, without attention (cheap). ``addition_embed_type="text"``
    adds an attention-pooled prompt vector to the time embedding (needs only encoder_hidden_states)."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 48, 64, 64),
        down_block_types=("DownBlock2D",) * 2 + ("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",) * 2,
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
        addition_embed_type="text", addition_embed_type_num_heads=4,
    )


def build_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
        clip_sample=False, set_alpha_to_one=True, steps_offset=1,  # offset unused by "trailing"
    )


# --- stage 1: the VAE on a fixed Haar-like latent code --------------------------------------------


def haar_latents(images: Tensor) -> Tensor:
    """(B, 3, 32, 32) in [0, 1] -> raw latents (B, 4, 16, 16): LL - background (RGB) and gained grey HH."""
    x = images * 2 - 1
    background = torch.tensor(BACKGROUND, dtype=x.dtype).view(1, 3, 1, 1) * 2 - 1
    ll = F.avg_pool2d(x, 2) - background
    grey = x.mean(1, keepdim=True)
    hh = (grey[..., 0::2, 0::2] + grey[..., 1::2, 1::2] - grey[..., 0::2, 1::2] - grey[..., 1::2, 0::2]) / 4
    return torch.cat([ll, hh * HH_GAIN], 1)


def haar_decode(latents: Tensor) -> Tensor:
    """Exact inverse of ``haar_latents`` for images without LH/HL detail: (B, 4, 16, 16) -> (B, 3, 32, 32)
    in [0, 1]. A VAE-free view of what the UNet generates (diagnostics)."""
    background = torch.tensor(BACKGROUND, dtype=latents.dtype).view(1, 3, 1, 1) * 2 - 1
    ll = F.interpolate(latents[:, :3] + background, scale_factor=2, mode="nearest")
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=latents.dtype).repeat(16, 16)  # (32, 32)
    hh = F.interpolate(latents[:, 3:] / HH_GAIN, scale_factor=2, mode="nearest") * checker
    return ((ll + hh + 1) / 2).clamp(0, 1)


def scene_batch(n: int, args: TrainArgs, step: int, stream: int) -> dict:
    """Fresh training scenes for every step; ``stream`` separates VAE, UNet and statistics data."""
    return make_batch(n, args.seed * 10_000_019 + stream * 1_000_003 + step, args.defect_rate, args.unsafe_rate,
                      "train")


def train_vae(vae: AutoencoderKL, args: TrainArgs, deadline: float, log) -> float:
    """Encoder -> Haar code (MSE), decoder <- Haar code (+ small noise) -> image (L1, x10 on defects/marks).
    Returns the scaling factor that gives the latents unit standard deviation."""
    opt = torch.optim.AdamW(vae.parameters(), args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.vae_lr, total_steps=max(args.vae_steps, 1), pct_start=0.05)
    stats = haar_latents(scene_batch(512, args, 0, stream=2)["images"])
    std = float(stats.std())
    vae.train()
    for step in range(args.vae_steps):
        if time.time() > deadline:
            log(f"vae: time cap hit at step {step}")
            break
        batch = scene_batch(args.vae_batch, args, step, stream=0)
        x, target = batch["images"] * 2 - 1, haar_latents(batch["images"])
        moments = vae.quant_conv(vae.encoder(x)) if vae.quant_conv is not None else vae.encoder(x)
        mean, logvar = moments.chunk(2, dim=1)
        decoded = vae.decode(target + 0.02 * std * torch.randn_like(target)).sample
        weight = 1 + 10 * (batch["defect_masks"] + batch["unsafe_masks"])
        recon = ((decoded - x).abs() * weight).mean()
        loss = recon + F.mse_loss(mean, target) / std**2 + 1e-3 * (logvar - LOGVAR_TARGET).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step} recon {recon.item():.4f} enc {F.mse_loss(mean, target).item() / std**2:.5f}")
    vae.eval()
    return 1.0 / std


# --- stage 2: text encoder + UNet ----------------------------------------------------------------


def tokenize(tokenizer, prompts: list[str]) -> Tensor:
    return tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids  # (B, L)


class PhraseProbe(nn.Module):
    """Training-only read-out of (colour, shape, position) from each phrase's last token.

    CLIP's text encoder is causal: only a phrase's last piece ("left", the "t" of "right") can see the
    phrase's colour and shape. Asking it to carry all three gives the UNet's cross-attention one
    key (position) and value (colour, shape) per object, the attribute binding that diffusion loss alone
    learned slowly (positions were right long before colours and shapes)."""

    def __init__(self, tokenizer, width: int) -> None:
        super().__init__()
        self.register_buffer("end_ids", torch.tensor(tokenizer.convert_tokens_to_ids(["left</w>", "t</w>"])))
        self.head = nn.Linear(width, len(COLOUR_NAMES) + len(SHAPES) + len(POSITIONS))

    def loss(self, hidden: Tensor, ids: Tensor, prompts: list[str]) -> Tensor:
        """hidden (B, L, D), ids (B, L); empty prompts contribute nothing."""
        objects = [o for p in prompts if p for o in parse_prompt(p)]
        if not objects:
            return hidden.sum() * 0.0
        targets = torch.tensor([[COLOUR_NAMES.index(o.colour), SHAPES.index(o.shape), POSITIONS.index(o.position)]
                                for o in objects])  # (N, 3), phrase order = row-major token order
        logits = self.head(hidden[torch.isin(ids, self.end_ids)])  # (N, 14)
        parts = logits.split([len(COLOUR_NAMES), len(SHAPES), len(POSITIONS)], dim=1)
        return sum(F.cross_entropy(part, targets[:, i]) for i, part in enumerate(parts)) / 3


def pretrain_text(text_encoder: CLIPTextModel, probe: PhraseProbe, tokenizer, args: TrainArgs, log) -> None:
    """A few hundred cheap text-only probe steps, so the UNet starts from a text encoder with structure."""
    params = list(text_encoder.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, 2e-3, weight_decay=0.01)
    for step in range(args.text_pretrain_steps):
        prompts = scene_batch(128, args, step, stream=3)["prompts"]
        ids = tokenize(tokenizer, prompts)
        loss = probe.loss(text_encoder(ids)[0], ids, prompts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.text_pretrain_steps - 1:
            log(f"text step {step} probe loss {loss.item():.4f}")


def warmup_cosine(total_steps: int, warmup: int = 200) -> Callable[[int], float]:
    """LR multiplier for ``LambdaLR``: linear warm-up, cosine decay to 10%."""
    def lr_at(s: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * s / max(total_steps, 1)))
        return min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * cosine)

    return lr_at


def flaw_weight(batch: dict, defect_weight: float, unsafe_weight: float) -> Tensor:
    """Per-latent loss weight (B, 1, 16, 16): rare, small flaws are learned late and drawn faintly (the judge then
    misses them), so their latents count ``defect_weight`` / ``unsafe_weight`` times."""
    return (1 + (defect_weight - 1) * F.max_pool2d(batch["defect_masks"], 2)
            + (unsafe_weight - 1) * F.max_pool2d(batch["unsafe_masks"], 2))


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def denoiser_batch(args, step: int, scaling: float, gen: torch.Generator) -> tuple[dict, Tensor, list[str]]:
    """Step ``step``'s scenes (with their flaw masks), as scaled Haar latents (B, 4, 16, 16), and their prompts, each
    dropped to "" with probability ``args.cfg_dropout`` (classifier-free guidance); the UNet and flow trainers'."""
    batch = scene_batch(args.batch, args, step, stream=1)
    latents = haar_latents(batch["images"]) * scaling
    drop = torch.rand(len(latents), generator=gen) < args.cfg_dropout
    return batch, latents, ["" if d else p for d, p in zip(drop.tolist(), batch["prompts"])]


def train_unet(unet, text_encoder, probe: PhraseProbe, tokenizer, scheduler: DDIMScheduler, scaling: float,
               args: TrainArgs, deadline: float, log, checkpoint) -> tuple[nn.Module, nn.Module, int]:
    """v-prediction on Haar latents x scaling (+ the phrase probe).

    Returns EMA copies of (unet, text_encoder) and the number of steps done (fewer if the time cap hit)."""
    params = list(unet.parameters()) + list(text_encoder.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.unet_steps))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    alphas = scheduler.alphas_cumprod  # (T,)
    gen = torch.Generator().manual_seed(args.seed)
    unet.train()
    text_encoder.train()
    last_checkpoint, running, done = time.time(), 0.0, 0
    for step in range(args.unet_steps):
        if time.time() > deadline:
            log(f"unet: time cap hit at step {step}")
            break
        batch, latents, prompts = denoiser_batch(args, step, scaling, gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * latents  # v
        ids = tokenize(tokenizer, prompts)
        hidden = text_encoder(ids)[0]  # (B, L, D)
        weight = flaw_weight(batch, args.defect_weight, args.unsafe_weight)  # (B, 1, 16, 16)
        loss = (weight * (unet(noisy, t, encoder_hidden_states=hidden).sample - target).square()).mean()
        probe_loss = probe.loss(hidden, ids, prompts)
        opt.zero_grad(set_to_none=True)
        (loss + args.probe_weight * probe_loss).backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_update(ema_unet, unet, min(args.ema_decay, (1 + step) / (10 + step)))
        ema_update(ema_text, text_encoder, min(args.ema_decay, (1 + step) / (10 + step)))
        done = step + 1
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.unet_steps - 1:
            log(f"unet step {step} loss {running:.4f} probe {probe_loss.item():.3f} lr {sched.get_last_lr()[0]:.2e}")
        if time.time() - last_checkpoint > 60 * args.checkpoint_minutes:
            checkpoint(ema_unet, ema_text, step + 1)
            last_checkpoint = time.time()
    return ema_unet, ema_text, done


# --- assembly -----------------------------------------------------------------------------------


def save_pipeline(folder: Path, vae, text_encoder, tokenizer, unet, scheduler, info: dict) -> None:
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = args_parser(__doc__.split("\n")[0], TrainArgs())
    parser.add_argument("--vae-from", type=Path, default=None, help="reuse this folder's VAE (experiments)")
    ns = parser.parse_args(argv)
    args = parsed_args(ns, TrainArgs)

    run = TrainingRun(args.seed, args.minutes, ns.work_dir, prefix="shapes-t2i-")
    work, log, deadline = run.work, run.log, run.deadline
    log(f"args {asdict(args)} work_dir {work}")
    tokenizer = build_clip_tokenizer(WORDS, work / "tokenizer", model_max_length=MAX_TOKENS)
    info = {"args": asdict(args), "command": " ".join(["python -m fnf.worlds.shapes.train_t2i", *sys.argv[1:]])}
    if ns.vae_from is not None:
        vae = AutoencoderKL.from_pretrained(ns.vae_from, subfolder="vae").eval()
        info["vae_from"] = str(ns.vae_from)
    else:
        vae = build_vae()
        scaling = train_vae(vae, args, deadline, log)
        vae.register_to_config(scaling_factor=scaling)
    info["vae_seconds"] = run.seconds()
    log(f"vae done: scaling_factor {vae.config.scaling_factor:.4f}, "
        f"{sum(p.numel() for p in vae.parameters())} params")

    torch.manual_seed(args.seed + 1)
    unet, text_encoder, scheduler = build_unet(), build_text_encoder(tokenizer), build_scheduler()
    log(f"unet {sum(p.numel() for p in unet.parameters())} params, "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters())} params")

    def checkpoint(ema_unet, ema_text, steps: int) -> None:
        save_pipeline(work / "checkpoint", vae, ema_text, tokenizer, ema_unet, scheduler,
                      {**info, "unet_steps_done": steps, "seconds": run.seconds()})
        log(f"checkpoint at step {steps} -> {work / 'checkpoint'}")

    probe = PhraseProbe(tokenizer, text_encoder.config.hidden_size)
    pretrain_text(text_encoder, probe, tokenizer, args, log)
    ema_unet, ema_text, done = train_unet(unet, text_encoder, probe, tokenizer, scheduler,
                                          vae.config.scaling_factor, args, deadline, log, checkpoint)
    info.update(seconds=run.seconds(), unet_steps_done=done)
    save_pipeline(ns.out, vae, ema_text, tokenizer, ema_unet, scheduler, info)
    log(f"saved {ns.out} in {run.seconds()}s")


if __name__ == "__main__":
    main()
