"""YAML pipeline configs: schema, loading, overrides and validation (OmegaConf).

A config chooses components by registry name only (no import paths)::

    description: ResPrune on LLaVA-1.5
    budget: 64                       # int k per image, or a float ratio in (0, 1]
    scorers:
      - name: cls_attention
      - name: text_relevance         # writes the score "relevance"
        params: {reduce: max}
    selector:
      name: residual_energy
      params: {alpha: 0.75, seed: cls_attention}

``base: NAME`` starts from another config (shipped name or path) and merges this file
on top. Loading resolves everything and validates every strategy's params, so a typo
fails before any model work starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .budget import check_budget
from .errors import ConfigError, suggest
from .params import build_params
from .plugins import get_host

__all__ = [
    "StrategyConfig",
    "ScorerConfig",
    "BackboneConfig",
    "PipelineConfig",
    "load_config",
    "shipped_configs",
    "to_yaml",
]


@dataclass
class StrategyConfig:
    """A selector chosen by registry name, with its params."""

    name: str = MISSING
    """Registry name or alias of the selector (`resprune plugins` lists them)."""
    params: dict[str, Any] = field(default_factory=dict)
    """The selector's params, validated against its `Params`; missing keys get their defaults."""


@dataclass
class ScorerConfig:
    """A scorer chosen by registry name; ``output`` renames the score it writes."""

    name: str = MISSING
    """Registry name or alias of the scorer."""
    params: dict[str, Any] = field(default_factory=dict)
    """The scorer's params, validated against its `Params`."""
    output: Optional[str] = None
    """Name of the score it writes; `null` keeps the scorer's own (`text_relevance` writes `relevance`)."""


@dataclass
class BackboneConfig:
    """Backbone hints and injector params (used when attaching to a model)."""

    model_type: Optional[str] = None
    """The `model.config.model_type` the config is meant for; on another model `attach` warns and ignores `backbone.params`."""
    params: dict[str, Any] = field(default_factory=dict)
    """Injector params (e.g. `scope: per_tile` for `llava_next`), merged under keywords given to `attach`."""


