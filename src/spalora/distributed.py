"""Several processes (GPUs, nodes): the process group, DDP or FSDP2, and the few collectives that
keep every rank's decisions identical. No launcher of our own: `torchrun` or `accelerate launch`
start the processes and set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.

- Process group: `init_distributed()` opens it when WORLD_SIZE > 1 (nccl when CUDA is there,
  gloo on CPU or with ACCELERATE_USE_CPU); a group opened before (accelerate, a test) is reused.
- Batches: `batch_size` is per process. Rank r takes the micro-batches g of the one seeded stream
  with g % world == r, so N processes with `grad_accum=A` train on exactly the micro-batches one
  process sees with `grad_accum=A*N`, with the same gradient (global batch =
  batch_size * grad_accum * world_size).
- DDP (the default): the adapters' gradients are averaged by DistributedDataParallel. Its wrapper
  is rebuilt whenever the set of trained tensors changes (masks set: the sparse values start to
  get gradients; our method's truncation: new parameter tensors); before the masks, unused
  sparse values are declared with `find_unused_parameters`.
- FSDP (`TrainConfig.distributed="fsdp"`, or "auto" under `accelerate launch --use_fsdp`): torch's
  FSDP2 `fully_shard` on each decoder block and the base model, sharding the frozen base weights;
  the adapters are `ignored_params` (small, replicated: masks, IRLS and truncation work on whole
  tensors as in one process), their gradients averaged here after backward. W0 + S is then built
  out of place in each forward (a sharded weight cannot hold it).
"""

from __future__ import annotations

import inspect
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from .layer import SpaloraLinear

MODES = ("auto", "ddp", "fsdp")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 (or no process group): the one process that writes files and prints."""
    return rank() == 0


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def init_distributed() -> bool:
    """Open the process group when a launcher started several processes; True if distributed.

    Idempotent, and a no-op for one process, so `train()` and `spalora train` call it always.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not _env_flag("ACCELERATE_USE_CPU")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return is_distributed()


def close_distributed() -> None:
    """Close a process group at the end of a command (silences torch's exit warning)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def dist_backend() -> str:
    """ "nccl" or "gloo" (or "none" without a process group)."""
    return str(dist.get_backend()) if is_distributed() else "none"


def local_device() -> torch.device:
    """The device this rank trains on: its GPU under nccl, else the CPU."""
    if dist_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """The device to train and evaluate on. "auto": this rank's GPU under nccl, else the GPU
    when there is one (a single process too), else the CPU. "cuda" without a GPU is an error,
    not a silent fall back to the CPU."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if dist_backend() == "nccl":
        return local_device()
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if name == "cuda":
        raise ValueError("device 'cuda' was asked for but torch sees no GPU")
    return torch.device("cpu")


def resolve_mode(mode: str) -> str:
    """ "ddp" or "fsdp"; "auto" follows accelerate's FSDP switch (ACCELERATE_USE_FSDP)."""
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "fsdp" if _env_flag("ACCELERATE_USE_FSDP") else "ddp"
    return mode


def mean_over_ranks(value: float) -> float:
    """The mean of a number over ranks (the logged loss of the global batch)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=local_device())
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (a list of one without a group)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(value, what: str) -> None:
    """Raise on every rank (never on one alone, which would hang the others) unless all ranks
    hold the same picklable `value` (for a list, the message names its first differing items)."""
    values = gather_objects(value)
    bad = [r for r, v in enumerate(values) if v != values[0]]
    if not bad:
        return
    first, other = values[0], values[bad[0]]
    if isinstance(first, list) and isinstance(other, list) and len(first) == len(other):
        diff = [(a, b) for a, b in zip(first, other, strict=True) if a != b][:3]
        detail = f"first differences, rank 0 vs rank {bad[0]}: {diff}"
    else:
        detail = f"rank 0: {first!r}, rank {bad[0]}: {other!r}"
    raise RuntimeError(f"ranks disagree on {what} ({detail})")


def adapter_checksum(model: nn.Module) -> list[float]:
    """Sums of every trainable tensor and mask buffer: equal on all ranks unless they diverged."""
    sums = []
    for name, t in sorted(model.named_parameters()):
        if t.requires_grad:
            sums.append((name, float(t.detach().double().sum())))
    for name, t in sorted(model.named_buffers()):
        if name.rsplit(".", 1)[-1] in ("sparse_crow", "sparse_col"):
            sums.append((name, float(t.double().sum())))
    return sums


def check_in_sync(model: nn.Module, where: str) -> None:
    """Check that every rank holds the same adapter (masks and values); cheap, run rarely.

    Ranks compute masks, IRLS refreshes and truncations independently from identical inputs;
    this turns any divergence (e.g. different linear-algebra kernels on mixed hardware) into a
    clear error instead of a silent drift or a hang.
    """
    if is_distributed():
        agree(adapter_checksum(model), f"the adapter {where}")


def used_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable tensors that the next forward uses: LoRA factors, sparse values once masked."""
    layers = [m for m in model.modules() if isinstance(m, SpaloraLinear)]
    if not layers:  # a PEFT model or full fine-tuning: everything trainable is used
        return [p for p in model.parameters() if p.requires_grad]
    used = []
    for layer in layers:
        if layer.r > 0:
            used += [layer.lora_A, layer.lora_B]
        if layer.nnz > 0 and layer.mask_ready:
            used.append(layer.sparse_values)
    return [p for p in used if p.requires_grad]


