"""The sparse part's mask as CSR index tensors: building, checking and expanding them.

A mask of `nnz` entries in an (out, in) weight is `crow` (out + 1,) and `col` (nnz,), entries in
row-major order; the row of each entry is derived from `crow` (never saved). A mask counts as set
when `crow[-1] == nnz > 0`: an all-zero `crow` means "no mask chosen yet".
"""

from __future__ import annotations

import torch


def index_dtype(numel: int) -> torch.dtype:
    """int32 where the sizes allow (half the memory of int64), else int64."""
    return torch.int32 if numel < 2**31 - 1 else torch.int64


def csr_from_flat(
    flat: torch.Tensor, n_rows: int, n_cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR (crow, col) of a set of flat row-major indices; also returns the row of each entry."""
    flat = torch.unique(flat.to(torch.int64))  # sorted, so entries come in CSR order
    rows = torch.div(flat, n_cols, rounding_mode="floor")
    cols = flat - rows * n_cols
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=flat.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    dt = index_dtype(max(n_rows * n_cols, flat.numel() + 1))
    return crow.to(dt), cols.to(dt), rows


def rows_from_crow(crow: torch.Tensor) -> torch.Tensor:
    """The row (int64) of each entry of a CSR mask, in CSR order."""
    counts = (crow[1:] - crow[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)


def mask_is_set(crow: torch.Tensor, nnz: int) -> bool:
    """Whether `crow` describes a chosen mask of `nnz` entries (reads one value: a sync on GPU)."""
    return nnz > 0 and int(crow[-1]) == nnz


def scatter_dense(
    rows: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """S as a dense fp32 tensor of `shape`, zero off the mask."""
    dense = torch.zeros(shape, device=values.device, dtype=torch.float32)
    dense.index_put_((rows.to(values.device), col.to(values.device, torch.int64)), values.float())
    return dense


def check_csr(name: str, crow: torch.Tensor, col: torch.Tensor, n_cols: int) -> None:
    """Raise a ValueError naming `name` unless (crow, col) is a valid mask of col.numel() entries
    with sorted, unique columns within each row; an all-zero crow (no mask yet) passes."""
    nnz = col.numel()
    if col.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}.sparse_col must hold int32/int64 indices")
    crow, col = crow.to(torch.int64), col.to(torch.int64)
    if int(crow[-1]) == 0 and not bool((crow != 0).any()):
        return  # saved before its mask was chosen
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow[1:] < crow[:-1]).any()):
        raise ValueError(f"{name}.sparse_crow is not a valid CSR row pointer for {nnz} entries")
    if bool((col < 0).any()) or bool((col >= n_cols).any()):
        raise ValueError(f"{name}.sparse_col has indices outside [0, {n_cols})")
    flat = rows_from_crow(crow) * n_cols + col
    if bool((flat[1:] <= flat[:-1]).any()):
        raise ValueError(f"{name}: sparse indices are not sorted and unique within rows")
