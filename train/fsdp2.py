"""FSDP2 (`torch.distributed.fsdp.fully_shard`), the second way ranks share a model (`run.strategy = "fsdp2"`).

Under "ddp" every rank holds the whole model and all-reduces the gradients of what trains. Under
"fsdp2" the parameters are DTensors split along their first dimension over the ranks: each rank
keeps 1/world_size of the weights, gradients and AdamW moments, and a block's full weights exist
only while the block runs. That is for runs whose training state, or frozen weights, leave too
little memory on one GPU (training more than LoRA; a bigger student).

Groups (`shard_model`): each decoder layer, the projector, and the root (the SpeechLM: token
embeddings, tied LM head, final norm). A group is all-gathered before its forward and freed after
it (and again for backward); the root stays gathered from its forward until its backward ends
(FSDP2's rule for the root), which is what lets a stage call `model.decoder.logits` or read
`model.decoder.lm_head.weight` after `model.hidden_states` (the fused KD loss). `hidden_states` is
registered as a forward method of the root (`register_fsdp_forward_method`), so every call the
stages and the sampler make enters through the root (`forward` is never called in training);
`logits` needs no registration of its own, as it runs on root-group weights, always after a
`hidden_states` call. Nothing that trains may sit in the root group (`shard_model` refuses it).
The frozen speech encoder is not sharded: every rank keeps it whole (FSDP2's `ignored_params`;
0.46B parameters in Phi-4MM), so no collective depends on whether its output cache
(model.encoder_cache) hits on one rank and misses on another.

Ranks in step. A sharded forward all-gathers, so every rank must make the same model calls in
the same order. The training forward does (one loss per micro-batch; every batch with audio, as
under ddp, where a projector without a gradient on one rank stops the run too). What runs
outside it does not: KD's rollouts stop when their samples end, at a different step on each rank;
KD draws on- or off-policy per rank; DPO computes references only for pairs a rank has not met;
held-out batches. So the loop runs those inside `gathered`: every group gathered once, kept so
across forwards, freed after, so the calls inside make no collective at all. That holds the whole
model on every rank for the moment (rollouts need it whole at every decode step anyway).

Mixed dtypes. `model.dtype = "bfloat16"` keeps the trainable tensors (LoRA factors, projector)
in float32 inside bf16 modules (train/recipe.py). A group whose parameters have more than one
dtype gets a `MixedPrecisionPolicy`: gathered in the frozen weights' dtype (the LoRA branch
computes in bf16, as `LoRALinear.forward` casts it under ddp) with gradients reduced and
accumulated in float32 into the float32 shards, so the numbers are those of ddp. Groups of one
dtype (the projector, float32) are left as they are. A group whose frozen weights themselves mix
dtypes is refused with the names.

Checkpoints (`full_trainable_state`, `full_optimizer_state`, `load_optimizer_state`): full state
dicts gathered to rank 0 on the CPU (`StateDictOptions(full_state_dict=True, cpu_offload=True)`),
written in exactly ddp's format (trainable.safetensors; optimizer.pt keyed by parameter index),
rather than torch.distributed.checkpoint's sharded format. Chosen because what a step saves is the
trainable state (LoRA + projector + their AdamW moments: megabytes to a few GB), which gathers in
seconds, and because one format keeps one set of checks: the manifests, damage detection and
fallback of train/checkpoints.py, weights read with safetensors only and optimizer state with
torch.load(weights_only=True), and a run saved under one strategy resumes under the other. Every
rank reads the full step from the shared out_dir and keeps its own shard (`copy_into`), so loading
needs no broadcast. Full fine-tuning of billions of parameters would want the sharded format.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch < 2.5: no public DTensor, hence no fsdp2 and nothing is ever sharded
    DTensor, distribute_tensor = (), None

logger = logging.getLogger(__name__)
MIN_TORCH = "2.7"  # fully_shard (public since 2.6) with ignored_params


def is_sharded(tensor) -> bool:
    return isinstance(tensor, DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor; a plain tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather across ranks for a sharded one: every rank must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """param.copy_(value) where `param` may be sharded and `value` is the full tensor: each rank
    writes its own shard of `value` (no communication; every rank must hold the same full value)."""
    if is_sharded(param) and not is_sharded(value):
        value = distribute_tensor(value.to(device=param.device, dtype=param.dtype), param.device_mesh,
                                  param.placements, src_data_rank=None)
    param.copy_(value)


def _fsdp_api():
    """fully_shard and friends, or a ConfigError saying which torch is needed."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
        if "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise ImportError("fully_shard has no ignored_params")
    except ImportError:
        raise ConfigError(f'run.strategy = "fsdp2" needs torch >= {MIN_TORCH} (torch.distributed.fsdp.fully_shard '
                          f'with ignored_params); this is torch {torch.__version__}: upgrade torch, or use '
                          'run.strategy = "ddp"') from None
    return init_device_mesh, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def replicated_parameters(model: nn.Module) -> set[nn.Parameter]:
    """What every rank keeps whole: the speech encoder's parameters when none of them trains."""
    encoder = getattr(model, "encoder", None)
    if encoder is None or any(p.requires_grad for p in encoder.parameters()):
        return set()
    return set(encoder.parameters())


