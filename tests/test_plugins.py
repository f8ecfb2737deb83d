"""The plugin system: built-ins through the hooks, entry-point plugins, failures, names."""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
import warnings
from dataclasses import dataclass

import pytest
import torch

import resprune
from resprune import Scorer, Selector, hookimpl
from resprune.plugins import BUILTIN_PLUGINS, ENTRY_POINT_GROUP, PluginHost

BUILTIN_SELECTORS = {"residual_energy", "dpp", "divprune", "topk", "random", "uniform", "dart", "vispruner", "scope", "hired",
                     "tome", "cdpruner", "dycoke", "fastvid", "pool", "downsample"}
BUILTIN_SCORERS = {"text_relevance", "cls_attention", "norm", "mean_similarity", "center", "llm_attention",
                   "key_norm", "hidden_similarity", "clip_relevance", "last_cls_attention", "temporal_change"}
BUILTIN_MERGERS = {"contextual", "nearest", "visionzip", "recycle", "rest_mean", "prumerge", "temporal", "fastvid", "pool"}


# --- third-party strategies and fake installed distributions ----------------------------


class Rotate(Selector):
    """Keeps tokens ``offset, offset+1, ...`` (mod N): trivially predictable picks."""

    name = "rotate"

    @dataclass
    class Params:
        offset: int = 0

    def select(self, tokens, k, scores, context):
        b, n, _ = tokens.shape
        picks = (torch.arange(k) + self.params.offset) % n
        return picks.expand(b, k).contiguous()


class Position(Scorer):
    """Scores every token by minus its index: the first tokens score highest."""

    name = "position"
    output = "position"

    def score(self, context):
        n = context.num_tokens
        return -torch.arange(n, dtype=torch.float32).expand(context.batch_size, n).contiguous()


def plugin_module(modname, *, selectors=(), scorers=(), selector_error=None, scorer_error=None,
                  aliases=(), override=False):
    """A module object that is a resprune plugin, as an entry point would load it."""
    mod = types.ModuleType(modname)
    if selectors or selector_error:
        @hookimpl
        def resprune_register_selectors(register):
            if selector_error:
                raise selector_error
            for cls in selectors:
                register(cls, aliases=aliases, override=override)

        mod.resprune_register_selectors = resprune_register_selectors
    if scorers or scorer_error:
        @hookimpl
        def resprune_register_scorers(register):
            if scorer_error:
                raise scorer_error
            for cls in scorers:
                register(cls)

        mod.resprune_register_scorers = resprune_register_scorers
    return mod


class FakeDist:
    def __init__(self, name, version):
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    """Looks like an ``importlib.metadata.EntryPoint`` of an installed distribution."""

    def __init__(self, name, target, *, dist="acme-resprune", version="2.0.1"):
        self.name = name
        self.group = ENTRY_POINT_GROUP
        self.value = f"{name}_module"
        self.dist = FakeDist(dist, version) if dist else None
        self._target = target
        self.loads = 0

    def load(self):
        self.loads += 1
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


@pytest.fixture
def entry_points(monkeypatch):
    """``entry_points(*eps)`` makes them the installed ``resprune`` entry points."""
    real = resprune.plugins.metadata.entry_points

    def install(*eps):
        def fake(**kwargs):
            if kwargs.get("group") == ENTRY_POINT_GROUP:
                return list(eps)
            return real(**kwargs)

        monkeypatch.setattr(resprune.plugins.metadata, "entry_points", fake)
        return eps

    for var in ("RESPRUNE_STRICT_PLUGINS", "RESPRUNE_DISABLE_PLUGINS", "RESPRUNE_DISABLE_PLUGIN_AUTOLOAD"):
        monkeypatch.delenv(var, raising=False)
    return install


@contextlib.contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- built-ins --------------------------------------------------------------------------


