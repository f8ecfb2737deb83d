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
on top; provenance (``reproduces``) is not inherited. Loading resolves everything and
validates every strategy's params, so a typo fails before any model work starts.

Interpolations between keys (``${budget}``) work; resolvers (``${oc.env:NAME}`` and any
other ``${name:...}``) are refused in config files and mappings: a config shared with a
run folder must not pull values out of the environment of whoever loads it, and the
resolved value would be saved beside every result, secrets included. Overrides that the
caller writes (``budget=${oc.env:B}``) are resolved; their values are saved.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .budget import check_budget, stage_budget
from .errors import ConfigError, suggest
from .params import build_params
from .plugins import get_host
from .stages import POSITIONS

__all__ = [
    "selector_label",
    "SelectorConfig",
    "ScorerConfig",
    "MergerConfig",
    "StageConfig",
    "BackboneConfig",
    "PipelineConfig",
    "load_config",
    "shipped_configs",
    "to_yaml",
]


@dataclass
class SelectorConfig:
    """A selector chosen by registry name, with its params."""

    name: Optional[str] = None
    """Registry name or alias of the selector (`resprune plugins` lists them); at the top level, `null` means no input stage (then `stages` prunes inside the LLM)."""
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
class MergerConfig:
    """A merger chosen by registry name: turns dropped tokens into tokens within the budget."""

    name: str = MISSING
    """Registry name or alias of the merger."""
    params: dict[str, Any] = field(default_factory=dict)
    """The merger's params, validated against its `Params`."""


@dataclass
class StageConfig:
    """A stage inside the LLM: on the hidden states entering decoder layer `layer`."""

    layer: int = MISSING
    """Decoder layer K >= 1 the stage acts on (its scorers read layer K-1's attention)."""
    budget: Any = None
    """Tokens kept per image: an int k, or a float ratio of the tokens entering the stage; `null` takes the top-level `budget`; a table `{192: 300, 128: 303}` gives one per top-level budget."""
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    """The stage's selector (`name`, `params`)."""
    scorers: list[ScorerConfig] = field(default_factory=list)
    """The stage's scorers."""
    merger: Optional[MergerConfig] = None
    """Optional merger of the tokens the stage drops."""
    positions: str = "keep"
    """Positions of the tokens after the stage: `keep` their original ones (FastV, DART), or
    `reindex` them 0, 1, ... over each row's kept tokens (PyramidDrop; 1-D RoPE models only)."""


@dataclass
class VisionStageConfig:
    """A stage inside the vision tower: on the patch tokens of `hidden_states[layer]` (CLS protected)."""

    layer: int = MISSING
    """Vision-encoder layer K >= 0, counted like the tower's `hidden_states` (the input of encoder layer K; 0: the embeddings); at most the layer the LLM's features are read from."""
    budget: Any = None
    """Patch tokens kept per tile: an int k, or a float ratio of the tokens entering the stage; `null` takes the top-level `budget`; a table `{192: 300, 128: 303}` gives one per top-level budget."""
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    """The stage's selector (`name`, `params`)."""
    scorers: list[ScorerConfig] = field(default_factory=list)
    """The stage's scorers."""
    merger: Optional[MergerConfig] = None
    """Optional merger of the tokens the stage drops."""


@dataclass
class BackboneConfig:
    """Backbone hints and injector params (used when attaching to a model)."""

    model_type: Optional[str] = None
    """The `model.config.model_type` the config is meant for; on another model `attach` warns and ignores `backbone.params`."""
    params: dict[str, Any] = field(default_factory=dict)
    """Injector params (e.g. `scope: per_tile` for `llava_next`), merged under keywords given to `attach`."""


VIDEO_ALLOCATIONS = ("global", "uniform", "energy")
"""How the input stage spends a video's budget over its frames."""

VIDEO_BUDGETS = ("video", "frame")
"""What an int budget counts for a video: tokens per video, or per frame (pair)."""


