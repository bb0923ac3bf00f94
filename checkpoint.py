"""Checkpoints, written atomically: what model.load_model reads back, and what train.py resumes from.

    save_checkpoint(model, tok, folder)     a Hugging Face folder (config.json, model.safetensors, tokenizer
                                            files), loadable by transformers and by model.load_model
    save_training_state(out, step, ...)     OUT/checkpoint: the policy (a HF folder, or with LoRA its adapters
                                            in PEFT's layout), AdamW's state, the critic, the step, the args
    checkpoint_to_resume(out, ...), load_training_state(ckpt, ...)     what --resume reads
    make_optimizer(module, lr, ...)         the optimizer whose state is saved and resumed (AdamW or SGD)
    metrics_log(path, resumed_at, is_main)  OUT/metrics.jsonl, one line per step; a resumed run drops the lines
                                            of the steps it takes again
    export_merged(run_dir, dest)            a LoRA run's adapters folded into a plain HF folder

Every folder is built aside and swapped in with two renames (swap_folder), so a killed run leaves the old
checkpoint or the new one, never half of one. Tensors go to safetensors, everything else to JSON: nothing
is ever pickled. Under torchrun, sharded weights and optimizer state are gathered first (parallel.py) and
rank 0 writes, so a checkpoint is the same files whatever the number of ranks.
Read next: evaluate.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import decision
import engine
import lora
import model as M
from parallel import full_state, load_optimizer_state, optimizer_state, this_rank
from ppo import Critic
from tokenizer import Tokenizer

# --------------------------------------------------------------------------------------------------
# A Hugging Face folder
# --------------------------------------------------------------------------------------------------


def hf_config(cfg: M.Config) -> dict:
    """The config.json a Hugging Face loader needs to rebuild the model (model.Config.from_hf reads it back)."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    d = {"architectures": [arch[cfg.model_type]], "model_type": cfg.model_type,
         "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
         "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
         "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_dim, "rms_norm_eps": cfg.norm_eps,
         "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
         "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_seq_len,
         "hidden_act": "silu", "bos_token_id": cfg.bos_token_id,
         "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0]}
    if cfg.model_type != "qwen2":
        d["attention_bias"] = cfg.o_bias
    d["mlp_bias"] = cfg.mlp_bias
    return d


