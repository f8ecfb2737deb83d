"""Token budgets: an int ``k`` (tokens per image) or a float ratio in (0, 1]."""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real

from .errors import BudgetError

__all__ = ["Budget", "check_budget", "resolve_budget", "stage_budget"]

Budget = int | float


def check_budget(budget: object, *, where: str = "budget") -> Budget:
    """Return ``budget`` if it is a positive int or a float ratio in (0, 1]; else raise.

    Raises:
        BudgetError: naming ``where`` and what a valid budget looks like.
    """
    if isinstance(budget, bool) or not isinstance(budget, Real):
        raise BudgetError(
            f"{where}={budget!r} ({type(budget).__name__}) is not a budget: use an int k >= 1 "
            f"(tokens kept per image) or a float ratio in (0, 1] (share of tokens kept)."
        )
    if isinstance(budget, Integral):
        if budget < 1:
            raise BudgetError(f"{where}={budget} must be >= 1 tokens (or a float ratio in (0, 1]).")
        return int(budget)
    if not (math.isfinite(budget) and 0.0 < budget <= 1.0):
        raise BudgetError(f"{where}={budget!r}: a float budget is a ratio and must lie in (0, 1].")
    return float(budget)


def resolve_budget(budget: Budget, n: int, *, where: str = "budget") -> int:
    """Number of tokens to keep out of ``n``: ``min(k, n)``, or ``max(1, round(ratio * n))``.

    Ratios are rounded half up. A budget at or above ``n`` keeps every token.
    """
    budget = check_budget(budget, where=where)
    if isinstance(budget, int):
        return min(budget, n)
    return min(n, max(1, math.floor(budget * n + 0.5)))


def stage_budget(budget: object, top: Budget, *, where: str = "budget") -> Budget:
    """A stage's budget: its own, the top-level ``top`` when ``None``, or from a **table** keyed
    by the top-level budget (``{192: 300, 128: 303, 64: 66}``: a method's per-budget counts).

    Raises:
        BudgetError: a table without an entry for ``top``, or a bad budget.
    """
    if budget is None:
        return check_budget(top, where=where)
    if isinstance(budget, Mapping):
        if top not in budget:
            listed = ", ".join(str(key) for key in budget)
            raise BudgetError(f"{where} is a table keyed by the top-level budget, with entries for {listed}; it has "
                              f"none for budget={top!r}. Use one of those budgets, or add an entry.")
        return check_budget(budget[top], where=f"{where}[{top!r}]")
    return check_budget(budget, where=where)