def test_builtins_register_through_the_hooks(plugin_host):
    host = plugin_host()
    rows = {row["plugin"]: row for row in host.list_plugins()}
    assert set(rows) == set(BUILTIN_PLUGINS)
    for module in BUILTIN_PLUGINS:
        assert rows[module]["distribution"] == "resprune"
        assert rows[module]["version"] == resprune.__version__
    provided = {kind: {n for r in rows.values() for n in r[kind]}
                for kind in ("selectors", "scorers", "mergers", "injectors")}
    assert provided["selectors"] == BUILTIN_SELECTORS == set(host.selectors.names())
    assert provided["scorers"] == BUILTIN_SCORERS == set(host.scorers.names())
    assert provided["mergers"] == BUILTIN_MERGERS == set(host.mergers.names())
    assert provided["injectors"] == set(host.injectors.names())
    # every class is attributed to the module (plugin) that defines it, and that plugin
    # registered it through a pluggy hook implementation, not by a side channel
    for kind in ("selectors", "scorers", "injectors"):
        hook = getattr(host.pm.hook, f"resprune_register_{kind}")
        hook_plugins = {impl.plugin_name for impl in hook.get_hookimpls()}
        for entry in getattr(host, kind).entries():
            assert entry.cls.__module__ == entry.plugin, entry
            assert entry.plugin in hook_plugins and entry.plugin in BUILTIN_PLUGINS
            assert entry.name in rows[entry.plugin][kind]


def test_list_plugins_of_the_process_wide_host_shows_every_builtin():
    rows = resprune.list_plugins()
    by_selector = {n: r for r in rows for n in r["selectors"]}
    by_scorer = {n: r for r in rows for n in r["scorers"]}
    assert BUILTIN_SELECTORS <= set(by_selector) and BUILTIN_SCORERS <= set(by_scorer)
    for name in BUILTIN_SELECTORS:
        assert by_selector[name]["distribution"] == "resprune"
        assert by_selector[name]["plugin"].startswith("resprune.strategies.")
    for name in BUILTIN_SCORERS:
        assert by_scorer[name]["distribution"] == "resprune"


def test_a_broken_builtin_is_not_silenced(plugin_host, monkeypatch):
    mod = plugin_module("fake_builtin_strategies", selector_error=RuntimeError("builtin bug"))
    monkeypatch.setitem(sys.modules, "fake_builtin_strategies", mod)
    with pytest.raises(RuntimeError, match="builtin bug"):
        PluginHost(autoload=False, builtins=("fake_builtin_strategies",))


@pytest.mark.parametrize(("alias", "canonical", "params"), [
    ("resprune", "residual_energy", {"alpha": 0.5}),
])
def test_aliases_resolve_to_the_same_class(alias, canonical, params):
    host = resprune.get_host()
    assert host.selectors.get(alias) is host.selectors.get(canonical)
    assert host.selectors.entry(alias).alias_of == canonical
    assert alias not in host.selectors.names() and alias in host.selectors.names(aliases=True)
    v = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    r = torch.rand(20, generator=torch.Generator().manual_seed(2))
    a = resprune.select(v, 7, selector=alias, scores={"relevance": r}, order="selection", **params)
    b = resprune.select(v, 7, selector=canonical, scores={"relevance": r}, order="selection", **params)
    assert torch.equal(a, b)


def test_aliases_given_at_registration(plugin_host):
    host = plugin_host(plugin_module("rotate_plugin", selectors=[Rotate], aliases=("spin", "turn")))
    assert host.selectors.get("spin") is Rotate and host.selectors.get("turn") is Rotate
    assert host.selectors.names() == sorted(BUILTIN_SELECTORS | {"rotate"})
    assert {"spin", "turn"} <= set(host.selectors.names(aliases=True))
    assert len(host.selectors) == len(BUILTIN_SELECTORS) + 1


# --- third-party plugins ----------------------------------------------------------------


