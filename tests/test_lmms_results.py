"""lmms-eval results as resprune rows (no lmms-eval needed): model_args parsing, the reader,
the paper's Rel. column, and `resprune report` on an lmms-eval output folder.

The result files here follow the schema lmms-eval 0.7.3 writes (``tests/test_lmms_eval.py``
reads files written by a real run)."""

from __future__ import annotations

import csv
import json

import pytest

from resprune.cli import main as cli
from resprune.errors import ConfigError, InvalidInputError
from resprune.lmms import parse_model_args, split_model_args
from resprune.lmms.results import lmms_columns, load_lmms_eval
from resprune.report import load_results


def write_result(folder, name, model_args, scores, *, date="20261128_100000", model="resprune", stats=None,
                 groups=None, samples=100):
    """An lmms-eval aggregated result file: ``scores`` is ``{task: {metric: value}}``."""
    results = {}
    for task, metrics in scores.items():
        block = {"alias": task}
        for metric, value in metrics.items():
            block[f"{metric},none"] = value
            block[f"{metric}_stderr,none"] = 0.01 if isinstance(value, float) else "N/A"
        results[task] = block
    data = {"results": results, "group_subtasks": groups or {t: [] for t in scores},
            "higher_is_better": {t: {m: True for m in ms} for t, ms in scores.items()},
            "n-samples": {t: {"original": samples, "effective": samples} for t in scores},
            "config": {"model": model, "model_args": model_args, "batch_size": "1", "limit": None, "offset": 0,
                       "gen_kwargs": ""},
            "throughput": {"total_gen_tokens": 10, "avg_speed": 1.0,
                           **{f"avg_resprune.{k}": v for k, v in (stats or {}).items()}},
            "date": date}
    path = folder / "llava-hf__llava-1.5-7b-hf" / f"{date}_{name}_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


MODEL = "pretrained=llava-hf/llava-1.5-7b-hf"
FULL = {"gqa": {"exact_match": 0.62}, "mme": {"mme_perception_score": 1510.0, "mme_cognition_score": 350.0},
        "pope": {"pope_accuracy": 0.86, "pope_f1_score": 0.859}}


def test_split_and_parse_model_args():
    assert split_model_args('a=1,b=[x,y],c="p,q",d={"k":1,"j":2}') == ["a=1", "b=[x,y]", 'c="p,q"',
                                                                       'd={"k":1,"j":2}']
    model, overrides = parse_model_args("pretrained=tiny:llava,pipeline=fastv,budget=64,stages.0.layer=3,"
                                        "scorers=[relevance,cls_attention],batch_size=2")
    assert model == {"pretrained": "tiny:llava", "pipeline": "fastv", "batch_size": "2"}
    assert overrides == ["budget=64", "stages.0.layer=3", "scorers=[relevance,cls_attention]"]
    # keyword arguments lmms-eval already parsed go back to dotlist text (bools as YAML booleans)
    assert parse_model_args({"pipeline": "x", "budget": 0.25, "selector.params.flag": True})[1] == \
        ["budget=0.25", "selector.params.flag=true"]
    with pytest.raises(ConfigError, match="not key=value"):
        parse_model_args("pretrained=x,budget")