def shard_groups(model: nn.Module) -> list[nn.Module]:
    """The blocks sharded as groups of their own, innermost first (fully_shard's order): decoder
    layers, Conformer blocks and the rest of the encoder when it trains, the projector. The root
    (the model) comes last and is not listed."""
    groups: list[nn.Module] = list(model.decoder.layers)
    encoder = getattr(model, "encoder", None)
    if encoder is not None and not replicated_parameters(model):
        groups += [*encoder.encoders, encoder]
    if getattr(model, "projector", None) is not None:
        groups.append(model.projector)
    return groups


def _own_parameters(module: nn.Module, ignored: set[nn.Parameter] = frozenset()) -> list[tuple[str, nn.Parameter]]:
    """The module's parameters not yet in a group (groups are sharded innermost first), nor kept whole."""
    return [(name, p) for name, p in module.named_parameters() if not is_sharded(p) and p not in ignored]


def precision_policy(module: nn.Module, name: str, ignored: set[nn.Parameter] = frozenset()):
    """FSDP2's MixedPrecisionPolicy for one group (see the module docstring): none for one dtype;
    gathered in the frozen weights' dtype, gradients in float32, for frozen low precision + float32
    trainable tensors; a ConfigError for anything else."""
    _, MixedPrecisionPolicy, _, _ = _fsdp_api()
    params = _own_parameters(module, ignored)
    if len({p.dtype for _, p in params}) <= 1:
        return MixedPrecisionPolicy()
    frozen = {p.dtype for _, p in params if not p.requires_grad}
    trained = {p.dtype for _, p in params if p.requires_grad}
    if len(frozen) != 1 or len(trained) != 1:
        kinds: dict[str, list[str]] = {}
        for param_name, p in params:
            kind = f"{'trainable' if p.requires_grad else 'frozen'} {str(p.dtype).removeprefix('torch.')}"
            kinds.setdefault(kind, []).append(param_name)
        listing = "; ".join(f"{kind}: {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
                            for kind, names in kinds.items())
        raise ConfigError(f'run.strategy = "fsdp2": the parameters of {name or "the model"} mix dtypes in a way FSDP2 '
                          f"cannot gather as one group ({listing}); only frozen weights of one dtype with trainable "
                          'tensors of one other dtype are supported; use model.dtype = "float32" or '
                          'run.strategy = "ddp"')
    return MixedPrecisionPolicy(param_dtype=frozen.pop(), reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """Shard `model` in place over all ranks (groups, policy and registration: the module docstring).

    First every trainable tensor takes rank 0's value, as DDP's constructor does: ranks seed
    differently (seed + rank), so fresh LoRA factors differ between ranks, and each rank keeps
    only its own slice of what it holds. The frozen weights are read from the same checkpoint on
    every rank and need no broadcast. Every sharded parameter is then replaced by a new DTensor
    parameter, so the optimizer must be built after this, and the checkpoint restored after it
    (`load_optimizer_state`, `copy_into`)."""
    init_device_mesh, _, fully_shard, register_fsdp_forward_method = _fsdp_api()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)
    mesh = init_device_mesh(device.type, (world_size,))
    names = {module: name for name, module in model.named_modules()}
    groups, kept_whole = shard_groups(model), replicated_parameters(model)
    for group in groups:
        fully_shard(group, mesh=mesh, mp_policy=precision_policy(group, names[group]))
    root_trainable = [name for name, p in _own_parameters(model, kept_whole) if p.requires_grad]
    if root_trainable:
        raise ConfigError(f'run.strategy = "fsdp2": {root_trainable[:3]} train but sit outside the sharded blocks '
                          "(decoder layers, projector), in the root group, whose gathered copy outlives its forward; "
                          'freeze them or use run.strategy = "ddp"')
    fully_shard(model, mesh=mesh, mp_policy=precision_policy(model, "", kept_whole), ignored_params=kept_whole or None)
    register_fsdp_forward_method(model, "hidden_states")
    # nn.Linear returns a view for 3-d input, and FSDP2 warns that an in-place op on a group's output
    # would skip its backward hook; nothing edits the projector's output in place (SpeechLM.embed).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPAudioProjector\) returned a view tensor")
    held = sum(local_part(p).numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    logger.info("fsdp2: %d groups + the root over %d ranks; rank %d holds %d of %d parameter elements",
                len(groups), world_size, dist.get_rank(), held, total)
    return model


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules fully_shard was applied to, the root (the model) last; the same order on every rank."""
    from torch.distributed.fsdp import FSDPModule

    inner = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    return [*inner, model]


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Inside the block every group of the sharded `model` is whole on every rank and stays whole
    across forwards, so calls to the model make no collective and ranks may make different numbers
    of them (see "Ranks in step" in the module docstring). Entering and leaving are collective (one
    all-gather per group, in the same order on every rank); leaving frees the gathered weights."""
    modules = fsdp_modules(model)
    for module in modules[:-1]:  # the root keeps its own rule: gathered from its forward to its backward
        module.set_reshard_after_forward(False, recurse=False)
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in modules[:-1]:
            module.set_reshard_after_forward(True, recurse=False)
        for module in modules:
            module.reshard()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """FSDP2's counterpart of DDP's `no_sync`: inside the block with enabled=False, backward keeps
    the unsharded gradients (float32 where a policy says so) and reduce-scatters nothing."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ---------------------------------------------------------------------------------------------
# checkpoints: full state on rank 0, in ddp's format


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every trainable tensor whole, on the CPU, on rank 0 (None elsewhere). Collective: all ranks
    call it. Only what trains is gathered: the frozen weights come from model.checkpoint."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            whole = full_tensor(param.detach()).cpu()
            if dist.get_rank() == 0:
                state[name] = whole
    return state if dist.get_rank() == 0 else None


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer holds, in the order of its integer ids in
    optimizer.state_dict() (param_groups in order, parameters in order)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """On rank 0, what `optimizer.state_dict()` returns for the unsharded model under ddp (integer
    ids, whole tensors on the CPU); None elsewhere. Collective. torch.distributed.checkpoint keys
    its full state dict by parameter name; the names map back to the ids one to one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    ids = {name: index for index, name in enumerate(_parameter_names(model, optimizer))}
    return {"state": {ids[name]: value for name, value in by_name["state"].items()},
            "param_groups": [{**group, "params": [ids[name] for name in group["params"]]}
                             for group in by_name["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state in ddp's format (every rank holds it whole) into the sharded
    optimizer: each rank keeps its shard of every moment."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    try:
        by_name = {"state": {names[index]: value for index, value in state["state"].items()},
                   "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                                    for group in state["param_groups"]]}
    except (IndexError, KeyError, TypeError) as err:
        raise ValueError(f"the saved optimizer state does not match the model's trainable tensors ({err!r})") from None
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
