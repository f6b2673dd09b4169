"""How the UNet's LoRA runs in sampling steps: folded into one weight, and base/tuned row pairs.

On a GPU a sampling step's cost is per-call work (op dispatch, kernel launches), not arithmetic. Three levers,
all exact up to float rounding:

- fold (``SamplerArgs.fold_lora``): in gradient-free steps each LoRA Linear runs as one matmul with
  W_θ = W + s·B·A, computed once per pass, instead of peft's base matmul, A, B, scale and add in every call
  (~14 aten ops -> 4); a cross-attention key / value projection of the prompt, whose input is the same tensor at
  every step of the pass, runs once per pass;
- fold with gradients (``SamplerArgs.fold_lora_grad``): the same in the differentiable steps, W_θ built once per
  chain with the graph to A and B, so forward, checkpoint recompute and backward of every call skip peft's
  LoRA ops; the K steps' weight gradients meet in W_θ and flow to A and B once. Costs one copy of the targeted
  weights in the compute dtype while the step's graph lives;
- pair (``SamplerArgs.fused_base``): one UNet call carries the base model θ0 on the first half of the batch and
  the tuned model θ on the second half. A folded layer multiplies the halves by W and W_θ in one batched matmul;
  every other LoRA layer (convolutions, FSDP-sharded or dropout-active layers) zeroes its LoRA ``A`` output on
  the base half through a forward hook. peft's mixed-adapter batches (``adapter_names=``) would index with
  Python lists in every layer: a device sync each.

A compiled UNet keeps peft's layers (a new forward per pass would recompile); its hooks are installed once.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


class BaseRowsOff:
    """Forward hooks on LoRA ``A`` projections that zero the base half of the batch while ``active``."""

    def __init__(self) -> None:
        self.active = False

    def install(self, layers: list[LoraLayer]) -> None:
        for layer in layers:
            for down in layer.lora_A.values():
                if self._zero_base_half not in down._forward_hooks.values():
                    down.register_forward_hook(self._zero_base_half)

    def _zero_base_half(self, module: nn.Module, args, output: Tensor) -> Tensor | None:
        if not self.active:
            return None
        output[: len(output) // 2] = 0  # no gradients here (gradient_free_lora): in place is safe
        return output


class LoraLayers:
    """A UNet's LoRA layers and its cross-attention key / value projections, found once: walking SD1.5's ~2 000
    modules takes ~2.5 ms of Python, and every sampling pass needs them (fold, pair, adapter on / off)."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.all = [m for m in unet.modules() if isinstance(m, LoraLayer)]
        self.text_projections = [projection for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention
                                 for projection in (m.to_k, m.to_v)]
        """Their input is the prompt embedding."""

    def enable(self, enabled: bool) -> None:
        """Switch the adapter of every layer on or off (what diffusers' ``enable_adapters`` does, without its walk)."""
        for layer in self.all:
            layer.enable_adapters(enabled)


@contextmanager
def gradient_free_lora(layers: LoraLayers, base_rows_off: BaseRowsOff, pair: bool, fold: bool):
    """Within the block (no gradients), UNet calls run the LoRA folded (``fold``) and, with ``pair``, treat the
    first half of every batch as the base model θ0 and the second half as the tuned model θ."""
    with torch.no_grad(), ExitStack() as stack:
        folded = FoldedLora(layers, pair, same_text=True) if fold else FoldedLora.none()
        stack.enter_context(folded.installed())
        if pair:
            rest = [m for m in layers.all if m not in folded.forwards]
            base_rows_off.install(rest)
            base_rows_off.active = True
            stack.callback(setattr, base_rows_off, "active", False)
        yield


class FoldedLora:
    """The foldable LoRA Linears of a UNet with W_θ = W + s·B·A built once, under the grad mode of the moment:
    with gradients enabled, W_θ carries them to A and B. ``installed()`` swaps the folded forwards in; a
    checkpointed step's recomputation in backward installs the same forwards again (the same W_θ)."""

    def __init__(self, layers: LoraLayers | None, pair: bool = False, same_text: bool = False) -> None:
        """``same_text``: every call gets the same prompt-embedding tensor (a gradient-free pass), so the
        cross-attention key / value projections compute their output once and return it again while their input is
        that same tensor object."""
        foldable = [] if layers is None or _compiled(layers.unet) else [m for m in layers.all if _foldable(m)]
        self.forwards = {layer: _folded_forward(layer, pair) for layer in foldable}
        if same_text:
            for layer in layers.text_projections:
                if layer in self.forwards:
                    self.forwards[layer] = _reusing_last_output(self.forwards[layer])

    @classmethod
    def none(cls) -> FoldedLora:
        """No folded layer: peft's LoRA layers run as they are."""
        return cls(None)

    @contextmanager
    def installed(self):
        for layer, forward in self.forwards.items():
            layer.forward = forward
        try:
            yield
        finally:
            for layer in self.forwards:
                del layer.forward  # back to peft's class forward


def _reusing_last_output(forward):
    """``forward`` that returns its previous output again when called with the same tensor object (which it holds, so
    the object cannot be freed and its id reused; nothing writes to the prompt embedding in place)."""
    last_input, last_output = None, None

    def call(x: Tensor) -> Tensor:
        nonlocal last_input, last_output
        if x is not last_input:
            last_input, last_output = x, forward(x)
        return last_output

    return call


def _compiled(unet: nn.Module) -> bool:
    return getattr(unet, "_fnf_compiled", False)


def _foldable(layer: nn.Module) -> bool:
    """A plain LoRA Linear with one active adapter whose output in this pass is W x + s·B·A x exactly."""
    if not isinstance(layer, LoraLinear) or layer.merged or layer.disable_adapters or len(layer.active_adapters) != 1:
        return False
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in layer.lora_variant or _sharded(layer.base_layer.weight):
        return False
    return isinstance(layer.lora_dropout[adapter], nn.Identity) or not layer.training  # no dropout in this pass


def _sharded(weight: Tensor) -> bool:
    """Sharded outside its module's forward: an FSDP2 ``DTensor``, or an FSDP1 (``use_orig_params``) view of this
    rank's slice of the flat parameter, 1-D or empty, where the whole (out, in) weight would be."""
    return isinstance(weight, DTensor) or weight.dim() != 2


def _folded_forward(layer: LoraLinear, pair: bool):
    adapter, base = layer.active_adapters[0], layer.base_layer
    kind = base.weight.device.type
    autocast = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
    dtype = torch.get_autocast_dtype(kind) if autocast else base.weight.dtype  # cast once here, not per call
    delta = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight * layer.scaling[adapter]  # (out, in)
    tuned = (base.weight + delta).to(dtype)
    bias = None if base.bias is None else base.bias.to(dtype)
    if pair:  # (2, in, out): [W^T; W_θ^T] for the [θ0 rows; θ rows] halves
        return partial(_pair_forward, torch.stack([base.weight.to(dtype), tuned]).mT, bias)
    return partial(F.linear, weight=tuned, bias=bias)


def _pair_forward(weights: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    halves = x.reshape(2, -1, x.shape[-1])  # (N, ..., in) -> (2, N/2 · ..., in)
    out = torch.bmm(halves, weights) if bias is None else torch.baddbmm(bias, halves, weights)  # (2, N/2 · ..., out)
    return out.view(*x.shape[:-1], out.shape[-1])
