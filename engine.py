"""The rollout engine: the weights that decoding reads, held in the layout of the fastest kernel this machine has.

Speed only: every number it produces is the plain model's to float32 rounding; skip it on a first read.

Every RL framework keeps two copies of the policy: the training copy, which the loss pass and the optimizer
use, and an inference copy that rollouts decode with, laid out for a fast kernel. verl syncs the actor's
weights into vLLM after each update; OpenRLHF and TRL do the same with their inference engines. Here the
inference copy is one tensor per linear layer, beside its parameter:

    pack(model)      give every linear layer a copy of its weight in the fast layout (model.load_model does)
    sync(model)      re-pack the weights that changed since they were packed: call it after optimizer.step()
    unpack(model)    drop the copies (benchmarks time decoding without them)
    linear(x, layer) what model.Linear calls without gradients: the packed product when the copy is current

On CPUs the fast layout is oneDNN's: `torch.ops.mkldnn._reorder_linear_weight` reorders a float32 weight
into the blocked layout that `_linear_pointwise` streams at close to memory speed. torch's own float32
`F.linear` goes through MKL, which takes slower code paths on AMD processors: on this project's 2-core EPYC
a SmolLM2 decode step runs 1.3-1.8x faster from the packed copies (`python bench/bench_engine.py`,
docs/speed.md). torch.compile's `freezing` prepacks the same way, but treats weights as constants, so it
cannot serve a policy that changes every step.

A copy is current while its parameter has the same storage at the same version (every in-place write, the
optimizer's included, bumps a tensor's version counter). A stale copy is never used: the layer falls back
to F.linear until the next sync. So forgetting sync costs speed, never correctness. Where no faster layout
exists (float32 on GPUs, 16-bit weights on CPUs, weights sharded by FSDP) pack leaves the layer alone and
F.linear runs.
Gradients always take F.linear: the training copy and the loss pass are untouched. The copies cost one more
float32 copy of the weights in memory (538 MB for SmolLM2-135M), half that in bf16.

The copy's dtype is precision.PRODUCTS when the layer is packed: with --precision bf16 each product rounds its
input to bf16 and hands its output on in float32, the rounding points of precision.linear in the loss pass,
and the output layer keeps a float32 copy (precision.py says why). On a GPU a bf16 copy is a plain bf16
tensor (its tensor cores need no other layout); a float32 GPU weight gets no copy.
A compiled graph (model.compile_decode) cannot hold oneDNN's opaque tensors, so there each product is one
custom op, `memory_r1::packed_linear`, that names its copy by a slot number and checks it at run time.

model.py calls `linear`; train.py calls `sync` after each optimizer step. Read next: lora.py.
"""

from __future__ import annotations

import itertools
import time
import weakref

import torch
import torch.nn.functional as F

import precision

CPU_FAST_LAYOUT = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
CPU_BF16_LAYOUT = CPU_FAST_LAYOUT and torch.ops.mkldnn._is_mkldnn_bf16_supported()  # oneDNN's bf16 kernels


class Packed:
    """One layer's fast copy: the reordered weight, and which tensor (storage, version) it was made from."""

    def __init__(self, weight: torch.Tensor, slot: int, dtype: torch.dtype = torch.float32):
        w = weight.detach()
        self.dtype, self.blocked = dtype, w.is_cpu
        # oneDNN's blocked layout (opaque) on a CPU; a GPU's bf16 copy is a plain tensor
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype)) if w.is_cpu else w.to(dtype)
        self.ptr, self.version, self.slot = w.data_ptr(), w._version, slot

    def __deepcopy__(self, memo):
        return None  # a copied model has other weights: it decodes with F.linear until pack() is called on it

    def current(self, weight: torch.Tensor) -> bool:
        """Still a copy of `weight`: the same storage, not written since (optimizer steps bump _version)."""
        return weight.data_ptr() == self.ptr and weight._version == self.version


# slot -> Packed. A compiled graph cannot hold an oneDNN tensor, so it names a layer's copy by its slot and
# the custom op below looks it up at run time; the entry dies with its layer.
TABLE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_next_slot = itertools.count()


def copy_dtype(layer) -> torch.dtype | None:
    """The dtype of `layer`'s fast copy, or None where it gets none: a plain float32 weight (not a DTensor
    shard, not 16-bit: cpu16.py handles those) on a CPU with oneDNN, or on a GPU with bf16 products."""
    w = layer.weight
    if type(w.data) is not torch.Tensor or w.dtype != torch.float32:
        return None
    dtype = torch.float32 if getattr(layer, "keep_float32", False) else precision.PRODUCTS
    if w.is_cpu and dtype == torch.bfloat16:
        return dtype if CPU_BF16_LAYOUT else None
    if w.is_cpu:
        return dtype if CPU_FAST_LAYOUT and precision.PACK_FLOAT32 else None
    return dtype if w.is_cuda and dtype == torch.bfloat16 else None


def pack_layer(layer) -> None:
    """layer.packed := a fresh copy of its weight in the fast layout (None where there is none)."""
    dtype = copy_dtype(layer)
    if dtype is None:
        layer.packed = None
        return
    slot = layer.packed.slot if layer.packed is not None else next(_next_slot)
    layer.packed = TABLE[slot] = Packed(layer.weight, slot, dtype)


def layers_of(model) -> list:
    """The modules with a `packed` slot (model.Linear)."""
    return [m for m in model.modules() if hasattr(m, "packed")]


def pack(model):
    """Give every linear layer of `model` its fast copy. Returns the model."""
    for layer in layers_of(model):
        pack_layer(layer)
    return model


def unpack(model):
    """Drop the fast copies: decoding goes back to F.linear (benchmarks time both). Returns the model."""
    for layer in layers_of(model):
        layer.packed = None
    return model


def sync(model) -> float:
    """Re-pack the layers whose weight changed since they were packed (one pass); returns the seconds taken.
    Layers that were never packed stay so."""
    t0 = time.perf_counter()
    for layer in layers_of(model):
        if layer.packed is not None and not layer.packed.current(layer.weight):
            pack_layer(layer)
    return time.perf_counter() - t0


def product(x: torch.Tensor, packed: Packed, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ W.T + b -> [..., out] from the packed copy, in its dtype; the output in x's."""
    xd, bd = x.to(packed.dtype), None if bias is None else bias.to(packed.dtype)
    if not packed.blocked:
        return F.linear(xd, packed.weight, bd).to(x.dtype)
    y = torch.ops.mkldnn._linear_pointwise(xd.reshape(-1, x.shape[-1]), packed.weight, bd, "none", [], "")
    return y.view(*x.shape[:-1], -1).to(x.dtype)  # [N, out] -> [..., out]


@torch.library.custom_op("memory_r1::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slot: int) -> torch.Tensor:
    """The product as one opaque op for compiled graphs: the packed copy if it is current, else F.linear."""
    packed = TABLE.get(slot)
    if packed is None or not packed.current(weight):
        return F.linear(x, weight, bias)
    return product(x, packed, bias)


@packed_linear.register_fake
def _(x, weight, bias, slot):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, layer) -> torch.Tensor | None:
    """What model.Linear calls: x @ W.T + b from the packed copy, or None where it must not be used
    (gradients, a stale copy, a 16-bit input)."""
    if layer.packed is None or torch.is_grad_enabled() or x.dtype != torch.float32:
        return None
    if torch.compiler.is_compiling():
        return packed_linear(x, layer.weight, layer.bias, layer.packed.slot)
    if not layer.packed.current(layer.weight):
        return None
    return product(x, layer.packed, layer.bias)