def test_plugin_selector_is_usable_by_select_and_pipeline(plugin_host):
    plugin_host(plugin_module("rotate_plugin", selectors=[Rotate]))
    v = torch.randn(2, 10, 4)
    kept = resprune.select(v, 3, selector="rotate", offset=8, order="selection")
    assert kept.tolist() == [[8, 9, 0]] * 2
    assert resprune.select(v, 3, selector="rotate", offset=8).tolist() == [[0, 8, 9]] * 2
    assert resprune.select(v[0], 0.5, selector="rotate").tolist() == [0, 1, 2, 3, 4]

    pipe = resprune.Pipeline("rotate", budget=4)
    sel = pipe.prune(v)
    assert sel.kept.tolist() == [[0, 1, 2, 3]] * 2 and sel.k == 4 and sel.n == 10
    pipe = resprune.load_pipeline({"budget": 2, "selector": {"name": "rotate", "params": {"offset": 5}}})
    assert pipe.select(v[0]).tolist() == [5, 6]
    with pytest.raises(resprune.ConfigError, match="offest.*Did you mean 'offset'"):
        resprune.load_pipeline({"budget": 2, "selector": {"name": "rotate", "params": {"offest": 5}}})


def test_plugin_scorer_feeds_a_builtin_selector(plugin_host):
    plugin_host(plugin_module("position_plugin", scorers=[Position]))
    v = torch.randn(12, 5)
    pipe = resprune.Pipeline("topk", budget=4, scorers=["position"])
    with pytest.raises(resprune.InvalidInputError, match="needs score 'relevance'"):
        pipe.prune(v)  # topk ranks by 'relevance' unless told otherwise
    pipe = resprune.load_pipeline({"budget": 4, "scorers": [{"name": "position"}],
                                   "selector": {"name": "topk", "params": {"score": "position"}}})
    sel = pipe.prune(v)
    assert sel.kept.tolist() == [[0, 1, 2, 3]]
    assert torch.equal(sel.scores["position"], -torch.arange(12.0).unsqueeze(0))
    assert resprune.score(v, "position").tolist() == [-float(i) for i in range(12)]


def test_entry_point_plugin_is_loaded_with_its_distribution(plugin_host, entry_points):
    (ep,) = entry_points(FakeEntryPoint("acme", plugin_module("acme_module", selectors=[Rotate])))
    host = plugin_host(autoload=True)
    assert ep.loads == 1
    row = next(r for r in host.list_plugins() if r["plugin"] == "acme")
    assert row == {"plugin": "acme", "distribution": "acme-resprune", "version": "2.0.1",
                   "scorers": [], "selectors": ["rotate"], "mergers": [], "injectors": [], "metrics": [],
                   "aliases": {}}
    assert host.selectors.entry("rotate").plugin == "acme"
    assert host.failed == []
    assert resprune.select(torch.randn(6, 3), 2, selector="rotate", offset=1).tolist() == [1, 2]
    # built-ins are untouched
    assert BUILTIN_SELECTORS <= set(host.selectors.names())


def test_entry_point_without_distribution(plugin_host, entry_points):
    entry_points(FakeEntryPoint("loose", plugin_module("loose_module", scorers=[Position]), dist=None))
    host = plugin_host(autoload=True)
    row = next(r for r in host.list_plugins() if r["plugin"] == "loose")
    assert row["distribution"] is None and row["version"] is None and row["scorers"] == ["position"]


def test_an_entry_point_name_listed_twice_is_loaded_once(plugin_host, entry_points):
    first = FakeEntryPoint("acme", plugin_module("acme_a", selectors=[Rotate]))
    second = FakeEntryPoint("acme", plugin_module("acme_b", scorers=[Position]))
    entry_points(first, second)
    host = plugin_host(autoload=True)
    assert (first.loads, second.loads) == (1, 0)
    assert "rotate" in host.selectors and "position" not in host.scorers


# --- broken plugins ---------------------------------------------------------------------


def test_plugin_that_fails_to_import_warns_and_the_others_work(plugin_host, entry_points):
    entry_points(
        FakeEntryPoint("broken", ImportError("No module named 'torchvisionx'"), dist="broken-dist"),
        FakeEntryPoint("acme", plugin_module("acme_module", selectors=[Rotate])),
    )
    with pytest.warns(RuntimeWarning) as record:
        host = plugin_host(autoload=True)
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "plugin 'broken'" in messages[0] and "broken-dist" in messages[0]
    assert "ImportError: No module named 'torchvisionx'" in messages[0]
    assert [(f.name, f.distribution, type(f.error)) for f in host.failed] == [("broken", "broken-dist", ImportError)]
    assert "broken" not in {r["plugin"] for r in host.list_plugins()}
    # the good plugin and the built-ins still work
    assert resprune.select(torch.randn(5, 3), 2, selector="rotate").tolist() == [0, 1]
    assert resprune.select(torch.randn(5, 3), 2).shape == (2,)


