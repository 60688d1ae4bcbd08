"""Hadamard matrices and their fast transform (pure math; QuaRot's rotations use them).

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H H^T = n I``; ``H / sqrt(n)`` is
orthogonal. Which orders are built here (:func:`hadamard_plan`):

* ``2^k``: Sylvester's construction ``H_2n = [[H, H], [H, -H]]`` (the fast Walsh-Hadamard
  transform computes ``x @ H`` in ``n log n``);
* ``m * 2^k`` with ``m = q + 1`` for a prime ``q = 3 (mod 4)`` (12, 20, 24, 44, 48, 60, 68, 72,
  80, 84, ...): Paley's first construction of order ``m``, Kronecker with Sylvester's ``2^k``
  (so 384 = 12 * 32, 768 = 12 * 64, 5120 = 20 * 256, 11008 = 172 * 64 is *not* covered: 171 is
  no prime);
* any other ``n``: a block-diagonal Hadamard ``I_{n/b} (x) H_b`` of the largest constructible
  block ``b`` dividing ``n`` (or the block size asked for). An ``n`` with no such block above 1
  (an odd ``n``) has no construction: :class:`HadamardSizeError`.

The transform of a row vector is ``x @ M`` with ``M = I_{n/b} (x) (P_m (x) S_{2^k}) / sqrt(b)``
(``P_m`` Paley's, ``S`` Sylvester's, ``b = m 2^k``): :func:`apply_hadamard` computes it with a
butterfly on the ``2^k`` axis and a small ``m x m`` matmul, :func:`hadamard_matrix` builds ``M``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

#: the largest Paley base order tried (orders up to this, q + 1 with q prime = 3 mod 4)
MAX_PALEY = 256


class HadamardSizeError(ValueError):
    """No Hadamard construction exists here for the asked size or block size."""


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


@functools.cache
def paley_orders() -> tuple[int, ...]:
    """Orders ``q + 1`` of Paley's first construction (``q`` prime, ``q = 3 mod 4``) up to
    :data:`MAX_PALEY` that are not powers of two times a smaller such order."""
    out: list[int] = []
    for q in range(3, MAX_PALEY):
        m = q + 1
        if _is_prime(q) and q % 4 == 3 and not _power_of_two(m) and _base_of(m, out) is None:
            out.append(m)
    return tuple(out)


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _base_of(n: int, bases: list[int] | tuple[int, ...]) -> int | None:
    """The base order ``m`` (1 or a Paley order) with ``n = m * 2^k``, or ``None``."""
    for m in (1, *bases):
        if n % m == 0 and _power_of_two(n // m):
            return m
    return None


@dataclasses.dataclass(frozen=True)
class HadamardPlan:
    """How a Hadamard transform of ``size`` inputs is built: diagonal blocks of ``block``
    inputs, each the Kronecker product of a base of order ``base`` (1: none; else Paley's) with
    Sylvester's of order ``block // base``."""

    size: int
    block: int
    base: int = 1

    @property
    def pow2(self) -> int:
        """The Sylvester (power-of-two) factor of a block."""
        return self.block // self.base

    @property
    def full(self) -> bool:
        """Whether the transform mixes all ``size`` inputs (not block-diagonal)."""
        return self.block == self.size

    def describe(self) -> str:
        kind = "Sylvester" if self.base == 1 else f"Paley {self.base} x Sylvester {self.pow2}"
        layout = "" if self.full else f", block-diagonal, {self.size // self.block} blocks of {self.block}"
        return f"Hadamard {self.size} ({kind}{layout})"


def hadamard_plan(size: int, block_size: int | None = None) -> HadamardPlan:
    """The construction used for a transform of ``size`` inputs (see the module docstring);
    ``block_size``: force block-diagonal blocks of that size. Raises :class:`HadamardSizeError`."""
    if size < 2:
        raise HadamardSizeError(f"a Hadamard transform needs at least 2 inputs, got {size}")
    bases = paley_orders()
    if block_size is not None:
        if block_size < 2 or size % block_size:
            raise HadamardSizeError(f"block size {block_size} does not divide {size} (or is below 2)")
        base = _base_of(block_size, bases)
        if base is None:
            raise HadamardSizeError(
                f"no Hadamard construction of order {block_size}: use a power of two or 2^k times one "
                f"of {list(bases[:8])}..."
            )
        return HadamardPlan(size, block_size, base)
    for block in sorted((d for d in range(2, size + 1) if size % d == 0), reverse=True):
        base = _base_of(block, bases)
        if base is not None:
            return HadamardPlan(size, block, base)
    raise HadamardSizeError(
        f"no Hadamard construction for size {size}: it has no even divisor (no Hadamard matrix of odd "
        f"order above 1 exists); leave this dimension out of the rotation"
    )


@functools.lru_cache(maxsize=32)
def _paley(m: int) -> torch.Tensor:
    """Paley's first construction of order ``m = q + 1`` (entries +-1), float64."""
    q = m - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in residues else -1.0 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]  # Jacobsthal Q[i, j] = chi(j - i), antisymmetric
    s = torch.zeros(m, m, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jac
    return s + torch.eye(m, dtype=torch.float64)


def base_matrix(
    m: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """The +-1 base matrix of order ``m`` (``[[1]]`` for 1)."""
    h = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
    return h.to(dtype=dtype, device=device)


def sylvester(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester's +-1 Hadamard matrix of order ``n`` (a power of two)."""
    if not _power_of_two(n):
        raise HadamardSizeError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(plan: HadamardPlan, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthogonal ``[size, size]`` matrix ``M`` of ``plan`` (``x @ M`` is the transform)."""
    block = torch.kron(base_matrix(plan.base), sylvester(plan.pow2)) / math.sqrt(plan.block)
    eye = torch.eye(plan.size // plan.block, dtype=torch.float64)
    return torch.kron(eye, block).to(dtype)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform of the last dimension (a power of two):
    ``x @ S_n`` in ``n log n`` additions."""
    n = x.shape[-1]
    if not _power_of_two(n):
        raise HadamardSizeError(f"the fast Walsh-Hadamard transform needs a power of two, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


def apply_hadamard(x: torch.Tensor, plan: HadamardPlan, pow2_transform=fwht) -> torch.Tensor:  # noqa: ANN001
    """``x @ hadamard_matrix(plan)`` on the last dimension, in ``x``'s dtype (fp32 inside for
    half precision). ``pow2_transform``: the unnormalized ``2^k`` transform of the last dim
    (default :func:`fwht`; a Triton kernel on GPU)."""
    if x.shape[-1] != plan.size:
        raise HadamardSizeError(f"a Hadamard transform of size {plan.size} got inputs of size {x.shape[-1]}")
    dtype = x.dtype
    work = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    lead = work.shape[:-1]
    y = pow2_transform(work.reshape(-1, plan.pow2)).reshape(
        *lead, plan.size // plan.block, plan.base, plan.pow2
    )
    if plan.base > 1:  # [..., blocks, base, pow2] x [base, base] over the base axis
        y = torch.einsum("...gap,ab->...gbp", y, base_matrix(plan.base, y.dtype, y.device))
    return (y.reshape(*lead, plan.size) / math.sqrt(plan.block)).to(dtype)


@dataclasses.dataclass(frozen=True)
class Rotation:
    """The orthogonal ``Q = diag(signs) M`` of a plan (``signs``: +-1 float64, or ``None`` for
    ``M`` itself), applied to rows without forming ``Q``: ``n log n`` per row, so a rotation of
    a 14336-wide layer costs no dense 14336 x 14336 matmul."""

    plan: HadamardPlan
    signs: torch.Tensor | None = None

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q`` on the last dimension (in ``x``'s dtype; use float64 to fuse weights)."""
        if self.signs is not None:
            x = x * self.signs.to(x.dtype).to(x.device)
        return apply_hadamard(x, self.plan)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``Q`` as a dense ``[size, size]`` matrix."""
        return self.right(torch.eye(self.plan.size, dtype=torch.float64)).to(dtype)


def random_rotation(size: int, seed: int, block_size: int | None = None) -> Rotation:
    """QuaRot's randomized Hadamard rotation ``diag(s) M`` with random signs ``s`` from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (size,), generator=g, dtype=torch.float64) * 2 - 1
    return Rotation(hadamard_plan(size, block_size), signs)


def random_hadamard(
    size: int, seed: int, block_size: int | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """:func:`random_rotation` as a dense orthogonal ``[size, size]`` matrix."""
    return random_rotation(size, seed, block_size).matrix(dtype)
