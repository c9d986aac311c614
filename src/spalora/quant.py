"""Quantized frozen bases: weight-only int8 (plain torch) or 4-bit NF4/FP4 (bitsandbytes).

`quantize_base(model, "int8")` replaces the frozen Linear/Conv1D layers (every one but the output
head, by default) with `QuantizedLinear`, which stores the weight quantized and dequantizes it for
each use; the adapters stay in full precision. Apply it before `get_spalora_model` (as QLoRA
does: budgets in percent then count the quantized layers' logical sizes) or after (it then
quantizes the wrapped layers' bases). A SpaloraLinear over a quantized base dequantizes W inside
its fused function, once in forward and once in backward, one layer at a time: no full-precision
copy of W outlives the layer's forward or backward. Gradient mask strategies need no weight
(they use the layer's input and output gradient), and magnitude/wanda read the dequantized W.

Formats (see docs/quantization.md for why these):
  int8: per output row, symmetric absmax / 127 (bitsandbytes' LLM.int8 weight format), plain
        torch, always available: 1 byte per weight + 4 bytes per row.
  nf4, fp4: bitsandbytes' blockwise 4-bit (absmax per `blocksize` weights, fp32, no double
        quantization): 0.5 byte per weight + 4 bytes per block. Needs `pip install spalora[quant]`.

Merging: `SpaloraModel.merge_and_unload()` returns a full-precision model (every quantized layer
dequantized, the adapted ones with W_deq + delta); `merge_and_unload(requantize=True)` quantizes
the merged layers again in their format and reports the error this adds (`RequantizationReport`).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layer import SpaloraLinear, is_conv1d, is_quantized
from .targeting import matches, set_submodule

QUANT_TYPES = ("int8", "nf4", "fp4")
FOUR_BIT = ("nf4", "fp4")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels take


def _bnb_functional():
    """bitsandbytes.functional, imported on first 4-bit use (a 5 s import; an optional extra)."""
    try:
        # its CPU backend logs a warning about an optional downloaded kernel that we never use
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        import bitsandbytes.functional as bnb_f
    except ImportError as exc:
        raise ImportError(
            "4-bit bases (nf4, fp4) need bitsandbytes: pip install 'spalora[quant]' "
            "(or bitsandbytes==0.50.2); int8 needs nothing extra"
        ) from exc
    return bnb_f


def check_quant_type(quant_type: str, blocksize: int = 64) -> None:
    """Raise ValueError on a format or block size this module does not support."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if quant_type in FOUR_BIT and blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} for {quant_type}, got {blocksize}")