def test_reader_rows_rel_and_newest_file_wins(tmp_path):
    write_result(tmp_path, "full", f"{MODEL},pipeline=none", FULL, stats={"tokens.visual_kept": 576.0})
    write_result(tmp_path, "rp64", f"{MODEL},pipeline=resprune-llava15,budget=64",
                 {"gqa": {"exact_match": 0.50}, "mme": {"mme_perception_score": 1300.0, "mme_cognition_score": 300.0}},
                 stats={"tokens.visual_kept": 64.0, "flops.ratio": 0.2, "latency.selection_ms": 3.0})
    # a later run of the same cell: re-runs GQA (replacing the old score) and adds POPE
    write_result(tmp_path, "rp64b", f"{MODEL},pipeline=resprune-llava15,budget=64",
                 {"gqa": {"exact_match": 0.589}, "pope": {"pope_accuracy": 0.87, "pope_f1_score": 0.8761}},
                 date="20261128_110000", stats={"tokens.visual_kept": 64.0})
    write_result(tmp_path, "other", f"{MODEL}", FULL, model="llava_hf")  # another lmms-eval model: not ours
    rows = {r["method"]: r for r in load_lmms_eval(tmp_path)}
    assert set(rows) == {"full", "resprune-llava15"}
    full, rp = rows["full"], rows["resprune-llava15"]
    assert full["budget"] is None and rp["budget"] == 64 and rp["selector"] == "residual_energy"
    assert full["metrics"]["mme"] == pytest.approx(1860.0)  # MME: perception + cognition
    assert full["metrics"]["gqa"] == pytest.approx(62.0) and full["metrics"]["pope"] == pytest.approx(85.9)
    assert rp["metrics"]["gqa"] == pytest.approx(58.9)  # the newer file's score
    assert rp["metrics"]["gqa.exact_match"] == pytest.approx(0.589)  # lmms-eval's raw value
    assert rp["metrics"]["pope.pope_accuracy"] == pytest.approx(0.87)
    assert not any("stderr" in k for k in rp["metrics"])
    assert rp["metrics"]["flops.ratio"] == pytest.approx(0.2) and rp["metrics"]["tokens.visual_kept"] == 64
    assert rp["tasks"] == ["gqa", "mme", "pope"] and rp["examples"] == 300 and len(rp["sources"]) == 2
    expected = (58.9 / 62.0 + 1600.0 / 1860.0 + 87.61 / 85.9) / 3  # the paper's Rel.: mean score / full score
    assert rp["rel"] == pytest.approx(expected)
    assert full["rel"] == pytest.approx(1.0)
    assert lmms_columns(rows.values()) == ["mme", "gqa", "pope", "tokens.visual_kept", "flops.ratio",
                                           "latency.selection_ms"]


def test_reader_separates_what_changes_numbers(tmp_path):
    """Runs differing in an override or in a run setting (limit) are different rows."""
    write_result(tmp_path, "a", f"{MODEL},pipeline=resprune-llava15,budget=64", {"gqa": {"exact_match": 0.5}})
    write_result(tmp_path, "b", f"{MODEL},pipeline=resprune-llava15,budget=64,selector.params.alpha=0.3",
                 {"gqa": {"exact_match": 0.4}})
    path = write_result(tmp_path, "c", f"{MODEL},pipeline=resprune-llava15,budget=64", {"gqa": {"exact_match": 0.7}})
    data = json.loads(path.read_text())
    data["config"]["limit"] = 10
    path.write_text(json.dumps(data))
    rows = load_lmms_eval(tmp_path)
    assert len(rows) == 3
    labels = sorted(r["label"] for r in rows)
    assert labels == ["resprune-llava15 budget=64", "resprune-llava15 budget=64 (limit=10)",
                      "resprune-llava15 selector.params.alpha=0.3 budget=64"]
    alpha = next(r for r in rows if "alpha" in r["label"])
    assert alpha["params"]["selector.params.alpha"] == 0.3 and alpha["rel"] is None  # no full row: no Rel.


def test_group_tasks_count_once(tmp_path):
    groups = {"pope_full": ["pope_adv", "pope_pop"], "pope_adv": [], "pope_pop": []}
    scores = {"pope_full": {"pope_f1_score": 0.85}, "pope_adv": {"pope_f1_score": 0.84},
              "pope_pop": {"pope_f1_score": 0.86}}
    write_result(tmp_path, "g", f"{MODEL},pipeline=none", scores, groups=groups)
    (row,) = load_lmms_eval(tmp_path)
    assert row["tasks"] == ["pope_full"]  # the group, not its members too
    assert row["metrics"]["pope_adv.pope_f1_score"] == pytest.approx(0.84)  # members' details kept


def test_unreadable_and_foreign_folders_name_the_problem(tmp_path):
    with pytest.raises(InvalidInputError, match="no lmms-eval result files"):
        load_lmms_eval(tmp_path)
    write_result(tmp_path, "other", MODEL, FULL, model="llava_hf")
    with pytest.raises(InvalidInputError, match="--model resprune"):
        load_lmms_eval(tmp_path)
    torn = tmp_path / "x" / "20261128_120000_results.json"
    torn.parent.mkdir()
    torn.write_text('{"results": {"gqa": {"exact_')  # an interrupted write
    with pytest.raises(InvalidInputError, match=r"20261128_120000_results\.json.*half-written"):
        load_lmms_eval(tmp_path)


