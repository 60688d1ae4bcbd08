"""The fast Walsh-Hadamard transform of the online rotations: a Triton kernel on GPU, torch on CPU.

:func:`fwht` computes the unnormalized ``x @ S_n`` (Sylvester's Hadamard, ``n`` a power of two)
of the last dimension: each Triton program holds a tile of rows (about 2048 values) in registers
and runs the ``log2 n`` butterfly stages in place (each stage: view a row as ``[n / 2h, 2, h]``,
swap the pair axis last, split it, write back ``(a + b, a - b)``), accumulating in fp32. Rows longer than
:data:`TRITON_MAX` and CPU tensors (without ``TRITON_INTERPRET=1``) use the torch butterfly
(:func:`llmpress.math.hadamard.fwht`). ``LLMPRESS_FWHT=torch`` forces the torch path.
"""

from __future__ import annotations

import os

import torch

from llmpress.math.hadamard import fwht as torch_fwht

try:  # triton is optional (the ``kernels`` extra)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None  # type: ignore[assignment]

#: the longest row the Triton kernel transforms in registers
TRITON_MAX = 1 << 15
#: ``torch`` forces the torch transform
FWHT_ENV = "LLMPRESS_FWHT"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_usable(x: torch.Tensor) -> bool:
    """Whether :func:`fwht_triton` can run on ``x`` (triton present, a GPU tensor or the
    interpreter, a power-of-two row of at most :data:`TRITON_MAX`)."""
    n = x.shape[-1]
    return (
        triton is not None
        and os.environ.get(FWHT_ENV, "") != "torch"
        and (x.is_cuda or _interpreted())
        and 2 <= n <= TRITON_MAX
        and n & (n - 1) == 0
    )


def fwht(x: torch.Tensor) -> torch.Tensor:
    """``x @ S_n`` on the last dimension (a power of two), in x's dtype (Triton when usable)."""
    return fwht_triton(x) if triton_usable(x) else torch_fwht(x)


if triton is not None:

    @triton.jit
    def _fwht_kernel(
        x_ptr, out_ptr, M, stride_x, stride_out, N: tl.constexpr, LOG_N: tl.constexpr, ROWS: tl.constexpr
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
        cols = tl.arange(0, N)  # [N]
        keep = (rows < M)[:, None]
        v = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=keep, other=0.0).to(tl.float32)
        for i in tl.static_range(LOG_N):
            h: tl.constexpr = 1 << i
            pairs = tl.permute(tl.reshape(v, [ROWS, N // (2 * h), 2, h]), [0, 1, 3, 2])  # [ROWS, N/2h, h, 2]
            a, b = tl.split(pairs)  # [ROWS, N/2h, h] each
            v = tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2]), [ROWS, N])
        out = out_ptr + rows[:, None] * stride_out + cols[None, :]
        tl.store(out, v.to(out_ptr.dtype.element_ty), mask=keep)


def _launch(n: int) -> tuple[int, int]:
    """(rows per program, warps): about 2048 values per program, one warp per 512 of them."""
    rows = max(1, 2048 // n)
    return rows, max(1, min(8, rows * n // 512))


def fwht_triton(x: torch.Tensor) -> torch.Tensor:
    """The Triton transform (see the module docstring); ``x`` on a GPU or under the interpreter."""
    if triton is None:
        raise RuntimeError("fwht_triton needs triton (pip install 'llmpress[kernels]')")
    n = x.shape[-1]
    if n & (n - 1) or not 2 <= n <= TRITON_MAX:
        raise ValueError(f"fwht_triton needs a power-of-two row of 2 to {TRITON_MAX} values, got {n}")
    rows = x.reshape(-1, n).contiguous()
    out = torch.empty_like(rows)
    m = rows.shape[0]
    if m:
        per, warps = _launch(n)
        grid = (triton.cdiv(m, per),)
        _fwht_kernel[grid](
            rows,
            out,
            m,
            rows.stride(0),
            out.stride(0),
            N=n,
            LOG_N=n.bit_length() - 1,
            ROWS=per,
            num_warps=warps,
        )
    return out.reshape(x.shape)
