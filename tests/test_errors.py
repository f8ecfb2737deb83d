"""Bad input to select / score / Pipeline, and plugins that break their contract."""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass

import pytest
import torch

import resprune
import resprune.errors as errors
from resprune import Pipeline, PruneContext, Scorer, Selector, hookimpl, score, select
from resprune.budget import resolve_budget

ALL_ERRORS = [getattr(errors, name) for name in errors.__all__ if inspect.isclass(getattr(errors, name))]


# --- the hierarchy ------------------------------------------------------------------------


def test_every_error_derives_from_resprune_error():
    documented = {"ResPruneError", "ConfigError", "UnknownStrategyError", "PluginError", "PluginLoadError",
                  "DuplicateStrategyError", "PluginContractError", "BudgetError", "InvalidInputError",
                  "MissingContextError", "IncompatibleBackboneError", "MissingDependencyError"}
    assert documented <= {cls.__name__ for cls in ALL_ERRORS}
    for cls in ALL_ERRORS:
        assert issubclass(cls, resprune.ResPruneError), cls
        assert getattr(resprune, cls.__name__) is cls  # exported at the top level too


@pytest.mark.parametrize(("cls", "also"), [
    (resprune.ConfigError, ValueError),
    (resprune.BudgetError, ValueError),
    (resprune.InvalidInputError, ValueError),
    (resprune.UnknownStrategyError, KeyError),
    (resprune.MissingContextError, KeyError),
    (resprune.MissingDependencyError, ImportError),
    (resprune.PluginLoadError, resprune.PluginError),
    (resprune.DuplicateStrategyError, resprune.PluginError),
    (resprune.PluginContractError, resprune.PluginError),
])
def test_documented_secondary_bases(cls, also):
    assert issubclass(cls, also)


def test_plugin_errors_are_not_value_errors():
    for cls in (resprune.PluginError, resprune.PluginLoadError, resprune.DuplicateStrategyError,
                resprune.PluginContractError, resprune.IncompatibleBackboneError):
        assert not issubclass(cls, (ValueError, KeyError))


def test_key_errors_print_their_message_unquoted():
    for cls in (resprune.UnknownStrategyError, resprune.MissingContextError):
        assert str(cls("it's 'x'")) == "it's 'x'"
        assert str(cls()) == ""


def test_suggest():
    assert errors.suggest("alpah", ["alpha", "eps"]) == " Did you mean 'alpha'?"
    assert errors.suggest("zzz", ["alpha", "eps"]) == ""


# --- budgets --------------------------------------------------------------------------------

BAD_BUDGETS = [
    (0, ">= 1"), (-5, ">= 1"), (0.0, "(0, 1]"), (-0.5, "(0, 1]"), (1.5, "(0, 1]"), (2.0, "(0, 1]"),
    (float("nan"), "(0, 1]"), (float("inf"), "(0, 1]"), ("64", "(str) is not a budget"),
    (None, "(NoneType) is not a budget"), (True, "(bool) is not a budget"), (False, "(bool) is not a budget"),
    (torch.tensor(3), "(Tensor) is not a budget"),
]


@pytest.mark.parametrize(("budget", "hint"), BAD_BUDGETS)
def test_bad_budget_in_select(budget, hint):
    with pytest.raises(resprune.BudgetError) as info:
        select(torch.randn(8, 3), budget)
    assert hint in str(info.value) and str(info.value).startswith("budget=")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("budget", "hint"), BAD_BUDGETS[:6])
def test_bad_budget_in_pipeline(budget, hint):
    with pytest.raises(resprune.BudgetError, match=r"budget=") as info:
        Pipeline(budget=budget)
    assert hint in str(info.value)
    with pytest.raises(resprune.BudgetError, match="budget"):
        resprune.load_pipeline("uniform", budget=budget)


@pytest.mark.parametrize(("budget", "n", "k"), [
    (1, 8, 1), (8, 8, 8), (100, 8, 8), (1.0, 8, 8), (0.5, 8, 4), (0.5, 5, 3), (0.3, 5, 2), (0.01, 8, 1),
    (0.2222, 576, 128), (0.25, 576, 144),
])
def test_resolve_budget(budget, n, k):
    assert resolve_budget(budget, n) == k


