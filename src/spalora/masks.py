"""Mask generation: which entries of each adapted weight the sparse part may train.

Gradient strategies rebuild each layer's weight gradient as G^T X from the layer input X (saved by
a forward hook, never modified in place) and the output gradient G (a tensor hook), so they work
while W is frozen or quantized and take no gradient itself. They accumulate over micro-batches:
`fisher` sums (G^T X)^2 (the empirical diagonal Fisher, RoSA's default), `grad` sums G^T X and
ranks by |mean|. `wanda` ranks |W_ij| * ||X_j|| with input norms from forward passes only;
`residual` is `fisher` on the part of each gradient that the current low-rank subspace does not
explain, (I - U U^T) G (I - V V^T) with U, V from the SVD of B A when collection starts, so nonzeros
are not spent on directions LoRA already covers. `magnitude` ranks |W|; `random` draws a uniform
support (SLTrain). A user callable
`fn(name, weight, k) -> scores or bool mask` may replace all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .distributed import is_distributed
from .layer import SpaloraLinear
from .lowrank import factored_svd

GRADIENT_STRATEGIES = ("fisher", "grad", "residual")
ACTIVATION_STRATEGIES = ("wanda",)


def needs_data(strategy: str | Callable) -> bool:
    return isinstance(strategy, str) and strategy in GRADIENT_STRATEGIES + ACTIVATION_STRATEGIES


def whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a weight sharded by FSDP (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def topk_flat(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k largest scores (ties broken by torch.topk)."""
    return torch.topk(scores.reshape(-1).float(), k, sorted=False).indices


