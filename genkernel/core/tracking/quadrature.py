"""Quadrature rules for the exact one-step identity (docs/ledger.md, "Quadrature and the residual").

    f(x; θ_k + Δ) − f(x; θ_k) = ∫_0^1 J(x; θ_k + sΔ) ds · Δ

A rule is a list of nodes s_q in [0, 1] with weights w_q summing to 1; the averaged Jacobian is
J̄ = Σ_q w_q J(x; θ_k + s_q Δ). Local error per step: left O(|Δ|²), midpoint and trapezoid
O(|Δ|³), Simpson O(|Δ|⁵).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuadratureRule:
    name: str
    nodes: tuple[float, ...]
    weights: tuple[float, ...]
    order: int  # exponent of |Δ| in the per-step error


QUADRATURE_RULES = {
    "left": QuadratureRule("left", (0.0,), (1.0,), 2),
    "midpoint": QuadratureRule("midpoint", (0.5,), (1.0,), 3),
    "trapezoid": QuadratureRule("trapezoid", (0.0, 1.0), (0.5, 0.5), 3),
    "simpson": QuadratureRule("simpson", (0.0, 0.5, 1.0), (1 / 6, 4 / 6, 1 / 6), 5),
}


def quadrature_rule(name: str) -> QuadratureRule:
    """The rule called ``name``; a clear error names the supported ones."""
    try:
        return QUADRATURE_RULES[name]
    except KeyError:
        raise ValueError(f"unknown quadrature {name!r}; choose one of {sorted(QUADRATURE_RULES)}") from None