@dataclass
class PipelineConfig:
    """A whole pruning pipeline: scorers, one selector, a budget."""

    budget: Any = MISSING
    """Tokens kept per image: an int k, or a float ratio in (0, 1] of each image's tokens."""
    selector: StrategyConfig = field(default_factory=StrategyConfig)
    """The one selector (`name`, `params`)."""
    scorers: list[ScorerConfig] = field(default_factory=list)
    """Scorers run before the selector, each writing one named score."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """Backbone hint and injector params."""
    description: str = ""
    """One line, shown by `resprune configs`."""
    reproduces: Optional[str] = None
    """Which paper table or setting this config reproduces, if any."""




def _config_dir():
    return resources.files("resprune") / "configs"


def shipped_configs() -> dict[str, str]:
    """Names of the configs shipped with resprune -> their descriptions."""
    out = {}
    for entry in sorted(_config_dir().iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            data = OmegaConf.create(entry.read_text())
            out[entry.name[: -len(".yaml")]] = str(data.get("description", ""))
    return out


def _read(source: str | Path, *, seen: tuple[str, ...] = ()) -> tuple[DictConfig, str]:
    """Read a shipped name or a YAML path, following ``base:``; return (config, label)."""
    text_path = Path(source)
    if text_path.suffix in (".yaml", ".yml") or text_path.exists():
        if not text_path.is_file():
            raise ConfigError(f"config file not found: {text_path}")
        label, text = str(text_path), text_path.read_text()
    else:
        if not (_config_dir() / f"{source}.yaml").is_file():
            names = shipped_configs()
            raise ConfigError(
                f"unknown config '{source}': neither a YAML file nor a shipped config.{suggest(str(source), names)} "
                f"Shipped configs: {', '.join(names)}.")
        label = f"{source} (shipped)"
        text = (_config_dir() / f"{source}.yaml").read_text()
    if label in seen:
        raise ConfigError(f"{label}: 'base' chain loops: {' -> '.join(seen + (label,))}")
    try:
        cfg = OmegaConf.create(text)
    except Exception as exc:  # yaml errors, duplicate keys
        raise ConfigError(f"{label}: cannot parse YAML: {exc}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{label}: a pipeline config must be a mapping at the top level")
    return _with_base(cfg, label, seen + (label,), Path(label).parent if label == str(text_path) else None)


def _with_base(cfg: DictConfig, label: str, seen: tuple[str, ...], folder: Path | None) -> tuple[DictConfig, str]:
    base = cfg.pop("base", None)
    if base is None:
        return cfg, label
    base_path = Path(str(base))
    if folder is not None and not base_path.is_absolute() and (folder / base_path).exists():
        base_path = folder / base_path
    parent, _ = _read(base_path if base_path.exists() else str(base), seen=seen)
    if "selector" in cfg and "name" in cfg.selector and cfg.selector.name != parent.get("selector", {}).get("name"):
        parent.selector = {"name": cfg.selector.name, "params": {}}  # params do not carry across selectors
    return OmegaConf.merge(parent, cfg), label


def _overrides(overrides: Iterable[str] | Mapping[str, Any], kwargs: Mapping[str, Any]) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items += list(overrides.items())
    else:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value (e.g. budget=64, selector.params.alpha=0.5)")
            key = item.split("=", 1)[0].strip()
            try:
                items.append((key, OmegaConf.select(OmegaConf.from_dotlist([item]), key)))
            except OmegaConfBaseException as exc:
                raise ConfigError(f"override {item!r}: {_msg(exc)}") from None
    items += list(kwargs.items())
    return items


def _apply(cfg: DictConfig, key: str, value: Any, label: str) -> None:
    if key == "selector" and isinstance(value, str):  # shorthand: selector=divprune
        if _canonical(value) != _canonical(cfg.selector.name):  # a new selector starts from its defaults
            cfg.selector = StrategyConfig(name=value)
        return
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{label}: override {key}={value!r}: {_msg(exc)}") from None


def _canonical(name: Any) -> Any:
    try:
        return get_host().selectors.get(str(name)).name
    except KeyError:
        return name


def _msg(exc: OmegaConfBaseException) -> str:
    return (getattr(exc, "msg", None) or str(exc)).splitlines()[0]


def load_config(
    source: str | Path | Mapping[str, Any] | DictConfig | PipelineConfig,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    **kwargs: Any,
) -> DictConfig:
    """Load, merge, override and validate a pipeline config.

    Args:
        source: a shipped config name (``"resprune-llava15"``), a YAML path, a mapping.
        overrides: dotlist strings (``["budget=64", "selector.params.alpha=0.3"]``) or a
            mapping of dotted keys to values. ``selector=NAME`` switches the selector
            (dropping the old selector's params).
        **kwargs: more overrides by top-level key, e.g. ``budget=64``.

    Returns:
        The resolved config (read-only ``DictConfig``) with every strategy's params filled
        with their defaults.

    Raises:
        ConfigError: naming the file, the full key and the valid choices.
    """
    if isinstance(source, (str, Path)):
        raw, label = _read(source)
    elif isinstance(source, PipelineConfig):
        raw, label = OmegaConf.structured(source), "<PipelineConfig>"
    elif isinstance(source, (Mapping, DictConfig)):
        raw = OmegaConf.create(OmegaConf.to_container(source) if isinstance(source, DictConfig) else dict(source))
        raw, label = _with_base(raw, "<dict>", ("<dict>",), None)
    else:
        raise ConfigError(f"cannot load a pipeline config from {type(source).__name__}")

    schema = OmegaConf.structured(PipelineConfig)
    valid = [f.name for f in dataclasses.fields(PipelineConfig)]
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{label}: unknown key '{key}'.{suggest(str(key), valid)} Valid keys: {', '.join(valid)}.")
    scorers = raw.get("scorers")
    for i, entry in enumerate(scorers if isinstance(scorers, ListConfig) else []):  # errors name scorers[i]
        try:
            OmegaConf.merge(OmegaConf.structured(ScorerConfig), entry)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{label}: scorers[{i}].{exc.full_key or ''}: {_msg(exc)}") from None
    try:
        cfg = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{label}: {exc.full_key or ''}: {_msg(exc)}") from None
    for key, value in _overrides(overrides, kwargs):
        _apply(cfg, key, value, label)
    return validate_config(cfg, label)


def validate_config(cfg: DictConfig, label: str = "<config>") -> DictConfig:
    """Check a merged config against the registries; fill params defaults; make it read-only."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{label}: {exc.full_key or ''}: {_msg(exc)}") from None
    check_budget(container["budget"], where=f"{label}: budget")  # BudgetError is a ConfigError

    host = get_host()
    sel = container["selector"]
    selector_cls = _lookup(host.selectors, sel["name"], f"{label}: selector.name")
    sel["params"] = dataclasses.asdict(build_params(selector_cls, sel["params"], where=f"{label}: selector.params"))
    outputs: dict[str, str] = {}
    for i, sc in enumerate(container["scorers"]):
        where = f"{label}: scorers[{i}]"
        scorer_cls = _lookup(host.scorers, sc["name"], f"{where}.name")
        sc["params"] = dataclasses.asdict(build_params(scorer_cls, sc["params"], where=f"{where}.params"))
        out = sc["output"] or scorer_cls.output
        if out in outputs:
            raise ConfigError(f"{where}: score '{out}' is already written by scorer '{outputs[out]}'; "
                              f"give one of them another name with `output:`.")
        outputs[out] = sc["name"]

    selector = selector_cls(sel["params"])
    missing = sorted(selector.required_scores() - set(outputs))
    if missing:
        writers = [e.name for e in host.scorers.entries() if getattr(e.cls, "output", None) == missing[0]]
        raise ConfigError(
            f"{label}: selector '{sel['name']}' ({selector!r}) needs score '{missing[0]}', which no scorer "
            f"in `scorers` writes. Add one ({', '.join(writers) or 'a scorer with output: ' + missing[0]}).")
    _validate_backbone(container["backbone"], host, label)
    result = OmegaConf.structured(PipelineConfig)
    result = OmegaConf.merge(result, container)
    OmegaConf.set_readonly(result, True)
    return result


def _validate_backbone(backbone: dict[str, Any], host: Any, label: str) -> None:
    """``backbone.params`` are the params of the injector registered for ``backbone.model_type``."""
    model_type = backbone.get("model_type")
    if model_type is None:
        if backbone.get("params"):
            raise ConfigError(f"{label}: backbone.params need backbone.model_type (which injector they are for).")
        return
    owners = {mt: e.cls for e in host.injectors.entries() for mt in e.cls.model_types}
    if model_type not in owners:
        raise ConfigError(f"{label}: backbone.model_type: no injector handles '{model_type}'."
                          f"{suggest(model_type, list(owners))} Supported: {', '.join(sorted(owners)) or 'none'}.")
    backbone["params"] = dataclasses.asdict(build_params(owners[model_type], backbone.get("params") or {},
                                                         where=f"{label}: backbone.params"))


def _lookup(registry: Any, name: Any, where: str) -> Any:
    try:
        return registry.get(name)
    except KeyError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what is saved beside results)."""
    return OmegaConf.to_yaml(cfg, resolve=True)