class QuantizedLinear(nn.Module):
    """A frozen Linear (or Conv1D) whose weight is stored weight-only quantized.

    `dequantize()` gives W as (out, in) in the original weight's dtype, a fresh tensor each call;
    `weight` is the same (so code that reads `module.weight` sees W, but writes to it are lost:
    the stored weight never changes). Forward is F.linear with the dequantized W: the same
    arithmetic as the fused spalora function, so a disabled adapter and a zero adapter agree.
    """

    spalora_quantized = True  # what spalora.layer.is_quantized looks for

    def __init__(
        self,
        in_features: int,
        out_features: int,
        quant_type: str = "int8",
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        blocksize: int = 64,
        conv1d: bool = False,
    ) -> None:
        super().__init__()
        check_quant_type(quant_type, blocksize)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.quant_type, self.blocksize = quant_type, int(blocksize)
        self.dtype = dtype  # what dequantize() returns: the original weight's dtype
        self.conv1d = conv1d  # to_float() gives a Conv1D back
        numel = self.in_features * self.out_features
        if quant_type == "int8":
            self.register_buffer(
                "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
            )
            self.register_buffer(
                "scale", torch.ones(out_features, dtype=torch.float32, device=device)
            )
        else:
            packed = (numel + 1) // 2
            blocks = math.ceil(numel / self.blocksize)
            self.register_buffer(
                "qweight", torch.zeros(packed, 1, dtype=torch.uint8, device=device)
            )
            self.register_buffer("absmax", torch.ones(blocks, dtype=torch.float32, device=device))
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )

    # ------------------------------------------------------------ conversion
    @classmethod
    @torch.no_grad()
    def from_float(
        cls, module: nn.Module, quant_type: str = "int8", blocksize: int = 64
    ) -> QuantizedLinear:
        """Quantize a Linear or Conv1D (its current weight; the module is left unchanged)."""
        check_quant_type(quant_type, blocksize)
        if isinstance(module, nn.Linear):
            w = module.weight
        elif is_conv1d(module):
            w = module.weight.t()
        else:
            raise TypeError(f"cannot quantize {type(module).__name__}: only Linear and Conv1D")
        if not w.dtype.is_floating_point:
            raise TypeError(f"the weight is {w.dtype}, not a floating-point tensor")
        q = cls(
            w.shape[1],
            w.shape[0],
            quant_type,
            module.bias,
            dtype=w.dtype,
            device=w.device,
            blocksize=blocksize,
            conv1d=is_conv1d(module),
        )
        q.set_weight(w)
        return q

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Store a new (out, in) weight, quantized."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight of shape {tuple(w.shape)} for a layer of "
                f"{self.out_features} x {self.in_features}"
            )
        w32 = w.detach().float()
        if not bool(torch.isfinite(w32).all()):
            raise ValueError("cannot quantize a weight holding inf or nan")
        if self.quant_type == "int8":
            absmax = w32.abs().amax(dim=1)
            scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
            self.qweight.copy_(torch.round(w32 / scale[:, None]).clamp_(-127, 127))
            self.scale.copy_(scale)
        else:
            bnb_f = _bnb_functional()
            packed, state = bnb_f.quantize_4bit(
                w32.reshape(-1),  # flat: blocks run over the row-major weight either way
                blocksize=self.blocksize,
                compress_statistics=False,
                quant_type=self.quant_type,
            )
            self.qweight.copy_(packed.reshape(self.qweight.shape))
            self.absmax.copy_(state.absmax.reshape(-1))

    def dequantize(self) -> torch.Tensor:
        """W as a new (out, in) tensor in the original dtype."""
        with torch.no_grad():
            if self.quant_type == "int8":
                w = self.qweight.to(torch.float32).mul_(self.scale[:, None])
                return w.to(self.dtype)
            bnb_f = _bnb_functional()
            # Flat, then reshaped: bitsandbytes 0.50.2's CPU dequantize_4bit gets 2-D shapes
            # wrong when the last side is not a multiple of the block size (4x the error).
            state = bnb_f.QuantState(
                absmax=self.absmax,
                shape=torch.Size((self.out_features * self.in_features,)),
                code=bnb_f.get_4bit_type(self.quant_type, device=self.qweight.device),
                blocksize=self.blocksize,
                quant_type=self.quant_type,
                dtype=self.dtype,
            )
            w = bnb_f.dequantize_4bit(self.qweight, state)
            return w.reshape(self.out_features, self.in_features)

    def _apply(self, fn, recurse: bool = True):
        # a cast (model.to(torch.bfloat16)) changes the dtype W is dequantized to; the scales
        # stay fp32 (bf16 scales would add error, and bitsandbytes wants fp32 absmax)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        super()._apply(fn, recurse)
        for name in ("scale", "absmax"):
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized W (a fresh tensor: writing to it changes nothing)."""
        return self.dequantize()

    def to_float(self) -> nn.Module:
        """A full-precision Linear (Conv1D if this came from one) holding the dequantized W."""
        w = self.dequantize()
        dev, has_bias = w.device, self.bias is not None
        if self.conv1d:
            from transformers.pytorch_utils import Conv1D

            out = Conv1D(self.out_features, self.in_features).to(dev, self.dtype)
            w = w.t()
        else:
            out = nn.Linear(
                self.in_features, self.out_features, bias=has_bias, device=dev, dtype=self.dtype
            )
        with torch.no_grad():
            out.weight.copy_(w)
            if has_bias:
                out.bias.copy_(self.bias)
        out.requires_grad_(False)
        out.train(self.training)
        return out

    def spec(self) -> dict:
        """The format, as from_float takes it: re-quantizes a merged layer the same way."""
        return {"quant_type": self.quant_type, "blocksize": self.blocksize}

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight (quantized values and scales; the bias not included)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(), self.bias)

    def extra_repr(self) -> str:
        block = f", blocksize={self.blocksize}" if self.quant_type in FOUR_BIT else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"quant_type={self.quant_type}{block}, bias={self.bias is not None}"
        )


# ------------------------------------------------------------------ models
def _targeted(name: str, target_modules: list[str] | str | None) -> bool:
    """None: every layer; else the adapters' matching (exact name, suffix, or regex)."""
    return target_modules is None or matches(name, target_modules)


