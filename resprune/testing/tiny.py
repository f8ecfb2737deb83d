"""The tiny offline models, for tests (they live in ``resprune.tiny``: the CLI's
``tiny:<model_type>`` models use them too)."""

from ..tiny import MODEL_TYPES, tiny_inputs, tiny_lvlm

__all__ = ["MODEL_TYPES", "tiny_inputs", "tiny_lvlm"]
