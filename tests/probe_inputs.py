"""Probe every reader and writer with hostile or careless input; count what each case ends in.

Run from the repository root::

    python tests/probe_inputs.py            # the table; exit status 1 if any case is silently wrong or a traceback
    python tests/probe_inputs.py --verbose  # also one line per case

Each case plants one file, folder, override or output path and classifies what resprune did:

- ``named``: a ``ResPruneError`` (or, through the CLI, exit status 2 and ``resprune: error:``
  without a traceback) whose message names what was wrong;
- ``warned``: accepted with a warning that names the problem (a skipped file, a recomputed one);
- ``ok``: accepted, and the check of the result passed (no environment value in any output,
  every table rectangular, the literal text kept, the numbers of a clean run);
- ``wrong``: accepted, but the check failed: silently wrong output;
- ``traceback``: any other exception.

Nothing here needs a network or a GPU; the run-folder cases use a tiny random LLaVA.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

SECRET = "probe-secret-5b7e"
ENV = "RESPRUNE_PROBE_SECRET"
OUTCOMES = ("named", "warned", "ok", "wrong", "traceback")


class Wrong(Exception):
    """A check of an accepted input failed: the output is silently wrong."""


def classify(case: Callable[[Path], None], folder: Path) -> tuple[str, str]:
    """Run one case in ``folder``; ``(outcome, detail)``."""
    from resprune.errors import ResPruneError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case(folder)
        except Wrong as exc:
            return "wrong", str(exc)
        except ResPruneError as exc:
            return ("named", str(exc)) if str(exc).strip() else ("wrong", "an error without a message")
        except Exception:  # noqa: BLE001 - what the probe counts
            return "traceback", traceback.format_exc(limit=-2).strip().splitlines()[-1]
    named = [w for w in caught if issubclass(w.category, (RuntimeWarning, UserWarning))]
    return ("warned", str(named[0].message)) if named else ("ok", "")


def cli(argv: list[str]) -> tuple[int, str, str]:
    from resprune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()


def cli_case(argv: list[str] | Callable[[Path], list[str]], check: Callable[[Path], None] | None = None):
    """A case that runs the CLI: exit 2 with a named error is ``named``; 0 then ``check``."""
    from resprune.errors import ResPruneError

    def run(folder: Path) -> None:
        args = argv(folder) if callable(argv) else argv
        rc, out, err = cli(args)
        if "Traceback" in err:
            raise RuntimeError(err.strip().splitlines()[-1])
        if rc == 2 and err.startswith("resprune: error: "):
            raise ResPruneError(err.strip())
        if rc != 0:
            raise RuntimeError(f"exit status {rc}: {err.strip()[-200:]}")
        if SECRET in out + err:
            raise Wrong("the environment value reached the output")
        if check is not None:
            check(folder)

    return run


def no_secret(*paths: Path) -> None:
    for path in paths:
        if path.exists() and SECRET in path.read_text(errors="replace"):
            raise Wrong(f"the environment value reached {path.name}")


def rectangular(path: Path) -> None:
    """Every markdown table of ``path`` has one column count."""
    current: list[int] = []
    for line in path.read_text().splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.replace("\\|", "").count("|"))
        else:
            if len(set(current)) > 1:
                raise Wrong(f"a table of {path.name} has rows of {sorted(set(current))} cells")
            current = []


# --- YAML pipeline and sweep files ---------------------------------------------------------------


def yaml_cases() -> dict[str, Callable[[Path], None]]:
    from resprune.config import load_config
    from resprune.sweep import load_sweep

    files = {
        "resolver": f"budget: 64\nselector: {{name: dpp}}\ndescription: ${{oc.env:{ENV}}}\n",
        "resolver in params": "budget: 64\nselector: {name: residual_energy, params: {alpha: '${oc.env:X}'}}\n",
        "python tag": "budget: !!python/object/apply:os.system ['true']\nselector: {name: dpp}\n",
        "anchor bomb": "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                       "c: [*b, *b, *b, *b, *b, *b, *b, *b]\nbudget: 64\nselector: {name: dpp}\n",
        "not a mapping": "- budget: 64\n",
        "scalar": "64\n",
        "empty": "",
        "duplicate key": "budget: 64\nbudget: 32\nselector: {name: dpp}\n",
        "unknown key": "budget: 64\nselectr: {name: dpp}\n",
        "not utf-8": b"budget: 64\ndescription: \xff\xfe\nselector: {name: dpp}\n",
        "base loop": "base: {self}\nbudget: 64\n",
        "base missing": "base: /nowhere/x.yaml\n",
        "base outside": "base: /etc/hostname\n",
        "scorers a mapping": "budget: 64\nselector: {name: dpp}\nscorers: {name: norm}\n",
        "params a list": "budget: 64\nselector: {name: dpp, params: [1, 2]}\n",
        "stages a mapping": "budget: 64\nselector: {name: null}\nstages: {layer: 2}\n",
        "stage layer text": "budget: 64\nselector: {name: null}\nstages: [{layer: two, selector: {name: topk}}]\n",
        "budget text": "budget: many\nselector: {name: dpp}\n",
        "budget negative": "budget: -3\nselector: {name: dpp}\n",
        "budget nan": "budget: .nan\nselector: {name: dpp}\n",
        "selector unknown": "budget: 64\nselector: {name: dppp}\n",
        "selector a list": "budget: 64\nselector: [dpp]\n",
        "deep nesting": "budget: 64\nselector: {name: dpp}\nbackbone: {params: " + "{a: " * 60 + "1" + "}" * 61 + "\n",
        "huge budget": "budget: 1e400\nselector: {name: dpp}\n",
        "bool budget": "budget: true\nselector: {name: dpp}\n",
        "model_type unknown": "budget: 64\nselector: {name: dpp}\nbackbone: {model_type: gpt2}\n",
    }
    escaped = "budget: 64\nselector: {name: dpp}\ndescription: '\\${oc.env:%s}'\n" % ENV
    cases: dict[str, Callable[[Path], None]] = {}
    for name, text in files.items():
        def case(folder: Path, name: str = name, text: str | bytes = text) -> None:
            path = folder / "c.yaml"
            data = text.replace("{self}", str(path)) if isinstance(text, str) else text
            path.write_bytes(data.encode() if isinstance(data, str) else data)
            cfg = load_config(path)
            if SECRET in str(cfg):
                raise Wrong("the environment value was read")
        cases[f"config: {name}"] = case

    def escaped_case(folder: Path) -> None:
        path = folder / "c.yaml"
        path.write_text(escaped)
        if load_config(path).description != "${oc.env:%s}" % ENV:
            raise Wrong("escaped text was not kept as written")
    cases["config: escaped resolver is text"] = escaped_case
    for name, text in {"resolver": f"out_dir: ${{oc.env:{ENV}}}\n", "grid a list": "grid: [1, 2]\n",
                       "metrics a mapping": "metrics: {a: 1}\n", "model an int": "model: 3\n",
                       "unknown key": "gird: {budget: [1]}\n", "limit zero": "limit: 0\n"}.items():
        def sweep_case(folder: Path, text: str = text) -> None:
            path = folder / "s.yaml"
            path.write_text(text)
            spec = load_sweep(path)
            if SECRET in str(spec):
                raise Wrong("the environment value was read")
        cases[f"sweep file: {name}"] = sweep_case
    return cases


# --- overrides and grid values -------------------------------------------------------------------


def override_cases(n_random: int) -> dict[str, Callable[[Path], None]]:
    from resprune.ablation import expand_grid
    from resprune.config import load_config
    from resprune.sweep import load_sweep

    fixed = ["description=@x", "description=`x", "budget=[1", "budget={", "selector.params.alpha=*x",
             "stages.5.layer=3", "stages.x.layer=3", "a..b=1", "=3", "budget", "budget=%x", "description=!!python/name:os.system",
             "selector.params=[1]", "scorers=5", "budget=null", "description=a|b", "selector=", "backbone.params.x=1"]
    cases: dict[str, Callable[[Path], None]] = {}
    for item in fixed:
        cases[f"override: {item}"] = lambda folder, item=item: load_config("resprune-llava15", [item])
        cases[f"sweep override: grid.{item}"] = lambda folder, item=item: load_sweep(None, [f"grid.{item}"])

    def escaped(folder: Path) -> None:
        cfg = load_config("resprune-llava15", ["description=\\${oc.env:%s}" % ENV])
        if cfg.description != "${oc.env:%s}" % ENV:
            raise Wrong(f"escaped override became {cfg.description!r}")
    cases["override: escaped resolver is text"] = escaped
    rng = random.Random(0)
    alphabet = "ab01.,:=[]{}()'\"`@*&!|%#$\\ -_\n\t" + "é中"
    keys = ["budget", "description", "selector.params.alpha", "stages.0.layer", "scorers.1.params.reduce",
            "selector", "backbone.params.scope"]
    for i in range(n_random):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        key = rng.choice(keys) if i % 4 else "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        cases[f"random override {i}"] = lambda folder, k=key, v=value: load_config("resprune-llava15", [f"{k}={v}"])
        grid_value = rng.choice([value, rng.random(), rng.randint(-5, 600), None, [value], {"a": value}])
        cases[f"random grid value {i}"] = lambda folder, k=rng.choice(keys[:4]), v=grid_value: expand_grid(
            "resprune-llava15", {k: [v]})
    return cases


# --- lmms-eval result files ----------------------------------------------------------------------


def _result(folder: Path, name: str, model_args: str, *, date: str = "20261128_100000", edit=None) -> Path:
    data = {"results": {"gqa": {"alias": "gqa", "exact_match,none": 0.5, "exact_match_stderr,none": 0.01}},
            "group_subtasks": {"gqa": []}, "higher_is_better": {"gqa": {"exact_match": True}},
            "n-samples": {"gqa": {"original": 10, "effective": 10}},
            "config": {"model": "resprune", "model_args": model_args, "limit": None},
            "throughput": {"avg_resprune.tokens.visual_kept": 64.0}, "date": date}
    if edit is not None:
        edit(data)
    path = folder / "org__m" / f"{date}_{name}_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def lmms_cases() -> dict[str, Callable[[Path], None]]:
    base = "pretrained=org/m,pipeline=resprune-llava15"

    def report(folder: Path, *, extra_good: bool) -> None:
        if extra_good:
            _result(folder / "r", "good", f"{base},budget=32", date="20261128_090000")
        rc, out, err = cli(["report", str(folder / "r"), "--no-plots", "--csv", str(folder / "t.csv")])
        if "Traceback" in err:
            raise RuntimeError(err.strip().splitlines()[-1])
        if rc == 2:
            from resprune.errors import ResPruneError
            raise ResPruneError(err.strip())
        if rc:
            raise RuntimeError(f"exit status {rc}")
        no_secret(folder / "r" / "report.md", folder / "t.csv")
        rectangular(folder / "r" / "report.md")
        if err.strip():
            warnings.warn(err.strip().splitlines()[0], RuntimeWarning)

    edits = {
        "model_args a list": lambda d: d["config"].__setitem__("model_args", ["pipeline=none"]),
        "model_args an int": lambda d: d["config"].__setitem__("model_args", 7),
        "model_args a mapping": lambda d: d["config"].__setitem__("model_args", {"pipeline": "none"}),
        "group_subtasks an int": lambda d: d["group_subtasks"].__setitem__("gqa", 3),
        "group_subtasks a list": lambda d: d.__setitem__("group_subtasks", ["gqa"]),
        "throughput a list": lambda d: d.__setitem__("throughput", [1, 2]),
        "throughput value text": lambda d: d["throughput"].__setitem__("avg_resprune.tokens.visual_kept", "x"),
        "n-samples a list": lambda d: d["n-samples"].__setitem__("gqa", [10]),
        "effective text": lambda d: d["n-samples"]["gqa"].__setitem__("effective", "abc"),
        "effective NaN": lambda d: d["n-samples"]["gqa"].__setitem__("effective", float("nan")),
        "effective negative": lambda d: d["n-samples"]["gqa"].__setitem__("effective", -1),
        "results entry a list": lambda d: d["results"].__setitem__("gqa", [0.5]),
        "results a list": lambda d: d.__setitem__("results", [1]),
        "metric value text": lambda d: d["results"]["gqa"].__setitem__("exact_match,none", "high"),
        "metric value NaN": lambda d: d["results"]["gqa"].__setitem__("exact_match,none", float("nan")),
        "higher_is_better a list": lambda d: d.__setitem__("higher_is_better", [True]),
        "config missing": lambda d: d.pop("config"),
        "date a list": lambda d: d.__setitem__("date", [2026]),
        "task name with pipe and newline": lambda d: d["results"].__setitem__("g|q\na", {"x,none": 0.1}),
    }
    args = {
        "env interpolation in budget": f"{base},budget=${{oc.env:{ENV}}}",
        "env interpolation in a param": f"{base},budget=64,selector.params.alpha=${{oc.env:{ENV}}}",
        "env interpolation in description": f"{base},description=${{oc.env:{ENV}}}",
        "env interpolation in pipeline": f"pretrained=org/m,pipeline=${{oc.env:{ENV}}}",
        "env interpolation in pretrained": f"pretrained=${{oc.env:{ENV}}},pipeline=none",
        "unset interpolation": f"{base},budget=${{oc.env:RESPRUNE_PROBE_UNSET}}",
        "broken interpolation": f"{base},budget=${{oc.env:",
        "not a YAML value": f"{base},description=@x",
        "missing pipeline": "pretrained=org/m,pipeline=/nowhere/p.yaml,budget=64",
        "pipeline with a resolver": "pretrained=org/m,pipeline={resolver},budget=64",
        "not key=value": f"{base},budget",
        "name with a pipe": "pretrained=org|m\nx,pipeline=none",
    }
    cases: dict[str, Callable[[Path], None]] = {}
    for name, change in edits.items():
        for extra in (False, True):
            def case(folder: Path, change=change, extra=extra) -> None:
                _result(folder / "r", "bad", f"{base},budget=64", edit=change)
                report(folder, extra_good=extra)
            cases[f"lmms result: {name}{' (beside a good file)' if extra else ''}"] = case
    for name, model_args in args.items():
        def case(folder: Path, model_args=model_args) -> None:
            resolver = folder / "p.yaml"
            resolver.write_text(f"budget: 64\nselector: {{name: dpp}}\ndescription: ${{oc.env:{ENV}}}\n")
            _result(folder / "r", "x", model_args.replace("{resolver}", str(resolver)))
            report(folder, extra_good=False)
        cases[f"lmms result: {name}"] = case

    def torn(folder: Path) -> None:
        path = _result(folder / "r", "t", f"{base},budget=64")
        path.write_text(path.read_text()[:40])
        report(folder, extra_good=False)
    cases["lmms result: torn file"] = torn

    def foreign(folder: Path) -> None:
        _result(folder / "r", "f", "pretrained=x", edit=lambda d: d["config"].__setitem__("model", "llava_hf"))
        report(folder, extra_good=False)
    cases["lmms result: another model's file only"] = foreign

    for name, target in {"file outside": "file", "folder outside": "folder", "file inside": "inside",
                         "loop": "loop"}.items():
        def case(folder: Path, target=target) -> None:
            outside = _result(folder / "elsewhere", "o", f"{base},budget=8")
            root = folder / "r"
            _result(root, "in", f"{base},budget=64")
            link = root / "l_results.json" if target in ("file", "inside") else root / "sub"
            src = {"file": outside, "folder": outside.parent, "inside": next(root.rglob("*_in_results.json")),
                   "loop": root}[target]
            link.symlink_to(src, target_is_directory=src.is_dir())
            report(folder, extra_good=False)
            if "budget 8" in (root / "report.md").read_text():
                raise Wrong("read a result file from outside the folder")
        cases[f"lmms result: symlinked {name}"] = case
    return cases


# --- run folders and reference files -------------------------------------------------------------


def run_folder_cases(model: tuple) -> dict[str, Callable[[Path], None]]:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    import resprune

    def study():
        lvlm, processor = model
        return resprune.Ablation("resprune-llava15", {"budget": [16]}, model=lvlm, processor=processor,
                                 metrics=["fidelity"], limit=1, max_new_tokens=2, progress=False)

    clean: dict[str, float] = {}

    def numbers(table) -> dict[str, float]:
        return {f"{r['method']}|{k}": round(v, 5) for r in table for k, v in r["metrics"].items()}

    def base_run(folder: Path) -> Path:
        run = folder / "run"
        table = study().run(run)
        if not clean:
            clean.update(numbers(table))
        return run

    def rerun_matches(run: Path) -> None:
        if numbers(study().run(run)) != clean:
            raise Wrong("the rerun's numbers differ from a clean run's")

    cases: dict[str, Callable[[Path], None]] = {}
    poisons = {"int64 logits": lambda t: t.round().to(torch.int64), "bool logits": lambda t: t > 0,
               "bf16 logits": lambda t: t.to(torch.bfloat16), "NaN logits": lambda t: t * float("nan"),
               "short logits": lambda t: t[:-1], "2-d logits": lambda t: t[None], "empty logits": lambda t: t[:0]}
    for name, change in poisons.items():
        def case(folder: Path, change=change) -> None:
            run = base_run(folder)
            shutil.rmtree(run / "cells")
            for path in (run / "reference").iterdir():
                with safe_open(str(path), framework="pt") as fh:
                    meta, logits = fh.metadata(), fh.get_tensor("first_logits")
                save_file({"first_logits": change(logits).contiguous()}, str(path), metadata=meta)
            rerun_matches(run)
        cases[f"reference: {name}"] = case
    for name, edit in {"token count text": lambda info: info.__setitem__("tokens", "many"),
                       "answer missing": lambda info: info.pop("answer"),
                       "prefill NaN": lambda info: info.__setitem__("prefill_ms", float("nan"))}.items():
        def case(folder: Path, edit=edit) -> None:
            run = base_run(folder)
            shutil.rmtree(run / "cells")
            for path in (run / "reference").iterdir():
                with safe_open(str(path), framework="pt") as fh:
                    meta, logits = dict(fh.metadata()), fh.get_tensor("first_logits")
                info = json.loads(meta["reference"])
                edit(info)
                meta["reference"] = json.dumps(info)
                save_file({"first_logits": logits}, str(path), metadata=meta)
            rerun_matches(run)
        cases[f"reference: {name}"] = case
    for name, data in {"truncated": None, "empty": b""}.items():
        def case(folder: Path, data=data) -> None:
            run = base_run(folder)
            shutil.rmtree(run / "cells")
            for path in (run / "reference").iterdir():
                raw = path.read_bytes()
                path.write_bytes(raw[: len(raw) // 2] if data is None else data)
            rerun_matches(run)
        cases[f"reference: {name} file"] = case

    def pickle(folder: Path) -> None:
        run = base_run(folder)
        torch.save({"x": 1}, run / "reference" / "x.pt")
        study().run(run)
    cases["reference: a planted pickle"] = pickle

    lines = {"not JSON": "{oops", "not an object": "[1]", "missing keys": '{"index": 0}',
             "metric text": '{"index": 0, "record": "x", "metrics": {"a": "b"}}'}
    for name, line in lines.items():
        def case(folder: Path, line=line) -> None:
            run = base_run(folder)
            cell = next((run / "cells").iterdir())
            path = cell / "examples.rank0.jsonl"
            path.write_text(line + "\n" + path.read_text())
            study().run(run)
        cases[f"run folder: example line {name}"] = case

    def torn(folder: Path) -> None:
        run = base_run(folder)
        cell = next((run / "cells").iterdir())
        with open(cell / "examples.rank0.jsonl", "a") as fh:
            fh.write('{"index": 0, "rec')
        rerun_matches(run)
    cases["run folder: torn last line"] = torn

    for name, target in {"results.jsonl outside": "results", "cell folder outside": "cell",
                         "reference folder outside": "reference", "examples file outside": "examples"}.items():
        def case(folder: Path, target=target) -> None:
            run = base_run(folder)
            outside = folder / "outside"
            outside.mkdir()
            cell = next((run / "cells").iterdir())
            victim = {"results": run / "results.jsonl", "cell": cell, "reference": run / "reference",
                      "examples": cell / "examples.rank0.jsonl"}[target]
            moved = outside / victim.name
            shutil.move(str(victim), moved)
            victim.symlink_to(moved, target_is_directory=moved.is_dir())
            before = {p: p.stat().st_mtime_ns for p in outside.rglob("*")}
            if target == "results":
                cli_case(["report", str(run), "--no-plots"])(folder)
            else:
                study().run(run)
            if any(p.stat().st_mtime_ns != t for p, t in before.items()):
                raise Wrong("wrote through a symlink leading outside the run folder")
        cases[f"run folder: {name}"] = case

    for name, rows in {
        "names with pipes and newlines": [{"model": "m|x\ny", "status": "done", "method": "a|b\nc", "budget": 8,
                                           "metrics": {"x|y\nz": 1.0}, "label": "l|\n", "reason": "r|\n"}],
        "a row that is a list": [[1, 2]],
        "metrics a list": [{"model": "m", "status": "done", "method": "x", "budget": 8, "metrics": [1, 2]}],
        "a model that is a number": [{"model": 3, "status": "done", "method": "x", "budget": 8, "metrics": {}}],
        "a method that is a list": [{"model": "m", "status": "done", "method": ["x"], "budget": 8, "metrics": {}}],
        "params a list": [{"model": "m", "status": "done", "method": "x", "budget": 8, "metrics": {}, "params": [1]}],
        "a metric that is text": [{"model": "m", "status": "done", "method": "x", "budget": 8, "metrics": {"k": "v"}}],
        "an unknown status": [{"model": "m", "status": "great", "method": "x", "budget": 8, "metrics": {}}],
        "a budget that is a list": [{"model": "m", "status": "done", "method": "x", "budget": [8], "metrics": {}}],
        "a row without keys": [{"model": "m"}],
        "formula-like names": [{"model": "=cmd|' /C calc'!A0", "status": "done", "method": "@SUM(1)",
                                "budget": 8, "metrics": {"+x": 1.0}}],
    }.items():
        def case(folder: Path, rows=rows) -> None:
            run = folder / "r"
            run.mkdir()
            (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            cli_case(["report", str(run), "--no-plots"], lambda f: rectangular(run / "report.md"))(folder)
        cases[f"run folder: results with {name}"] = case
    return cases


# --- outputs that cannot be written --------------------------------------------------------------


def output_cases() -> dict[str, Callable[[Path], None]]:
    from resprune.data import photo_path

    photo = str(photo_path("coffee"))

    def results(folder: Path) -> Path:
        run = folder / "run"
        run.mkdir(exist_ok=True)
        (run / "results.jsonl").write_text(json.dumps({"model": "m", "status": "done", "method": "full",
                                                       "budget": None, "metrics": {"flops.ratio": 1.0}}) + "\n")
        return run

    def file(folder: Path) -> Path:
        (folder / "afile").write_text("x")
        return folder / "afile"

    def folder_(folder: Path) -> Path:
        (folder / "adir").mkdir(exist_ok=True)
        return folder / "adir"

    image = ["--model", "tiny:llava", "--image", photo, "--prompt", "hi", "--max-new-tokens", "1"]
    return {
        "sweep --out a file": cli_case(lambda f: ["sweep", "--quiet", "--out", str(file(f)), "limit=1"]),
        "sweep --out /proc": cli_case(["sweep", "--quiet", "--out", "/proc/x", "limit=1"]),
        "sweep --out under a file": cli_case(lambda f: ["sweep", "--quiet", "--out", str(file(f) / "x"), "limit=1"]),
        "report --csv a folder": cli_case(lambda f: ["report", str(results(f)), "--no-plots", "--csv",
                                                     str(folder_(f))]),
        "report --csv /proc": cli_case(lambda f: ["report", str(results(f)), "--no-plots", "--csv", "/proc/x/t.csv"]),
        "report: report.md a folder": cli_case(lambda f: ["report", str(results(f)), "--no-plots"]
                                               if (results(f) / "report.md").mkdir() is None else []),
        "report: plots a file": cli_case(lambda f: ["report", str(results(f))]
                                         if (results(f) / "plots").write_text("x") else []),
        "demo --out a folder": cli_case(lambda f: ["demo", "--out", str(folder_(f))]),
        "demo --out /proc": cli_case(["demo", "--out", "/proc/x/y.png"]),
        "run --out a folder": cli_case(lambda f: ["run", "resprune-llava15", *image, "--out", str(folder_(f))]),
        "visualize --out /proc": cli_case(["visualize", "resprune-llava15", "--model", "tiny:llava", "--image", photo,
                                           "--out", "/proc/x/o.png"]),
        "visualize --out without a suffix": cli_case(lambda f: ["visualize", "resprune-llava15", "--model",
                                                                "tiny:llava", "--image", photo, "--out", str(f / "o")]),
        "demo --out .xyz": cli_case(lambda f: ["demo", "--out", str(f / "o.xyz")]),
        "visualize --out under a file": cli_case(lambda f: ["visualize", "resprune-llava15", "--model", "tiny:llava",
                                                            "--image", photo, "--out", str(file(f) / "o.png")]),
    }


# --- videos: files, folders of frames, clips in batches --------------------------------------------


def video_cases() -> dict[str, Callable[[Path], None]]:
    """Hostile and careless videos through ``resprune run`` / ``visualize --video``, the file reader
    and the batch builders. Accepted ones are checked: the frames read are the ones written."""
    import numpy as np
    from PIL import Image

    from resprune.data import video_path
    from resprune.models import load_model
    from resprune.video import Video, load_video, read_video_file, video_chat_inputs

    def run(video: Callable[[Path], str], model: str = "tiny:qwen2_5_vl", config: str = "resprune-video"):
        return cli_case(lambda f: ["run", config, "--model", model, "--video", video(f), "--prompt", "hi",
                                   "--max-new-tokens", "1"])

    def write(name: str, data: bytes) -> Callable[[Path], str]:
        def make(folder: Path) -> str:
            (folder / name).write_bytes(data)
            return str(folder / name)
        return make

    def frames(sizes: list[tuple[int, int]], extra: Callable[[Path], None] | None = None) -> Callable[[Path], str]:
        def make(folder: Path) -> str:
            d = folder / "frames"
            d.mkdir()
            for i, size in enumerate(sizes):
                Image.new("RGB", size, (10 * i, 0, 0)).save(d / f"{i:03d}.png")
            if extra is not None:
                extra(d)
            return str(d)
        return make

    def dir_named(name: str) -> Callable[[Path], str]:
        def make(folder: Path) -> str:
            (folder / name).mkdir()
            return str(folder / name)
        return make

    def png_named_mp4(folder: Path) -> str:
        Image.new("RGB", (32, 32)).save(folder / "x.png")
        (folder / "x.png").rename(folder / "x.mp4")
        return str(folder / "x.mp4")

    def truncated(folder: Path) -> str:
        data = video_path("cut").read_bytes()
        (folder / "cut.mp4").write_bytes(data[: len(data) // 3])
        return str(folder / "cut.mp4")

    def frames_round_trip(folder: Path) -> None:
        clip = read_video_file(video_path("cut"), 8)
        greys = [float(np.asarray(f, dtype=np.float32).mean()) for f in clip.frames]
        if len(clip.frames) != 8 or abs(greys[0] - greys[3]) > 2 or abs(greys[0] - greys[4]) < 2:
            raise Wrong(f"the bundled clip read back as {len(clip.frames)} frames of means {greys}")

    def max_frames(value: object) -> Callable[[Path], None]:
        return lambda folder: read_video_file(video_path("cut"), value)  # type: ignore[arg-type]

    def onevision_lengths(folder: Path) -> None:
        _, proc = load_model("tiny:llava_onevision")
        clip = load_video("cut")
        video_chat_inputs(proc, [[clip], [Video(clip.frames[:3])]], ["a", "b"])

    def media_mismatch(folder: Path) -> None:
        _, proc = load_model("tiny:qwen2_5_vl")
        video_chat_inputs(proc, [[load_video("cut")]], ["a", "b"])

    return {
        "an empty file named .mp4": run(write("empty.mp4", b"")),
        "text named .mp4": run(write("notes.mp4", b"not a video at all")),
        "a PNG named .mp4": run(png_named_mp4),
        "a truncated MP4": run(truncated),
        "a file that is no video": run(write("notes.txt", b"hello")),
        "a folder named .mp4": run(dir_named("clip.mp4")),
        "an empty folder": run(dir_named("empty")),
        "frames of two sizes": run(frames([(64, 48), (48, 64)])),
        "a folder with a broken frame": run(frames([(64, 48)] * 2, lambda d: (d / "002.png").write_bytes(b"x"))),
        "a path that is not there": run(lambda f: str(f / "missing.mp4")),
        "a video on a backbone without videos": run(lambda f: str(video_path("cut")), "tiny:llava", "resprune-llava15"),
        "the bundled clip reads back": frames_round_trip,
        "max_frames=0": max_frames(0),
        "max_frames=-3": max_frames(-3),
        "max_frames=True": max_frames(True),
        "max_frames='8'": max_frames("8"),
        "OneVision videos of two lengths in a batch": onevision_lengths,
        "one media list for two prompts": media_mismatch,
    }


# --- the table -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="one line per case")
    parser.add_argument("--random", type=int, default=60, help="random overrides and grid values (each)")
    args = parser.parse_args(argv)
    os.environ[ENV] = SECRET
    from resprune.models import load_model

    areas = {"YAML config and sweep files": yaml_cases(), "overrides and grid values": override_cases(args.random),
             "lmms-eval result files": lmms_cases(), "run folders and references": run_folder_cases(
                 load_model("tiny:llava")), "unwritable outputs": output_cases(), "videos": video_cases()}
    counts: dict[str, Counter] = defaultdict(Counter)
    bad = []
    for area, cases in areas.items():
        for name, case in cases.items():
            folder = Path(tempfile.mkdtemp(prefix="resprune-probe-"))
            try:
                outcome, detail = classify(case, folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            counts[area][outcome] += 1
            if outcome in ("wrong", "traceback"):
                bad.append(f"{area} / {name}: {outcome}: {detail}")
            if args.verbose:
                print(f"{outcome:<9} {area} / {name}: {' '.join(detail.split())[:160]}")
    print("| area | tried | " + " | ".join(OUTCOMES) + " |")
    print("|---|---:|" + "---:|" * len(OUTCOMES))
    for area in areas:
        c = counts[area]
        print(f"| {area} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES) + " |")
    total = sum((counts[a] for a in areas), Counter())
    print(f"| all | {sum(total.values())} | " + " | ".join(str(total[o]) for o in OUTCOMES) + " |")
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
