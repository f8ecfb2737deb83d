"""The docs cannot rot: every Python block of every page (and the README) runs, and every
hook and built-in strategy is documented."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import resprune
from resprune import hookspecs
from resprune.config import BackboneConfig, PipelineConfig, ScorerConfig, SelectorConfig
from resprune.plugins import get_host
from resprune.reference import field_docs, render_reference, schema_table
from resprune.reference import main as reference_main
from resprune.sweep import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```python(?P<attrs>[^\n]*)\n(?P<body>.*?)^```", re.S | re.M)

RUNNER = """
import sys, traceback
blocks = {blocks!r}
for i, code in enumerate(blocks):
    try:
        exec(compile(code, f"<block {{i}}>", "exec"), {{"__name__": "__main__"}})
    except Exception:
        traceback.print_exc()
        print(f"DOC BLOCK {{i}} FAILED:\\n{{code}}", file=sys.stderr)
        sys.exit(1)
"""

# blocks that need a model download or a real checkpoint: shown, not run
NEEDS_CHECKPOINT = ("from_pretrained(",)


SNIPPET = re.compile(r'^--8<-- "(?P<path>[^":]+)(?::[^"]*)?"$', re.M)


def is_include(body: str) -> bool:
    """A block that only includes a file (pymdownx.snippets): that file is tested where it lives."""
    lines = [line for line in body.splitlines() if line.strip()]
    return bool(lines) and all(SNIPPET.match(line) for line in lines)


def page_blocks(page: Path) -> list[tuple[str, str]]:
    return [(m.group("attrs"), m.group("body")) for m in FENCE.finditer(page.read_text())
            if not is_include(m.group("body"))]


def test_included_files_exist_and_example_files_are_tested():
    included = {m.group("path") for page in PAGES for m in SNIPPET.finditer(page.read_text())}
    assert "examples/resprune-farthest-point/tests/test_plugin.py" in included
    for path in included:
        assert (ROOT / "docs" / path).is_file() or (ROOT / path).is_file(), f"snippet '{path}' not found"
    ci = (ROOT / ".ci" / "run").read_text()  # the example's code shown in the docs runs in CI
    assert "pip install -e examples/resprune-farthest-point" in ci
    assert "python -m pytest examples/resprune-farthest-point/tests" in ci


@pytest.mark.parametrize("page", [p for p in PAGES if page_blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path):
    blocks = page_blocks(page)
    for attrs, body in blocks:  # title="x.py" blocks are files the other blocks import or test
        title = re.search(r'title="([^"]+)"', attrs)
        if title:
            path = tmp_path / title.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
    runnable = [body for attrs, body in blocks if 'title="' not in attrs
                and not any(marker in body for marker in NEEDS_CHECKPOINT)]
    env = dict(os.environ, PYTHONPATH=str(tmp_path), HF_HUB_OFFLINE="1")
    if runnable:
        out = subprocess.run([sys.executable, "-c", RUNNER.format(blocks=runnable)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-4000:]
    for test in sorted(tmp_path.rglob("test_*.py")):
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-4000:]


def test_every_hook_is_documented_with_its_exact_signature():
    text = (ROOT / "docs" / "plugins.md").read_text()
    hooks = [name for name, fn in vars(hookspecs).items() if name.startswith("resprune_register_") and callable(fn)]
    assert len(hooks) == 5
    for name in hooks:
        sig = str(inspect.signature(getattr(hookspecs, name))).replace("'", "")
        assert f"{name}{sig}" in text, f"docs/plugins.md does not show `{name}{sig}`"


def test_configuration_reference_is_up_to_date():
    page = ROOT / "docs" / "reference.md"
    assert page.read_text() == render_reference(), (
        "docs/reference.md is stale: run `python -m resprune.reference --write docs/reference.md`")
    assert reference_main(["--check", str(page)]) == 0


def test_reference_check_fails_on_a_stale_page(tmp_path, capsys):
    stale = tmp_path / "reference.md"
    stale.write_text(render_reference().replace("Text guidance strength", "Text strength"))
    assert reference_main(["--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert reference_main(["--write", str(stale)]) == 0 and reference_main(["--check", str(stale)]) == 0


def test_every_builtin_strategy_and_param_is_in_the_configuration_reference():
    text = render_reference()
    host = get_host()
    for registry in (host.selectors, host.scorers, host.injectors, host.metrics):
        for entry in registry.entries():
            if entry.plugin.startswith("resprune."):
                assert f"### `{entry.name}` {{#{registry.kind}-{entry.name}}}" in text
                docs = field_docs(entry.cls.Params)
                for field in entry.cls.Params.__dataclass_fields__:
                    assert docs.get(field), f"param '{field}' of {registry.kind} '{entry.name}' has no docstring"
                    assert f"| `{field}` |" in text
    for schema in (PipelineConfig, SelectorConfig, ScorerConfig, BackboneConfig, SweepConfig):
        docs = field_docs(schema)
        for field in schema.__dataclass_fields__:
            assert docs.get(field), f"{schema.__name__}.{field} has no docstring"


def test_every_builtin_strategy_is_on_the_strategies_page():
    text = (ROOT / "docs" / "strategies.md").read_text()
    host = get_host()
    for registry in (host.selectors, host.scorers, host.injectors):
        for entry in registry.entries():
            if entry.plugin.startswith("resprune."):
                assert f"`{entry.name}`" in text, f"built-in '{entry.name}' is missing from docs/strategies.md"
                if entry.cls.Params.__dataclass_fields__ and registry.kind != "injector":
                    assert f'--8<-- "reference.md:{registry.kind}-{entry.name}"' in text, (
                        f"docs/strategies.md does not include the params table of '{entry.name}'")


def test_field_docs_reads_attribute_docstrings():
    @dataclasses.dataclass
    class Params:
        alpha: float = 1.0
        """First line
        continues here."""
        beta: int = 2
        gamma: str = "x"
        """Gamma."""

    assert field_docs(Params) == {"alpha": "First line continues here.", "gamma": "Gamma."}
    table = schema_table(Params, label="param")
    assert "| `alpha` | `float` | `1` | First line continues here. |" in table
    assert "| `beta` | `int` | `2` |  |" in table


SPHINX_ROLE = re.compile(r":(class|func|meth|attr|mod|exc|data|obj):`")


def test_docstrings_use_markdown_not_sphinx_roles():
    """mkdocstrings renders Markdown; a Sphinx role would show up raw in the API reference."""
    offenders = [f"{path.relative_to(ROOT)}:{n}" for folder in ("resprune", "strategies", "backbones")
                 for path in sorted((ROOT / folder).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if SPHINX_ROLE.search(line)]
    assert not offenders, f"Sphinx roles in docstrings: {offenders}"


def test_every_shipped_config_is_listed():
    text = (ROOT / "docs" / "configuration.md").read_text()
    for name in resprune.shipped_configs():
        assert name in text, f"shipped config '{name}' is missing from docs/configuration.md"
