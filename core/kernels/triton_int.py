"""Weight-only group-wise int4/int8 matmul in Triton: ``y = x @ W^T`` with packed integer ``W``.

Weight semantics: ``W[n, k] = (codes[n, k] - zero[n, k // gs]) * scale[n, k // gs]`` with codes in
``0 .. 2^bits - 1``; symmetric weights have no zeros tensor (``zero = 2^(bits-1)``).

Layout (built once by :func:`repack_int`, at model load, never per call)
-------------------------------------------------------------------------
``P = 32 // bits`` codes share one int32 word (8 for int4, 4 for int8). K is cut into *chunks*
of ``C = P * R`` consecutive inputs, ``R = 32`` (``16`` when the group size is a multiple of 16
but not of 32). Chunk ``c`` is stored as ``R`` rows of words, ``qweight[c * R + j, n]``, whose
bits ``[i * bits, (i + 1) * bits)`` hold the code of ``W[n, c * C + i * R + j]``. So:

* ``qweight`` is ``int32 [ceil(K / C) * R, N]`` (K zero-padded to whole chunks), N contiguous:
  a tile of ``R x BLOCK_N`` words is ``R`` fully coalesced row loads, each word read once;
* bits ``[i * bits, (i + 1) * bits)`` of the whole tile are *slice* ``i``: the codes of ``R``
  consecutive inputs ``c * C + i * R + [0, R)`` -- a contiguous piece of K, matched by a contiguous load
  of ``x`` -- with no reshape, interleave or repeated word loads;
* ``R`` divides the group size, so a slice lies in one group: its scales and zeros are one
  ``[BLOCK_N]`` vector (``scales``/``zeros`` are ``[G, N]``, N contiguous), loaded once per slice.

A code is turned into a float without a shift or an int-to-float conversion: slot ``i`` is
masked in place (slots of the upper half-word after one shift by 16 per word), and
``(bits | 0x4B000000)`` read as fp32 is ``2^23 + code * 2^sh`` exactly; ``2^-sh`` is folded
into the slice's scale vector.

Kernel and dispatch (:func:`int_matmul`, rows ``M`` = product of x's leading dimensions)
---------------------------------------------------------------------------------------
One Triton kernel, grid ``(M tiles, N tiles, SPLIT_K)``, fp32 accumulation, two inner modes,
then the fallback:

* ``M <= ELEMENTWISE_MAX_ROWS`` (one row, GEMV): CUDA cores, no ``tl.dot``: each thread keeps an
  fp32 ``[R, BLOCK_N]`` tile of ``x_k * W[n, k]`` sums and reduces it over ``R`` once, at the
  end (no per-slice reductions). Per weight: one AND-OR, one add, two FMAs.
* ``M <= DECODE_MAX_ROWS`` (decode, one 16-row tensor-core tile) and ``M < FALLBACK_MIN_ROWS``
  (tiled GEMM, autotuned ``BLOCK_M``): each slice is dequantized to x's dtype
  (``(q - z) * s``) and fed to ``tl.dot`` with the fp32 accumulator.
* ``M >= FALLBACK_MIN_ROWS``: the weight is dequantized (a Triton kernel writing ``W^T`` in x's
  dtype) and multiplied with ``torch.matmul`` (cuBLAS), which wins once the matmul is compute
  bound. The threshold is a module constant, to be tuned on the target GPU.

Decode and small-M GEMM split K over programs (``SPLIT_K``, from the SM count, so that small-N
layers still fill the GPU); the partial sums meet by fp32 ``atomic_add`` in a zeroed buffer,
cast to x's dtype afterwards. With ``SPLIT_K == 1`` the kernel writes the output directly.
Block sizes, warps and stages are autotuned (``triton.autotune``) for Hopper-class GPUs, keyed
on the row bucket (next power of two), N, K, bits, split and dtypes; under the Triton
interpreter (``TRITON_INTERPRET=1``) a single tiny configuration is used, and ``tl.dot`` runs on
fp32 operands (the interpreter's bf16 ``tl.dot`` is wrong).

On a CPU tensor without the interpreter, :func:`int_matmul` computes with the torch fallback.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import torch

try:  # triton is optional (the ``kernels`` extra)
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

__all__ = [
    "DECODE_MAX_ROWS",
    "ELEMENTWISE_MAX_ROWS",
    "FALLBACK_MIN_ROWS",
    "HAVE_TRITON",
    "TritonIntWeight",
    "dequantize",
    "int_matmul",
    "repack_int",
    "supports",
]

#: Rows (product of x's leading dimensions) handled by the CUDA-core GEMV mode (one row per program).
ELEMENTWISE_MAX_ROWS = 1
#: Rows up to which the decode configurations (one 16-row tile, split K) are used.
DECODE_MAX_ROWS = 16
#: From this many rows on, dequantize-then-``torch.matmul`` (cuBLAS) is used instead of the
#: Triton GEMM: at large M the matmul is compute bound and cuBLAS is faster than a GEMM that
#: dequantizes in its inner loop, while the one-off dequantization is amortized over the rows.
#: A first guess for H100/H200, to be tuned with ``examples/benchmarks/kernels.py``.
FALLBACK_MIN_ROWS = 512

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclasses.dataclass(frozen=True)
class TritonIntWeight:
    """Weights repacked once (at model load) into the kernels' layout (see the module docstring).

    ``qweight`` int32 ``[ceil(K / C) * R, N]``; ``scales`` ``[G, N]`` (fp16, bf16 or fp32);
    ``zeros`` ``[G, N]`` (uint8 when integral, else fp32) or ``None`` when symmetric.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int

    @property
    def slice_rows(self) -> int:
        """``R``: words per chunk row block (inputs per slice)."""
        return _slice_rows(self.group_size)

    @property
    def chunk(self) -> int:
        """``C``: inputs per chunk (``32 // bits * R``)."""
        return 32 // self.bits * self.slice_rows

    @property
    def num_chunks(self) -> int:
        """Chunks along K (the last one zero-padded)."""
        return -(-self.in_features // self.chunk)


def _slice_rows(group_size: int) -> int:
    return 32 if group_size % 32 == 0 else 16


def _norm_group_size(group_size: int | None, in_features: int) -> int:
    return in_features if group_size is None or group_size <= 0 else int(group_size)


def supports(bits: int, group_size: int | None, in_features: int) -> bool:
    """Whether :func:`repack_int` accepts this layer (bits 4/8, group a multiple of 16 dividing K)."""
    gs = _norm_group_size(group_size, in_features)
    return bits in (4, 8) and in_features > 0 and in_features % gs == 0 and gs % 16 == 0


def repack_int(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int | None,
) -> TritonIntWeight:
    """Repack stored weights into the kernels' layout (once, on the tensors' device).

    ``codes`` uint8 ``[N, K]`` (values ``0 .. 2^bits - 1``), ``scales`` ``[N, G]`` (any float
    dtype), ``zeros`` ``[N, G]`` (codes-domain zero points, uint8 or float) or ``None`` for
    symmetric weights (zero ``2^(bits-1)``); ``group_size`` ``None`` or ``-1`` for per-channel.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be [out_features, in_features], got shape {tuple(codes.shape)}")
    N, K = codes.shape
    gs = _norm_group_size(group_size, K)
    if not supports(bits, gs, K):
        raise ValueError(
            f"triton-int supports bits 4/8 with a group size that is a multiple of 16 and divides "
            f"in_features; got bits={bits}, group_size={group_size}, in_features={K}"
        )
    G = K // gs
    if tuple(scales.shape) != (N, G):
        raise ValueError(f"scales must be [{N}, {G}], got {tuple(scales.shape)}")
    if zeros is not None and tuple(zeros.shape) != (N, G):
        raise ValueError(f"zeros must be [{N}, {G}], got {tuple(zeros.shape)}")
    maxq = (1 << bits) - 1
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > maxq):
        raise ValueError(f"codes must lie in 0..{maxq} for {bits}-bit weights")

    P, R = 32 // bits, _slice_rows(gs)
    C = P * R
    nc = -(-K // C)
    dev = codes.device
    ct = torch.zeros(nc * C, N, dtype=torch.int64, device=dev)
    ct[:K] = codes.t().to(torch.int64)
    ct = ct.view(nc, P, R, N)
    words = torch.zeros(nc, R, N, dtype=torch.int64, device=dev)
    for i in range(P):
        words |= ct[:, i] << (i * bits)
    del ct
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).view(nc * R, N)

    sdtype = scales.dtype if scales.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    s = scales.t().to(sdtype).contiguous()
    z: torch.Tensor | None = None
    if zeros is not None:
        zt = zeros.t()
        if zt.dtype == torch.uint8:
            z = zt.contiguous()
        else:
            zf = zt.to(torch.float32)
            integral = bool(torch.all((zf == torch.round(zf)) & (zf >= 0) & (zf <= 255)))
            z = (zf.to(torch.uint8) if integral else zf).contiguous()
    return TritonIntWeight(
        qweight=words.contiguous(),
        scales=s,
        zeros=z,
        bits=bits,
        group_size=gs,
        in_features=K,
        out_features=N,
    )


def _dequantize_t_torch(w: TritonIntWeight, dtype: torch.dtype) -> torch.Tensor:
    """``W^T`` ``[K, N]`` in ``dtype``, in torch (any device)."""
    P, R, nc = 32 // w.bits, w.slice_rows, w.num_chunks
    N, K, gs = w.out_features, w.in_features, w.group_size
    words = w.qweight.view(nc, 1, R, N)
    shifts = (torch.arange(P, device=words.device, dtype=torch.int32) * w.bits).view(1, P, 1, 1)
    codes = ((words >> shifts) & ((1 << w.bits) - 1)).reshape(nc * P * R, N)[:K]
    zero = (
        w.zeros.to(torch.float32).repeat_interleave(gs, dim=0)
        if w.zeros is not None
        else torch.tensor(float(1 << (w.bits - 1)), device=codes.device)
    )
    scale = w.scales.to(torch.float32).repeat_interleave(gs, dim=0)
    return ((codes.to(torch.float32) - zero) * scale).to(dtype)


def _can_launch(t: torch.Tensor) -> bool:
    return HAVE_TRITON and (t.is_cuda or _INTERPRET)


def _dequantize_t(w: TritonIntWeight, dtype: torch.dtype) -> torch.Tensor:
    """``W^T`` ``[K, N]`` contiguous in ``dtype``: the Triton kernel where it can run, else torch."""
    if not _can_launch(w.qweight):
        return _dequantize_t_torch(w, dtype)
    K, N = w.in_features, w.out_features
    out = torch.empty(K, N, dtype=dtype, device=w.qweight.device)
    block_n = 32 if _INTERPRET else 128
    grid = (w.num_chunks, triton.cdiv(N, block_n))
    zeros = w.zeros if w.zeros is not None else w.scales  # dummy pointer when symmetric
    _dequant_kernel[grid](
        w.qweight,
        w.scales,
        zeros,
        out,
        N,
        K,
        w.group_size,
        BITS=w.bits,
        R=w.slice_rows,
        HAS_ZEROS=w.zeros is not None,
        BLOCK_N=block_n,
        num_warps=4,
    )
    return out


def dequantize(w: TritonIntWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype`` (used by the fallback path and by tests)."""
    return _dequantize_t(w, dtype).t().contiguous()


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _int_mm_kernel(
        x_ptr,
        qw_ptr,
        s_ptr,
        z_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_om,
        group_size,
        num_chunks,
        chunks_per_split,
        m_bucket,  # autotuning key only
        BITS: tl.constexpr,
        R: tl.constexpr,
        HAS_ZEROS: tl.constexpr,
        USE_DOT: tl.constexpr,
        DOT_FP32: tl.constexpr,
        SPLIT_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """out[m, n] (+)= sum over this split's chunks of x[m, k] * W[n, k]."""
        P: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        HALF: tl.constexpr = 1 << (BITS - 1)
        C: tl.constexpr = P * R
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, R)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        w_cols = qw_ptr + offs_n[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if not USE_DOT:  # GEMV (BLOCK_M == 1): x_k * W[n, k] summed elementwise, over R at the end
            acc2 = tl.zeros((R, BLOCK_N), dtype=tl.float32)
            x_row = x_ptr + pid_m * stride_xm
        c_lo = pid_k * chunks_per_split
        c_hi = tl.minimum(c_lo + chunks_per_split, num_chunks)
        for c in range(c_lo, c_hi):
            words = tl.load(w_cols + (c * R + offs_r)[:, None] * N, mask=n_ok[None, :], other=0)  # [R, BN]
            words = words.to(tl.uint32, bitcast=True)
            words_hi = words >> 16  # slots in the upper half-word
            for i in tl.static_range(P):
                k0 = c * C + i * R
                offs_k = k0 + offs_r
                g_off = (k0 // group_size) * N + offs_n
                if EVEN_K:  # K is whole chunks: no masks along K
                    k_ok = offs_r >= 0
                    g_ok = n_ok
                else:
                    k_ok = offs_k < K
                    g_ok = n_ok & (offs_n * 0 + k0 < K)  # (a scalar mask operand breaks the interpreter)
                s = tl.load(s_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)  # [BN]
                if HAS_ZEROS:  # noqa: SIM108 (constexpr branches)
                    b = -tl.load(z_ptr + g_off, mask=g_ok, other=0).to(tl.float32) * s
                else:
                    b = s * -HALF
                # slot i sits at bit sh of `src`; masked in place under the 2^23 exponent it reads as
                # 2^23 + code * 2^sh (exact), and 2^-sh goes into the scale: one AND-OR per code
                if i < P // 2:  # noqa: SIM108
                    src = words & (MASK << (i * BITS))
                else:
                    src = words_hi & (MASK << ((i - P // 2) * BITS))
                q = (src | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                wq = (
                    q * (s * (1.0 / (1 << ((i % (P // 2)) * BITS))))[None, :] + b[None, :]
                )  # (code - z) * s, fp32 [R, BN]
                if USE_DOT:
                    xk = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                    wq = wq.to(x_ptr.dtype.element_ty)
                    if DOT_FP32:
                        acc += tl.dot(xk.to(tl.float32), wq.to(tl.float32))
                    else:
                        acc = tl.dot(xk, wq, acc)
                else:
                    xr = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)  # [R]
                    acc2 += xr[:, None] * wq
        if not USE_DOT:
            acc += tl.sum(acc2, axis=0)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        o_ok = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_ok)
        else:
            tl.atomic_add(out_ptrs, acc, mask=o_ok)

    @triton.jit
    def _dequant_kernel(
        qw_ptr,
        s_ptr,
        z_ptr,
        out_ptr,
        N,
        K,
        group_size,
        BITS: tl.constexpr,
        R: tl.constexpr,
        HAS_ZEROS: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """out[k, n] = W[n, k] for one chunk of K and BLOCK_N outputs (out is ``W^T``)."""
        P: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        HALF: tl.constexpr = 1 << (BITS - 1)
        c = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, R)
        n_ok = offs_n < N
        words = tl.load(qw_ptr + (c * R + offs_r)[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0)
        words = words.to(tl.uint32, bitcast=True)
        for i in tl.static_range(P):
            k0 = c * (P * R) + i * R
            offs_k = k0 + offs_r
            g_off = (k0 // group_size) * N + offs_n
            g_ok = n_ok & (offs_n * 0 + k0 < K)  # (a scalar mask operand breaks the interpreter)
            s = tl.load(s_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)
            code = (words >> (i * BITS)) & MASK
            q = (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            if HAS_ZEROS:
                z = tl.load(z_ptr + g_off, mask=g_ok, other=0).to(tl.float32)
                wq = (q - z[None, :]) * s[None, :]
            else:
                wq = (q - HALF) * s[None, :]
            tl.store(
                out_ptr + offs_k[:, None] * N + offs_n[None, :],
                wq.to(out_ptr.dtype.element_ty),
                mask=(offs_k < K)[:, None] & n_ok[None, :],
            )

    def _cfg(bm: int | None, bn: int, warps: int, stages: int) -> Any:
        kw = {"BLOCK_N": bn} if bm is None else {"BLOCK_M": bm, "BLOCK_N": bn}
        return triton.Config(kw, num_warps=warps, num_stages=stages)

    # Decode (1..16 rows): BLOCK_M is fixed by the caller; weight streaming dominates, so the
    # search is over the N tile width (bytes in flight per program), warps and pipeline depth.
    _DECODE_CONFIGS = (
        [_cfg(None, 32, 1, 1)]
        if _INTERPRET
        else [
            _cfg(None, 64, 2, 3),
            _cfg(None, 64, 4, 4),
            _cfg(None, 128, 4, 3),
            _cfg(None, 128, 4, 4),
            _cfg(None, 256, 8, 3),
            _cfg(None, 256, 8, 4),
        ]
    )
    # GEMM (17 .. FALLBACK_MIN_ROWS - 1 rows): Hopper-sized tiles; BLOCK_M pruned to the rows.
    _GEMM_CONFIGS = (
        [_cfg(16, 32, 1, 1)]
        if _INTERPRET
        else [
            _cfg(32, 64, 4, 4),
            _cfg(32, 128, 4, 4),
            _cfg(64, 64, 4, 4),
            _cfg(64, 128, 4, 3),
            _cfg(64, 128, 4, 4),
            _cfg(128, 64, 4, 4),
            _cfg(128, 128, 8, 3),
            _cfg(128, 256, 8, 3),
        ]
    )

    def _prune_gemm(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
        """Drop row tiles much taller than the rows there are."""
        rows = int(named_args.get("m_bucket", kwargs.get("m_bucket", 1 << 30)))
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, rows)]
        return kept or configs[:1]

    _KEY = ["m_bucket", "N", "K", "BITS", "HAS_ZEROS", "USE_DOT", "SPLIT_K", "BLOCK_M"]
    _decode_kernel = triton.autotune(configs=_DECODE_CONFIGS, key=_KEY, reset_to_zero=["out_ptr"])(
        _int_mm_kernel
    )
    _gemm_kernel = triton.autotune(
        configs=_GEMM_CONFIGS,
        key=_KEY[:-1],
        reset_to_zero=["out_ptr"],
        prune_configs_by={"early_config_prune": _prune_gemm},
    )(_int_mm_kernel)


@functools.cache
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 4
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def _split_k(programs: int, num_chunks: int, device: torch.device) -> int:
    """Split K (a power of two) until ``programs * split`` reaches two waves of the GPU's SMs,
    keeping at least two chunks per split (one under the interpreter)."""
    sms = 4 if _INTERPRET or device.type != "cuda" else _num_sms(device.index or 0)
    min_chunks = 1 if _INTERPRET else 2
    split = 1
    while programs * split < 2 * sms and num_chunks // (2 * split) >= min_chunks:
        split *= 2
    return split


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _launch(x2: torch.Tensor, w: TritonIntWeight) -> torch.Tensor:
    """The Triton kernel on rows ``x2`` ``[M, K]`` (row-contiguous), ``M < FALLBACK_MIN_ROWS``."""
    M, K = x2.shape
    N = w.out_features
    decode = M <= DECODE_MAX_ROWS
    use_dot = M > ELEMENTWISE_MAX_ROWS
    if decode:
        block_m = 16 if use_dot else 1
        nominal = (1, 32 if _INTERPRET else 64)
    else:
        block_m = None
        nominal = (16, 32) if _INTERPRET else (64, 128)
    programs = triton.cdiv(M, nominal[0]) * triton.cdiv(N, nominal[1])
    split = _split_k(programs, w.num_chunks, x2.device)
    chunks_per_split = triton.cdiv(w.num_chunks, split)
    out = (
        torch.zeros(M, N, dtype=torch.float32, device=x2.device)
        if split > 1
        else torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    )
    zeros = w.zeros if w.zeros is not None else w.scales  # dummy pointer when symmetric

    def grid(meta: dict[str, Any]) -> tuple[int, int, int]:
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), split)

    args = (x2, w.qweight, w.scales, zeros, out, M, N, K, x2.stride(0), out.stride(0))
    common = dict(
        group_size=w.group_size,
        num_chunks=w.num_chunks,
        chunks_per_split=chunks_per_split,
        m_bucket=_next_pow2(M),
        BITS=w.bits,
        R=w.slice_rows,
        HAS_ZEROS=w.zeros is not None,
        USE_DOT=use_dot,
        DOT_FP32=_INTERPRET or x2.dtype == torch.float32,
        SPLIT_K=split,
        EVEN_K=K % w.chunk == 0,
    )
    if decode:
        _decode_kernel[grid](*args, **common, BLOCK_M=block_m)
    else:
        _gemm_kernel[grid](*args, **common)
    return out if split == 1 else out.to(x2.dtype)


def _fallback(x2: torch.Tensor, w: TritonIntWeight) -> torch.Tensor:
    """Dequantize (once per call) and multiply with ``torch.matmul`` (cuBLAS on GPU)."""
    return torch.matmul(x2, _dequantize_t(w, x2.dtype))


def int_matmul(x: torch.Tensor, w: TritonIntWeight) -> torch.Tensor:
    """``x @ W^T``: x ``[..., K]`` fp16/bf16/fp32 -> ``[..., N]`` in x's dtype, fp32 accumulation.

    Dispatch on the rows ``M``: GEMV for ``ELEMENTWISE_MAX_ROWS`` (1) row, one 16-row tensor-core
    tile up to ``DECODE_MAX_ROWS`` (both split K), the tiled GEMM below ``FALLBACK_MIN_ROWS``,
    dequantize + ``torch.matmul`` from there on (and on CPU tensors outside the interpreter).
    """
    if not HAVE_TRITON:
        raise RuntimeError(
            "llmpress.kernels.triton_int needs triton (pip install 'llmpress[kernels]'); "
            "use another kernel (LLMPRESS_KERNEL) on this machine"
        )
    K, N = w.in_features, w.out_features
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {K}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"int_matmul supports fp16, bf16 and fp32 activations, got {x.dtype}")
    if x.device != w.qweight.device:
        raise ValueError(f"x is on {x.device}, the weight on {w.qweight.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, N)
    if M >= FALLBACK_MIN_ROWS or not _can_launch(x2):
        out = _fallback(x2, w)
    else:
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        out = _launch(x2, w)
    return out.reshape(*lead, N)