def test_plugin_whose_register_hook_raises_warns_and_is_skipped(plugin_host, entry_points):
    entry_points(
        FakeEntryPoint("acme", plugin_module("acme_module", selectors=[Rotate])),
        FakeEntryPoint("faulty", plugin_module("faulty_module", selector_error=ZeroDivisionError("oops")),
                       dist="faulty-dist"),
    )
    with pytest.warns(RuntimeWarning, match=r"plugin 'faulty'.*faulty-dist.*ZeroDivisionError: oops"):
        host = plugin_host(autoload=True)
    assert [f.name for f in host.failed] == ["faulty"]
    assert "faulty" not in {r["plugin"] for r in host.list_plugins()}
    assert not host.pm.has_plugin("faulty")
    assert "rotate" in host.selectors and BUILTIN_SELECTORS <= set(host.selectors.names())


def test_test_registered_plugin_whose_hook_raises_warns(plugin_host):
    with pytest.warns(RuntimeWarning, match="plugin 'flaky_module' failed to load.*ValueError: nope"):
        host = plugin_host(plugin_module("flaky_module", selector_error=ValueError("nope")))
    assert [f.name for f in host.failed] == ["flaky_module"]


def test_a_skipped_plugin_leaves_nothing_registered(plugin_host, entry_points):
    entry_points(FakeEntryPoint("half", plugin_module("half_module", scorers=[Position],
                                                      selector_error=RuntimeError("half broken"))))
    with pytest.warns(RuntimeWarning, match="plugin 'half'"):
        host = plugin_host(autoload=True)
    assert [f.name for f in host.failed] == ["half"]
    assert "position" not in host.scorers


@pytest.mark.parametrize("how", ["env", "argument"])
def test_strict_mode_raises_plugin_load_error(plugin_host, entry_points, monkeypatch, how):
    error = ImportError("cannot import name 'foo'")
    entry_points(FakeEntryPoint("broken", error, dist="broken-dist"))
    kwargs = {"autoload": True}
    if how == "env":
        monkeypatch.setenv("RESPRUNE_STRICT_PLUGINS", "1")
    else:
        kwargs["strict"] = True
    with no_warnings(), pytest.raises(resprune.PluginLoadError) as info:
        plugin_host(**kwargs)
    message = str(info.value)
    assert "plugin 'broken'" in message and "broken-dist" in message
    assert "ImportError: cannot import name 'foo'" in message and "RESPRUNE_STRICT_PLUGINS" in message
    assert info.value.__cause__ is error
    assert isinstance(info.value, resprune.PluginError)


def test_strict_mode_also_covers_a_raising_register_hook(plugin_host, entry_points):
    entry_points(FakeEntryPoint("faulty", plugin_module("faulty_module", scorer_error=KeyError("k"))))
    with pytest.raises(resprune.PluginLoadError, match="plugin 'faulty'.*KeyError"):
        plugin_host(autoload=True, strict=True)


@pytest.mark.parametrize("value", ["0", "", "no"])
def test_strict_env_off_values_only_warn(plugin_host, entry_points, monkeypatch, value):
    entry_points(FakeEntryPoint("broken", ImportError("x")))
    monkeypatch.setenv("RESPRUNE_STRICT_PLUGINS", value)
    with pytest.warns(RuntimeWarning, match="plugin 'broken'"):
        plugin_host(autoload=True)


