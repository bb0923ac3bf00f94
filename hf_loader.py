"""Read a Hugging Face checkpoint folder, local or from the hub: its config, its weights, its tokenizer.

    config, tensors, tok = read_hf_folder(folder)   # config.json as a dict, {HF tensor name: tensor}, Tokenizer
    folder = download_from_hub("Qwen/Qwen2.5-7B-Instruct")   # config, tokenizer and safetensors files only

Only safetensors weights are read (never pickle files) and no code from a checkpoint runs. model.load_model
turns the result into a Transformer, with the same code that builds one from a GGUF file (gguf_loader.py).
Every problem is a ModelLoadError whose message names the file or hub id. Read next: gguf_loader.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from tokenizer import Tokenizer, TokenizerError


class ModelLoadError(ValueError):
    """A checkpoint cannot be used; the message names the file (or hub id) and the problem."""


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: {what} is not valid JSON ({e})") from None


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards a model.safetensors.index.json lists, by HF name."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index, "shard index")["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ModelLoadError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                             "(only safetensors weights are loaded, never pickle files)")
    out = {}
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise ModelLoadError(f"{path}: weight shard listed in the index is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt headers
            raise ModelLoadError(f"{path}: cannot read safetensors file ({e})") from None
    return out


def read_hf_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor], Tokenizer]:
    """(config.json dict with the end-of-turn ids of generation_config.json added, tensors, tokenizer)."""
    config = read_json(folder / "config.json", "config.json")
    eos = config.get("eos_token_id")
    eos = list(eos) if isinstance(eos, list) else [] if eos is None else [eos]
    gen_path = folder / "generation_config.json"
    if gen_path.exists():  # chat models list their end-of-turn ids here (Llama-3: 128001, 128008, 128009)
        g = read_json(gen_path, "generation_config.json").get("eos_token_id")
        eos += g if isinstance(g, list) else [g]
    try:
        tok = Tokenizer.from_folder(folder, eos)
    except TokenizerError as e:
        raise ModelLoadError(str(e)) from None
    return config, read_safetensors(folder), tok


HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja", "*.safetensors", "model.safetensors.index.json"]


def download_from_hub(repo_id: str) -> Path:
    """Download config, tokenizer and safetensors files only (never pickle weights or custom code)."""
    from huggingface_hub import snapshot_download  # imported when a hub id is given: it is slow to import

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:
        raise ModelLoadError(f"{repo_id}: not a local path, and downloading it from the Hugging Face hub "
                             f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
