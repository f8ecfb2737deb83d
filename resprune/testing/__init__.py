"""Helpers for testing resprune and resprune plugins.

- :mod:`resprune.testing.reference`: slow, obviously correct reference implementations
  that fast paths are compared against.
- :mod:`resprune.testing.contracts`: the contract checks every scorer and selector must
  pass; plugin authors run them over their own strategies.
"""

from .contracts import check_scorer_contract, check_selector_contract, random_context

__all__ = ["check_scorer_contract", "check_selector_contract", "random_context"]