def test_disable_plugins_skips_the_named_ones(plugin_host, entry_points, monkeypatch):
    broken = FakeEntryPoint("broken", ImportError("x"))
    other = FakeEntryPoint("other", plugin_module("other_module", scorers=[Position]))
    acme = FakeEntryPoint("acme", plugin_module("acme_module", selectors=[Rotate]))
    entry_points(broken, other, acme)
    monkeypatch.setenv("RESPRUNE_DISABLE_PLUGINS", " broken , other")
    with no_warnings():
        host = plugin_host(autoload=True)
    assert (broken.loads, other.loads, acme.loads) == (0, 0, 1)
    assert host.failed == [] and "position" not in host.scorers and "rotate" in host.selectors
    assert {r["plugin"] for r in host.list_plugins()} == set(BUILTIN_PLUGINS) | {"acme"}


def test_disable_autoload_loads_builtins_only(plugin_host, entry_points, monkeypatch):
    acme = FakeEntryPoint("acme", plugin_module("acme_module", selectors=[Rotate]))
    broken = FakeEntryPoint("broken", ImportError("x"))
    entry_points(acme, broken)
    monkeypatch.setenv("RESPRUNE_DISABLE_PLUGIN_AUTOLOAD", "1")
    with no_warnings():
        host = PluginHost()
    assert (acme.loads, broken.loads) == (0, 0)
    assert {r["plugin"] for r in host.list_plugins()} == set(BUILTIN_PLUGINS)
    assert set(host.selectors.names()) == BUILTIN_SELECTORS and set(host.scorers.names()) == BUILTIN_SCORERS
    # the process-wide host built lazily follows the same variable
    resprune.reset_plugins(None)  # the plugin_host fixture restores the previous global host afterwards
    assert "rotate" not in resprune.get_host().selectors and acme.loads == 0
    # an explicit autoload=True still loads them
    with pytest.warns(RuntimeWarning, match="'broken'"):
        host = PluginHost(autoload=True)
    assert "rotate" in host.selectors


def test_process_wide_host_loads_entry_points_by_default(plugin_host, entry_points):
    acme = FakeEntryPoint("acme", plugin_module("acme_module", selectors=[Rotate]))
    entry_points(acme)
    resprune.reset_plugins(None)  # the plugin_host fixture restores the previous global host afterwards
    host = resprune.get_host()
    assert resprune.get_host() is host and acme.loads == 1
    assert "rotate" in host.selectors
    assert resprune.select(torch.randn(4, 2), 2, selector="rotate", offset=3).tolist() == [0, 3]


# --- invalid registrations ---------------------------------------------------------------


class Misspelled:
    @staticmethod
    @hookimpl
    def resprune_register_selector(register):  # missing the final 's'
        register(Rotate)


def test_misspelled_hook_is_a_plugin_error(plugin_host):
    with pytest.raises(resprune.PluginError) as info:
        plugin_host(Misspelled)
    message = str(info.value)
    assert "resprune_register_selector" in message and "unknown hook" in message
    assert "resprune_register_selectors" in message and "check the spelling" in message


def test_misspelled_hook_error_names_the_entry_point(plugin_host, entry_points):
    mod = types.ModuleType("acme_internal_impl")
    mod.resprune_register_selector = Misspelled.resprune_register_selector
    entry_points(FakeEntryPoint("acme-typo", mod))
    with pytest.raises(resprune.PluginError, match="plugin 'acme-typo'"):
        plugin_host(autoload=True)


class DefaultedRegister:
    @staticmethod
    @hookimpl
    def resprune_register_selectors(register=None):  # pluggy would pass nothing
        register(Rotate)


def test_register_with_a_default_is_named_not_a_none_call(plugin_host, entry_points):
    entry_points(FakeEntryPoint("acme-default", DefaultedRegister))
    with pytest.warns(RuntimeWarning) as record:
        host = plugin_host(autoload=True)
    message = str(record[0].message)
    assert "plugin 'acme-default'" in message and "without a default value" in message
    assert "def resprune_register_selectors(register):" in message
    assert "rotate" not in host.selectors and host.failed[0].name == "acme-default"
    with pytest.raises(resprune.PluginLoadError, match="without a default value"):
        plugin_host(autoload=True, strict=True)


