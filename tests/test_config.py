"""YAML pipeline configs: shipped ones, validation messages, inheritance, overrides, round trips."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import resprune
from resprune import ConfigError, load_config, shipped_configs
from resprune.config import PipelineConfig, SelectorConfig, to_yaml
from resprune.params import param_names
from resprune.testing import random_context

SHIPPED = sorted(shipped_configs())


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def plain(cfg):
    return OmegaConf.to_container(cfg, resolve=True)


def ctx():
    return random_context(b=2, rows=4, cols=6, d=16, seed=3)


# --- shipped configs --------------------------------------------------------------------------


def test_shipped_configs_are_listed_with_descriptions():
    names = shipped_configs()
    assert {"resprune-llava15", "resprune-llava-next", "resprune-qwen2.5-vl", "dpp", "divprune",
            "fastervlm", "random", "uniform", "topk-relevance"} <= set(names)
    assert list(names) == sorted(names)
    for name, description in names.items():
        assert isinstance(description, str) and len(description) > 10, name


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_and_is_complete(name):
    cfg = load_config(name)
    assert isinstance(cfg, DictConfig) and OmegaConf.is_readonly(cfg)
    assert resprune.check_budget(cfg.budget) == cfg.budget
    host = resprune.get_host()
    # every param is filled with its value or default, and nothing else, in every stage
    stages = list(cfg.vision_stages) + ([cfg] if cfg.selector.name is not None else []) + list(cfg.stages)
    assert stages, "a config prunes somewhere"
    for stage in stages:
        assert list(stage.selector.params) == param_names(host.selectors.get(stage.selector.name).Params)
        for sc in stage.scorers:
            assert list(sc.params) == param_names(host.scorers.get(sc.name).Params)
        if stage.merger is not None:
            assert list(stage.merger.params) == param_names(host.mergers.get(stage.merger.name).Params)
    assert cfg.description == shipped_configs()[name]
    with pytest.raises(OmegaConfBaseException):
        cfg.budget = 1  # read-only


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("budget", [None, 5])
def test_shipped_config_runs_on_random_tokens(name, budget):
    tables = [st.budget for st in load_config(name).stages if isinstance(st.budget, DictConfig)]
    if budget is not None and tables and budget not in tables[0]:  # per-budget counts (SparseVLM): named
        with pytest.raises(resprune.BudgetError, match="table keyed by the top-level budget, with entries for"):
            resprune.load_pipeline(name, budget=budget)
        return
    pipe = resprune.load_pipeline(name) if budget is None else resprune.load_pipeline(name, budget=budget)
    context = ctx()
    if pipe.selector is not None and pipe.selector.adaptive:  # a count per image: each image alone
        n = context.num_tokens
        for i in range(context.batch_size):
            one = random_context(b=1, rows=4, cols=6, d=16, seed=3 + i)
            sel = pipe.run(one)
            picks = sel.k - (pipe.merger.extra(sel.k - 1, n) if pipe.merger is not None and sel.k < n else 0)
            assert 1 <= picks <= resprune.resolve_budget(pipe.budget, n) and sel.kept.shape == (1, sel.k)
        two = random_context(b=2, rows=30, cols=30, d=16, seed=1)
        # DyCoke's and FastVID's counts read no scores; where two videos' counts agree they go as one batch
        counts = pipe.selector.count({}, two) if pipe.selector.name in ("dycoke", "fastvid") else None
        if counts is not None and len(set(counts)) == 1:
            assert pipe.run(two).kept.shape == (2, min(counts[0], resprune.resolve_budget(pipe.budget, two.num_tokens)))
            return
        with pytest.raises(resprune.InvalidInputError, match="adaptive count runs one image at a time"):
            pipe.run(two)  # two images, two counts
        return
    if pipe.resizes_images:  # it spends the budget before the processor: tokens it did not make are refused
        context = ctx()
        if resprune.resolve_budget(pipe.budget, context.num_tokens) < context.num_tokens \
                and isinstance(pipe.budget, int):
            with pytest.raises(resprune.InvalidInputError, match="prepare_images"):
                pipe.run(context)
        else:
            assert pipe.run(context).k == context.num_tokens
        return
    if pipe.input_stage is None:  # it prunes inside the LLM or the tower only: no tokens to prune before the LLM
        assert (pipe.llm_stages or pipe.vision_stages) and pipe.selector is None
        with pytest.raises(resprune.ConfigError, match="no input stage"):
            pipe.run(context)
        return
    sel = pipe.run(context)
    n = context.num_tokens
    budget = k = resprune.resolve_budget(pipe.budget, n)
    if pipe.merger is not None and k < n:  # a merger may make tokens on top of the budget (TRIM's mean token)
        k += pipe.merger.extra(k - pipe.merger.slots(k, n), n)
    assert (sel.k, sel.n) == (k, n) and sel.kept.shape == (2, k) and sel.order.shape == (2, k)
    assert sel.kept.dtype == torch.long
    for row, order in zip(sel.kept, sel.order):
        assert row.tolist() == sorted(set(order.tolist())) and 0 <= int(row.min()) and int(row.max()) < n
    cfg = pipe.config
    outputs = {sc.output or resprune.get_host().scorers.get(sc.name).output for sc in cfg.scorers}
    assert set(sel.scores) == outputs
    params = cfg.selector.params
    if k < n and cfg.selector.name == "residual_energy" and params.seed != "none":
        # the seed score (written by a configured scorer) decides the first pick
        assert torch.equal(sel.order[:, 0], sel.scores[params.seed].argmax(dim=-1))
    if k < n and cfg.selector.name == "topk":
        slots = pipe.merger.slots(budget, n) if pipe.merger is not None else 0
        ranked = torch.sort(sel.scores[params.score], dim=-1, descending=True, stable=True).indices  # ties: lower index
        expected = ranked[:, : budget - slots].sort(dim=-1).values
        if slots or pipe.merger is not None:  # the picks, plus the places of the merged tokens
            assert sel.features is not None and sel.features.shape == (2, k, context.tokens.shape[-1])
            assert all(set(e.tolist()) <= set(r.tolist()) for e, r in zip(expected, sel.kept))
        else:
            assert torch.equal(sel.kept, expected)


def test_paper_defaults_of_the_llava15_config():
    cfg = load_config("resprune-llava15")
    assert cfg.budget == 128 and isinstance(cfg.budget, int)
    assert [sc.name for sc in cfg.scorers] == ["cls_attention", "text_relevance"]
    assert cfg.selector.name == "residual_energy"
    assert (cfg.selector.params.alpha, cfg.selector.params.seed) == (0.75, "cls_attention")
    assert load_config("resprune-qwen2.5-vl").selector.params.seed == "norm"
    assert load_config("resprune-qwen2.5-vl").budget == pytest.approx(0.2222)


@pytest.mark.parametrize("name", ["ablation-llava15-relevance-max", "ablation-llava15-seed-cls-attention"])
def test_ablations_equal_to_the_full_method(name):
    full, ablation = plain(load_config("resprune-llava15")), plain(load_config(name))
    for key in ("budget", "selector", "scorers", "backbone"):
        assert ablation[key] == full[key], key
    assert ablation["description"] != full["description"]


def test_ablations_change_only_what_they_say():
    full = plain(load_config("resprune-llava15"))
    no_rel = plain(load_config("ablation-llava15-no-text-relevance"))
    assert [sc["name"] for sc in no_rel["scorers"]] == ["cls_attention"]
    assert no_rel["selector"]["params"] == {**full["selector"]["params"], "alpha": 0.0}
    no_pre = plain(load_config("ablation-llava15-no-text-preprocessing"))
    assert no_pre["scorers"][1]["params"] == {"reduce": "max", "keywords": "all", "strip": []}
    assert no_pre["selector"] == full["selector"]
    no_sub = plain(load_config("ablation-llava15-no-subspace"))
    assert no_sub["selector"] == {"name": "topk", "params": {"score": "relevance", "count": "budget"}}  # alpha etc. dropped
    for reduce in ("mean", "pooled"):
        cfg = plain(load_config(f"ablation-llava15-relevance-{reduce}"))
        assert cfg["scorers"][1]["params"]["reduce"] == reduce and cfg["selector"] == full["selector"]


# --- validation messages ------------------------------------------------------------------------


def test_unknown_top_level_key_names_the_file(tmp_path):
    path = write(tmp_path, "bad.yaml", """\
        bugdet: 64
        selector: {name: uniform}
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: unknown key 'bugdet'.")
    assert "Did you mean 'budget'?" in message
    assert ("Valid keys: budget, selector, scorers, merger, vision_stages, stages, video, backbone, description, "
            "reproduces.") in message


