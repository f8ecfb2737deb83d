"""Run folders: nothing in them runs code, resumes are never stale or double-counted, damaged
files are repaired or named, and a killed sweep resumes to the results of an uninterrupted one."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import resprune
from resprune import runfiles
from resprune.data import load_records
from resprune.report import write_report
from resprune.models import load_model

METRICS = ["fidelity", "flops", "accuracy"]
GRID = {"selector": ["residual_energy", "random"], "budget": [16]}


@functools.cache
def tiny():
    return load_model("tiny:llava")


def study(grid=GRID, *, limit=2, metrics=METRICS, max_new_tokens=3, dataset=None, base="resprune-llava15", **kw):
    model, processor = tiny()
    return resprune.Ablation(base, grid, model=model, processor=processor, metrics=metrics,
                             limit=limit, model_name="tiny:llava", max_new_tokens=max_new_tokens, dataset=dataset,
                             progress=False, **kw)


def numbers(table):
    """What must not change between runs: labels, counts and every metric but timings."""
    return [(r["label"], r["status"], r["examples"], {k: round(v, 6) for k, v in r["metrics"].items()
                                                    if not k.startswith("latency")}) for r in table]


@functools.cache
def fresh(max_new_tokens=3, limit=2, dataset_key=None):
    """The numbers of an uninterrupted run into an empty folder."""
    import tempfile

    dataset = DATASETS[dataset_key] if dataset_key else None
    with tempfile.TemporaryDirectory() as folder:
        return numbers(study(max_new_tokens=max_new_tokens, limit=limit, dataset=dataset).run(folder))


def sample_records():
    return load_records(None)


DATASETS = {
    "a": [dict(r) for r in sample_records()[:2]],
    "b": [{**r, "question": "What colour dominates? " + r["question"]} for r in sample_records()[:2]],
}


# --- security ------------------------------------------------------------------------------------


class Payload:
    def __reduce__(self):
        return (os.system, (f"echo pwned > {Payload.marker}",))


def test_a_planted_pickle_in_a_run_folder_is_refused_and_never_executed(tmp_path):
    out = tmp_path / "run"
    s = study()
    s.run(out)
    Payload.marker = tmp_path / "MARKER"
    torch.save({"answer": Payload(), "first_logits": torch.zeros(3), "tokens": 1}, out / "reference" / "ex00000.pt")
    for action in (lambda: study().run(out), lambda: study().collect(out)):
        with pytest.raises(runfiles.RunFileError, match=r"ex00000.pt.*never loaded.*arbitrary code"):
            action()
    assert not Payload.marker.exists()
    # the CLI says it in one line and exits 2
    proc = subprocess.run([sys.executable, "-m", "resprune.cli", "sweep", "--quiet", "--out", str(out), "limit=2",
                           "max_new_tokens=3", "grid.budget=[16]", "grid.selector=[residual_energy,random]",
                           f"metrics={METRICS}".replace("'", "")], capture_output=True, text=True)
    assert proc.returncode == 2 and "never loaded" in proc.stderr and "Traceback" not in proc.stderr
    assert not Payload.marker.exists()
    write_report(out, plots=False)  # reports read JSON only
    assert not Payload.marker.exists()


def test_references_hold_only_tensors_and_json(tmp_path):
    study().run(tmp_path)
    files = sorted((tmp_path / "reference").iterdir())
    assert files and all(f.suffix == ".safetensors" for f in files)
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as fh:
        assert list(fh.keys()) == ["first_logits"]
        assert set(json.loads(fh.metadata()["reference"])) == {"answer", "tokens", "prefill_ms", "peak_mib"}


# --- stale and concurrent runs --------------------------------------------------------------------


def test_a_changed_generation_length_recomputes_instead_of_reusing_stale_cells(tmp_path):
    assert numbers(study(max_new_tokens=3).run(tmp_path)) == fresh(3)
    again = study(max_new_tokens=1).run(tmp_path)
    assert numbers(again) == fresh(1)
    spec = json.loads((tmp_path / "sweep.json").read_text())
    assert spec["max_new_tokens"] == 1 and spec["identity"]["max_new_tokens"] == 1


def test_another_dataset_in_the_same_folder_is_recomputed(tmp_path):
    study(dataset=DATASETS["a"]).run(tmp_path)
    assert numbers(study(dataset=DATASETS["b"]).run(tmp_path)) == fresh(dataset_key="b")
    assert numbers(study(dataset=DATASETS["a"]).run(tmp_path)) == fresh(dataset_key="a")


def test_a_changed_image_at_the_same_path_is_a_different_record(tmp_path):
    from PIL import Image

    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(photo)
    records = [{"image": str(photo), "question": "What is it?", "answers": ["red"]}]
    s = study(dataset=records, limit=None)
    key = s.record_keys[0]
    Image.new("RGB", (64, 48), (10, 200, 10)).save(photo)
    assert study(dataset=records, limit=None).record_keys[0] != key


def test_a_larger_limit_reuses_the_examples_already_done(tmp_path):
    study(limit=1).run(tmp_path)
    cell = next(p for p in (tmp_path / "cells").iterdir())
    before = (cell / "examples.rank0.jsonl").read_text()
    table = study(limit=2).run(tmp_path)
    assert numbers(table) == fresh(limit=2)
    assert (cell / "examples.rank0.jsonl").read_text().startswith(before)  # appended to, not redone


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from resprune.runfiles import RunLock\n"
        f"lock = RunLock({str(tmp_path)!r}); lock.acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runfiles.RunLockedError, match=rf"'{tmp_path}' is being written by pid {holder.pid}"):
            study().run(tmp_path)
        proc = subprocess.run([sys.executable, "-m", "resprune.cli", "sweep", "--quiet", "--out", str(tmp_path),
                               "limit=1"], capture_output=True, text=True)
        assert proc.returncode == 2 and "is being written by" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    study().run(tmp_path)  # the kernel dropped the lock with its process


def test_duplicate_example_lines_are_counted_once(tmp_path):
    s = study()
    first = numbers(s.run(tmp_path))
    for path in (tmp_path / "cells").glob("*/examples.rank0.jsonl"):
        lines = path.read_text().splitlines()
        path.write_text("\n".join(lines + lines) + "\n")  # what two interleaved runs used to leave
    assert numbers(s.collect(tmp_path)) == first


# --- damaged files ------------------------------------------------------------------------------------


def finished(tmp_path):
    s = study()
    table = s.run(tmp_path)
    cell = tmp_path / "cells" / table[1]["cell"]
    return s, numbers(table), cell


def test_a_torn_last_line_is_dropped_repaired_and_recomputed(tmp_path):
    s, first, cell = finished(tmp_path)
    examples = cell / "examples.rank0.jsonl"
    data = examples.read_bytes()
    examples.write_bytes(data[:300] if len(data) > 300 else data[: len(data) // 2])  # the reproduction
    (cell / "summary.json").unlink()
    with pytest.warns(RuntimeWarning, match="torn last line"):
        again = s.run(tmp_path)
    assert numbers(again) == first
    indices = [json.loads(line)["index"] for line in examples.read_text().splitlines()]
    assert sorted(indices) == [0, 1] and examples.read_bytes().endswith(b"\n")


def test_a_nul_padded_tail_is_a_torn_write(tmp_path):
    s, first, cell = finished(tmp_path)
    examples = cell / "examples.rank0.jsonl"
    lines = examples.read_bytes().splitlines(keepends=True)
    examples.write_bytes(lines[0] + lines[1][:10] + b"\0" * 64)  # what a power loss leaves
    (cell / "summary.json").unlink()
    with pytest.warns(RuntimeWarning, match="torn last line"):
        assert numbers(s.run(tmp_path)) == first
    assert b"\0" not in examples.read_bytes()


def test_a_damaged_line_elsewhere_names_the_file_and_line(tmp_path):
    s, _, cell = finished(tmp_path)
    examples = cell / "examples.rank0.jsonl"
    lines = examples.read_text().splitlines()
    examples.write_text("{oops\n" + "\n".join(lines) + "\n")
    with pytest.raises(runfiles.RunFileError, match=rf"{examples.name}:1: damaged line"):
        s.collect(tmp_path)
    examples.write_text('{"index": 0}\n' + "\n".join(lines) + "\n")
    with pytest.raises(runfiles.RunFileError, match=rf"{examples.name}:1: not an example line"):
        s.collect(tmp_path)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_summary_meta_and_reference_files_are_recomputed(tmp_path, damage):
    s, first, cell = finished(tmp_path)
    victims = [cell / "summary.json", cell / "meta.rank0.json", next((tmp_path / "reference").iterdir())]
    for path in victims:
        data = path.read_bytes()
        path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="damaged"):
        table = s.run(tmp_path)
    assert numbers(table) == first
    assert json.loads((cell / "meta.rank0.json").read_text())["status"] == "done"
    assert json.loads((cell / "summary.json").read_text())["status"] == "done"


def test_whole_files_are_replaced_atomically(tmp_path):
    path = tmp_path / "f.json"
    runfiles.write_atomic(path, "old")

    def dies(tmp):
        tmp.write_text("half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runfiles.replace_with(path, dies)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_read_jsonl_rules(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n{"a": 3')
    with pytest.warns(RuntimeWarning, match="torn last line"):
        assert runfiles.read_jsonl(path) == [(1, {"a": 1}), (3, {"a": 2})]
    assert path.read_bytes().endswith(b"3")  # reading alone repairs nothing
    runfiles.read_jsonl(path, repair=True)
    assert path.read_bytes() == b'{"a": 1}\n\n{"a": 2}\n'
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n\0\0\0\0')
    assert runfiles.read_jsonl(path, repair=True) == [(1, {"a": 1}), (2, {"a": 2})]
    assert path.read_bytes() == b'{"a": 1}\n{"a": 2}\n'
    path.write_bytes(b'{"a": 1}\n\xff\xfe\n{"a": 2}\n')
    with pytest.raises(runfiles.RunFileError, match=r"x.jsonl:2: damaged line \(not UTF-8\)"):
        runfiles.read_jsonl(path)


# --- kill and resume (real subprocesses, killed in the middle of chosen writes) ---------------------

SWEEP = ["sweep", "--quiet", "limit=3", "max_new_tokens=2", "grid.budget=[16]",
         "grid.selector=[residual_energy,random]", "metrics=[fidelity,flops,accuracy]"]
KILLER = Path(__file__).with_name("kill_at.py")


def cli(*args, kill=None):
    cmd = [sys.executable, str(KILLER), *kill, "--", *args] if kill else [sys.executable, "-m", "resprune.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def rows(folder):
    return [(r["label"], r["status"], r["examples"], {k: round(v, 6) for k, v in r["metrics"].items()})
            for r in map(json.loads, (folder / "results.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_a_sweep_killed_at_several_points_resumes_to_the_uninterrupted_results(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert cli(*SWEEP, "--out", str(clean)).returncode == 0
    for kill in (["append", "-", "2"],                   # half-way through an example line
                 ["replace", "summary.json", "1"],       # between cells, while the summary is written
                 ["replace", "results.jsonl", "1"]):     # at the end, while the results are written
        proc = cli(*SWEEP, "--out", str(killed), kill=kill)
        assert proc.returncode == -signal.SIGKILL, (kill, proc.stderr[-2000:])
    done = cli(*SWEEP, "--out", str(killed))
    assert done.returncode == 0, done.stderr[-2000:]
    assert rows(killed) == rows(clean)
    for path in killed.glob("cells/*/examples.rank*.jsonl"):
        indices = [json.loads(line)["index"] for line in path.read_text().splitlines()]
        assert sorted(indices) == [0, 1, 2], path  # no example counted (or written) twice
    # the report: killed while report.md is written, then rerun
    assert cli("report", "--no-plots", str(clean)).returncode == 0
    assert cli("report", "--no-plots", str(killed), kill=["replace", "report.md", "1"]).returncode == -signal.SIGKILL
    assert not (killed / "report.md").exists()
    assert cli("report", "--no-plots", str(killed)).returncode == 0
    assert (killed / "report.md").read_text() == (clean / "report.md").read_text().replace(str(clean), str(killed))


# --- what a handed run folder holds is checked, not trusted ---------------------------------------


def _poison(path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta, logits = fh.metadata(), fh.get_tensor("first_logits")
    save_file({"first_logits": change(logits).contiguous()}, str(path), metadata=meta)


POISONS = {
    "int64": (lambda t: t.round().to(torch.int64), "torch.int64"),
    "bool": (lambda t: t > 0, "torch.bool"),
    "bf16": (lambda t: t.to(torch.bfloat16), "torch.bfloat16"),
    "nan": (lambda t: torch.where(t > t.median(), torch.nan, t), "NaN"),
    "short": (lambda t: t[:-1], "shape"),
    "2-d": (lambda t: t[None], "shape"),
}


@pytest.mark.parametrize("poison", sorted(POISONS))
def test_a_reference_that_was_never_written_so_is_recomputed_not_used(tmp_path, poison):
    import shutil

    change, named = POISONS[poison]
    study().run(tmp_path / "a")
    shutil.copytree(tmp_path / "a" / "reference", tmp_path / "b" / "reference")
    for path in (tmp_path / "b" / "reference").iterdir():
        _poison(path, change)
    with pytest.warns(RuntimeWarning, match=f"ignored a reference file whose .*{named}.*recomputed"):
        table = study().run(tmp_path / "b")
    assert numbers(table) == fresh()


def test_an_upgraded_third_party_plugin_recomputes_its_cells(tmp_path, plugin_host):
    import types

    import resprune.backbones.llava as llava
    import resprune.strategies.metrics as metrics
    import resprune.strategies.random_choice as random_choice

    def plugin(version):
        module = types.ModuleType("acme_selectors")
        module.__version__ = version

        class Acme(random_choice.RandomSelector):
            name = "acme"

        @resprune.hookimpl
        def resprune_register_selectors(register):
            register(Acme)

        module.resprune_register_selectors = resprune_register_selectors
        return module

    ids = []
    for version in ("1.0", "1.0", "1.1"):
        plugin_host(llava, metrics, random_choice, plugin(version))
        s = study({"selector": ["acme"], "budget": [16]}, base="random", metrics=["flops"], limit=1)
        table = s.run(tmp_path)
        ids.append(table[1]["cell"])
        meta = json.loads((tmp_path / "cells" / ids[-1] / "meta.rank0.json").read_text())
        assert meta["plugins"]["acme_selectors"] == version
    assert ids[0] == ids[1] != ids[2]  # the same version reuses the cell; an upgrade recomputes it
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == sorted({ids[0], ids[2]})