SELECTOR_KWARGS = {
    "residual_energy": {}, "resprune": {"seed": "norm"}, "dpp": {}, "divprune": {}, "topk": {},
    "random": {}, "uniform": {},
}


@pytest.mark.parametrize("name", sorted(SELECTOR_KWARGS))
@pytest.mark.parametrize("budget", [7, 50, 1.0])
def test_budget_at_or_above_n_keeps_every_token(name, budget):
    v = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(3))
    scores = {"relevance": torch.rand(2, 7), "norm": v.norm(dim=-1)}
    kept = select(v, budget, selector=name, scores=scores, **SELECTOR_KWARGS[name])
    assert torch.equal(kept, torch.arange(7).expand(2, 7))
    order = select(v, budget, selector=name, scores=scores, order="selection", **SELECTOR_KWARGS[name])
    assert torch.equal(order.sort(dim=-1).values, torch.arange(7).expand(2, 7))
    sel = Pipeline(name, budget=budget).prune(v, scores=scores) if not SELECTOR_KWARGS[name] else None
    if sel is not None:
        assert sel.k == 7 and torch.equal(sel.kept, torch.arange(7).expand(2, 7)) and bool(sel.mask().all())


# --- tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "hint"), [
    (torch.randn(6), "must be 2-D [N, d] or 3-D [B, N, d], got shape (6,)"),
    (torch.randn(1, 2, 6, 3), "got shape (1, 2, 6, 3)"),
    (torch.tensor(1.0), "got shape ()"),
    (torch.arange(12).reshape(6, 2), "floating-point tensor, got dtype torch.int64"),
    (torch.ones(6, 2, dtype=torch.bool), "floating-point tensor, got dtype torch.bool"),
    (torch.ones(6, 2, dtype=torch.int32), "got dtype torch.int32"),
    (torch.randn(0, 4), "empty: shape (1, 0, 4)"),
    (torch.randn(6, 0), "empty: shape (1, 6, 0)"),
    (torch.randn(0, 6, 4), "empty: shape (0, 6, 4)"),
    ([[1.0, 2.0], [3.0, 4.0]], "must be a torch.Tensor [N, d] or [B, N, d], got list"),
    (None, "got NoneType"),
])
def test_bad_tokens(tokens, hint):
    for call in (lambda: select(tokens, 2), lambda: score(tokens, "norm"),
                 lambda: Pipeline("uniform", budget=2).prune(tokens)):
        with pytest.raises(resprune.InvalidInputError) as info:
            call()
        assert hint in str(info.value)
        assert str(info.value).startswith("tokens ")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tokens_say_where(bad):
    v = torch.randn(2, 6, 4)
    v[1, 2, 3] = bad
    for call in (lambda: select(v, 2), lambda: score(v, "norm"), lambda: Pipeline(budget=2).prune(v)):
        with pytest.raises(resprune.InvalidInputError, match="NaN or Inf") as info:
            call()
        assert "first at index [1, 2, 3] of shape (2, 6, 4)" in str(info.value)
    w = torch.randn(6, 4)
    w[4, 0] = bad
    with pytest.raises(resprune.InvalidInputError, match=r"index \[0, 4, 0\]"):
        select(w, 2)


def test_huge_but_finite_tokens_are_not_reported_as_non_finite():
    v = torch.full((6, 4), 3e38)  # the sum overflows to inf, the values are finite
    assert select(v, 2, selector="uniform").shape == (2,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_is_accepted(dtype):
    v = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(select(v.to(dtype), 3, selector="divprune"), select(v.to(dtype).float(), 3, selector="divprune"))


def test_bad_order_and_mismatched_context():
    v = torch.randn(6, 4)
    with pytest.raises(resprune.InvalidInputError, match="order='random' must be 'sorted' or 'selection'"):
        select(v, 2, order="random")
    with pytest.raises(resprune.InvalidInputError, match=r"context tokens \(1, 5, 4\) do not match tokens \(1, 6, 4\)"):
        select(v, 2, context=PruneContext(torch.randn(5, 4)))


# --- scores ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "shape", "expected"), [
    (None, (5,), "expected (6,)"),
    (None, (6, 1), "expected (6,)"),
    (2, (6,), "expected (2, 6)"),
    (2, (2, 5), "expected (2, 6)"),
    (2, (3, 6), "expected (2, 6)"),
])
def test_scores_of_the_wrong_shape(batch, shape, expected):
    v = torch.randn(*((batch,) if batch else ()), 6, 4)
    r = torch.rand(shape)
    for call in (lambda: select(v, 2, scores={"relevance": r}),
                 lambda: Pipeline(budget=2).prune(v, scores={"relevance": r})):
        with pytest.raises(resprune.InvalidInputError) as info:
            call()
        message = str(info.value)
        assert message.startswith("scores['relevance'] has shape") and expected in message
        assert f"{batch or 1} image(s) of N=6 tokens" in message