def test_report_on_lmms_eval_folder_has_table_i_layout(tmp_path):
    write_result(tmp_path, "full", f"{MODEL},pipeline=none", FULL, stats={"tokens.visual_kept": 576.0,
                                                                          "flops.ratio": 1.0})
    for budget, gqa in ((64, 0.58), (128, 0.60)):
        for pipe, delta in (("resprune-llava15", 0.0), ("fastv", -0.05)):
            write_result(tmp_path, f"{pipe}{budget}", f"{MODEL},pipeline={pipe},budget={budget}",
                         {"gqa": {"exact_match": gqa + delta}},
                         stats={"tokens.visual_kept": float(budget), "flops.ratio": budget / 576})
    assert len(load_results(tmp_path)) == 5  # report's loader detects the lmms-eval folder
    table = tmp_path / "table.csv"
    assert cli(["report", str(tmp_path), "--no-plots", "--csv", str(table)]) == 0
    text = (tmp_path / "report.md").read_text()
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    assert header == "| method | mme | gqa | pope | tokens.visual_kept | flops.ratio | Rel. |"  # the paper's order
    order = [line.split("|")[1].strip() for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert order == ["full", "**budget 128**", "fastv", "resprune-llava15", "**budget 64**", "fastv",
                     "resprune-llava15"]
    assert "| full | 1860 | 62 | 85.9 | 576 | 1 | 100.0 |" in lines
    assert "| resprune-llava15 | – | **58** | – | 64 | 0.111 | 93.5 |" in lines  # Rel. over shared tasks: 58 / 62
    with table.open() as f:
        records = list(csv.DictReader(f))
    assert len(records) == 5 and {"gqa", "gqa.exact_match", "flops.ratio", "pipeline"} <= set(records[0])


def test_to_pandas_on_lmms_eval_rows(tmp_path):
    """The DataFrame of docs/lmms-eval.md: a pivot of Rel. and of a task by method x budget."""
    pd = pytest.importorskip("pandas")
    from resprune import ResultTable

    write_result(tmp_path, "full", f"{MODEL},pipeline=none", FULL)
    for budget, gqa in ((64, 0.558), (128, 0.589)):
        write_result(tmp_path, f"rp{budget}", f"{MODEL},pipeline=resprune-llava15,budget={budget}",
                     {"gqa": {"exact_match": gqa}})
    frame = ResultTable(load_results(tmp_path)).to_pandas()
    assert {"gqa", "gqa.exact_match", "mme", "pipeline", "rel"} <= set(frame.columns)
    pruned = frame[frame["method"] != "full"]
    rel = pruned.pivot_table(index="method", columns="budget", values="rel")
    assert rel.loc["resprune-llava15", 64] == pytest.approx(55.8 / 62.0)
    assert pruned.pivot_table(index="method", columns="budget", values="gqa").loc["resprune-llava15", 128] == \
        pytest.approx(58.9)
    assert pd.isna(frame.loc[frame["method"] != "full", "mme"]).all()


def test_a_pipeline_yaml_that_is_gone_keeps_the_run_settings(tmp_path):
    write_result(tmp_path, "gone", f"{MODEL},pipeline=/nowhere/mine.yaml,budget=96", {"gqa": {"exact_match": 0.5}})
    (row,) = load_lmms_eval(tmp_path)
    assert row["method"] == "mine" and row["budget"] == 96 and row["selector"] is None


def test_an_interpolation_in_a_result_file_is_shown_as_written_never_resolved(tmp_path, monkeypatch):
    secret = "do-not-print-7f3a"
    monkeypatch.setenv("RESPRUNE_TEST_SECRET", secret)
    write_result(tmp_path, "env", f"{MODEL},pipeline=resprune-llava15,budget=${{oc.env:RESPRUNE_TEST_SECRET}},"
                                  f"selector.params.alpha=${{oc.env:RESPRUNE_TEST_SECRET}}",
                 {"gqa": {"exact_match": 0.5}})
    write_result(tmp_path, "unset", f"{MODEL},pipeline=resprune-llava15,budget=64,"
                                    f"selector.params.alpha=${{oc.env:RESPRUNE_NOT_SET_ANYWHERE}}",
                 {"gqa": {"exact_match": 0.4}}, date="20261128_110000")
    rows = load_lmms_eval(tmp_path)
    assert secret not in json.dumps(rows, default=str)
    labels = " ".join(r["label"] for r in rows)
    assert "${oc.env:RESPRUNE_TEST_SECRET}" in labels and "${oc.env:RESPRUNE_NOT_SET_ANYWHERE}" in labels
    assert cli(["report", str(tmp_path), "--no-plots", "--csv", str(tmp_path / "t.csv")]) == 0
    for written in (tmp_path / "report.md", tmp_path / "t.csv"):
        assert secret not in written.read_text()


def table_cells(line):
    """The cells of a markdown table line (``\\|`` inside a cell is text)."""
    import re

    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def assert_tables_well_formed(text):
    """Every markdown table in ``text``: a header, a separator and rows, all with one column count."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    assert tables
    for table in tables:
        width = len(table_cells(table[0]))
        assert all(set(c) <= set("-:") and c for c in table_cells(table[1])), table[1]
        assert [len(table_cells(line)) for line in table] == [width] * len(table), table


def test_values_that_are_not_numbers_are_warned_and_shown_as_n_a_in_a_well_formed_table(tmp_path):
    """NaN, Infinity and text scores of an lmms-eval file are never dropped without a word: each gets a
    warning naming the file, the task and the metric, and its cell reads n/a; a task whose metrics
    are all missing reads – ; every table of the report keeps one column count."""
    write_result(tmp_path, "full", f"{MODEL},pipeline=none", FULL)
    bad = write_result(tmp_path, "bad", f"{MODEL},pipeline=resprune-llava15,budget=64",
                       {"gqa": {"exact_match": float("nan")}, "pope": {"pope_f1_score": float("inf")},
                        "mme": {"mme_perception_score": "oops", "mme_cognition_score": 300.0}},
                       stats={"flops.ratio": float("-inf")})
    with pytest.warns(RuntimeWarning) as caught:
        rows = load_lmms_eval(tmp_path)
    said = [str(w.message) for w in caught]
    for key, shown in (("results.gqa.exact_match,none", "NaN"), ("results.pope.pope_f1_score,none", "Infinity"),
                       ("results.mme.mme_perception_score,none", '"oops"'),
                       ("throughput.avg_resprune.flops.ratio", "-Infinity")):
        assert any(str(bad) in m and f"{key} is {shown}, not a finite number; shown as n/a" in m for m in said), key
    pruned = next(r for r in rows if r["method"] != "full")
    assert pruned["metrics"]["gqa"] != pruned["metrics"]["gqa"]  # NaN: kept, not dropped
    with pytest.warns(RuntimeWarning):
        assert cli(["report", str(tmp_path), "--no-plots"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "| resprune-llava15 | n/a | n/a | n/a |" in text  # MME: a sum with a part that is not a number
    assert "n/a: read, but not a finite number (a warning named it)." in text
    assert_tables_well_formed(text)


def test_a_table_without_metrics_is_still_well_formed(tmp_path):
    from resprune.report import results_table

    rows = [{"model": "m", "status": "done", "method": "full", "budget": None, "metrics": {}, "rel": None},
            {"model": "m", "status": "done", "method": "a", "budget": 8, "metrics": {}, "rel": None}]
    text = results_table(rows)
    assert "lower is better for none" not in text and "shares in % ()" not in text
    assert_tables_well_formed(text)


def test_csv_cells_that_would_start_a_formula_are_escaped_and_numbers_are_not(tmp_path):
    """A handed-over result file cannot put a live formula in `report --csv`: text starting with
    =, +, -, @, tab or carriage return gets a leading quote; numeric cells stay numbers."""
    write_result(tmp_path, "full", "pretrained==HYPERLINK(1),pipeline=none", {"gqa": {"exact_match": 0.62}})
    write_result(tmp_path, "pruned", "pretrained=@SUM(1),pipeline=resprune-llava15,budget=64",
                 {"gqa": {"exact_match": -0.25}})
    table = tmp_path / "table.csv"
    assert cli(["report", str(tmp_path), "--no-plots", "--csv", str(table)]) == 0
    with table.open() as f:
        records = list(csv.DictReader(f))
    assert {r["model"] for r in records} == {"'=HYPERLINK(1)", "'@SUM(1)"}
    assert {r["gqa.exact_match"] for r in records} == {"0.62", "-0.25"}  # numbers: unchanged, a minus included
    from resprune.report import csv_text

    assert [csv_text(v) for v in ("+1", "-x", "\tx", "\rx", "ok", "", -3, 2.5)] == \
        ["'+1", "'-x", "'\tx", "'\rx", "ok", "", -3, 2.5]


def write_samples(result, task, values, *, key="exact_match"):
    """lmms-eval's --log_samples file beside ``result``: one line per doc with its metric."""
    path = result.with_name(result.name.removesuffix("_results.json") + f"_samples_{task}.jsonl")
    lines = [{"doc_id": i, "target": "x", "filtered_resps": "y", key: v} for i, v in enumerate(values)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_per_sample_logs_give_intervals_and_paired_tests_and_the_rest_says_why_not(tmp_path):
    """A planted folder: GQA and POPE per sample (--log_samples), MME without intervals (not per
    sample); the intervals are Wilson's on the logged values, the tests McNemar's, Holm-corrected."""
    from scipy import stats

    rng = __import__("random").Random(0)
    full = [1.0 if rng.random() < 0.7 else 0.0 for _ in range(60)]
    per = {"none": full,
           "resprune-llava15": [v if rng.random() < 0.9 else 1.0 - v for v in full],
           "pool": [v if rng.random() < 0.6 else 0.0 for v in full],
           "random": [v if rng.random() < 0.7 else 0.0 for v in full]}
    for pipe, values in per.items():
        scores = {"gqa": {"exact_match": sum(values) / len(values)}, "pope": {"pope_accuracy": 0.8, "pope_f1_score": 0.8},
                  "mme": {"mme_perception_score": 1400.0, "mme_cognition_score": 300.0}}
        budget = "" if pipe == "none" else ",budget=64"
        result = write_result(tmp_path, pipe, f"{MODEL},pipeline={pipe}{budget}", scores, samples=60)
        write_samples(result, "gqa", values)
        write_samples(result, "pope", [{"question_id": i, "score": float(i % 5 != 0)} for i in range(60)],
                      key="pope_accuracy")
    rows = {r["method"]: r for r in load_results(tmp_path)}
    for method, values in (("pool", per["pool"]), ("full", per["none"])):
        ci = stats.binomtest(int(sum(values)), len(values)).proportion_ci(0.95, method="wilson")
        assert rows[method]["intervals"]["gqa"] == pytest.approx([100 * ci.low, 100 * ci.high])
        assert rows[method]["intervals"]["gqa.exact_match"] == pytest.approx([ci.low, ci.high])
    assert rows["pool"]["intervals"]["pope.pope_accuracy"] == pytest.approx(
        list(stats.binomtest(48, 60).proportion_ci(0.95, method="wilson")))
    assert "mme" not in rows["pool"]["intervals"] and "pope" not in rows["pool"]["intervals"]  # F1, MME: no
    raw = {}
    for method in ("pool", "random"):
        a, b = per[method], per["resprune-llava15"]
        only_a = sum(x == 1 and y == 0 for x, y in zip(a, b))
        only_b = sum(x == 0 and y == 1 for x, y in zip(a, b))
        raw[method] = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
    low, high = sorted(raw, key=raw.get)
    want = {low: min(1.0, 2 * raw[low])}
    want[high] = max(want[low], raw[high])
    for method in ("pool", "random"):
        assert rows[method]["tests"]["against"] == "residual_energy"
        assert rows[method]["tests"]["p"]["gqa"] == pytest.approx(want[method])
    assert "tests" not in rows["resprune-llava15"]
    assert cli(["report", str(tmp_path), "--no-plots", "--split", "pool"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "mme: no interval or test, MME's score sums per-category accuracies" in text
    assert "pope: its column (pope_f1_score) has no interval, not being a mean over samples; pope.pope_accuracy" in text
    assert_tables_well_formed(text)
    easy = sum(1 for f, p in zip(per["none"], per["pool"]) if f == 1 and p == 1)
    hard = sum(1 for f, p in zip(per["none"], per["pool"]) if f == 1 and p == 0)
    easy += 48  # POPE: each task split by its own correctness; every row gets the same 48 of 60
    assert f"easy {easy}, hard {hard} examples" in text  # VTC-Bench: among what the full model gets right


def test_a_run_without_sample_logs_says_to_log_them(tmp_path):
    write_result(tmp_path, "full", f"{MODEL},pipeline=none", FULL)
    assert cli(["report", str(tmp_path), "--no-plots"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "gqa, pope: no interval or test where a run was not made with --log_samples" in text