def shard_model(model: nn.Module) -> None:
    """FSDP2 in place: each decoder block (`_no_split_modules`) and the base model are sharded
    across ranks; trainable tensors stay whole on every rank (ignored by FSDP).

    The root is the base model, not the SpaloraModel wrapper, so `generate()` (which calls the
    base model) gathers the embeddings too.
    """
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        fully_shard = None
    if fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise RuntimeError(
            "distributed='fsdp' needs torch >= 2.7 (FSDP2's fully_shard with ignored_params); "
            f"this is torch {torch.__version__}: use distributed='ddp'"
        )
    for layer in model.modules():
        if isinstance(layer, SpaloraLinear):
            layer.restore_base_weight()  # W0 back before the weight is split across ranks
            layer.sparse_in_weight = False  # a sharded weight cannot hold W0 + S: out of place
    device = local_device()
    mesh = init_device_mesh(device.type, (world_size(),))
    ignored = {p for p in model.parameters() if p.requires_grad}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(base, "_no_split_modules", None) or ())
    for module in base.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, ignored_params=ignored)
    fully_shard(base, mesh=mesh, ignored_params=ignored)


def broadcast_trainable(model: nn.Module) -> None:
    """Give every rank rank 0's trainable tensors (DDP's start-up copy, for the adapters only:
    every rank loaded the same frozen base, and copying it would move the whole model)."""
    if is_distributed():
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)


class DistributedTraining:
    """What the training loop needs from the process group; a pass-through for one process.

    `engine` is what the loop calls forward on (the DDP wrapper, or the model itself); `model`
    stays the user's module, which masks, schedules, checkpoints and evaluation keep using.
    """

    def __init__(self, model: nn.Module, mode: str = "auto") -> None:
        self.model = model
        self.world = world_size()
        self.mode = resolve_mode(mode) if self.world > 1 else "single"
        self.engine: nn.Module = model
        if self.world == 1:
            return
        broadcast_trainable(model)
        check_in_sync(model, "at the start (masks differ across ranks)")
        if self.mode == "fsdp":
            shard_model(model)
        else:
            self.engine = self._wrap()

    def _wrap(self) -> nn.Module:
        """A DDP wrapper over the tensors in use now (the model itself when none is trained)."""
        from torch.nn.parallel import DistributedDataParallel

        used = used_parameters(self.model)
        if not used:  # e.g. sparse-only before its masks: no gradient to average
            return self.model
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        device = local_device()
        # masks and rotary tables are identical on every rank: no buffer copies per forward
        # (newer torch names the switch forward_sync_buffers, older broadcast_buffers)
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        return DistributedDataParallel(
            self.model,
            device_ids=[device.index] if device.type == "cuda" else None,
            init_sync=False,  # the adapters were copied from rank 0 above, the base is shared
            find_unused_parameters=len(used) < len(trainable),
            **{key: False},
        )

    def trained_tensors_changed(self) -> None:
        """Rebuild the DDP wrapper after masks were set or layers were truncated."""
        if self.mode == "ddp":
            self.engine = self._wrap()

    def no_sync(self, last_micro_batch: bool):
        """Skip DDP's all-reduce on all but the last micro-batch of an optimizer step."""
        if self.engine is not self.model and not last_micro_batch:
            return self.engine.no_sync()
        return nullcontext()

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """FSDP mode: average the replicated adapters' gradients over ranks (DDP does its own)."""
        if self.mode != "fsdp":
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.world)  # as DDP: divide first
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