def check_video_option(key: str, value: Any, where: str) -> None:
    """``ConfigError`` (``where``: the key as the caller wrote it) unless ``value`` is a choice of
    the video option ``key`` (``allocation``: ``VIDEO_ALLOCATIONS``; ``budget_per``: ``VIDEO_BUDGETS``)."""
    choices = {"allocation": VIDEO_ALLOCATIONS, "budget_per": VIDEO_BUDGETS}[key]
    if value not in choices:
        raise ConfigError(f"{where}={excerpt(repr(value))}: must be one of {', '.join(choices)}."
                          f"{suggest(str(value), choices)}")


@dataclass
class VideoConfig:
    """How videos are pruned (images ignore it)."""

    allocation: str = "global"
    """How a video's budget is spent over its frames: `global`, one selection over every token of every frame (ResPrune's subspace across frames: a frame the earlier ones explain gets few tokens); `uniform`, an equal share per frame (largest remainder); `energy`, a share per frame in proportion to its residual energy outside the span of the frame before it (all of the first frame's energy), each frame selected on its own."""
    budget_per: str = "video"
    """What an int `budget` counts for a video: `video`, tokens per video; `frame`, tokens per frame (pair), so a video of t frame pairs keeps up to t x budget. A ratio is the same share either way."""


@dataclass
class PipelineConfig:
    """A whole pruning pipeline: the input stage (scorers, selector, merger, budget) and the
    stages inside the LLM."""

    budget: Any = MISSING
    """Tokens kept per image by the input stage: an int k, or a float ratio in (0, 1] of each image's tokens; also the budget of any stage that leaves its own `null`."""
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    """The input stage's selector (`name`, `params`); `name: null` for no input stage."""
    scorers: list[ScorerConfig] = field(default_factory=list)
    """Scorers run before the input stage's selector, each writing one named score."""
    merger: Optional[MergerConfig] = None
    """Optional merger of the input stage (`name`, `params`): makes tokens out of the dropped ones within the budget."""
    vision_stages: list[VisionStageConfig] = field(default_factory=list)
    """Stages inside the vision tower, at increasing `layer`s, before the input stage."""
    stages: list[StageConfig] = field(default_factory=list)
    """Stages inside the LLM, at increasing `layer`s, each with its own scorers, selector, budget and merger."""
    video: VideoConfig = field(default_factory=VideoConfig)
    """How videos are pruned: `allocation` of a video's budget over its frames."""
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
    for entry in sorted(_config_dir().iterdir(), key=lambda p: p.name.removesuffix(".yaml")):
        if entry.name.endswith(".yaml"):
            data = OmegaConf.create(entry.read_text())
            out[entry.name[: -len(".yaml")]] = str(data.get("description", ""))
    return out


YAML_SUFFIXES = (".yaml", ".yml")

_RESOLVER = re.compile(r"(?<!\\)(?:\\\\)*\$\{\s*[A-Za-z_][\w.\-]*\s*:")
"""A resolver interpolation (``${oc.env:HOME}``), as opposed to a key interpolation (``${budget}``)
or escaped text (``\\${oc.env:HOME}``, an odd number of backslashes before ``${``)."""

_DOLLAR = re.compile(r"(\\*)\$\{")


def escape_interpolations(value: Any) -> Any:
    """``value`` (a container of plain values) with every ``${`` in its strings escaped, so that
    OmegaConf keeps the text as written (``\\${oc.env:HOME}`` reads back as ``${oc.env:HOME}``)."""
    if isinstance(value, str):
        return _DOLLAR.sub(lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {k: escape_interpolations(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escape_interpolations(v) for v in value]
    return value


def parse_value(text: str, key: str, label: str = "override") -> Any:
    """The YAML value of ``key=text`` as OmegaConf's dotlist parses it, never resolved;
    ``ConfigError`` naming the key and how to quote the value when it is not YAML."""
    import yaml

    try:
        node = OmegaConf.from_dotlist([f"v={text}"])
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise ConfigError(
            f"{label} {excerpt(key)}={excerpt(text, 40)}: the value is not a YAML value ({problem}). Quote it as a "
            f"YAML string: {excerpt(key)}='{excerpt(text, 40)}' (in a shell, inside double quotes: "
            f"\"{excerpt(key)}='{excerpt(text, 40)}'\").") from None
    except (OmegaConfBaseException, ValueError, TypeError) as exc:
        raise ConfigError(f"{label} {excerpt(key)}={excerpt(text, 40)}: {excerpt(exc, 200)}") from None
    return OmegaConf.to_container(node, resolve=False)["v"]


def parse_override(item: Any, label: str = "override") -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``: the value parsed as YAML and never resolved (see
    ``parse_value``); ``ConfigError`` for anything that is not ``key=value``."""
    if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
        raise ConfigError(f"{label} {excerpt(repr(item))} must look like key=value (e.g. budget=64, "
                          f"selector.params.alpha=0.5)")
    key, _, text = item.partition("=")
    return key.strip(), parse_value(text, key.strip(), label)


def excerpt(value: object, limit: int = 60) -> str:
    """``value`` as text, cut to ``limit`` characters: errors never quote whole files."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_yaml_text(path: Path, what: str = "config") -> str:
    """A YAML file's text; ``ConfigError`` for a missing, unreadable or non-UTF-8 file, or another suffix."""
    if path.suffix not in YAML_SUFFIXES:
        raise ConfigError(f"{what} file '{path}' is not a YAML file (expected a {' or '.join(YAML_SUFFIXES)} "
                          f"suffix).")
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); save it as UTF-8.") \
            from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file '{path}': {exc.strerror or exc}") from None