def test_unknown_selector_param_lists_valid_ones_and_suggests(tmp_path):
    path = write(tmp_path, "p.yaml", """\
        budget: 64
        selector:
          name: residual_energy
          params: {alpah: 0.5}
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: selector.params.alpah: unknown parameter of selector 'residual_energy'.")
    assert "Did you mean 'alpha'?" in message
    assert "Valid parameters: alpha, eps, seed, relevance, tol, energy_fraction, method." in message


def test_scorer_errors_name_the_list_index(tmp_path):
    path = write(tmp_path, "s.yaml", """\
        budget: 64
        scorers:
          - name: cls_attention
          - name: text_relevance
            params: {reduce: maxx}
        selector: {name: uniform}
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: scorers[1].params")
    assert "reduce='maxx' is not one of 'max', 'mean', 'pooled'" in message and "Did you mean 'max'?" in message
    with pytest.raises(ConfigError, match=r"scorers\[0\]\.params\.p: unknown parameter of scorer 'norm'"):
        load_config({"budget": 3, "scorers": [{"name": "norm", "params": {"p": 2}}], "selector": {"name": "uniform"}})
    with pytest.raises(ConfigError, match=r"scorers\[1\]\.name: unknown scorer 'nrom'. Did you mean 'norm'"):
        load_config({"budget": 3, "scorers": [{"name": "center"}, {"name": "nrom"}], "selector": {"name": "uniform"}})


def test_unknown_key_in_a_scorer_entry_names_the_full_key():
    with pytest.raises(ConfigError) as info:
        load_config({"budget": 3, "scorers": [{"name": "norm", "outptu": "n"}], "selector": {"name": "uniform"}})
    assert "scorers[0].outptu" in str(info.value)


@pytest.mark.parametrize(("yaml", "hints"), [
    ("alpha: high", ["selector.params.alpha", "'high'", "Float"]),
    ("alpha: true", ["selector.params.alpha", "bool"]),
    ("alpha: -1", ["selector.params", "alpha=-1.0 must be >= 0.0"]),
    ("method: grm", ["selector.params", "method='grm'", "Did you mean 'gram'?"]),
])
def test_wrong_param_type_or_value(tmp_path, yaml, hints):
    path = write(tmp_path, "t.yaml", f"""\
        budget: 64
        selector:
          name: residual_energy
          params: {{{yaml}}}
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    for hint in hints:
        assert hint in str(info.value)


def test_wrong_type_of_a_structural_key():
    with pytest.raises(ConfigError, match="scorers"):
        load_config({"budget": 3, "scorers": 5, "selector": {"name": "uniform"}})
    with pytest.raises(ConfigError, match=r"backbone\.model_typ.*model_type"):
        load_config({"budget": 3, "selector": {"name": "uniform"}, "backbone": {"model_typ": "llava"}})
    with pytest.raises(ConfigError, match=r"selector\.parms.*params"):
        load_config({"budget": 3, "selector": {"name": "uniform", "parms": {}}})


@pytest.mark.parametrize(("value", "hint"), [
    ("abc", "budget='abc' (str) is not a budget"),
    ("0", "budget=0 must be >= 1"),
    ("-3", "budget=-3 must be >= 1"),
    ("1.5", "budget=1.5: a float budget is a ratio and must lie in (0, 1]"),
    ("0.0", "must lie in (0, 1]"),
    ("true", "budget=True (bool) is not a budget"),
    ("[64]", "is not a budget"),
])
def test_budget_errors_name_the_file(tmp_path, value, hint):
    path = write(tmp_path, "b.yaml", f"""\
        budget: {value}
        selector: {{name: uniform}}
        """)
    with pytest.raises(resprune.ResPruneError) as info:
        load_config(path)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{path}: budget")
    assert hint in str(info.value)


def test_budget_error_in_a_config_is_a_config_error():
    with pytest.raises(ConfigError):
        load_config({"budget": "abc", "selector": {"name": "uniform"}})


@pytest.mark.parametrize("budget", [1, 576, 0.5, 1.0])
def test_valid_budgets(budget):
    assert load_config({"budget": budget, "selector": {"name": "uniform"}}).budget == budget


def test_missing_required_values(tmp_path):
    path = write(tmp_path, "m.yaml", """\
        budget: ???
        selector: {name: uniform}
        """)
    with pytest.raises(ConfigError, match="budget.*Missing mandatory value") as info:
        load_config(path)
    assert str(info.value).startswith(str(path))
    with pytest.raises(ConfigError, match="budget.*Missing mandatory value"):
        load_config({"selector": {"name": "uniform"}})
    with pytest.raises(ConfigError, match=r"selector\.name: missing.*or give `stages:`"):
        load_config({"budget": 3})
    # an override can fill the missing value
    assert load_config(path, ["budget=8"]).budget == 8


def test_duplicate_yaml_key(tmp_path):
    path = write(tmp_path, "d.yaml", """\
        budget: 64
        selector: {name: uniform}
        budget: 32
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: cannot parse YAML")
    assert "duplicate key" in str(info.value) and "budget" in str(info.value)


def test_unparsable_and_non_mapping_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_config(write(tmp_path, "x.yaml", "budget: [1, 2\n"))
    with pytest.raises(ConfigError, match="must be a mapping at the top level"):
        load_config(write(tmp_path, "y.yaml", "- budget\n- 64\n"))


def test_unknown_selector_and_config_names():
    with pytest.raises(ConfigError) as info:
        load_config({"budget": 3, "selector": {"name": "residual_enrgy"}})
    message = str(info.value)
    assert message.startswith("<dict>: selector.name: unknown selector 'residual_enrgy'.")
    assert "Did you mean 'residual_energy'?" in message and "Available selectors:" in message
    with pytest.raises(ConfigError, match="unknown config 'resprune-llava1'.*Did you mean 'resprune-llava15'"):
        load_config("resprune-llava1")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/dir/pipe.yaml")
    with pytest.raises(ConfigError, match="cannot load a pipeline config from int"):
        load_config(42)


@pytest.mark.parametrize(("selector", "scorers", "missing", "writer"), [
    ({"name": "residual_energy", "params": {"seed": "norm"}}, [], "norm", "norm"),
    ({"name": "residual_energy", "params": {"seed": "cls_attention"}}, [{"name": "norm"}], "cls_attention",
     "cls_attention"),
    ({"name": "topk"}, [], "relevance", "text_relevance"),
])
def test_seed_or_rank_score_that_no_scorer_writes(selector, scorers, missing, writer):
    with pytest.raises(ConfigError) as info:
        load_config({"budget": 3, "selector": selector, "scorers": scorers})
    message = str(info.value)
    assert f"needs score '{missing}', which no scorer in `scorers` writes" in message
    assert f"Add one ({writer})" in message


@pytest.mark.parametrize(("score", "hint"), [("depth", ""), ("llm_atention", " Did you mean 'llm_attention'?"),
                                             ("relevanse", " Did you mean 'relevance'?")])
def test_a_score_no_installed_scorer_writes_is_named_with_a_did_you_mean(score, hint):
    with pytest.raises(ConfigError) as info:
        load_config({"budget": 3, "selector": {"name": "topk", "params": {"score": score}}, "scorers": []})
    message = str(info.value)
    assert f"reads score '{score}', which no installed scorer writes.{hint} The scores `scorers` write: none" \
        in message
    assert "Add one" not in message  # no advice to write a scorer named after a typo


def test_seed_override_is_checked_against_the_scorers():
    with pytest.raises(ConfigError, match="needs score 'norm'"):
        load_config("resprune-llava15", ["selector.params.seed=norm"])
    cfg = load_config("resprune-llava15", ["selector.params.seed=relevance"])  # text_relevance writes it
    assert cfg.selector.params.seed == "relevance"


def test_two_scorers_writing_one_score_and_output_renaming():
    base = {"budget": 3, "selector": {"name": "topk", "params": {"score": "n2"}}}
    with pytest.raises(ConfigError, match=r"scorers\[1\]: score 'norm' is already written by scorer 'norm'"):
        load_config({**base, "scorers": [{"name": "norm"}, {"name": "norm"}]})
    cfg = load_config({**base, "scorers": [{"name": "norm"}, {"name": "mean_similarity", "output": "n2"}]})
    sel = resprune.load_pipeline(cfg).run(ctx())
    assert set(sel.scores) == {"norm", "n2"}
    assert torch.equal(sel.kept, sel.scores["n2"].topk(3, dim=-1).indices.sort(dim=-1).values)


# --- base: inheritance ---------------------------------------------------------------------------


@pytest.fixture
def chain(tmp_path):
    base = write(tmp_path, "base.yaml", """\
        description: the base
        budget: 64
        scorers:
          - name: norm
        selector:
          name: residual_energy
          params: {alpha: 0.5, seed: norm}
        """)
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub, "mid.yaml", """\
        base: ../base.yaml
        budget: 32
        selector:
          params: {eps: 0.01}
        """)
    switch = write(sub, "switch.yaml", """\
        base: mid.yaml
        description: switched
        selector:
          name: dpp
        """)
    same = write(sub, "same.yaml", """\
        base: mid.yaml
        selector:
          name: residual_energy
          params: {alpha: 0.25}
        """)
    return base, sub / "mid.yaml", switch, same


def test_base_chain_merges_in_order(chain, monkeypatch, tmp_path):
    _, mid, _, same = chain
    monkeypatch.chdir(tmp_path.parent)  # relative bases resolve against the file's folder, not the cwd
    cfg = load_config(mid)
    assert cfg.budget == 32 and cfg.description == "the base"
    defaults = dataclasses.asdict(resprune.get_host().selectors.get("residual_energy").Params())
    assert plain(cfg.selector.params) == {**defaults, "alpha": 0.5, "eps": 0.01, "seed": "norm"}
    assert [sc.name for sc in cfg.scorers] == ["norm"]
    same_cfg = load_config(same)  # same selector: params keep merging through the chain
    assert (same_cfg.selector.params.alpha, same_cfg.selector.params.eps, same_cfg.selector.params.seed) == (
        0.25, 0.01, "norm")


def test_changing_the_selector_in_a_child_resets_its_params(chain):
    _, _, switch, _ = chain
    cfg = load_config(switch)
    assert cfg.selector.name == "dpp" and cfg.description == "switched" and cfg.budget == 32
    default = dataclasses.asdict(resprune.get_host().selectors.get("dpp").Params())
    assert plain(cfg.selector.params) == default  # no alpha/eps/seed carried over from residual_energy


def test_base_may_be_a_shipped_config_or_used_from_a_mapping(tmp_path):
    path = write(tmp_path, "mine.yaml", """\
        base: resprune-llava15
        budget: 64
        selector:
          params: {alpha: 0.3}
        """)
    cfg = plain(load_config(path))
    full = plain(load_config("resprune-llava15"))
    assert cfg["budget"] == 64 and cfg["selector"]["params"] == {**full["selector"]["params"], "alpha": 0.3}
    assert cfg["scorers"] == full["scorers"]
    from_mapping = plain(load_config({"base": "resprune-llava15", "budget": 64, "selector": {"params": {"alpha": 0.3}}}))
    assert from_mapping == cfg
    with pytest.raises(ConfigError, match="unknown config 'resprune-lava15'.*Did you mean 'resprune-llava15'"):
        load_config({"base": "resprune-lava15", "budget": 3})


def test_base_loop_is_reported(tmp_path):
    a = write(tmp_path, "a.yaml", "base: b.yaml\nbudget: 3\n")
    write(tmp_path, "b.yaml", "base: a.yaml\nselector: {name: uniform}\n")
    with pytest.raises(ConfigError, match="'base' chain loops") as info:
        load_config(a)
    assert str(info.value).count("a.yaml") >= 2 and "b.yaml" in str(info.value)


def test_errors_in_an_inherited_file_name_the_child(tmp_path):
    write(tmp_path, "parent.yaml", "budget: 3\nselector: {name: residual_energy, params: {alpah: 1}}\n")
    child = write(tmp_path, "child.yaml", "base: parent.yaml\nbudget: 4\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: selector\.params\.alpah"):
        load_config(child)


# --- overrides ----------------------------------------------------------------------------------


def test_overrides_as_dotlist_mapping_and_kwargs_agree():
    dotlist = load_config("resprune-llava15", ["budget=64", "selector.params.alpha=0.3",
                                               "scorers.1.params.reduce=mean"])
    mapping = load_config("resprune-llava15", {"budget": 64, "selector.params.alpha": 0.3,
                                               "scorers.1.params.reduce": "mean"})
    kwargs = load_config("resprune-llava15", ["scorers.1.params.reduce=mean"], budget=64,
                         selector={"params": {"alpha": 0.3}})
    assert plain(dotlist) == plain(mapping) == plain(kwargs)
    assert dotlist.budget == 64 and isinstance(dotlist.budget, int)
    assert dotlist.selector.params.alpha == 0.3 and dotlist.scorers[1].params.reduce == "mean"
    assert dotlist.selector.params.seed == "cls_attention"  # untouched params stay
    ratio = load_config("resprune-llava15", ["budget=0.25"])
    assert ratio.budget == 0.25 and isinstance(ratio.budget, float)


@pytest.mark.parametrize(("override", "hints"), [
    ("bugdet=64", ["override bugdet=64", "'bugdet'", "budget"]),
    ("selector.parms.alpha=0.3", ["selector.parms.alpha", "'parms'", "params"]),
    ("selector.params.alpah=0.3", ["selector.params.alpah: unknown parameter", "Did you mean 'alpha'?"]),
    ("selector.params.alpha=high", ["selector.params.alpha", "'high'"]),
    ("budget=abc", ["budget='abc'"]),
    ("budget=0", ["budget=0 must be >= 1"]),
    ("budget", ["must look like key=value"]),
])
def test_bad_dotlist_overrides(override, hints):
    with pytest.raises(resprune.ResPruneError) as info:
        load_config("resprune-llava15", [override])
    assert isinstance(info.value, ValueError)
    for hint in hints:
        assert hint in str(info.value)


def test_selector_name_override_drops_the_old_selectors_params_as_yaml_does():
    cfg = load_config("resprune-llava15", ["selector.name=dpp"])
    assert cfg.selector.name == "dpp" and plain(cfg.selector.params)["normalize"] == "minmax"
    # params given beside the switch apply to the new selector, whatever their order
    cfg = load_config("resprune-llava15", ["selector.params.normalize=none", "selector.name=dpp"])
    assert cfg.selector.params.normalize == "none"
    with pytest.raises(ConfigError, match="selector.params.alpha: unknown parameter of selector 'dpp'"):
        load_config("resprune-llava15", ["selector.params.alpha=0.5", "selector.name=dpp"])  # written by the user
    # the same selector under an alias keeps its params
    assert load_config("resprune-llava15", ["selector.name=resprune"]).selector.params.alpha == 0.75


def test_scorer_name_override_drops_the_old_scorers_params():
    cfg = load_config("resprune-llava15", ["scorers.1.name=norm"])
    assert cfg.scorers[1].name == "norm" and plain(cfg.scorers[1].params) == {}


@pytest.mark.parametrize("how", ["dotlist", "mapping", "kwargs"])
def test_selector_shorthand_override(how):
    if how == "dotlist":
        cfg = load_config("resprune-llava15", ["selector=divprune"])
    elif how == "mapping":
        cfg = load_config("resprune-llava15", {"selector": "divprune"})
    else:
        cfg = load_config("resprune-llava15", selector="divprune")
    assert plain(cfg.selector) == {"name": "divprune", "params": {}}


def test_unresolvable_interpolation_in_an_override(monkeypatch):
    monkeypatch.delenv("RESPRUNE_TEST_NO_SUCH_VAR", raising=False)
    with pytest.raises(ConfigError, match="budget"):
        load_config("uniform", ["budget=${oc.env:RESPRUNE_TEST_NO_SUCH_VAR}"])


def test_interpolation_in_an_override_resolves(monkeypatch):
    monkeypatch.setenv("RESPRUNE_TEST_BUDGET", "48")
    assert load_config("uniform", ["budget=${oc.decode:${oc.env:RESPRUNE_TEST_BUDGET}}"]).budget == 48


# --- sources and round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_round_trip_through_yaml(tmp_path, name):
    cfg = load_config(name)
    path = tmp_path / "saved.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(path)
    assert plain(again) == plain(cfg)
    pipe = resprune.load_pipeline(name)
    assert pipe.to_yaml() == to_yaml(cfg)
    assert plain(load_config(pipe.save_config(tmp_path / "pipe.yaml"))) == plain(cfg)


def test_sources_mapping_dataclass_and_loaded_config_agree():
    mapping = {"budget": 16, "selector": {"name": "uniform"}}
    from_dict = load_config(mapping)
    from_dataclass = load_config(PipelineConfig(budget=16, selector=SelectorConfig(name="uniform")))
    from_loaded = load_config(from_dict)
    from_omegaconf = load_config(OmegaConf.create(mapping))
    assert plain(from_dict) == plain(from_dataclass) == plain(from_loaded) == plain(from_omegaconf)
    assert mapping == {"budget": 16, "selector": {"name": "uniform"}}  # the caller's mapping is untouched


def test_pipeline_from_config_uses_the_resolved_params():
    pipe = resprune.load_pipeline("resprune-qwen2.5-vl", ["selector.params.alpha=0.1"], budget=6)
    assert pipe.budget == 6
    assert pipe.selector.params.alpha == 0.1 and pipe.selector.params.seed == "norm"
    assert pipe.score_names == ["norm", "relevance"]
    assert pipe.requires == {"text", "text_embedder"}
    described = pipe.describe()
    assert described["selector"] == {"name": "residual_energy", "params": plain(pipe.config.selector.params)}
    direct = resprune.Pipeline(resprune.get_host().selectors.get("residual_energy")(plain(pipe.config.selector.params)),
                               budget=6, scorers=["norm", "text_relevance"])
    context = ctx()
    assert torch.equal(pipe.run(context).order, direct.run(context).order)


def test_backbone_block_is_validated_against_the_injectors():
    base = {"budget": 3, "selector": {"name": "uniform"}}
    with pytest.raises(ConfigError) as info:
        load_config({**base, "backbone": {"model_type": "lava"}})
    message = str(info.value)
    assert "backbone.model_type: no injector handles 'lava'." in message and "Did you mean 'llava'?" in message
    with pytest.raises(ConfigError, match="backbone.params need backbone.model_type"):
        load_config({**base, "backbone": {"params": {"scope": "global"}}})
    with pytest.raises(ConfigError, match=r"backbone\.params\.nope: unknown parameter of injector 'llava'"):
        load_config({**base, "backbone": {"model_type": "llava", "params": {"nope": 1}}})


def test_a_stage_budget_table_is_keyed_by_the_top_level_budget():
    cfg = {"budget": 128, "selector": {"name": None},
           "stages": [{"layer": 2, "budget": {192: 300, 128: 0.5}, "selector": {"name": "uniform"}}]}
    assert resprune.load_pipeline(cfg).stages[0].budget == 0.5
    assert resprune.load_pipeline(cfg, budget=192).stages[0].budget == 300
    with pytest.raises(resprune.BudgetError, match=r"stages\[0\]\.budget is a table .* entries for 192, 128; it has "
                                                   r"none for budget=64"):
        resprune.load_pipeline(cfg, budget=64)
    bad = {**cfg, "stages": [{**cfg["stages"][0], "budget": {128: 0}}]}
    with pytest.raises(resprune.BudgetError, match=r"stages\[0\]\.budget\[128\]=0"):
        resprune.load_pipeline(bad)
