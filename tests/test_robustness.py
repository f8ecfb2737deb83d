"""Mistakes a new user, a plugin author or a tester makes: each gets a named error, never a raw
traceback, a hang or silently wrong output."""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import types
from dataclasses import dataclass

import pytest
import torch

import resprune
from resprune import hookimpl
from resprune.cli import main
from resprune.config import load_config
from resprune.data import load_records, open_image, record_digest
from resprune.errors import (ConfigError, IncompatibleBackboneError, InvalidInputError, PluginError,
                             ResPruneError, UnknownStrategyError)
from resprune.models import load_model
from resprune.sweep import load_sweep


@functools.cache
def tiny():
    return load_model("tiny:llava")


# --- numeric input --------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "key"), [
    ({"alpha": float("nan")}, "alpha"), ({"eps": float("inf")}, "eps"), ({"tol": float("nan")}, "tol"),
])
def test_non_finite_selector_params_are_refused(params, key):
    with pytest.raises(ConfigError, match=rf"params.{key}: must be a finite number, got (nan|inf)"):
        resprune.select(torch.randn(20, 4), 3, **params)


def test_non_finite_params_are_refused_in_configs_and_by_the_cli(capsys):
    with pytest.raises(ConfigError, match="selector.params.tol: must be a finite number"):
        load_config("resprune-llava15", ["selector.params.tol=.nan"])
    assert main(["config", "resprune-llava15", "selector.params.alpha=.inf"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "must be a finite number, got inf" in err


# --- plugins ---------------------------------------------------------------------------------------


class NoOutput(resprune.Scorer):
    name = "no_output"

    def score(self, context):
        return torch.ones(context.batch_size, context.num_tokens)


class Halves(resprune.Selector):
    """Keeps the first k tokens (an unregistered class, e.g. from a notebook)."""

    name = "halves"

    @dataclass
    class Params:
        offset: int = 0

    def select(self, tokens, k, scores, context):
        b = tokens.shape[0]
        return (torch.arange(k) + self.params.offset).expand(b, k).contiguous()


def _module(name, **hooks):
    mod = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(mod, hook, fn)
    return mod


def test_a_scorer_without_output_is_refused_at_registration(plugin_host):
    @hookimpl
    def resprune_register_scorers(register):
        register(NoOutput)

    with pytest.raises(PluginError, match=r"plugin 'noout': scorer class .*NoOutput has no class attribute "
                                          r"`output` \(the name of the score it writes\)"):
        plugin_host(_module("noout", resprune_register_scorers=resprune_register_scorers))


def test_select_accepts_a_selector_class_and_names_what_it_does_not_accept():
    v = torch.randn(10, 4)
    assert resprune.select(v, 3, selector=Halves, offset=2).tolist() == [2, 3, 4]
    assert resprune.Pipeline(Halves, budget=2).select(v).tolist() == [0, 1]
    with pytest.raises(InvalidInputError, match="int is not a Selector subclass; pass a registered selector name"):
        resprune.select(v, 3, selector=int)
    with pytest.raises(InvalidInputError, match="pass params only with a selector name or class"):
        resprune.select(v, 3, selector=Halves(), offset=1)
    with pytest.raises(InvalidInputError, match="selector=3: pass a registered selector name"):
        resprune.select(v, 3, selector=3)


def test_a_misspelt_hook_parameter_gets_resprunes_own_message(plugin_host):
    @hookimpl
    def resprune_register_selectors(reg):
        reg(Halves)

    with pytest.raises(PluginError) as info:
        plugin_host(_module("typo_plugin", resprune_register_selectors=resprune_register_selectors))
    assert str(info.value) == ("plugin 'typo_plugin': resprune_register_selectors(reg) does not match the hook's "
                               "signature resprune_register_selectors(register): hook implementations take exactly "
                               "one parameter, named `register`.")


def test_unknown_names_hint_at_reinstalling(monkeypatch):
    with pytest.raises(UnknownStrategyError, match="did you reinstall the package after changing its entry points"):
        resprune.select(torch.randn(5, 2), 2, selector="qqqq")
    with pytest.raises(UnknownStrategyError) as info:  # a near miss suggests the name instead
        resprune.select(torch.randn(5, 2), 2, selector="divprun")
    assert "Did you mean 'divprune'?" in str(info.value) and "reinstall" not in str(info.value)


def test_an_entry_point_added_without_reinstalling_is_named(tmp_path, monkeypatch):
    import importlib.metadata as md

    from resprune import plugins

    root = tmp_path / "pkg"
    root.mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "acme-prune"\n[project.entry-points.resprune]\n'
                                         'acme = "acme_prune.plugin"\nacme_new = "acme_prune.more"\n')

    class Dist:
        metadata = {"Name": "acme-prune"}
        entry_points = [md.EntryPoint("acme", "acme_prune.plugin", plugins.ENTRY_POINT_GROUP)]

        def read_text(self, name):
            return json.dumps({"url": root.as_uri(), "dir_info": {"editable": True}}) \
                if name == "direct_url.json" else None

    monkeypatch.setattr(plugins.metadata, "distributions", lambda: [Dist()])
    with pytest.raises(UnknownStrategyError) as info:
        resprune.select(torch.randn(5, 2), 2, selector="acme_kcenter")
    msg = str(info.value)
    assert "acme-prune declares `acme_new = \"acme_prune.more\"`" in msg and "does not" in msg
    assert f"pip install -e {root}" in msg


def test_conformance_helpers_catch_writes_that_escape_version_counters():
    from resprune.testing.contracts import check_selector_contract

    class Sneaky(Halves):
        name = "sneaky"

        def select(self, tokens, k, scores, context):
            tokens.data[0, 0, 0] += 1.0  # .data bypasses the version counter
            return super().select(tokens, k, scores, context)

    with pytest.raises(AssertionError, match="selector 'sneaky' modified its input context\\['tokens'\\]"):
        check_selector_contract(Sneaky())


def test_the_reconstruction_residual_of_keep_all_is_never_negative():
    from resprune.linalg import span_residual

    v = torch.randn(30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    q = torch.linalg.svd(v, full_matrices=False).Vh
    assert float(v.pow(2).sum() - (v @ q.T).pow(2).sum()) < 0  # rounding makes this squared norm negative
    assert span_residual(v, list(range(30))) == 0.0  # ... and it is reported as 0, never as the best value


# --- configs ----------------------------------------------------------------------------------------


def test_a_base_that_is_not_yaml_is_never_quoted(tmp_path):
    secret = tmp_path / "secrets.txt"
    secret.write_text("api_key: sk-THISMUSTNOTLEAK\n" * 50)
    cfg = tmp_path / "c.yaml"
    for base in (secret, "/etc/passwd"):
        cfg.write_text(f"base: {base}\nbudget: 8\n")
        with pytest.raises(ConfigError) as info:
            load_config(cfg)
        assert "not a YAML file" in str(info.value) and "THISMUSTNOTLEAK" not in str(info.value)
    junk = tmp_path / "junk.yaml"
    junk.write_text("x" * 5000 + ": 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(junk)
    assert len(str(info.value)) < 300


def test_resolvers_are_refused_in_config_files_and_never_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("RESPRUNE_TEST_SECRET", "hunter2")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: resprune-llava15\ndescription: 'key ${oc.env:RESPRUNE_TEST_SECRET}'\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "description: resolver interpolations" in str(info.value) and "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match="resolver interpolations"):
        load_config({"budget": 8, "selector": {"name": "uniform"}, "description": "${oc.env:HOME}"})
    sweep = tmp_path / "s.yaml"
    sweep.write_text("model: ${oc.env:RESPRUNE_TEST_SECRET}\n")
    with pytest.raises(ConfigError, match="model: resolver interpolations"):
        load_sweep(sweep)
    # interpolations between keys stay allowed
    cfg.write_text("budget: 8\ndescription: 'keeps ${budget}'\nselector: {name: uniform}\n")
    assert load_config(cfg).description == "keeps 8"


def test_provenance_is_not_inherited_through_base(tmp_path):
    assert load_config("resprune-llava15").reproduces
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("base: resprune-llava15\nselector: {params: {alpha: 0.1}}\n")
    assert load_config(cfg).reproduces is None
    cfg.write_text("base: resprune-llava15\nreproduces: my own table\n")
    assert load_config(cfg).reproduces == "my own table"


@pytest.mark.parametrize(("yaml", "hint"), [
    ("budget: 8\nselector: {name: topk, params: [1, 2]}\n", "selector.params: expected a mapping of parameter"),
    ("budget: 8\nselector: {name: topk}\nscorers: {name: norm}\n", "scorers: expected a list, got a mapping"),
    ("budget: 8\nselector: {name: topk}\nscorers: [norm]\n", "scorers[0]: expected a mapping such as {name: norm}"),
    ("budget: 8\nselector: uniform\n", "selector: expected a mapping"),
    ("budget: 8\nselector: {name: uniform}\nbackbone: [llava]\n", "backbone: expected a mapping"),
    ("budget: 8\nselector: {name: text_relevance}\n", "unknown selector 'text_relevance'"),
    ("budget: 8\nselector: {name: topk}\nscorers: [{name: text_relevance, params: {strip: ['(unclosed']}}]\n",
     "strip[0]='(unclosed' is not a regular expression"),
])
def test_config_shapes_get_named_errors(tmp_path, yaml, hint):
    path = tmp_path / "c.yaml"
    path.write_text(yaml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert hint in str(info.value)


def test_non_utf8_files_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"budget: 8\ndescription: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: not UTF-8 text \(byte 0xe9\)"):
        load_config(path)
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"image": "a.png", "question": "caf\xe9?"}\n')
    with pytest.raises(InvalidInputError, match=r"d.jsonl:1: not UTF-8 text"):
        load_records(data)


@pytest.mark.parametrize(("override", "hint"), [
    ("grid=[1,2]", "grid: expected a mapping such as {budget: [64, 128]"),
    ("metrics={a: 1}", "metrics: expected a list"),
    ("max_new_tokens=0", "max_new_tokens must be >= 1, got 0"),
    ("limit=-1", "limit must be >= 1 (or null for every record), got -1"),
    ("limit=0", "limit must be >= 1"),
])
def test_bad_sweep_values_are_refused_before_any_model_work(override, hint):
    with pytest.raises(ResPruneError) as info:
        load_sweep(None, [override])
    assert hint in str(info.value)


def test_an_ablation_refuses_bad_generation_settings():
    model, processor = tiny()
    for kwargs, hint in (({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
                         ({"limit": -1}, "limit must be an int >= 1"),
                         ({"metrics": "fidelity"}, "metrics must be a list")):
        with pytest.raises(ResPruneError, match=hint):
            resprune.Ablation("resprune-llava15", {"budget": [8]}, model=model, processor=processor, **kwargs)


def test_progress_false_prints_nothing(tmp_path, capsys):
    model, processor = tiny()
    resprune.Ablation("resprune-llava15", {"budget": [8]}, model=model, processor=processor, limit=1,
                      metrics=["flops"], max_new_tokens=1, progress=False).run(tmp_path)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


# --- dataset records ----------------------------------------------------------------------------


@pytest.mark.parametrize(("record", "hint"), [
    ({"image": 5, "question": "q"}, "'image' is a int (5)"),
    ({"image": ["a.png"], "question": "q"}, "'image' is a list"),
    ({"image": "a.png", "question": 3}, "'question' must be a string"),
    ({"image": "a.png", "question": "q", "answers": 5}, "'answers' must be a string or a list of strings, got 5"),
    ({"image": "a.png", "question": "q", "answers": ["a", 2]}, "'answers' must be a string or a list of strings"),
])
def test_bad_records_are_named(record, hint):
    with pytest.raises(InvalidInputError) as info:
        load_records([record])
    assert "record 0" in str(info.value) and hint in str(info.value)


def test_a_json_list_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"image": "a.png", "question": "q"}\n["a.png", "q"]\n')
    with pytest.raises(InvalidInputError, match=r"d.jsonl:2: expected a JSON object .* got a list"):
        load_records(path)


def test_unreadable_images_are_named_and_never_block(tmp_path):
    from PIL import Image

    with pytest.raises(InvalidInputError, match=r"cannot read image <9 bytes>"):
        open_image(b"not a png")
    with pytest.raises(InvalidInputError, match=r"cannot read image <9 bytes>"):
        open_image({"bytes": b"not a png"})
    with pytest.raises(InvalidInputError, match=r"use a path, a PIL image or bytes"):
        open_image(5)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInputError, match="not a regular file"):
        open_image(str(fifo))  # would block forever in open()
    with pytest.raises(InvalidInputError, match="not a regular file"):
        record_digest({"image": str(fifo), "question": "q"})
    with pytest.raises(InvalidInputError, match="not a regular file"):
        open_image(str(tmp_path))
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 Mpx, a few KB on disk
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 50_000_000
    try:
        with pytest.raises(InvalidInputError, match="refused image .*bomb.png.*decompression bomb"):
            open_image(str(bomb))
    finally:
        Image.MAX_IMAGE_PIXELS = old


# --- attach -----------------------------------------------------------------------------------------


def _pipe():
    return resprune.load_pipeline("resprune-llava15", budget=16)


def test_attaching_to_an_inner_module_is_refused_and_changes_nothing():
    model, processor = tiny()
    inner = model.model
    before = dict(inner.__dict__)
    with pytest.raises(IncompatibleBackboneError, match="LlavaModel has no generate\\(\\); attach\\(\\) takes the whole"):
        _pipe().attach(inner, processor)
    assert inner.__dict__.keys() == before.keys() and "forward" not in inner.__dict__
    with _pipe().attach(model, processor) as attached:  # nothing was left marked as attached
        assert attached.active


def test_remove_is_exception_safe():
    model, processor = tiny()
    injector_cls = resprune.get_host().injector_for(model.config.model_type)

    class Broken(injector_cls):
        def restore_state(self, model, state):
            raise RuntimeError("disk on fire")

    handle = Broken({}).attach(model, _pipe(), processor)
    with pytest.raises(PluginError, match="failed to restore the model's state \\(RuntimeError: disk on fire\\)"):
        handle.remove()
    assert not handle.active and "forward" not in model.__dict__ and "generate" not in model.__dict__
    with _pipe().attach(model, processor):  # free to attach again
        pass


def test_concurrent_attaches_let_exactly_one_through():
    model, processor = tiny()
    injector_cls = resprune.get_host().injector_for(model.config.model_type)

    class Slow(injector_cls):
        def save_state(self, model):
            time.sleep(0.01)
            return super().save_state(model)

    results, barrier = [], threading.Barrier(20)

    def attach():
        barrier.wait()
        try:
            results.append(Slow({}).attach(model, _pipe(), processor))
        except InvalidInputError as exc:
            results.append(exc)

    threads = [threading.Thread(target=attach) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handles = [r for r in results if not isinstance(r, Exception)]
    assert len(handles) == 1 and all("already has a resprune pipeline" in str(r) for r in results if r not in handles)
    handles[0].remove()
    assert "forward" not in model.__dict__


def test_a_catastrophic_strip_pattern_is_an_error_not_a_hang():
    from resprune.text import STRIP_TIMEOUT_S, strip_format

    start = time.perf_counter()
    with pytest.raises(InvalidInputError, match=r"strip pattern '\(a\|aa\)\+\$' ran over .*catastrophic"):
        strip_format("a" * 40 + "b", [r"(a|aa)+$"])
    assert time.perf_counter() - start < STRIP_TIMEOUT_S + 2
    assert strip_format("aaa (a+)+ b", [r"(a+)+$"]) == "aaa (a+)+ b"  # the (a+)+$ is no problem here