def test_scores_accept_lists_and_1d_for_one_image():
    v = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    r = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7]
    assert select(v, 3, selector="topk", scores={"relevance": r}).tolist() == [1, 3, 5]
    assert select(v, 3, selector="topk", scores={"relevance": torch.tensor([r])}).tolist() == [1, 3, 5]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_name_the_score(bad):
    r = torch.rand(6)
    r[2] = bad
    with pytest.raises(resprune.InvalidInputError, match=r"scores\['cls_attention'\] contains NaN or Inf"):
        select(torch.randn(6, 4), 2, scores={"cls_attention": r}, seed="cls_attention")


def test_required_score_missing():
    with pytest.raises(resprune.InvalidInputError) as info:
        select(torch.randn(6, 4), 2, seed="cls_attention", scores={"relevance": torch.rand(6)})
    message = str(info.value)
    assert "selector 'residual_energy' needs score 'cls_attention'" in message
    assert "['relevance']" in message and "scores={'cls_attention': ...}" in message
    with pytest.raises(resprune.InvalidInputError, match="selector 'topk' needs score 'relevance'"):
        select(torch.randn(6, 4), 2, selector="topk")


# --- params ----------------------------------------------------------------------------------


def test_unknown_selector_param_lists_valid_ones():
    with pytest.raises(resprune.ConfigError) as info:
        select(torch.randn(6, 4), 2, alpah=0.5)
    message = str(info.value)
    assert "params.alpah: unknown parameter of selector 'residual_energy'" in message
    assert "Did you mean 'alpha'?" in message
    assert "Valid parameters: alpha, eps, seed, relevance, tol, energy_fraction, method." in message


def test_unknown_scorer_param_lists_valid_ones():
    with pytest.raises(resprune.ConfigError, match="unknown parameter of scorer 'norm'.*Valid parameters: \\(none\\)"):
        score(torch.randn(6, 4), "norm", p=1)
    with pytest.raises(resprune.ConfigError, match="reduce='maxx' is not one of 'max', 'mean', 'pooled'. Did you mean 'max'"):
        score(torch.randn(6, 4), "text_relevance", reduce="maxx")


@pytest.mark.parametrize(("params", "hint"), [
    ({"alpha": -1.0}, "alpha=-1.0 must be >= 0.0"),
    ({"alpha": "high"}, "alpha"),
    ({"tol": 0.9}, "tol=0.9 must be <= 0.5"),
    ({"method": "qr"}, "method='qr' is not one of"),
    ({"seed": ""}, "seed and relevance must be score names"),
])
def test_invalid_selector_param_values(params, hint):
    with pytest.raises(resprune.ConfigError) as info:
        select(torch.randn(6, 4), 2, **params)
    assert hint in str(info.value) and "residual_energy" in str(info.value)


# --- missing context -------------------------------------------------------------------------


def test_scorer_needing_context_the_caller_did_not_give():
    v = torch.randn(6, 4)
    with pytest.raises(resprune.MissingContextError) as info:
        score(v, "cls_attention")
    message = str(info.value)
    assert message.startswith("scorer 'cls_attention' needs context 'cls_attention'")
    assert "vision-tower CLS->patch attention" in message and "Available: tokens." in message
    assert isinstance(info.value, KeyError)
    with pytest.raises(resprune.MissingContextError, match="needs context 'text_embedder'.*Available: text, tokens"):
        score(v, "text_relevance", context={"text": "a red car"})
    with pytest.raises(resprune.MissingContextError, match="scorer 'center' needs context 'positions'"):
        score(v, "center")