def test_two_plugins_registering_one_name(plugin_host):
    class OtherRotate(Rotate):
        pass

    a = plugin_module("plugin_a", selectors=[Rotate])
    b = plugin_module("plugin_b", selectors=[OtherRotate])
    with pytest.raises(resprune.DuplicateStrategyError) as info:
        plugin_host(a, b)
    message = str(info.value)
    assert "selector 'rotate' is registered twice" in message
    assert "plugin 'plugin_a'" in message and "plugin 'plugin_b'" in message
    assert "OtherRotate" in message and "override=True" in message
    assert isinstance(info.value, resprune.PluginError)


def test_entry_point_plugin_clashing_with_a_builtin(plugin_host, entry_points):
    class MyResidual(Rotate):
        name = "residual_energy"

    entry_points(FakeEntryPoint("evil", plugin_module("evil_module", selectors=[MyResidual])))
    with pytest.raises(resprune.DuplicateStrategyError,
                       match="'residual_energy'.*plugin 'resprune.strategies.residual_energy'.*plugin 'evil'"):
        plugin_host(autoload=True)


def test_alias_clashing_with_a_builtin_alias(plugin_host):
    with pytest.raises(resprune.DuplicateStrategyError, match="selector 'resprune'.*resprune.strategies.residual_energy"):
        plugin_host(plugin_module("clash", selectors=[Rotate], aliases=("resprune",)))


def test_override_replaces_on_purpose(plugin_host, caplog):
    class MyDivPrune(Rotate):
        name = "divprune"

    with caplog.at_level("WARNING", logger="resprune"):
        host = plugin_host(plugin_module("better_divprune", selectors=[MyDivPrune], override=True))
    assert host.selectors.get("divprune") is MyDivPrune
    assert host.selectors.entry("divprune").plugin == "better_divprune"
    assert "overridden by plugin 'better_divprune'" in caplog.text
    assert resprune.select(torch.randn(6, 2), 2, selector="divprune", offset=4).tolist() == [4, 5]


def test_registering_the_same_class_twice_is_harmless(plugin_host):
    mod = types.ModuleType("twice")

    @hookimpl
    def resprune_register_selectors(register):
        register(Rotate)
        register(Rotate)

    mod.resprune_register_selectors = resprune_register_selectors
    host = plugin_host(mod)
    assert host.selectors.get("rotate") is Rotate
    assert set(next(r for r in host.list_plugins() if r["plugin"] == "twice")["selectors"]) == {"rotate"}


def test_registering_an_instance(plugin_host):
    mod = types.ModuleType("instance_plugin")

    @hookimpl
    def resprune_register_selectors(register):
        register(Rotate())

    mod.resprune_register_selectors = resprune_register_selectors
    with pytest.raises(resprune.PluginError, match=r"plugin 'instance_plugin'.*not an instance: use register\(Rotate\)"):
        plugin_host(mod)


@pytest.mark.parametrize(("hook", "cls", "expected"), [
    ("selectors", dict, "builtins.dict as a selector, but it does not subclass resprune.Selector"),
    ("selectors", Position, "Position as a selector, but it does not subclass resprune.Selector"),
    ("scorers", Rotate, "Rotate as a scorer, but it does not subclass resprune.Scorer"),
])
def test_registering_a_class_of_the_wrong_kind(plugin_host, hook, cls, expected):
    mod = plugin_module("wrong_kind", **{hook: [cls]})
    with pytest.raises(resprune.PluginError, match="plugin 'wrong_kind'") as info:
        plugin_host(mod)
    assert expected in str(info.value)
    assert not isinstance(info.value, resprune.DuplicateStrategyError)


def test_registering_a_class_without_a_name(plugin_host):
    class Nameless(Selector):
        def select(self, tokens, k, scores, context):
            return torch.arange(k).expand(tokens.shape[0], k)

    with pytest.raises(resprune.PluginError, match="Nameless needs a non-empty class attribute `name`"):
        plugin_host(plugin_module("nameless_plugin", selectors=[Nameless]))


# --- unknown names ------------------------------------------------------------------------