def parse_yaml(text: str, label: str, what: str = "config") -> DictConfig:
    """Parse a YAML mapping safely (OmegaConf: no Python tags); errors quote at most a short
    excerpt. ``what`` names the kind of file in the error when it is not a mapping."""
    try:
        cfg = OmegaConf.create(text)
    except Exception as exc:  # yaml errors, duplicate keys
        raise ConfigError(f"{label}: cannot parse YAML: {excerpt(exc, 300)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{label}: a {what} must be a mapping at the top level")
    return cfg


def check_keys(cfg: Any, valid: list[str], label: str) -> None:
    """``ConfigError`` for the first top-level key of ``cfg`` not in ``valid`` (with a suggestion)."""
    for key in cfg:
        if key not in valid:
            raise ConfigError(f"{label}: unknown key '{excerpt(key)}'.{suggest(str(key), valid)} "
                              f"Valid keys: {', '.join(valid)}.")


def refuse_resolvers(cfg: Any, label: str, prefix: str = "") -> None:
    """``ConfigError`` naming the key of the first ``${resolver:...}`` interpolation in ``cfg``."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    items = cfg.items() if isinstance(cfg, dict) else enumerate(cfg) if isinstance(cfg, list) else ()
    for key, value in items:
        where = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, str) and _RESOLVER.search(value):
            raise ConfigError(
                f"{label}: {where}: resolver interpolations such as {excerpt(value, 40)!r} are not allowed: their "
                f"value would be saved beside every result (environment secrets included). Write the value, or "
                f"give it as an override (key=value).")
        refuse_resolvers(value, label, where)


def _read(source: str | Path, *, seen: tuple[str, ...] = ()) -> tuple[DictConfig, str]:
    """Read a shipped name or a YAML path, following ``base:``; return (config, label)."""
    text_path = Path(source)
    if text_path.suffix in YAML_SUFFIXES or text_path.exists():
        label, text = str(text_path), read_yaml_text(text_path)
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
    cfg = parse_yaml(text, label, "pipeline config")
    return _with_base(cfg, label, seen + (label,), Path(label).parent if label == str(text_path) else None)


def _with_base(cfg: DictConfig, label: str, seen: tuple[str, ...], folder: Path | None) -> tuple[DictConfig, str]:
    refuse_resolvers(cfg, label)
    _check_shapes(cfg, label)
    base = cfg.pop("base", None)
    if base is None:
        return cfg, label
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{label}: base: expected a shipped config name or a YAML path, got {excerpt(base)!r}.")
    base_path = Path(str(base))
    if folder is not None and not base_path.is_absolute() and (folder / base_path).exists():
        base_path = folder / base_path
    parent, _ = _read(base_path if base_path.exists() else str(base), seen=seen)
    if "selector" in cfg and "name" in cfg.selector and cfg.selector.name != parent.get("selector", {}).get("name"):
        parent.selector = {"name": cfg.selector.name, "params": {}}  # params do not carry across selectors
    for key in PROVENANCE:
        parent.pop(key, None)  # what the base reproduces, this config does not claim by inheritance
    return OmegaConf.merge(parent, cfg), label


PROVENANCE = ("reproduces",)
"""Keys that describe where a config comes from; ``base:`` does not pass them on."""

_SHAPES: dict[str, Any] = {
    "selector": {"params": dict},
    "scorers": [{"params": dict}],
    "merger": {"params": dict},
    "stages": [{"selector": {"params": dict}, "scorers": [{"params": dict}], "merger": {"params": dict}}],
    "vision_stages": [{"selector": {"params": dict}, "scorers": [{"params": dict}], "merger": {"params": dict}}],
    "video": {},
    "backbone": {"params": dict},
}
"""The nesting every config must have: a mapping where ``{}``, a list where ``[]``."""


def _check_shapes(cfg: Any, label: str, shape: Any = None, where: str = "") -> None:
    """Name the key whose value is a list where a mapping belongs (or the reverse), before merging."""
    shape = _SHAPES if shape is None else shape
    if isinstance(shape, dict):
        if not isinstance(cfg, (DictConfig, dict)):
            kind = "a list" if isinstance(cfg, (ListConfig, list)) else f"{excerpt(cfg, 30)!r}"
            raise ConfigError(f"{label}: {where}: expected a mapping (key: value), got {kind}.")
        for key, sub in shape.items():
            if key in cfg and cfg[key] is not None:
                _check_shapes(cfg[key], label, sub, f"{where}.{key}" if where else key)
    elif isinstance(shape, list):
        if not isinstance(cfg, (ListConfig, list)):
            kind = "a mapping" if isinstance(cfg, (DictConfig, dict)) else f"{excerpt(cfg, 30)!r}"
            raise ConfigError(f"{label}: {where}: expected a list, got {kind}"
                              + (" (write one '- name: ...' entry per item)" if where == "scorers" else "") + ".")
        for i, item in enumerate(cfg):
            if not isinstance(item, (DictConfig, dict)):
                raise ConfigError(f"{label}: {where}[{i}]: expected a mapping such as {{name: {excerpt(item, 30)}}}, "
                                  f"got {excerpt(item, 30)!r}.")
            _check_shapes(item, label, shape[0], f"{where}[{i}]")
    elif shape is dict and not isinstance(cfg, (DictConfig, dict)):
        kind = "a list" if isinstance(cfg, (ListConfig, list)) else f"{excerpt(cfg, 30)!r}"
        raise ConfigError(f"{label}: {where}: expected a mapping of parameter names to values, got {kind}.")


def _overrides(overrides: Iterable[str] | Mapping[str, Any], kwargs: Mapping[str, Any]) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items += list(overrides.items())
    else:
        if isinstance(overrides, str):
            raise ConfigError(f"overrides must be a list of key=value strings, got the string {excerpt(repr(overrides))}.")
        items += [parse_override(item) for item in overrides]
    items += list(kwargs.items())
    # switching a strategy comes first, so that params given beside it apply to the new one
    return sorted(items, key=lambda kv: not _SWITCH.fullmatch(str(kv[0])))


_SWITCH = re.compile(r"(stages\.\d+\.)?(selector(\.name)?|scorers\.\d+\.name)")
"""Override keys that switch a strategy (its old params are dropped, as in YAML)."""


def _apply(cfg: DictConfig, key: str, value: Any, label: str) -> None:
    found = re.fullmatch(r"(stages\.(\d+)\.)?selector(\.name)?", key)
    if found and isinstance(value, str) and (owner := _owner(cfg, found.group(2))) is not None:  # also selector=dpp
        if _canonical("selectors", value) != _canonical("selectors", owner.selector.name):
            owner.selector = SelectorConfig(name=value)  # a new selector starts from its defaults
        return
    found = re.fullmatch(r"(stages\.(\d+)\.)?scorers\.(\d+)\.name", key)
    owner = _owner(cfg, found.group(2)) if found else None
    if found and isinstance(value, str) and owner is not None and int(found.group(3)) < len(owner.scorers):
        entry = owner.scorers[int(found.group(3))]
        if _canonical("scorers", value) != _canonical("scorers", entry.name):
            entry.name, entry.params = value, {}  # a new scorer starts from its defaults
        return
    _check_path(cfg, key, value, label)
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except (OmegaConfBaseException, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        msg = _msg(exc) if isinstance(exc, OmegaConfBaseException) else str(exc)
        raise ConfigError(f"{label}: override {key}={excerpt(repr(value))}: {msg}") from None


def _check_path(cfg: DictConfig, key: Any, value: Any, label: str) -> None:
    """``ConfigError`` for an override key that is not a dotted key, or that walks into a list
    entry that does not exist (``stages.5.layer=3`` with two stages)."""
    parts = key.split(".") if isinstance(key, str) else [""]
    if not all(parts):
        raise ConfigError(f"{label}: override key {excerpt(repr(key))} is not a dotted config key "
                          f"(e.g. budget, selector.params.alpha, stages.0.layer).")
    node: Any = cfg
    for depth, part in enumerate(parts[:-1]):
        parent = ".".join(parts[:depth])
        if isinstance(node, ListConfig):
            if not part.isdigit():
                raise ConfigError(f"{label}: override {excerpt(key)}: {parent} is a list; index its entries by "
                                  f"number ({parent}.0).")
            if int(part) >= len(node):
                entries = f"{len(node)} entr{'y' if len(node) == 1 else 'ies'}"
                span = f" ({parent}.0 to {parent}.{len(node) - 1})" if len(node) else ""
                raise ConfigError(
                    f"{label}: override {excerpt(key)}={excerpt(repr(value))}: {parent} has {entries}{span}, so "
                    f"{parent}.{part} does not exist. To add one, write the whole list in a YAML file with base:.")
            node = node[int(part)]
        elif isinstance(node, DictConfig) and part in node and not OmegaConf.is_missing(node, part):
            node = node._get_node(part)
        else:
            return  # a new key: validation names it


def _owner(cfg: DictConfig, stage: str | None) -> Any:
    """The config node holding ``selector``/``scorers``: the top level, or ``stages[i]`` (``None`` if absent)."""
    if stage is None:
        return cfg
    i = int(stage)
    return cfg.stages[i] if i < len(cfg.stages) else None


def _canonical(kind: str, name: Any) -> Any:
    try:
        return getattr(get_host(), kind).get(str(name)).name
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
        refuse_resolvers(raw, label)
    elif isinstance(source, (Mapping, DictConfig)):
        try:
            raw = OmegaConf.create(OmegaConf.to_container(source) if isinstance(source, DictConfig) else dict(source))
        except (OmegaConfBaseException, ValueError, TypeError) as exc:
            raise ConfigError(f"<dict>: not a config mapping: {excerpt(exc, 200)}") from None
        raw, label = _with_base(raw, "<dict>", ("<dict>",), None)
    else:
        raise ConfigError(f"cannot load a pipeline config from {type(source).__name__}")

    schema = OmegaConf.structured(PipelineConfig)
    valid = [f.name for f in dataclasses.fields(PipelineConfig)]
    check_keys(raw, valid, label)
    for key, item_schema in (("scorers", ScorerConfig), ("stages", StageConfig),  # errors name scorers[i] / stages[i]
                             ("vision_stages", VisionStageConfig)):
        entries = raw.get(key)
        for i, entry in enumerate(entries if isinstance(entries, ListConfig) else []):
            try:
                OmegaConf.merge(OmegaConf.structured(item_schema), entry)
            except OmegaConfBaseException as exc:
                raise ConfigError(f"{label}: {key}[{i}].{exc.full_key or ''}: {_msg(exc)}") from None
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
    if container["selector"]["name"] is None:
        if not container["stages"] and not container["vision_stages"]:
            raise ConfigError(f"{label}: selector.name: missing. Name the selector of the input stage (`resprune "
                              f"plugins` lists them), or give `stages:` that prune inside the LLM.")
        if container["scorers"] or container["merger"]:
            raise ConfigError(f"{label}: scorers/merger need selector.name (the input stage's selector).")
        if container["selector"]["params"]:
            raise ConfigError(f"{label}: selector.params need selector.name.")
    else:
        _validate_stage(container, host, label, "")
    from .backbones.vision_stages import VISION_FIELDS  # here: both modules import this one
    from .llm_pruning import LLM_STAGE_FIELDS

    last = -1
    for i, stage in enumerate(container["vision_stages"]):
        where = f"vision_stages[{i}]"
        layer = stage["layer"]
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ConfigError(f"{label}: {where}.layer={layer!r}: a stage inside the vision tower acts on the tower's "
                              f"hidden_states[K], K >= 0 (0: the embeddings).")
        if layer <= last:
            raise ConfigError(f"{label}: {where}.layer={layer}: vision stage layers must increase (the previous stage "
                              f"is at layer {last}).")
        last = layer
        stage_budget(stage["budget"], container["budget"], where=f"{label}: {where}.budget")
        if stage["selector"]["name"] is None:
            raise ConfigError(f"{label}: {where}.selector.name: missing. Every stage needs a selector.")
        _validate_stage(stage, host, label, f"{where}.", VISION_FIELDS, "inside the vision tower")
    last = 0
    for i, stage in enumerate(container["stages"]):
        where = f"stages[{i}]"
        layer = stage["layer"]
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ConfigError(f"{label}: {where}.layer={layer!r}: a stage inside the LLM acts on decoder layer "
                              f"K >= 1 (its scorers read layer K-1).")
        if layer <= last:
            raise ConfigError(f"{label}: {where}.layer={layer}: stage layers must increase (the previous stage is at "
                              f"layer {last}).")
        last = layer
        stage_budget(stage["budget"], container["budget"], where=f"{label}: {where}.budget")
        if stage["selector"]["name"] is None:
            raise ConfigError(f"{label}: {where}.selector.name: missing. Every stage needs a selector.")
        if stage["positions"] not in POSITIONS:
            raise ConfigError(f"{label}: {where}.positions={stage['positions']!r}: must be one of "
                              f"{', '.join(POSITIONS)}.")
        _validate_stage(stage, host, label, f"{where}.", LLM_STAGE_FIELDS, "inside the LLM")
    _validate_backbone(container["backbone"], host, label)
    for key in ("allocation", "budget_per"):
        check_video_option(key, container["video"][key], f"{label}: video.{key}")
    result = OmegaConf.structured(PipelineConfig)
    result = OmegaConf.merge(result, escape_interpolations(container))  # text reading `${...}` stays that text
    OmegaConf.set_readonly(result, True)
    return result


def _validate_stage(stage: dict[str, Any], host: Any, label: str, prefix: str,
                    offered: frozenset[str] | None = None, place: str = "") -> None:
    """Check one stage's strategies against the registries and fill their params' defaults;
    ``offered``: the context fields every backbone offers there (a stage inside the LLM or the
    tower), so a strategy that needs another is refused here rather than when it runs."""
    sel = stage["selector"]
    selector_cls = _lookup(host.selectors, sel["name"], f"{label}: {prefix}selector.name")
    sel["params"] = dataclasses.asdict(build_params(selector_cls, sel["params"], where=f"{label}: {prefix}selector.params"))
    outputs: dict[str, str] = {}
    needs: list[tuple[str, frozenset[str]]] = []
    for i, sc in enumerate(stage["scorers"]):
        where = f"{label}: {prefix}scorers[{i}]"
        scorer_cls = _lookup(host.scorers, sc["name"], f"{where}.name")
        sc["params"] = dataclasses.asdict(build_params(scorer_cls, sc["params"], where=f"{where}.params"))
        needs.append((f"{prefix}scorers[{i}] '{sc['name']}'", frozenset(scorer_cls(sc["params"]).requires)))
        out = sc["output"] or scorer_cls.output
        if out in outputs:
            raise ConfigError(f"{where}: score '{out}' is already written by scorer '{outputs[out]}'; "
                              f"give one of them another name with `output:`.")
        outputs[out] = sc["name"]
    readers = [(f"{prefix}selector '{sel['name']}'", selector_cls(sel["params"]))]
    if stage.get("merger"):
        merger = stage["merger"]
        merger_cls = _lookup(host.mergers, merger["name"], f"{label}: {prefix}merger.name")
        merger["params"] = dataclasses.asdict(build_params(merger_cls, merger["params"],
                                                           where=f"{label}: {prefix}merger.params"))
        readers.append((f"{prefix}merger '{merger['name']}'", merger_cls(merger["params"])))
    needs += [(who, frozenset(strategy.requires)) for who, strategy in readers]
    for who, fields in needs if offered is not None else ():
        absent = sorted(fields - offered)
        if absent:
            why = (" (text-conditioned scorers read the instruction's word embeddings, which only the input stage "
                   "has)" if absent[0] in ("text", "text_embedder") else "")
            raise ConfigError(f"{label}: {who} needs context '{absent[0]}', which a stage {place} does not have"
                              f"{why}. A stage there offers: {', '.join(sorted(offered))}.")
    for who, strategy in readers:
        missing = sorted(strategy.required_scores() - set(outputs))
        if missing:
            writers = [e.name for e in host.scorers.entries() if getattr(e.cls, "output", None) == missing[0]]
            if not writers:  # no installed scorer writes it: most likely a misspelt score name
                known = {str(getattr(e.cls, "output", "")) for e in host.scorers.entries()} | set(outputs)
                written = ", ".join(sorted(outputs)) or "none"
                raise ConfigError(
                    f"{label}: {who} ({strategy!r}) reads score '{missing[0]}', which no installed scorer writes."
                    f"{suggest(missing[0], known)} The scores `{prefix}scorers` write: {written}; every score a "
                    f"scorer can write is in `resprune plugins` (a scorer's output, or its `output:` in the config).")
            raise ConfigError(
                f"{label}: {who} ({strategy!r}) needs score '{missing[0]}', which no scorer in `{prefix}scorers` "
                f"writes. Add one ({', '.join(writers)}).")


def _validate_backbone(backbone: dict[str, Any], host: Any, label: str) -> None:
    """``backbone.params`` are the params of the injector registered for ``backbone.model_type``."""
    model_type = backbone.get("model_type")
    if model_type is None:
        if backbone.get("params"):
            raise ConfigError(f"{label}: backbone.params need backbone.model_type (which injector they are for).")
        return
    if model_type not in host.model_types:
        raise ConfigError(f"{label}: backbone.model_type: no injector handles '{model_type}'."
                          f"{suggest(model_type, host.model_types)} Supported: {', '.join(host.model_types) or 'none'}.")
    backbone["params"] = dataclasses.asdict(build_params(host.injector_for(model_type), backbone.get("params") or {},
                                                         where=f"{label}: backbone.params"))


def _lookup(registry: Any, name: Any, where: str) -> Any:
    try:
        return registry.get(name)
    except KeyError as exc:
        raise ConfigError(f"{where}: {exc}") from None


MODEL_SUFFIXES = {"llava15": "llava", "llava-next": "llava_next", "qwen2.5-vl": "qwen2_5_vl",
                  "qwen3-vl": "qwen3_vl", "qwen3.5": "qwen3_5",
                  "internvl": "internvl"}
"""How shipped config names end for a backbone (``visionzip-qwen2.5-vl``) -> its ``model_type``."""


def shipped_variants(name: Any, model_type: Any) -> list[str]:
    """Shipped configs that are ``name`` for ``model_type`` models (``visionzip`` on ``qwen2_5_vl``:
    ``visionzip-qwen2.5-vl``), by the name suffixes of ``MODEL_SUFFIXES``."""
    if not isinstance(name, str):
        return []
    stem = name
    for suffix in MODEL_SUFFIXES:
        stem = stem.removesuffix(f"-{suffix}")
    return [f"{stem}-{suffix}" for suffix, mt in MODEL_SUFFIXES.items()
            if mt == model_type and f"{stem}-{suffix}" != name and (_config_dir() / f"{stem}-{suffix}.yaml").is_file()]


def selector_label(cfg: DictConfig) -> str:
    """The input stage's selector (``residual_energy``), or for a config that prunes only inside
    the LLM its stages' selectors and layers (``topk@2+topk@8``)."""
    return cfg.selector.name or "+".join([f"{st.selector.name}@vision{st.layer}" for st in cfg.vision_stages]
                                         + [f"{st.selector.name}@{st.layer}" for st in cfg.stages])


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what is saved beside results); text that reads ``${...}`` is
    written escaped, so the file loads back as the same text, never as an interpolation."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    return OmegaConf.to_yaml(OmegaConf.create(escape_interpolations(container)))