def quantize_base(
    model: nn.Module,
    quant_type: str = "int8",
    target_modules: list[str] | str | None = None,
    blocksize: int = 64,
) -> nn.Module:
    """Quantize the frozen Linear/Conv1D layers of `model` in place; returns `model`.

    Default targets: every Linear/Conv1D but the output head (kept in full precision, as it is
    often tied to the embedding). `target_modules`: names or name suffixes, or a regex on the full
    name, as in SpaloraConfig. Works on a plain model and on a SpaloraModel (then the bases of its
    SpaloraLinear layers are quantized; a merged adapter must be unmerged first). Layers already
    quantized are left as they are. The full-precision weights are dropped (freed unless held
    elsewhere): quantize right after loading to keep peak memory low.
    """
    check_quant_type(quant_type, blocksize)
    if quant_type in FOUR_BIT:
        _bnb_functional()  # a missing extra fails here, before anything changes
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    todo: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        parts = name.split(".")
        if "base_layer" in parts or module is head:
            continue
        if isinstance(module, SpaloraLinear):
            if module.merged_adapters:
                raise RuntimeError(f"{name} holds a merged adapter: unmerge_adapter() first")
            if not module.quantized and _targeted(name, target_modules):
                todo.append((name, module))
        elif (isinstance(module, nn.Linear) or is_conv1d(module)) and _targeted(
            name, target_modules
        ):
            todo.append((name, module))
    if not todo and not any(is_quantized(m) for m in root.modules()):
        raise ValueError(f"target_modules={target_modules!r} matched no Linear/Conv1D layer")
    for name, module in todo:
        if isinstance(module, SpaloraLinear):
            module.restore_base_weight()  # W0, not W0 + S, is what gets quantized
            module.base_layer = QuantizedLinear.from_float(module.base_layer, quant_type, blocksize)
            module.base_layer.train(module.training)
            module.conv1d = False  # the quantized base stores W as (out, in) for Conv1D too
        else:
            q = QuantizedLinear.from_float(module, quant_type, blocksize)
            q.train(module.training)
            set_submodule(root, name, q)
    release_loaded_storage(root)
    return model


