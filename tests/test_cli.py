"""The ``resprune`` command line, run in-process (and once as a real process)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import resprune
from resprune import hookimpl
from resprune.cli import main
from resprune.plugins import ENTRY_POINT_GROUP

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def table_rows(out):
    rows = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3:
            rows[(parts[0], parts[1])] = parts[2:]
    return rows


def test_plugins_lists_every_builtin_with_its_provider(capsys):
    rc, out, err = run(capsys, "plugins")
    assert rc == 0 and err == ""
    assert out.splitlines()[0].split() == ["kind", "name", "plugin", "distribution"]
    rows = table_rows(out)
    host = resprune.get_host()
    for kind in ("scorers", "selectors", "injectors"):
        for entry in getattr(host, kind).entries():
            # third-party plugins installed next to resprune (examples/ in CI) are listed too
            builtin = entry.plugin.startswith("resprune.")
            assert rows[(kind[:-1], entry.name)][0] == entry.plugin
            if builtin:
                assert rows[(kind[:-1], entry.name)] == [entry.plugin, "resprune", resprune.__version__]
    assert {name for kind, name in rows if kind == "selector"} == set(host.selectors.names())
    assert {name for kind, name in rows if kind == "scorer"} == set(host.scorers.names())
    assert ("selector", "residual_energy") in rows and ("scorer", "text_relevance") in rows
    assert rows[("selector", "residual_energy")][0] == "resprune.strategies.residual_energy"
    # aliases are listed as aliases of their strategy, not as strategies of their own
    assert "resprune" not in {name for kind, name in rows if kind != "alias"}
    assert rows[("alias", "resprune")] == ["->", "selector", "residual_energy"]


def test_plugins_piped_into_head_exits_quietly():
    proc = subprocess.run(f"{sys.executable} -m resprune.cli plugins | head -1", shell=True, capture_output=True,
                          text=True, executable="/bin/bash")
    assert proc.stdout.startswith("kind") and proc.stderr == ""
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", f"{sys.executable} -m resprune.cli plugins | head -c 10"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""


def test_plugins_json(capsys):
    rc, out, _ = run(capsys, "plugins", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data == resprune.list_plugins()
    by_plugin = {row["plugin"]: row for row in data}
    assert by_plugin["resprune.strategies.token_scores"]["scorers"] == ["center", "mean_similarity", "norm"]
    assert by_plugin["resprune.strategies.residual_energy"]["aliases"] == {"resprune": "residual_energy"}
    builtin = [row for row in data if row["plugin"].startswith("resprune.")]
    assert builtin and all(row["distribution"] == "resprune" for row in builtin)
    assert all(row["distribution"] != "resprune" for row in data if row not in builtin)


class _Rotate(resprune.Selector):
    name = "rotate_cli"

    def select(self, tokens, k, scores, context):
        import torch

        return torch.arange(k).expand(tokens.shape[0], k).contiguous()


class _EP:
    def __init__(self, name, target):
        self.name, self.group, self._target = name, ENTRY_POINT_GROUP, target
        self.dist = types.SimpleNamespace(metadata={"Name": f"{name}-dist"}, version="9.9")

    def load(self):
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


def test_plugins_shows_third_party_and_failed_plugins(capsys, monkeypatch, plugin_host):
    mod = types.ModuleType("acme_cli_module")

    @hookimpl
    def resprune_register_selectors(register):
        register(_Rotate)

    mod.resprune_register_selectors = resprune_register_selectors
    eps = [_EP("acme", mod), _EP("broken", ImportError("no module named 'missing_dep'"))]
    real = resprune.plugins.metadata.entry_points
    monkeypatch.setattr(resprune.plugins.metadata, "entry_points",
                        lambda **kw: eps if kw.get("group") == ENTRY_POINT_GROUP else real(**kw))
    monkeypatch.delenv("RESPRUNE_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("RESPRUNE_STRICT_PLUGINS", raising=False)
    with pytest.warns(RuntimeWarning, match="'broken'"):
        plugin_host(autoload=True)
    rc, out, err = run(capsys, "plugins")
    assert rc == 0
    assert table_rows(out)[("selector", "rotate_cli")] == ["acme", "acme-dist", "9.9"]
    assert "FAILED" in err and "broken" in err and "ImportError: no module named 'missing_dep'" in err
    assert "FAILED" not in out


def test_configs_lists_every_shipped_config(capsys):
    rc, out, _ = run(capsys, "configs")
    assert rc == 0
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.strip()}
    shipped = resprune.shipped_configs()
    assert listed.keys() == shipped.keys()
    for name, description in shipped.items():
        assert listed[name] == description


def test_config_prints_the_resolved_yaml_with_overrides(capsys):
    rc, out, err = run(capsys, "config", "resprune-llava15", "budget=64", "selector.params.alpha=0.5")
    assert rc == 0 and err == ""
    printed = OmegaConf.create(out)
    assert printed.budget == 64 and printed.selector.params.alpha == 0.5
    assert printed.selector.params.seed == "cls_attention"
    expected = resprune.load_config("resprune-llava15", ["budget=64", "selector.params.alpha=0.5"])
    assert OmegaConf.to_container(resprune.load_config(dict(OmegaConf.to_container(printed)))) == \
        OmegaConf.to_container(expected)


def test_config_accepts_a_yaml_path(capsys, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: uniform\nbudget: 12\n")
    rc, out, _ = run(capsys, "config", str(path))
    assert rc == 0 and OmegaConf.create(out).budget == 12 and OmegaConf.create(out).selector.name == "uniform"


@pytest.mark.parametrize(("argv", "hint"), [
    (["config", "resprune-llava15", "bugdet=64"], "bugdet"),
    (["config", "resprune-llava15", "budget=0"], "budget=0 must be >= 1"),
    (["config", "resprune-llava15", "selector.params.alpah=1"], "Did you mean 'alpha'?"),
    (["config", "resprune-llava1"], "Did you mean 'resprune-llava15'?"),
    (["config", "resprune-llava15", "budget"], "key=value"),
    (["demo", "--budget", "abc"], "--budget 'abc' is not a budget"),
    (["demo", "--budget", "0"], "budget=0 must be >= 1"),
    (["demo", "--model", "tiny:nope"], "unknown tiny model 'tiny:nope'"),
])
def test_errors_are_messages_not_tracebacks(capsys, argv, hint, tmp_path):
    if argv[0] == "demo":
        argv = [*argv, "--out", str(tmp_path / "never.png")]
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert err.startswith("resprune: error: ") and hint in err
    assert "Traceback" not in err and out == ""


def test_config_selector_shorthand(capsys):
    rc, out, _ = run(capsys, "config", "resprune-llava15", "selector=divprune")
    assert rc == 0 and OmegaConf.create(out).selector.name == "divprune"


def test_demo_unknown_photo_is_an_error_message(capsys, tmp_path):
    rc, out, err = run(capsys, "demo", "--photo", "moon", "--out", str(tmp_path / "x.png"))
    assert rc == 2 and err.startswith("resprune: error: ") and "astronaut" in err


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["no-such-command"], ["config"], ["plugins", "--jsn"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "usage: resprune" in capsys.readouterr().err


def test_demo_writes_a_png_and_a_table(capsys, tmp_path):
    out_path = tmp_path / "x.png"
    rc, out, _ = run(capsys, "demo", "--out", str(out_path), "--budget", "0.25", "--photo", "chelsea")
    assert rc == 0
    assert out_path.read_bytes()[:8] == PNG_MAGIC
    assert "kept 144 of 576 visual tokens" in out  # the tiny LLaVA has LLaVA-1.5's 576 tokens
    assert "chelsea.jpg" in out
    for name in ("residual_energy", "dpp", "divprune", "topk", "uniform", "random"):
        assert any(line.split()[:1] == [name] for line in out.splitlines()), name
    assert str(out_path.resolve()) in out
    from PIL import Image

    with Image.open(out_path) as img:
        assert img.format == "PNG" and img.width > 0 and img.height > 0


def test_module_entry_point_and_console_script():
    proc = subprocess.run([sys.executable, "-m", "resprune.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: resprune")
    for command in ("plugins", "configs", "config", "demo"):
        assert command in proc.stdout
    script = Path(sys.executable).with_name("resprune")
    if not script.exists():
        pytest.skip("the resprune console script is not installed next to this interpreter")
    proc = subprocess.run([str(script), "configs"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resprune-llava15" in proc.stdout
