"""What a user is handed (a colleague's run folder, lmms-eval outputs, overrides pasted from a
paper) is data: malformed files are named errors or warned skips, nothing is resolved from the
environment, symlinks follow one rule, and names cannot break the tables or collide as files."""

from __future__ import annotations

import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resprune.cli import main as cli
from resprune.config import load_config, to_yaml
from resprune.data import photo_path
from resprune.errors import ConfigError, InvalidInputError, ResPruneError
from resprune.lmms.results import load_lmms_eval, result_files
from resprune.report import load_results, write_report
from resprune.runfiles import RunFileError, unique_slug

from test_lmms_results import FULL, MODEL, write_result

SECRET = "do-not-print-91c2"


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


MALFORMED = {
    "model_args a list": (lambda d: d["config"].__setitem__("model_args", ["pipeline=none"]), "config.model_args"),
    "model_args an int": (lambda d: d["config"].__setitem__("model_args", 7), "config.model_args"),
    "group_subtasks an int": (lambda d: d["group_subtasks"].__setitem__("gqa", 3), "group_subtasks.gqa"),
    "throughput a list": (lambda d: d.__setitem__("throughput", [1, 2]), "throughput"),
    "n-samples a list": (lambda d: d["n-samples"].__setitem__("gqa", [100]), "n-samples.gqa"),
    "effective abc": (lambda d: d["n-samples"]["gqa"].__setitem__("effective", "abc"), "n-samples.gqa.effective"),
    "effective NaN": (lambda d: d["n-samples"]["gqa"].__setitem__("effective", float("nan")),
                      "n-samples.gqa.effective"),
    "results entry a list": (lambda d: d["results"].__setitem__("gqa", [0.5]), "results.gqa"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_result_file_is_a_named_error_alone_and_a_warned_skip_beside_good_ones(tmp_path, case):
    change, key = MALFORMED[case]
    bad = write_result(tmp_path, "bad", f"{MODEL},pipeline=none", {"gqa": {"exact_match": 0.6}})
    _edit(bad, change)
    with pytest.raises(InvalidInputError) as info:
        load_lmms_eval(tmp_path)
    message = str(info.value)
    assert bad.name in message and f"{key}: expected" in message
    write_result(tmp_path, "good", f"{MODEL},pipeline=resprune-llava15,budget=64", {"gqa": {"exact_match": 0.5}},
                 date="20261128_090000")
    with pytest.warns(RuntimeWarning, match=f"skipped .*{bad.name}.*{key}: expected"):
        rows = load_lmms_eval(tmp_path)
    assert [r["budget"] for r in rows] == [64]
    assert cli(["report", str(tmp_path), "--no-plots"]) == 0


def test_a_missing_pipeline_is_warned_about_and_marked_in_the_report(tmp_path):
    write_result(tmp_path, "full", f"{MODEL},pipeline=none", FULL)
    write_result(tmp_path, "gone", f"{MODEL},pipeline=/nowhere/mine.yaml", {"gqa": {"exact_match": 0.5}},
                 date="20261128_110000")
    with pytest.warns(RuntimeWarning, match="mine.yaml.*could not be read"):
        rows = load_lmms_eval(tmp_path)
    gone = next(r for r in rows if r["method"] == "mine")
    assert "budget=?" in gone["label"] and "budget=None" not in gone["label"]
    assert "could not be read" in gone["reason"] and gone["status"] == "done"
    with pytest.warns(RuntimeWarning):
        report = write_report(tmp_path, plots=False).read_text()
    assert "Notes:" in report and "mine.yaml" in report.split("Notes:")[1]


def test_symlinks_are_followed_inside_the_folder_and_skipped_with_a_warning_outside(tmp_path):
    root, outside = tmp_path / "results", tmp_path / "elsewhere"
    write_result(root, "full", f"{MODEL},pipeline=none", FULL)
    far = write_result(outside, "far", f"{MODEL},pipeline=resprune-llava15,budget=32", {"gqa": {"exact_match": 0.1}})
    near = write_result(root / "kept", "near", f"{MODEL},pipeline=resprune-llava15,budget=64",
                        {"gqa": {"exact_match": 0.5}}, date="20261128_110000")
    (root / "file_out_results.json").symlink_to(far)
    (root / "folder_out").symlink_to(far.parent, target_is_directory=True)
    (root / "folder_in").symlink_to(near.parent.parent, target_is_directory=True)  # a second view of `kept`
    (root / "loop").symlink_to(root, target_is_directory=True)
    with pytest.warns(RuntimeWarning, match="leading outside") as caught:
        files = result_files(root)
    assert {w.message.args[0].split(":")[0] for w in caught} == {str(root / "file_out_results.json"),
                                                                 str(root / "folder_out")}
    assert far not in [f.resolve() for f in files]
    assert {f.resolve() for f in files} == {p.resolve() for p in root.rglob("*_results.json")
                                            if str(p.resolve()).startswith(str(root))}
    rows = load_lmms_eval(root)
    assert sorted(r["budget"] for r in rows if r["method"] != "full") == [64]  # 32 lives outside


def test_a_run_folder_whose_results_leave_it_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text(json.dumps({"model": "m", "status": "done", "method": "full", "budget": None,
                                   "metrics": {}}) + "\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").symlink_to(outside)
    with pytest.raises(RunFileError, match="symlink leading outside"):
        load_results(run)
    assert cli(["report", str(run), "--no-plots"]) == 2


NASTY = ["a|b", "two\nlines", "pipe | and\r\nnewline", "=cmd|' /C calc'!A0", "back\\|slash"]


def _tables(text):
    """The column count of every row of every markdown table in ``text``."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = line.replace("\\|", "").count("|") - 1
            current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def test_names_with_pipes_and_newlines_keep_every_table_rectangular(tmp_path):
    rows = [{"model": NASTY[i % len(NASTY)] if i else "m|x", "status": "done", "method": "full", "budget": None,
             "metrics": {n: 0.5 for n in NASTY}, "label": "full"} for i in range(1)]
    rows += [{"model": "m|x", "status": "done", "method": name, "budget": 64, "metrics": {n: 0.1 * i for n in NASTY},
              "label": name, "reason": name if i % 2 else None} for i, name in enumerate(NASTY)]
    rows += [{"model": "m|x", "status": "failed", "method": "f|g", "budget": 64, "metrics": {}, "label": "f\n|g",
              "reason": "boom | bang\nmore"}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(tmp_path, plots=False).read_text()
    tables = _tables(text)
    assert tables and all(len(set(t)) == 1 for t in tables)
    bullets = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(bullets) == 1 + 2  # one failed cell, two noted rows: each one line
    assert "## m\\|x" in text


def test_plot_files_and_model_folders_are_unique_and_stable():
    names = ["org/m", "org:m", "org_m", "org m"]
    slugs = [unique_slug(n) for n in names]
    assert len(set(slugs)) == len(names) and slugs == [unique_slug(n) for n in names]
    assert unique_slug("org_m") == "org_m"  # a name that is already a file name stays as it is
    assert all("/" not in s and ":" not in s for s in slugs)


def test_two_models_whose_names_slug_alike_get_two_plots(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"model": model, "status": "done", "method": method, "budget": budget, "metrics": {"fidelity.kl": v}}
            for model in ("org/m", "org:m") for method, budget, v in (("full", None, 0.0), ("dpp", 8, 0.2),
                                                                      ("dpp", 16, 0.1))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path)
    assert len(list((tmp_path / "plots").glob("*.png"))) == 2


# --- overrides and grid values ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["@x", "`x", "[1", "{", "*x", "%x"])
def test_an_override_that_is_not_yaml_names_the_key_and_shows_how_to_quote_it(value, capsys):
    with pytest.raises(ConfigError, match=r"description=.*not a YAML value.*description='"):
        load_config("resprune-llava15", [f"description={value}"])
    assert load_config("resprune-llava15", [f"description='{value}'"]).description == value  # the quoting shown
    assert cli(["config", "resprune-llava15", f"description={value}"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_sweep_override_and_grid_value_that_are_not_yaml_are_named(tmp_path, tiny_llava):
    import resprune
    from resprune.sweep import load_sweep

    with pytest.raises(ConfigError, match="grid.budget=\\[1.*not a YAML value"):
        load_sweep(None, ["grid.budget=[1"])
    model, processor = tiny_llava
    table = resprune.Ablation("resprune-llava15", {"description": ["@x", "`y", "[1"]}, model=model,
                              processor=processor, metrics=["flops"], limit=1, progress=False)
    assert [c.config.description for c in table.cells] == ["@x", "`y", "[1"]  # grid values are values, not YAML


def test_an_override_of_a_list_entry_that_does_not_exist_says_how_many_there_are():
    with pytest.raises(ConfigError, match=r"stages has 3 entries \(stages\.0 to stages\.2\), so stages\.5 does "):
        load_config("pdrop", ["stages.5.layer=3"])
    with pytest.raises(ConfigError, match=r"stages has 0 entries, so stages\.0 does not exist"):
        load_config("resprune-llava15", ["stages.0.layer=3"])


def test_escaped_interpolations_are_text_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("RESPRUNE_TEST_SECRET", SECRET)
    escaped = "\\${oc.env:RESPRUNE_TEST_SECRET}"
    path = tmp_path / "mine.yaml"
    path.write_text(f"base: resprune-llava15\ndescription: '{escaped}'\n")
    for cfg in (load_config(path), load_config("resprune-llava15", [f"description={escaped}"])):
        assert cfg.description == "${oc.env:RESPRUNE_TEST_SECRET}"
        saved = tmp_path / "saved.yaml"
        saved.write_text(to_yaml(cfg))
        assert SECRET not in saved.read_text() and load_config(saved).description == cfg.description
    path.write_text("base: resprune-llava15\ndescription: '\\\\${oc.env:RESPRUNE_TEST_SECRET}'\n")  # \\ then ${
    with pytest.raises(ConfigError, match="resolver interpolations"):
        load_config(path)


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(key=st.one_of(st.sampled_from(["budget", "description", "selector.params.alpha", "stages.0.layer",
                                      "scorers.1.params.reduce", "backbone.params.scope", "selector"]), _text),
       value=_text)
def test_any_override_is_a_named_error_or_a_config(key, value):
    try:
        load_config("resprune-llava15", [f"{key}={value}"])
    except ResPruneError:
        pass


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.one_of(_text, st.integers(), st.floats(), st.none(), st.booleans()), min_size=1,
                       max_size=3),
       key=st.sampled_from(["budget", "description", "selector.params.alpha", "selector", "scorers.0.name"]))
def test_any_grid_value_is_a_named_error_or_a_grid(key, values):
    from resprune.ablation import expand_grid

    try:
        expand_grid("resprune-llava15", {key: values})
    except ResPruneError:
        pass


# --- outputs that cannot be written ------------------------------------------------------------------


def _unwritable_cases(tmp_path):
    photo = str(photo_path("astronaut"))
    afile, adir = tmp_path / "afile", tmp_path / "adir"
    afile.write_text("x")
    adir.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text(json.dumps({"model": "m", "status": "done", "method": "full", "budget": None,
                                                   "metrics": {"flops.ratio": 1.0}}) + "\n")
    (tmp_path / "run_md" / "report.md").mkdir(parents=True)
    (tmp_path / "run_md" / "results.jsonl").write_text((run / "results.jsonl").read_text())
    image = ["--model", "tiny:llava", "--image", photo]
    return {
        "sweep --out a file": (["sweep", "--out", str(afile), "limit=1"], "is a file, not a folder"),
        "sweep --out /proc/x": (["sweep", "--out", "/proc/x", "limit=1"], "cannot create run folder '/proc/x'"),
        "report --csv a folder": (["report", str(run), "--no-plots", "--csv", str(adir)], "--csv .* is a folder"),
        "report --csv /proc/x/t.csv": (["report", str(run), "--no-plots", "--csv", "/proc/x/t.csv"],
                                       "cannot create --csv's folder '/proc/x'"),
        "report.md a folder": (["report", str(tmp_path / "run_md"), "--no-plots"], "report .*report.md' is a folder"),
        "demo --out a folder": (["demo", "--out", str(adir)], "--out .* is a folder"),
        "demo --out /proc/x/y.png": (["demo", "--out", "/proc/x/y.png"], "cannot create --out's folder"),
        "run --out a folder": (["run", "resprune-llava15", *image, "--prompt", "hi", "--out", str(adir)],
                               "--out .* is a folder"),
        "demo --out not an image": (["demo", "--out", str(tmp_path / "o.xyz")], "ends in '.xyz', which is not an "
                                                                                 "image format"),
        "visualize --out without a suffix": (["visualize", "resprune-llava15", *image, "--out", str(tmp_path / "o")],
                                             "has no file suffix"),
        "visualize --out /proc/x.png": (["visualize", "resprune-llava15", *image, "--out", "/proc/x/o.png"],
                                        "cannot create --out's folder"),
    }


def test_every_unwritable_output_is_named_before_any_model_work(tmp_path, monkeypatch, capsys):
    import resprune.demo
    import resprune.models
    import resprune.run

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the outputs were checked")

    for module in (resprune.models, resprune.run, resprune.demo):
        monkeypatch.setattr(module, "load_model", no_model)
    for case, (argv, message) in _unwritable_cases(tmp_path).items():
        assert cli(argv) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("resprune: error: ") and "Traceback" not in err, case
        assert re.search(message, err), (case, err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        assert cli(["sweep", "--out", str(run), "limit=1"]) == 2
        assert "cannot write in run folder" in capsys.readouterr().err
    finally:
        run.chmod(0o755)


def test_a_cell_folder_that_cannot_be_written_stops_the_sweep_before_it_starts(tmp_path, tiny_llava):
    import resprune
    from resprune.errors import OutputPathError

    model, processor = tiny_llava
    study = resprune.Ablation("resprune-llava15", {"budget": [16, 32]}, model=model, processor=processor,
                              metrics=["flops"], limit=1, progress=False)
    cells = tmp_path / "cells"
    cells.mkdir()
    (cells / study.cells[1].id).write_text("not a folder")
    with pytest.raises(OutputPathError, match=f"folder of cell '{study.cells[1].label}'.*is a file"):
        study.run(tmp_path)
    assert not (tmp_path / "reference").exists() and not (cells / study.cells[0].id).exists()  # nothing ran
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (cells / study.cells[1].id).unlink()
    (cells / study.cells[1].id).symlink_to(outside, target_is_directory=True)
    with pytest.raises(RunFileError, match="symlink leading outside the run folder"):
        study.run(tmp_path)


BAD_ROWS = {
    "metrics a list": ({"metrics": [1, 2]}, "'metrics' is list"),
    "model a number": ({"model": 3}, "'model' is int"),
    "method a list": ({"method": ["x"]}, "'method' is list"),
    "params a list": ({"params": [1]}, "'params' is list"),
    "a metric text": ({"metrics": {"k": "v"}}, "metric 'k' is str"),
    "unknown status": ({"status": "great"}, "'status' is 'great'"),
    "budget a list": ({"budget": [8]}, "'budget' is list"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_results_row_of_the_wrong_types_names_its_line_and_key(tmp_path, case, capsys):
    change, message = BAD_ROWS[case]
    good = {"model": "m", "status": "done", "method": "x", "budget": 8, "metrics": {"k": 1.0}}
    (tmp_path / "results.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, **change}) + "\n")
    with pytest.raises(InvalidInputError, match=rf"results\.jsonl:2: {re.escape(message)}"):
        load_results(tmp_path)
    assert cli(["report", str(tmp_path), "--no-plots"]) == 2
    assert "Traceback" not in capsys.readouterr().err