class MaskCollector:
    """Accumulates per-layer statistics over micro-batches through hooks on SpaloraLinear layers."""

    def __init__(self, layers: dict[str, SpaloraLinear], strategy: str) -> None:
        if strategy not in GRADIENT_STRATEGIES + ACTIVATION_STRATEGIES:
            raise ValueError(f"strategy {strategy!r} collects no statistics")
        self.layers = layers
        self.strategy = strategy
        self.stats: dict[str, torch.Tensor] = {}
        self.input_sq: dict[str, torch.Tensor] = {}  # per input feature: sum of x^2 over tokens
        self.input_tokens: dict[str, int] = {}
        self._subspace: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.batches = 0  # micro-batches whose statistics reached every layer
        self._seen: dict[str, int] = {}
        self._handles = []

    def attach(self) -> MaskCollector:
        for name, layer in self.layers.items():
            self._seen[name] = 0
            if self.strategy == "residual" and layer.r > 0:
                spec = factored_svd(layer.lora_B, layer.lora_A, layer.scale)
                keep = spec.sigma > spec.sigma.max().clamp_min(1e-30) * 1e-6  # B A's range only
                if bool(keep.any()):
                    w = layer.base_layer.weight
                    self._subspace[name] = (
                        spec.U[:, keep].to(w.device, torch.float32),
                        spec.V[:, keep].to(w.device, torch.float32),
                    )
            self._handles.append(layer.register_forward_hook(self._make_hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, name: str):
        def on_forward(module: SpaloraLinear, inputs, output):
            if not module.training:  # evaluation or generation: not mask statistics
                return None
            x = inputs[0].detach()
            x2 = x.reshape(-1, x.shape[-1]).float()
            sq = (x2 * x2).sum(0)
            self._add_input(name, sq, x2.shape[0])
            if self.strategy == "wanda":
                self._add(name, sq)
                self._count(name)
                return None
            if not torch.is_grad_enabled():
                return None
            if not output.requires_grad:  # nothing trainable yet (sparse-only): still get G
                output = output.detach().requires_grad_(True)

            def on_grad(g):
                g2 = g.detach().reshape(-1, g.shape[-1]).float()
                wg = g2.t() @ x2  # (out, in): this micro-batch's weight gradient
                if name in self._subspace:  # residual: (I - U U^T) G (I - V V^T)
                    U, V = self._subspace[name]
                    wg = wg - U @ (U.t() @ wg)
                    wg = wg - (wg @ V) @ V.t()
                self._add(name, wg if self.strategy == "grad" else wg * wg)
                self._count(name)

            output.register_hook(on_grad)
            return output

        return on_forward

    def _add(self, name: str, value: torch.Tensor) -> None:
        if name in self.stats:
            self.stats[name].add_(value)
        else:
            self.stats[name] = value.clone()

    def _add_input(self, name: str, sq: torch.Tensor, tokens: int) -> None:
        if name in self.input_sq:
            self.input_sq[name].add_(sq)
        else:
            self.input_sq[name] = sq.clone()
        self.input_tokens[name] = self.input_tokens.get(name, 0) + tokens

    def all_reduce(self) -> None:
        """Sum every rank's statistics in place (no-op in one process), before any top-k.

        Each rank saw its own micro-batches; with the sums of squared gradients and of squared
        inputs added over ranks, every rank ranks the same scores and picks the same mask, and
        the input RMS (our method's column weights) is that of all the data.
        """
        if not is_distributed():
            return
        for name in self.layers:  # same layers, same order on every rank
            if name in self.stats:
                dist.all_reduce(self.stats[name])
        names = [n for n in self.layers if n in self.input_sq]
        if names:
            flat = torch.cat([self.input_sq[n] for n in names])
            dist.all_reduce(flat)
            tokens = torch.tensor(
                [self.input_tokens[n] for n in names], dtype=torch.float64, device=flat.device
            )
            dist.all_reduce(tokens)
            offset = 0
            for n, count in zip(names, tokens.tolist(), strict=True):
                size = self.input_sq[n].numel()
                self.input_sq[n] = flat[offset : offset + size].clone()
                self.input_tokens[n] = int(count)
                offset += size

    def input_rms(self) -> dict[str, torch.Tensor]:
        """Root mean square of each layer's input features over the tokens seen."""
        return {n: (sq / max(1, self.input_tokens[n])).sqrt() for n, sq in self.input_sq.items()}

    def _count(self, name: str) -> None:
        self._seen[name] += 1
        self.batches = min(self._seen.values())

    def scores(self, name: str, layer: SpaloraLinear) -> torch.Tensor:
        """Per-entry importance of one layer's weight, shape (out, in)."""
        if name not in self.stats:
            raise RuntimeError(f"no statistics were collected for layer {name}")
        s = self.stats[name]
        if self.strategy == "grad":
            return s.abs()
        if self.strategy == "wanda":
            return whole(layer.base_weight()).detach().float().abs() * s.sqrt().unsqueeze(0)
        return s


def static_scores(layer: SpaloraLinear, strategy: str, generator: torch.Generator) -> torch.Tensor:
    """Scores that need no data: magnitude of W, or uniform random (SLTrain)."""
    if strategy == "magnitude":
        return whole(layer.base_weight()).detach().float().abs()
    if strategy == "random":
        shape = (layer.out_features, layer.in_features)
        return torch.rand(shape, generator=generator).to(layer.base_layer.weight.device)
    raise ValueError(f"strategy {strategy!r} needs data")


def mask_from_callable(fn: Callable, name: str, layer: SpaloraLinear) -> torch.Tensor:
    """Call a user strategy; it returns scores (top-k taken here) or a bool mask of exactly k."""
    out = fn(name, whole(layer.base_weight()).detach(), layer.nnz)
    out = torch.as_tensor(out)
    expected = (layer.out_features, layer.in_features)
    if tuple(out.shape) != expected:
        raise ValueError(
            f"mask callable returned shape {tuple(out.shape)} for {name}, expected {expected}"
        )
    if out.dtype == torch.bool:
        if int(out.sum()) != layer.nnz:
            raise ValueError(
                f"mask callable returned {int(out.sum())} entries for {name}, expected {layer.nnz}"
            )
        return out.reshape(-1).nonzero().squeeze(1)
    return topk_flat(out, layer.nnz)


def apply_masks(
    layers: dict[str, SpaloraLinear],
    strategy: str | Callable,
    collector: MaskCollector | None = None,
    seed: int = 0,
    progress: bool = True,
) -> None:
    """Choose and set each sparse layer's mask (top-k of its scores, k = its nnz)."""
    generator = torch.Generator().manual_seed(seed)
    items = [(n, lay) for n, lay in layers.items() if lay.nnz > 0]
    for name, layer in tqdm(items, desc="choosing masks", disable=not progress, leave=False):
        if callable(strategy):
            flat = mask_from_callable(strategy, name, layer)
        elif needs_data(strategy):
            if collector is None:
                raise RuntimeError(f"strategy {strategy!r} needs collected statistics")
            flat = topk_flat(collector.scores(name, layer), layer.nnz)
        else:
            flat = topk_flat(static_scores(layer, strategy, generator), layer.nnz)
        layer.set_mask(flat)


def collect_statistics(
    model: torch.nn.Module,
    layers: dict[str, SpaloraLinear],
    strategy: str,
    batches: Iterable[dict],
    num_batches: int,
    progress: bool = True,
) -> MaskCollector:
    """Run forward (and for gradient strategies backward) passes on `num_batches` micro-batches.

    Used for one-shot mask generation outside a training loop; parameters are not updated and
    gradients that reach trainable parameters are cleared afterwards.
    """
    collector = MaskCollector(layers, strategy).attach()
    was_training = model.training
    model.train()
    try:
        it = iter(batches)
        for _ in tqdm(
            range(num_batches), desc=f"mask statistics ({strategy})", disable=not progress
        ):
            batch = next(it)
            if strategy in GRADIENT_STRATEGIES:
                model(**batch).loss.backward()
            else:
                with torch.no_grad():
                    model(**batch)
    except StopIteration as exc:
        raise ValueError(f"mask generation needs {num_batches} batches; the data ran out") from exc
    finally:
        collector.detach()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return collector