def test_unknown_selector_lists_names_and_suggests():
    with pytest.raises(resprune.UnknownStrategyError) as info:
        resprune.select(torch.randn(5, 3), 2, selector="residual_enrgy")
    message = str(info.value)
    assert message.startswith("unknown selector 'residual_enrgy'.")  # no KeyError quoting
    assert "Did you mean 'residual_energy'?" in message
    available = message.split("Available selectors: ")[1].rstrip(".").split(", ")
    assert available == sorted(resprune.get_host().selectors.names())
    assert {"divprune", "dpp", "random", "residual_energy", "topk", "uniform"} <= set(available)
    assert isinstance(info.value, KeyError)


def test_unknown_scorer_and_unknown_name_without_close_match():
    with pytest.raises(resprune.UnknownStrategyError, match="unknown scorer 'nrom'. Did you mean 'norm'"):
        resprune.score(torch.randn(5, 3), "nrom")
    with pytest.raises(resprune.UnknownStrategyError) as info:
        resprune.Pipeline("zzzzzz", budget=3)
    assert "Did you mean" not in str(info.value)
    assert "Available selectors:" in str(info.value)
    with pytest.raises(resprune.UnknownStrategyError, match="unknown scorer 'cls_atention'.*'cls_attention'"):
        resprune.Pipeline(budget=3, scorers=["cls_atention"])
    injectors = resprune.get_host().injectors
    with pytest.raises(resprune.UnknownStrategyError) as info:
        injectors.get("no_such_backbone")
    assert str(info.value).startswith("unknown injector 'no_such_backbone'.")
    assert f"Available injectors: {', '.join(injectors.names()) or '(none)'}." in str(info.value)


def test_unknown_name_suggests_plugin_strategies_too(plugin_host):
    plugin_host(plugin_module("rotate_plugin", selectors=[Rotate]))
    with pytest.raises(resprune.UnknownStrategyError, match="Did you mean 'rotate'.*rotate"):
        resprune.select(torch.randn(5, 3), 2, selector="rotat")


def test_reset_plugins_swaps_the_process_wide_host(plugin_host):
    host = plugin_host(plugin_module("rotate_plugin", selectors=[Rotate]))
    assert resprune.get_host() is host
    previous = resprune.reset_plugins(None)
    assert previous is host
    fresh = resprune.get_host()
    assert fresh is not host and "rotate" not in fresh.selectors


def test_builtin_plugins_are_modules_of_the_resprune_package():
    for module in BUILTIN_PLUGINS:
        assert module.startswith(("resprune.strategies.", "resprune.backbones."))
        mod = importlib.import_module(module)
        hooks = ("resprune_register_selectors", "resprune_register_scorers", "resprune_register_mergers",
                 "resprune_register_injectors", "resprune_register_metrics")
        assert any(hasattr(mod, h) for h in hooks)


def test_two_injectors_claiming_one_model_type_is_a_duplicate(plugin_host):
    import resprune.backbones.llava as llava

    class MyLlava(resprune.injection.PlaceholderInjector):
        name = "my_llava"
        model_types = ("llava",)

        def encode(self, model, inputs, need):
            raise NotImplementedError

    class Plugin:
        @staticmethod
        @resprune.hookimpl
        def resprune_register_injectors(register):
            register(MyLlava)

    with pytest.raises(resprune.DuplicateStrategyError) as info:
        plugin_host(llava, Plugin)
    message = str(info.value)
    assert "model_type 'llava' is claimed by two injectors" in message and "'my_llava' (plugin 'Plugin')" in message


def test_the_host_finds_the_injector_of_a_model_type():
    host = resprune.get_host()
    assert host.injector_for("llava_next").name == "llava_next" and host.injector_for("llava").name == "llava"
    assert host.model_types == ["gemma3", "internvl", "llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_5",
                                "qwen3_vl"]
    assert host.injector_for("llava_onevision").name == "llava_onevision"
    with pytest.raises(resprune.IncompatibleBackboneError, match=r"no injector supports model_type 'blip_2'.*llava"):
        host.injector_for("blip_2")
