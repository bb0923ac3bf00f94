"""LoRA (Hu et al., 2021): trainable low-rank adapters on the linear layers of a frozen model, in PEFT's files.

    add_lora(model, rank, alpha, dropout, targets)   freeze every weight; adapters A [r, in], B [out, r] (B = 0)
    adapters_disabled(model)                         the base model again: a LoRA policy's KL reference, no copy
    merge_lora(model)                                W + (alpha / r) B A folded into each weight, adapters dropped
    save_adapter(model, folder, base) / load_adapter(model, folder)
                                                     adapter_model.safetensors + adapter_config.json, PEFT's layout

A layer can take an adapter when it has model.Linear's slots (lora_a, lora_b, lora_scale, lora_dropout,
lora_enabled); model.Linear.forward adds (alpha / r) B A dropout(x) to its output. This file imports nothing
of the project: adapter file names come from the model's own map to Hugging Face names (model.hf_names()),
so peft loads what this writes, and the other way round. Read next: hf_loader.py.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # every projection of a model.py block


class AdapterError(ValueError):
    """An adapter folder cannot be used; the message names the file and the problem."""


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=LORA_TARGETS,
             seed: int = 0) -> nn.Module:
    """Freeze every weight and give each target Linear a trainable adapter; returns the model.

    A [r, in] starts like nn.Linear's init and B [out, r] at zero, so an untrained adapter changes nothing.
    A and B are float32 whatever the base dtype: AdamW's small steps are not lost to bf16 rounding.
    """
    unknown = set(targets) - set(LORA_TARGETS)
    if rank < 1 or unknown:
        raise ValueError(f"LoRA needs rank >= 1 and targets among {LORA_TARGETS} (got rank {rank}, {unknown or ''})")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            a = torch.empty(rank, mod.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            mod.lora_a = nn.Parameter(a.to(mod.weight.device))
            mod.lora_b = nn.Parameter(torch.zeros(mod.out_features, rank, device=mod.weight.device))
            mod.lora_scale, mod.lora_dropout = alpha / rank, dropout
    model.lora = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "targets": list(targets)}
    return model


def lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "lora_a", None) is not None]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the frozen base model: the KL reference of a LoRA policy, with no second copy in memory."""
    layers = lora_layers(model)
    for m in layers:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.lora_enabled = True


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its weight, W + (alpha / r) B A (in float32), and drop the adapters."""
    for m in lora_layers(model):
        m.weight.copy_((m.weight.float() + m.lora_scale * m.lora_b @ m.lora_a).to(m.weight.dtype))
        m.lora_a = m.lora_b = None
    model.__dict__.pop("lora", None)
    return model


# --------------------------------------------------------------------------------------------------
# PEFT's files: layers.0.wq.lora_a <-> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
# --------------------------------------------------------------------------------------------------


def adapter_names(model: nn.Module) -> dict[str, str]:
    """Our adapter parameter names -> PEFT's, for every layer that has an adapter."""
    hf = model.hf_names()
    out = {}
    for name, m in model.named_modules():
        if getattr(m, "lora_a", None) is not None:
            theirs = "base_model.model." + hf[f"{name}.weight"].removesuffix(".weight")
            out[f"{name}.lora_a"], out[f"{name}.lora_b"] = theirs + ".lora_A.weight", theirs + ".lora_B.weight"
    return out


def projection_names(model: nn.Module) -> dict[str, str]:
    """Our projection names -> PEFT's target_modules names: wq -> q_proj, w_gate -> gate_proj, ..."""
    hf = model.hf_names()
    return {t: hf[f"layers.0.{t}.weight"].removesuffix(".weight").rsplit(".", 1)[-1] for t in LORA_TARGETS}


def save_adapter(model: nn.Module, folder, base_model: str, state: dict | None = None) -> None:
    """adapter_model.safetensors and adapter_config.json (PEFT's layout) into an existing folder.
    `state` replaces the model's parameters (a sharded model's gathered weights)."""
    from safetensors.torch import save_file

    params = dict(model.named_parameters()) if state is None else state
    tensors = {theirs: params[ours].detach().contiguous().cpu() for ours, theirs in adapter_names(model).items()}
    save_file(tensors, str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora, proj = model.lora, projection_names(model)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": lora["r"], "lora_alpha": lora["lora_alpha"], "lora_dropout": lora["lora_dropout"],
              "target_modules": [proj[t] for t in lora["targets"]], "bias": "none"}
    (Path(folder) / "adapter_config.json").write_text(json.dumps(config, indent=2))


def read_adapter_config(folder) -> dict:
    path = Path(folder) / "adapter_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: cannot read the adapter config ({e})") from None


def load_adapter(model: nn.Module, folder) -> nn.Module:
    """Give `model` the adapters saved in `folder` by save_adapter (or by peft, same layout)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = read_adapter_config(folder)
    ours = {v: k for k, v in projection_names(model).items()}
    try:
        targets = [ours[t] for t in cfg["target_modules"]]
        add_lora(model, int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout", 0.0)), targets)
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{folder / 'adapter_config.json'}: not a LoRA config this model supports ({e})") from None
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterError(f"{path}: adapter weights not found")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors' own error type for a truncated or corrupt header
        raise AdapterError(f"{path}: cannot read safetensors file ({e})") from None
    params = dict(model.named_parameters())
    for name, theirs in adapter_names(model).items():
        if theirs not in state or state[theirs].shape != params[name].shape:
            raise AdapterError(f"{path}: {theirs} is missing or has the wrong shape")
        params[name].data.copy_(state[theirs])
    return model
