"""Contract tests over every registered selector and scorer, and tests of the checks themselves."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

import resprune
from resprune.interfaces import Scorer, Selector
from resprune.plugins import get_host
from resprune.testing import check_scorer_contract, check_selector_contract, random_context

SELECTORS = get_host().selectors.names()
SCORERS = get_host().scorers.names()


# every built-in strategy runs the full conformance suites in test_conformance.py


def test_all_reference_strategies_are_registered():
    assert {"residual_energy", "topk", "random", "uniform", "divprune", "dpp"} <= set(SELECTORS)
    assert {"text_relevance", "norm", "mean_similarity", "center", "cls_attention"} <= set(SCORERS)


class Flaky(Selector):
    """Answers differently on every call."""

    name = "flaky"
    calls = 0

    def select(self, tokens: torch.Tensor, k: int, scores: Mapping[str, torch.Tensor], context) -> torch.Tensor:
        Flaky.calls += 1
        gen = torch.Generator().manual_seed(Flaky.calls)
        return torch.stack([torch.randperm(tokens.shape[1], generator=gen)[:k] for _ in range(tokens.shape[0])])


class BatchDependent(Selector):
    """Ranks by the batch mean, so an image's picks depend on its neighbours."""

    name = "batch_dependent"

    def select(self, tokens, k, scores, context):
        s = (tokens - tokens.mean(dim=0, keepdim=True)).norm(dim=-1)
        return s.argsort(dim=-1, descending=True)[:, :k]


class Repeats(Selector):
    name = "repeats"

    def select(self, tokens, k, scores, context):
        return torch.zeros(tokens.shape[0], k, dtype=torch.long)


class Sloppy(Scorer):
    name = "sloppy"
    output = "sloppy"

    def score(self, context):
        return context.tokens.sum(-1)[:, :-1]


@pytest.mark.parametrize("selector, message", [
    (Flaky, "not deterministic"),
    (BatchDependent, "differ alone and in a batch"),
    (Repeats, "duplicate indices"),
])
def test_selector_contract_catches_broken_selectors(selector, message):
    with pytest.raises((AssertionError, resprune.PluginContractError), match=message):
        check_selector_contract(selector({}))


def test_scorer_contract_catches_wrong_shape():
    with pytest.raises(resprune.PluginContractError, match=r"scorer 'sloppy'.*\[B, N\]"):
        check_scorer_contract(Sloppy({}))