def test_pipeline_checks_context_before_running_any_scorer():
    calls = []
    v = torch.randn(6, 4)
    pipe = Pipeline("residual_energy", budget=2, scorers=["norm", "cls_attention"])
    pipe.scorers[0][1].score = lambda ctx: calls.append(ctx) or ctx.tokens.norm(dim=-1)
    with pytest.raises(resprune.MissingContextError, match="which caller did not supply"):
        pipe.prune(v)
    assert calls == []
    with pytest.raises(resprune.MissingContextError, match="which my-backbone did not supply"):
        pipe.prune(v, source="my-backbone")
    sel = pipe.prune(v, cls_attention=torch.rand(6))
    assert sel.kept.shape == (1, 2) and set(sel.scores) == {"norm", "cls_attention"}


def test_bad_context_values():
    v = torch.randn(2, 6, 4)
    with pytest.raises(resprune.InvalidInputError, match="context 'grid'=\\(2, 2\\).*4 cells but there are N=6"):
        score(v, "center", context={"grid": (2, 2)})
    with pytest.raises(resprune.InvalidInputError, match="'text'.*must be a string or 2 strings.*got 1 items"):
        score(v, "text_relevance", context={"text": ["a cat"], "text_embedder": lambda w: torch.randn(1, 4)})


# --- plugins that break their contract -----------------------------------------------------


class Misbehaving(Selector):
    name = "misbehaving"

    @dataclass
    class Params:
        mode: str = "ok"

    def select(self, tokens, k, scores, context):
        b, n, _ = tokens.shape
        good = torch.arange(k).expand(b, k).contiguous()
        mode = self.params.mode
        if mode == "ok":
            return good
        if mode == "flat":
            return good[0]
        if mode == "short":
            return good[:, : k - 1]
        if mode == "int32":
            return good.int()
        if mode == "float":
            return good.float()
        if mode == "duplicates":
            return torch.zeros(b, k, dtype=torch.long)
        if mode == "too_big":
            return good + n - k + 1
        if mode == "negative":
            return good - 1
        if mode == "list":
            return good.tolist()
        if mode == "raise":
            raise ValueError("alpha too large for these tokens")
        if mode == "write_tokens":
            tokens.mul_(2.0)
            return good
        if mode == "write_scores":
            scores["relevance"].zero_()
            return good
        if mode == "write_context":
            context.tokens[0, 0] = 0.0
            return good
        if mode == "add_score":
            scores["mine"] = good  # the mapping is read-only
            return good
        raise AssertionError(mode)


class BadScorer(Scorer):
    name = "bad_scorer"
    output = "bad"

    @dataclass
    class Params:
        mode: str = "ok"

    def score(self, context):
        b, n = context.batch_size, context.num_tokens
        good = torch.rand(b, n)
        mode = self.params.mode
        if mode == "ok":
            return good
        if mode == "flat":
            return good.reshape(-1)
        if mode == "nan":
            return good.masked_fill(good > -1, float("nan"))
        if mode == "inf":
            good[0, 0] = float("inf")
            return good
        if mode == "int":
            return torch.ones(b, n, dtype=torch.long)
        if mode == "numpy":
            return good.numpy()
        if mode == "huge64":
            return good.double() * 1e300  # finite in float64, inf once cast to float32
        if mode == "write_tokens":
            context.tokens.add_(1.0)
            return good
        raise AssertionError(mode)


@pytest.fixture
def bad_plugins(plugin_host):
    mod = types.ModuleType("bad_strategies_plugin")

    @hookimpl
    def resprune_register_selectors(register):
        register(Misbehaving)

    @hookimpl
    def resprune_register_scorers(register):
        register(BadScorer)

    mod.resprune_register_selectors = resprune_register_selectors
    mod.resprune_register_scorers = resprune_register_scorers
    return plugin_host(mod)


