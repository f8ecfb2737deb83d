"""Helpers for testing resprune and resprune plugins.

- ``resprune.testing.reference``: slow, obviously correct reference implementations
  that fast paths are compared against.
- ``resprune.testing.contracts``: the contract checks every scorer and selector must
  pass; plugin authors run them over their own strategies.
- ``tiny_lvlm`` / ``tiny_inputs`` (from ``resprune.tiny``): tiny randomly initialised
  LLaVA / LLaVA-NeXT / Qwen2.5-VL models with offline processors, for tests that need a
  real model without a download.
"""

from .contracts import check_merger_contract, check_scorer_contract, check_selector_contract, random_context
from .tiny import MODEL_TYPES, tiny_inputs, tiny_lvlm

__all__ = ["check_merger_contract", "check_scorer_contract", "check_selector_contract", "random_context", "tiny_lvlm", "tiny_inputs",
           "MODEL_TYPES"]
