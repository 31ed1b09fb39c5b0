"""Normalized Hadamard matrices (orthogonal, every entry +-1/sqrt(n)) for PHI-S, in numpy or jax.numpy.

A width n gets, in this order of preference:
1. Sylvester, n = 2^k: H_{2m} = [[H_m, H_m], [H_m, -H_m]].
2. Sylvester (x) Paley, n = 2^i * m with m a Paley order (the largest Sylvester factor first, as
   NVlabs/RADIO's examples/common/hadamard.py does): Paley I for m = q + 1, q a prime power = 3 mod 4;
   Paley II for m = 2 (q + 1), q a prime power = 1 mod 4. Prime powers use the field GF(p^k) (RADIO's
   code handles primes only). 768 = 64 x Paley I(12); 1152 = 32 x Paley II(36); 1280 = 64 x Paley I(20).
3. Fallback, where neither exists (n = 2 mod 4 above 2, n odd above 1, or no Paley factor such as
   n = 4 x 47 = 188): Sylvester(2^a) (x) the normalized discrete Hartley matrix of the odd rest,
   cas(2 pi i j / r) / sqrt(r) (cas = cos + sin). Deterministic and orthogonal, but its entries are
   not of equal magnitude, so PHI-S then equalizes the channels' variances only approximately (RADIO
   falls back to a random orthogonal matrix instead: no better, and not reproducible across runs).

The matrix is built from index arithmetic (iota, a table of at most n quadratic characters): inside
a jitted step it is computed, never embedded as an n x n constant.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a width's matrix is made: sylvester (x) paley (x) hartley, orders multiplying to n."""

    n: int
    sylvester: int  # order of the Sylvester factor (1: none)
    paley: tuple[int, int, int, int] | None  # (construction 1 | 2, q, p, k) with q = p^k
    hartley: int  # order of the Hartley fallback factor (1: none, the matrix is an exact Hadamard)

    @property
    def exact(self) -> bool:
        return self.hartley == 1

    def describe(self) -> str:
        parts = [f"Sylvester({self.sylvester})"] if self.sylvester > 1 else []
        if self.paley:
            kind, q = self.paley[:2]
            parts.append(f"Paley {'I' * kind}({q + 1 if kind == 1 else 2 * (q + 1)}, q={q})")
        if self.hartley > 1:
            parts.append(f"Hartley({self.hartley}) [fallback: not an exact Hadamard matrix]")
        return " x ".join(parts) or "Sylvester(1)"


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, k >= 1; None otherwise."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)  # the smallest prime factor
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _paley(m: int) -> tuple[int, int, int, int] | None:
    """A Paley construction of order m, (kind, q, p, k), or None."""
    if (pk := _prime_power(m - 1)) and (m - 1) % 4 == 3:
        return (1, m - 1, *pk)
    if m % 2 == 0 and (pk := _prime_power(m // 2 - 1)) and (m // 2 - 1) % 4 == 1:
        return (2, m // 2 - 1, *pk)
    return None


@functools.cache
def plan(n: int) -> Plan:
    if n < 1:
        raise ValueError(f"a Hadamard matrix needs a positive order, got {n}")
    twos = (n & -n).bit_length() - 1  # the power of 2 in n
    for i in range(twos, -1, -1):
        m = n >> i
        if m == 1:
            return Plan(n, n, None, 1)
        if m % 4 == 0 and (p := _paley(m)):
            return Plan(n, 1 << i, p, 1)
    return Plan(n, 1 << twos, None, n >> twos)


# ---------------------------------------------------------------- the field GF(p^k) (k = 1: integers mod p)


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficient lists, lowest degree first; f monic."""
    a = list(a)
    for top in range(len(a) - 1, len(f) - 2, -1):
        c = a[top] % p
        if c:
            for j, fj in enumerate(f):
                a[top - len(f) + 1 + j] = (a[top - len(f) + 1 + j] - c * fj) % p
    return [x % p for x in a[: len(f) - 1]]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic polynomial of degree k irreducible over GF(p) (lowest degree first)."""

    def polys(deg):
        for i in range(p**deg):
            yield [(i // p**j) % p for j in range(deg)] + [1]

    for f in polys(k):
        if all(any(_poly_mod(f, g, p)) for d in range(1, k // 2 + 1) for g in polys(d)):
            return f
    raise ValueError(f"no irreducible polynomial of degree {k} over GF({p})")  # never: one always exists


@functools.cache
def quadratic_character(q: int, p: int, k: int) -> np.ndarray:
    """chi[x] for the q elements of GF(p^k), element x encoded by its base-p digits (polynomial
    coefficients, lowest first): 0 at 0, 1 at a nonzero square, -1 elsewhere."""
    if k == 1:
        squares = {(x * x) % p for x in range(1, p)}
    else:
        f = _irreducible(p, k)
        squares = set()
        for x in range(1, q):
            a = [(x // p**j) % p for j in range(k)]
            prod = [0] * (2 * k - 1)
            for i, ai in enumerate(a):
                for j, aj in enumerate(a):
                    prod[i + j] += ai * aj
            squares.add(sum(c * p**j for j, c in enumerate(_poly_mod(prod, f, p))))
    chi = np.array([1 if x in squares else -1 for x in range(q)], np.int8)
    chi[0] = 0
    return chi


# ---------------------------------------------------------------- the matrices (xp: numpy or jax.numpy)


def _jacobsthal(q: int, p: int, k: int, xp):
    """Q[a, b] = chi(a - b) over GF(q), [q, q]."""
    a = xp.arange(q)[:, None]
    b = xp.arange(q)[None, :]
    diff = xp.zeros((q, q), dtype=xp.int32)
    for j in range(k):  # subtraction digit by digit (the additive group of GF(p^k) is (Z/p)^k)
        w = p**j
        diff = diff + (((a // w) % p - (b // w) % p) % p) * w
    return xp.take(xp.asarray(quadratic_character(q, p, k), dtype=xp.float32), diff)


def _paley_matrix(kind: int, q: int, p: int, k: int, xp):
    jac = _jacobsthal(q, p, k, xp)
    ones = xp.ones((1, q), xp.float32)
    if kind == 1:  # skew conference matrix S; H = I + S
        s = xp.concatenate(
            [xp.concatenate([xp.zeros((1, 1), xp.float32), ones], 1), xp.concatenate([-ones.T, jac], 1)], 0
        )
        return xp.eye(q + 1, dtype=xp.float32) + s
    c = xp.concatenate(  # symmetric conference matrix C
        [xp.concatenate([xp.zeros((1, 1), xp.float32), ones], 1), xp.concatenate([ones.T, jac], 1)], 0
    )
    return xp.kron(c, xp.asarray([[1.0, -1.0], [-1.0, -1.0]], xp.float32)) + xp.kron(
        xp.eye(q + 1, dtype=xp.float32), xp.asarray([[1.0, 1.0], [1.0, -1.0]], xp.float32)
    )


def _hartley(r: int, xp):
    i = xp.arange(r, dtype=xp.int32)
    angle = (2 * math.pi / r) * ((i[:, None] * i[None, :]) % r).astype(xp.float32)  # exact products mod r
    return (xp.cos(angle) + xp.sin(angle)) / math.sqrt(r)


def hadamard(n: int, xp=np):
    """The normalized [n, n] matrix of `plan(n)` (orthogonal: H @ H.T = I), as an xp float32 array."""
    pl = plan(n)
    h = xp.ones((1, 1), xp.float32)
    while h.shape[0] < pl.sylvester:
        h = xp.kron(xp.asarray([[1.0, 1.0], [1.0, -1.0]], xp.float32), h)
    if pl.paley:
        h = xp.kron(h, _paley_matrix(*pl.paley, xp))
    h = h / math.sqrt(h.shape[0])
    if pl.hartley > 1:
        h = xp.kron(h, _hartley(pl.hartley, xp))
    return h
