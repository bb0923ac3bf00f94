"""Several processes for train.py: torchrun ranks, DDP replicas or FSDP2 shards (torch.distributed).

One process unless torchrun sets WORLD_SIZE; then a process group (gloo on CPU, NCCL on GPU). What
train.py needs from it, each small:
    init_distributed, world_size, this_rank    who am I; my_share: my contiguous share of a step's prompts
    gather, all_sum                            rewards, metrics and loss normalisers over every rank
    Call, data_parallel, no_sync               the loss pass as a module call, so DDP syncs its gradients
    fsdp_shard, is_sharded                     FSDP2: weights, gradients and AdamW state sharded
    full_state, optimizer_state                whole weights and optimizer state for a checkpoint
    clip_gradients                             the global gradient norm, also of sharded gradients
In one process every function here is a plain pass-through, so train.py reads the same either way.
"""

from __future__ import annotations

import contextlib
import os

import torch



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


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks."""
    if world_size() == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def my_share(items: list, rank: int, world: int) -> tuple[list, int]:
    """This rank's contiguous share of `items` and the index of its first item (len(items) % world == 0)."""
    n = len(items) // world
    return items[rank * n:(rank + 1) * n], rank * n


class Call(torch.nn.Module):
    """module(*args) runs inner.<method>(*args). DDP syncs the gradients of what runs inside a forward call,
    and the loss pass is a method (Transformer.logprobs, Critic.completion_values), not the forward."""

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


def fsdp_shard(module: torch.nn.Module, blocks, methods: tuple[str, ...]) -> None:
    """FSDP2: each block's parameters, then the rest's (the root: embeddings, norm, heads), sharded over the
    ranks and all-gathered just in time around each block's forward and backward. Entry points other than
    forward are registered so they gather too: a block's shared-prompt step (Block.shared) and the root's
    `methods` (the loss pass, the critic's values)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in blocks:
        fully_shard(layer)
        register_fsdp_forward_method(layer, "shared")
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
    locally (DDP: no_sync; FSDP2: set_requires_gradient_sync)."""
    if last or world_size() == 1:
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
