"""Several processes for train.py: torchrun ranks, DDP replicas or FSDP2 shards (torch.distributed).

One process unless torchrun sets WORLD_SIZE; then a process group (gloo on CPU, NCCL on GPU). What
train.py needs from it, each small:
    init_distributed, world_size, this_rank    who am I
    my_share, validation_share                 my contiguous share of a step's prompts, of the validation set
    gather, gather_lists, all_sum, concat_over_ranks
                                               rewards, metrics and loss normalisers over every rank
    prepare_models, backward, no_sync          DDP or FSDP2 around the loss pass; a backward whose gradients
                                               add up to the one-process gradient
    fsdp_shard, is_sharded                     FSDP2: weights, gradients and AdamW state sharded
    full_state, optimizer_state                whole weights and optimizer state for a checkpoint
    load_optimizer_state                       ... and back, each rank keeping its shard
    clip_gradients, barrier                    the global gradient norm, also of sharded gradients; wait for all
In one process every function here is a plain pass-through, so train.py reads the same either way, and a
first reading can skip this file. Read next: checkpoint.py.
"""

from __future__ import annotations

import contextlib
import os

import torch

import engine


def init_distributed(args) -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the process group and picks this rank's GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(args.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def this_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if world_size() > 1 else 0


def gather(obj) -> list:
    """Every rank's `obj`, in rank order ([obj] in one process). For small things: scores, lengths."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(values):
    """Element-wise sum over ranks of a list of numbers, or of a dict's values (keys kept)."""
    if world_size() == 1:
        return values
    if isinstance(values, dict):
        return dict(zip(values, all_sum(list(values.values()))))
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def gather_lists(lists: dict[str, list]) -> dict[str, list]:
    """Each key's list, concatenated over ranks in rank order (per-completion scores, lengths, ...)."""
    every = gather(lists)
    return {k: [x for part in every for x in part[k]] for k in lists}


def concat_over_ranks(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's 1-D tensor, concatenated in rank order, and the index where this rank's part begins."""
    every = gather(values.cpu())
    return torch.cat(every), sum(map(len, every[:this_rank()]))


def barrier() -> None:
    """Every rank waits here for the others (nobody runs ahead of a checkpoint being written)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def my_share(items: list) -> tuple[list, int]:
    """This rank's contiguous share of `items` and the index of its first item (len(items) % world == 0)."""
    n = len(items) // world_size()
    return items[this_rank() * n:(this_rank() + 1) * n], this_rank() * n


def validation_share(items: list, lock_step: bool) -> tuple[list, int]:
    """This rank's share of `items` (the last rank may get fewer) and how many of them are real. With
    `lock_step` (FSDP2 gathers weights collectively, so every rank must make the same model calls) the share
    is padded with copies of the last item, whose results the caller drops."""
    per_rank = -(-len(items) // world_size())  # ceil
    mine = items[this_rank() * per_rank:(this_rank() + 1) * per_rank]
    n_real = len(mine)
    return (mine + [items[-1]] * (per_rank - n_real) if lock_step else mine), n_real


class Call(torch.nn.Module):
    """module(*args) runs inner.<method>(*args). DDP syncs the gradients of what runs inside a forward call,
    and the loss pass is a method (Transformer.group_logprobs, Critic.group_values), not the forward."""

    def __init__(self, inner: torch.nn.Module, method: str):
        super().__init__()
        self.inner, self.method = inner, method

    def forward(self, *args):
        return getattr(self.inner, self.method)(*args)  # the instance's: FSDP2 wraps it there


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP over the trainable parameters when there are several unsharded ranks; the module otherwise."""
    if world_size() == 1 or is_sharded(module):
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def prepare_models(policy, ref, critic, device, fsdp: bool):
    """The loss-pass modules (policy, critic): plain calls in one process, DDP-wrapped over several, with
    every model sharded by FSDP2 first when `fsdp`. Sampling and the reference use the models directly."""
    if fsdp:  # shard after loading whole weights; the optimizers are then built on the shards
        if world_size() == 1:
            raise SystemExit("--fsdp shards over several processes: start train.py with torchrun")
        fsdp_shard(policy, policy.layers, ("group_logprobs", "decode_step"))  # the loss pass; generate's steps
        if ref is not None and ref is not policy:
            fsdp_shard(ref, ref.layers, ("group_logprobs",))
        if critic is not None:
            fsdp_shard(critic, critic.backbone.layers, ("group_values",))
    # The loss pass as module calls, so that DDP sees it (it syncs the gradients of what runs in a forward).
    policy_pass = data_parallel(Call(policy, "group_logprobs"), device)
    return policy_pass, None if critic is None else data_parallel(Call(critic, "group_values"), device)


def backward(loss: torch.Tensor) -> None:
    """loss.backward(), where `loss` is this rank's share of the whole step's loss: DDP and FSDP average
    gradients over ranks, so the loss is multiplied by the world size to make them add up instead."""
    (loss * world_size()).backward()


def fsdp_shard(module: torch.nn.Module, blocks, methods: tuple[str, ...]) -> None:
    """FSDP2: each block's parameters, then the rest's (the root: embeddings, norm, heads), sharded over the
    ranks and all-gathered just in time around each block's forward and backward. Entry points other than
    forward are registered so they gather too: a block's loss-pass and decode steps (Block.tree,
    Block.step) and the root's `methods` (the loss pass, generate's decode step, the critic's values)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    engine.unpack(module)  # shards have no fast layout: decoding takes F.linear
    for layer in blocks:
        fully_shard(layer)
        register_fsdp_forward_method(layer, "tree")
        register_fsdp_forward_method(layer, "step")  # a decode step (Transformer.decode_step)
    fully_shard(module)
    for name in methods:
        register_fsdp_forward_method(module, name)


def is_sharded(module: torch.nn.Module) -> bool:
    inner = getattr(module, "inner", module)
    return hasattr(inner, "set_requires_gradient_sync")  # what fully_shard gives a module


def full_state(module: torch.nn.Module) -> dict | None:
    """The module's state dict with whole tensors: gathered (a collective, every rank calls it) when sharded."""
    if not is_sharded(module):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def no_sync(module, last: bool):
    """Gradients are reduced over ranks at the minibatch's last backward only; earlier ones accumulate
    locally (DDP: no_sync; FSDP2: set_requires_gradient_sync). A module of None (no critic) needs nothing."""
    if last or world_size() == 1 or module is None:
        yield
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        module.inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.inner.set_requires_gradient_sync(True)


def clip_gradients(opt: torch.optim.Optimizer, max_norm: float) -> float:
    """Clip the global gradient norm of the optimizer's parameters; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # a DTensor when sharded


def param_names(module: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in its order (its state dict's indices)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def optimizer_state(opt: torch.optim.Optimizer, module: torch.nn.Module) -> dict:
    """opt.state_dict(); for a sharded module the whole state, gathered (a collective: every rank calls it)."""
    if not is_sharded(module):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not sd:  # with cpu_offload only rank 0 receives the gathered state
        return {}
    index = {n: i for i, n in enumerate(param_names(module, opt))}  # FSDP names the state by parameter
    return {"state": {index[n]: st for n, st in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict, module: torch.nn.Module | None = None) -> None:
    """opt.load_state_dict(sd) of a whole state (integer parameter indices); a sharded module's optimizer
    keeps only its own shard of it."""
    if module is None or not is_sharded(module):
        return opt.load_state_dict(sd)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = param_names(module, opt)
    named = {"state": {names[i]: st for i, st in sd["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
    set_optimizer_state_dict(module, opt, named, options=StateDictOptions(full_state_dict=True))