@torch.no_grad()
def release_loaded_storage(model: nn.Module) -> None:
    """Give the unquantized tensors (embeddings, norms) memory of their own.

    transformers loads safetensors weights as views of one memory-mapped file; while any of them
    (the embeddings, say) still points into it, every page of the fp32 projections that quantizing
    read stays mapped and resident, so the process kept its fp32 footprint (measured on
    SmolLM2-135M: 935 MB resident after quantizing, 638 MB after this).
    """
    for param in model.parameters():  # each tied parameter once: the tie is kept
        param.data = param.data.clone()
    for module in model.modules():
        if is_quantized(module):
            continue  # its buffers are fresh already
        for key, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[key] = buf.clone()


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every QuantizedLinear of `model` by its full-precision Linear/Conv1D (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            if name:
                set_submodule(model, name, module.to_float())
            else:
                raise ValueError("the model itself is a QuantizedLinear: call to_float()")
    return model


@dataclass
class BaseMemory:
    """Bytes of the quantized layers' stored weights, and what they would take in fp32."""

    quantized_bytes: int
    fp32_bytes: int
    layers: int

    @property
    def ratio(self) -> float:
        return self.quantized_bytes / self.fp32_bytes if self.fp32_bytes else float("nan")

    def __str__(self) -> str:
        return (
            f"{self.layers} quantized layers: {self.quantized_bytes / 2**20:.2f} MiB "
            f"(fp32: {self.fp32_bytes / 2**20:.2f} MiB, {self.ratio:.1%})"
        )


def base_memory(model: nn.Module) -> BaseMemory:
    """Memory of the quantized base weights of `model` (biases and other layers not counted)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    return BaseMemory(
        quantized_bytes=sum(m.nbytes for m in layers),
        fp32_bytes=sum(4 * m.in_features * m.out_features for m in layers),
        layers=len(layers),
    )


# ------------------------------------------------------------------- merge
@dataclass
class RequantizationReport:
    """The error re-quantizing the merged weights adds: dequant(quant(W')) against the exact
    merged W' = W_deq + delta, per layer (max |error|, ||error||_F / ||W'||_F) and overall."""

    quant_type: str
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)
    _sq_err: float = 0.0
    _sq_ref: float = 0.0

    def add(self, name: str, quantized: torch.Tensor, exact: torch.Tensor) -> None:
        err = quantized.float() - exact.float()
        sq_err, sq_ref = float(err.pow(2).sum()), float(exact.float().pow(2).sum())
        self._sq_err += sq_err
        self._sq_ref += sq_ref
        rel = math.sqrt(sq_err / sq_ref) if sq_ref > 0 else 0.0
        self.layers[name] = (float(err.abs().max()) if err.numel() else 0.0, rel)

    @property
    def max_abs_error(self) -> float:
        return max((m for m, _ in self.layers.values()), default=0.0)

    @property
    def relative_error(self) -> float:
        return math.sqrt(self._sq_err / self._sq_ref) if self._sq_ref > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"re-quantized {len(self.layers)} merged layers to {self.quant_type}: max |error| "
            f"{self.max_abs_error:.3g}, relative (Frobenius) error {self.relative_error:.3g} "
            "against the exact merged weights"
        )


def finish_merge(
    model: nn.Module, formats: dict[str, dict], requantize: bool
) -> tuple[nn.Module, RequantizationReport | None]:
    """The last step of merge_and_unload on a quantized base.

    `formats`: layer name -> the format its base was quantized in (QuantizedLinear.spec()), for
    the adapted layers whose base was quantized. requantize=False: every quantized layer of
    `model` is dequantized (a plain full-precision model). requantize=True: the merged layers are
    quantized again in their format (others stay as they are) and the added error is reported.
    """
    if not requantize:
        return dequantize_model(model), None
    if not formats:
        raise ValueError("requantize=True, but no adapted layer of this model was quantized")
    kinds = sorted({f["quant_type"] for f in formats.values()})
    report = RequantizationReport("/".join(kinds))
    for name, fmt in formats.items():
        module = model.get_submodule(name)
        if isinstance(module, QuantizedLinear):  # never dequantized: no delta was added
            continue
        exact = module.weight.t() if is_conv1d(module) else module.weight
        q = QuantizedLinear.from_float(module, **fmt)
        q.train(module.training)
        report.add(name, q.dequantize(), exact.detach())
        set_submodule(model, name, q)
    model.spalora_requantization = report
    print(f"[spalora] {report}", file=sys.stderr)
    return model, report


def merge_and_unload(
    model, requantize: bool = False, adapter_names: list[str] | None = None
) -> tuple[nn.Module, RequantizationReport | None]:
    """SpaloraModel.merge_and_unload, returning the re-quantization report too (None without)."""
    merged = model.merge_and_unload(adapter_names, requantize=requantize)
    return merged, getattr(merged, "spalora_requantization", None)