def save_checkpoint(model: M.Transformer, tokenizer: Tokenizer, folder, dtype: torch.dtype | None = None,
                    state: dict | None = None) -> Path:
    """Write a Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer files) atomically.

    Loadable by transformers' AutoModelForCausalLM and by load_model. Everything is written into a
    temporary sibling folder that then replaces `folder`, so a crash never leaves a half-written checkpoint.
    `state` replaces model.state_dict() (a sharded model's gathered weights).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    names = model.hf_names()
    state = {names[k]: v.detach().to(dtype or v.dtype).contiguous().cpu()
             for k, v in (model.state_dict() if state is None else state).items()
             if k in names and not (k == "lm_head.weight" and model.cfg.tie_embeddings)}
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = {**hf_config(model.cfg), "torch_dtype": str(dtype or model.lm_head.weight.dtype).split(".")[-1]}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        eos = list(tokenizer.stop_ids)
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2))
        tokenizer.tk.save(str(tmp / "tokenizer.json"))
        special = {"eos_token": tokenizer.tk.id_to_token(eos[0]) if eos else None, "bos_token": tokenizer.bos_token,
                   "tokenizer_class": "PreTrainedTokenizerFast"}
        (tmp / "tokenizer_config.json").write_text(json.dumps(special, indent=2))
        swap_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def swap_folder(tmp, folder) -> None:
    """Replace `folder` by the finished folder `tmp`: two renames, so a reader sees the old or the new one.

    A crash between them leaves `folder.old` (whole) and no `folder`; find_checkpoint looks there too.
    """
    tmp, folder = Path(tmp), Path(folder)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The models a run trains from: policy, frozen reference, PPO critic
# --------------------------------------------------------------------------------------------------


def load_models(args, base, ckpt: Path | None):
    """(policy, ref, critic) from the starting model `base` and a checkpoint to resume. The reference is the
    starting model (also on resume); with LoRA it is the policy itself with its adapters disabled, so no
    second copy is held. ref and critic are None when not needed."""
    dtype, dev = base.lm_head.weight.dtype, base.lm_head.weight.device
    ref = None
    if args.lora_rank:
        with resume_file(ckpt / "adapter_model.safetensors") if ckpt else contextlib.nullcontext():
            policy = (lora.load_adapter(base, ckpt) if ckpt else
                      lora.add_lora(base, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets))
        ref = policy if args.beta > 0 else None
    else:
        with resume_file(ckpt / "model.safetensors") if ckpt else contextlib.nullcontext():
            policy = M.load_model(str(ckpt), dtype, dev)[0] if ckpt else base
        if args.beta > 0:
            ref = base if ckpt else M.load_model(args.model, dtype, dev)[0]
            ref.requires_grad_(False)
            engine.unpack(ref)  # it scores, never decodes: its decoding copy would cost 538 MB for SmolLM2
    critic = None
    if args.algo == "ppo":
        backbone = M.load_model(args.model, dtype, dev)[0]
        if args.lora_rank:
            lora.add_lora(backbone, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets, seed=1)
        critic = Critic(backbone)
        if ckpt:
            with resume_file(ckpt / "critic.safetensors") as path:
                load_trainable_state(critic, path)
    if args.compile:
        for m in (policy, critic.backbone if critic is not None else None):
            if m is not None:
                M.compile_blocks(m, dynamic=True)
        M.compile_decode(policy)
    return policy, ref, critic


# --------------------------------------------------------------------------------------------------
# Training state: OUT/checkpoint = the policy + optimizer state + step, swapped in atomically
# --------------------------------------------------------------------------------------------------


def make_optimizer(module: torch.nn.Module, lr: float, kind: str = "adamw",
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters, or plain gradient descent (kind "sgd": the decision head's recipe)."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
    return optimizer(params, lr=lr, weight_decay=weight_decay)


def save_optimizer(sd: dict, path: Path) -> None:
    """An optimizer state dict's tensors (AdamW's moments) as safetensors (never pickle); the rest as JSON."""
    tensors = {f"{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()
               if torch.is_tensor(v)}
    save_file(tensors, str(path), metadata={"param_groups": json.dumps(sd["param_groups"])})


def optimizer_shape(groups: list[dict]) -> tuple[str, list[int]]:
    """Which optimizer (AdamW's groups have betas, SGD's do not) and how many tensors each group holds."""
    return ("AdamW" if "betas" in groups[0] else "SGD"), [len(g["params"]) for g in groups]


def load_optimizer(opt: torch.optim.Optimizer, path: Path, module: torch.nn.Module | None = None) -> None:
    """Load what save_optimizer wrote; into a sharded module's optimizer, each rank keeps its shard."""
    state = {}
    with safe_open(str(path), "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        for key in f.keys():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = f.get_tensor(key)
    saved, now = optimizer_shape(groups), optimizer_shape(opt.param_groups)
    if saved != now:  # another optimizer, or other trainable tensors
        raise ValueError(f"saved for {saved[0]} with parameter groups of {saved[1]} tensors, but this run has "
                         f"{now[0]} with {now[1]}: resume with the settings and --lora-rank the run was started with")
    load_optimizer_state(opt, {"state": state, "param_groups": groups}, module)


def base_model_id(name: str) -> str:
    """The --model as an adapter's base_model_name_or_path: an absolute path for local files."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def save_training_state(out: Path, step: int, policy, tok, opt, args, critic=None, critic_opt=None) -> None:
    """OUT/checkpoint: the policy (a HF folder, or with LoRA its adapters in PEFT's layout), the optimizer,
    the critic's trainable weights, the step and the args; built aside and swapped in. Every rank calls it
    (sharded weights are gathered first); rank 0 writes."""
    weights, opt_state = full_state(policy), optimizer_state(opt, policy)
    if critic is not None:
        critic_weights, critic_opt_state = full_state(critic), optimizer_state(critic_opt, critic)
    if this_rank() != 0:
        return
    tmp = out / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if args.lora_rank:
        tmp.mkdir(parents=True)
        lora.save_adapter(policy, tmp, base_model_id(args.model), weights)  # load_model(tmp) = base + adapters
    else:
        save_checkpoint(policy, tok, tmp, state=weights)  # config.json, model.safetensors, tokenizer.json, ...
    save_optimizer(opt_state, tmp / "optimizer.safetensors")
    decision.save_head(policy, tmp)  # --decision-head: the manager's trained decision head, if it has one
    if critic is not None:
        save_file(trainable_state(critic, critic_weights), str(tmp / "critic.safetensors"))
        save_optimizer(critic_opt_state, tmp / "critic_optimizer.safetensors")
    state = {"step": step, "args": vars(args),
             "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    swap_folder(tmp, out / "checkpoint")


def trainable_state(module: torch.nn.Module, weights: dict | None = None) -> dict[str, torch.Tensor]:
    """The parameters an optimizer updates (named_parameters lists a tied weight once), from `weights`
    (gathered ones) when given."""
    return {n: (p if weights is None else weights[n]).detach().contiguous().cpu()
            for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    missing = set(trainable_state(module)) - set(state)
    if missing:
        raise ValueError(f"missing {sorted(missing)[:3]}: saved with other LoRA settings?")
    module.load_state_dict(state, strict=False)


def export_merged(run_dir: Path, dest: Path) -> None:
    """python train.py --out RUN --export-merged DEST: RUN's adapters folded into a plain HF checkpoint."""
    ckpt = find_checkpoint(run_dir)
    if ckpt is None or not (ckpt / "adapter_config.json").is_file():
        raise SystemExit(f"{run_dir}: no LoRA checkpoint to export (a full fine-tuning checkpoint is already "
                         "a Hugging Face folder)")
    dtype = getattr(torch, json.loads((ckpt / "trainer_state.json").read_text())["args"]["dtype"])
    model, tok = M.load_model(str(ckpt), dtype)  # base model + adapters
    save_checkpoint(lora.merge_lora(model), tok, dest)
    print(f"merged {ckpt} into {dest}", file=sys.stderr)


def find_checkpoint(out: Path) -> Path | None:
    """OUT/checkpoint, or OUT/checkpoint.old when a crash fell between swap_folder's two renames."""
    for folder in (out / "checkpoint", out / "checkpoint.old"):
        if (folder / "trainer_state.json").is_file():
            return folder
    return None


@contextlib.contextmanager
def resume_file(path: Path):
    """Reading a file --resume needs: if it is missing or damaged, the run ends in one line that names it and the
    way out, before anything is written (the log is trimmed and checkpoints replaced only after every read)."""
    try:
        yield path
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError, M.ModelLoadError) as e:
        why = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise SystemExit(f"--resume: {path} is missing or damaged ({why}); nothing was changed: delete "
                         f"{path.parent} to start afresh, or pass another --out") from None


def checkpoint_to_resume(out: Path, resume: bool, model_name: str) -> Path | None:
    """OUT's checkpoint with --resume (None: start afresh); refuses to overwrite one without it. Creates OUT."""
    ckpt = find_checkpoint(out) if resume else None
    if resume and ckpt is None and (out / "checkpoint").exists():  # a folder, but no state to say which step
        with resume_file(out / "checkpoint" / "trainer_state.json") as path:
            path.read_text()
    if resume and ckpt is None:
        print(f"--resume: no checkpoint in {out}; starting from {model_name}", file=sys.stderr)
    elif not resume and find_checkpoint(out):
        raise SystemExit(f"{out} already holds a checkpoint: pass --resume to continue it, or another --out")
    if this_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt:
            print(f"resuming from {ckpt}", file=sys.stderr)
    return ckpt


def trim_metrics(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint, which a resumed run writes again, and any line that does not
    parse (a kill can cut the last one in half)."""
    if path.exists():
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)


def metrics_log(path: Path, resumed_at: int | None, is_main: bool):
    """log(record): one JSON line per call in `path` (rank 0 only). A fresh run starts the file anew; a
    resumed one drops the lines of steps after its checkpoint, which it is about to take again."""
    if is_main:
        trim_metrics(path, resumed_at) if resumed_at is not None else path.unlink(missing_ok=True)

    def log(record: dict) -> None:
        if is_main:
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
    return log


def load_training_state(ckpt: Path, opt, policy, critic=None, critic_opt=None) -> int:
    """--resume: the optimizers' state and the RNG from `ckpt` (weights are loaded with the models);
    returns the number of finished steps."""
    with resume_file(ckpt / "trainer_state.json") as path:
        state = json.loads(path.read_text())
        step, rng = int(state["step"]), torch.frombuffer(bytearray(base64.b64decode(state["torch_rng"])), dtype=torch.uint8)
    with resume_file(ckpt / "optimizer.safetensors") as path:
        load_optimizer(opt, path, policy)
    if critic is not None:
        with resume_file(ckpt / "critic_optimizer.safetensors") as path:
            load_optimizer(critic_opt, path, critic)
    torch.set_rng_state(rng)
    return step
