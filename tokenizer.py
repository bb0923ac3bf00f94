"""The tokenizer wrapper: tokenizer.json (or a GGUF's vocabulary) plus the chat formats and stop ids.

    tok.encode(text) / tok.decode(ids)          plain text <-> token ids (no special tokens added)
    tok.chat(messages)                          Llama-3 or ChatML prompt ids, ending where the assistant speaks
    tok.stop_ids                                end-of-text and end-of-turn ids: generate() stops on them

    Tokenizer.from_folder(folder, eos_ids)      from a Hugging Face folder's tokenizer files

model.load_model builds it (gguf_loader.py from a GGUF's metadata); this file only knows about text.
Read next: hf_loader.py, gguf_loader.py, lora.py; engine.py, precision.py and cpu16.py are speed only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

CHAT_END = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}
TURN_START = {"llama3": "<|start_header_id|>", "chatml": "<|im_start|>"}


class TokenizerError(ValueError):
    """A tokenizer file cannot be used; the message names the file (model.py: ModelLoadError)."""


@dataclass
class Tokenizer:
    tk: HFTokenizer  # the `tokenizers` library object
    chat_format: str | None  # "llama3", "chatml", or None for a base model without a chat format
    stop_ids: tuple = ()
    bos_token: str | None = None  # Llama-3 prepends <|begin_of_text|>; ChatML models prepend nothing
    default_system: str | None = None  # ChatML templates (Qwen, SmolLM2) insert one when none is given
    pad_id: int = 0  # fills padded positions; masks never come from it (pad may equal a stop id)
    turn_ids: tuple = ()  # the token that starts each turn (<|start_header_id|>, <|im_start|>): prefix caching's cuts

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Messages [{"role", "content"}] formatted as the model was trained to read them."""
        if self.chat_format is None:
            raise ValueError("this tokenizer has no chat format (neither <|start_header_id|> nor <|im_start|>)")
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
        if self.chat_format == "llama3":
            turn = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
            text = (self.bos_token or "") + "".join(turn.format(m["role"], m["content"].strip()) for m in messages)
            return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.chat_text(messages, add_generation_prompt))

    @classmethod
    def build(cls, tk, eos_ids=(), chat_template: str | None = None, bos_token: str | None = None):
        """Wrap a `tokenizers.Tokenizer`: detect the chat format, collect stop ids, find the default system."""
        vocab = tk.get_vocab()
        fmt = "llama3" if "<|start_header_id|>" in vocab else "chatml" if "<|im_start|>" in vocab else None
        stops = [i for i in eos_ids if i is not None]
        if fmt is not None:
            stops.append(vocab[CHAT_END[fmt]])
        default_system = None
        if fmt == "chatml" and chat_template:
            # The ChatML templates of Qwen2.5 and SmolLM2 write a literal default system turn; reuse it.
            m = re.search(r"<\|im_start\|>system(?:\\n|\n)(.+?)<\|im_end\|>", chat_template)
            default_system = m.group(1) if m and "{{" not in m.group(1) else None
        if fmt == "llama3" and bos_token is None:
            bos_token = "<|begin_of_text|>"
        pad = stops[0] if stops else 0
        turns = (vocab[TURN_START[fmt]],) if fmt is not None else ()
        return cls(tk, fmt, tuple(dict.fromkeys(stops)), bos_token, default_system, pad, turns)

    @classmethod
    def from_folder(cls, folder: Path, eos_ids=()) -> "Tokenizer":
        """tokenizer.json, with the chat template of tokenizer_config.json or chat_template.jinja."""
        path, cfg_path = Path(folder) / "tokenizer.json", Path(folder) / "tokenizer_config.json"
        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # a missing file, or the tokenizers library's own error for a broken one
            raise TokenizerError(f"{path}: cannot read tokenizer ({e})") from None
        try:
            config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{cfg_path}: tokenizer_config.json is not valid JSON ({e})") from None
        template = config.get("chat_template")
        if template is None and (Path(folder) / "chat_template.jinja").exists():
            template = (Path(folder) / "chat_template.jinja").read_text()
        return cls.build(tk, eos_ids, template)