@pytest.mark.parametrize(("mode", "hint"), [
    ("flat", "returned shape (4,); expected int64 indices of shape [B, k] = (2, 4)"),
    ("short", "returned shape (2, 3)"),
    ("list", "returned list"),
    ("int32", "returned dtype torch.int32; expected torch.int64"),
    ("float", "returned dtype torch.float32"),
    ("duplicates", "returned duplicate indices; the 4 picks must be distinct"),
    ("too_big", "returned indices outside [0, 9)"),
    ("negative", "returned indices outside [0, 9)"),
    ("write_tokens", "wrote into context['tokens'], tokens in place"),
    ("write_scores", "wrote into scores['relevance'] in place"),
    ("write_context", "wrote into context['tokens'], tokens in place"),
])
def test_selector_breaking_its_contract(bad_plugins, mode, hint):
    v = torch.randn(2, 9, 3)
    rel = {"relevance": torch.rand(2, 9)}
    for call in (lambda: select(v, 4, selector="misbehaving", mode=mode, scores=rel),
                 lambda: resprune.load_pipeline({"budget": 4, "selector": {"name": "misbehaving",
                                                                           "params": {"mode": mode}}}).prune(
                     v, scores=rel)):
        with pytest.raises(resprune.PluginContractError) as info:
            call()
        message = str(info.value)
        assert message.startswith("selector 'misbehaving' (plugin 'bad_strategies_plugin') ")
        assert hint in message
        assert isinstance(info.value, resprune.PluginError)
    assert select(v, 4, selector="misbehaving").tolist() == [[0, 1, 2, 3]] * 2  # the control


@pytest.mark.parametrize(("mode", "kind"), [("raise", "ValueError: alpha too large"),
                                            ("add_score", "TypeError: 'mappingproxy' object")])
def test_an_exception_inside_a_plugin_names_the_plugin(bad_plugins, mode, kind):
    with pytest.raises(resprune.PluginError) as info:
        select(torch.randn(9, 3), 4, selector="misbehaving", mode=mode)
    assert str(info.value).startswith(f"selector 'misbehaving' (plugin 'bad_strategies_plugin') raised {kind}")
    assert info.value.__cause__ is not None  # the original traceback is kept


def test_an_exception_inside_a_plugin_is_one_line_from_the_cli(bad_plugins, capsys, tmp_path):
    from resprune.cli import main

    photo = tmp_path / "p.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (9, 99, 199)).save(photo)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("budget: 8\nselector: {name: misbehaving, params: {mode: raise}}\n")
    rc = main(["run", str(cfg), "--model", "tiny:llava", "--image", str(photo), "--prompt", "Hi?",
               "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("resprune: error: selector 'misbehaving' (plugin 'bad_strategies_plugin') raised ValueError")


@pytest.mark.parametrize(("mode", "hint"), [
    ("flat", "returned shape (18,) torch.float32; a scorer must return a float tensor of shape [B, N] = (2, 9)"),
    ("int", "returned shape (2, 9) torch.int64"),
    ("numpy", "returned ndarray"),
    ("nan", "returned NaN or Inf scores"),
    ("inf", "returned NaN or Inf scores"),
    ("huge64", "returned NaN or Inf scores (in float32)"),
    ("write_tokens", "wrote into context['tokens'] in place; the tensors handed to plugins are read-only"),
])
def test_scorer_breaking_its_contract(bad_plugins, mode, hint):
    v = torch.randn(2, 9, 3)
    pipe = resprune.load_pipeline({"budget": 4, "scorers": [{"name": "bad_scorer", "params": {"mode": mode}}],
                                   "selector": {"name": "topk", "params": {"score": "bad"}}})
    for call in (lambda: score(v, "bad_scorer", mode=mode), lambda: pipe.prune(v)):
        with pytest.raises(resprune.PluginContractError) as info:
            call()
        assert str(info.value).startswith("scorer 'bad_scorer' (plugin 'bad_strategies_plugin') ")
        assert hint in str(info.value)
    assert score(v, "bad_scorer").shape == (2, 9)


def test_plugin_selector_needing_unsupplied_context(plugin_host):
    class NeedsDepth(Misbehaving):
        name = "needs_depth"
        requires = frozenset({"depth"})

    mod = types.ModuleType("depth_plugin")

    @hookimpl
    def resprune_register_selectors(register):
        register(NeedsDepth)

    mod.resprune_register_selectors = resprune_register_selectors
    plugin_host(mod)
    v = torch.randn(5, 3)
    with pytest.raises(resprune.MissingContextError) as info:
        select(v, 2, selector="needs_depth")
    assert "selector 'needs_depth' needs context 'depth' (non-standard field)" in str(info.value)
    assert select(v, 2, selector="needs_depth", context={"depth": torch.rand(5)}).tolist() == [0, 1]
    # a zero-argument callable is computed on request only
    assert select(v, 2, selector="needs_depth", context={"depth": lambda: torch.rand(5)}).tolist() == [0, 1]
