"""Pipeline: stages of scorers (each writes a named score) + a selector (+ a merger) + a budget.

The input stage (before the LLM) is the common case and what ``run``/``prune``/``select``
use; in-LLM stages (``resprune.stages.Stage`` with ``layer=K``) run when the pipeline is
attached to a model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from .budget import Budget, check_budget, resolve_budget, stage_budget
from .config import check_video_option, load_config, shipped_variants, to_yaml
from .context import PruneContext
from .errors import ConfigError, IncompatibleBackboneError, MissingContextError
from .interfaces import Injector, Merger, Scorer, Selector
from .plugins import get_host
from .selection import Selection, check_tokens, make_merger, make_scorer, make_selector
from .stages import Stage

if TYPE_CHECKING:
    from .injection import Attached

__all__ = ["Pipeline", "load_pipeline"]


class Pipeline:
    """A list of stages: optionally one before the LLM (the input stage), then stages at
    increasing decoder layers. ``run``/``prune``/``select`` run the input stage; ``attach``
    runs them all on a model.

    Args:
        selector: the input stage's selector (a registry name or a ``Selector``), or ``None``
            for no input stage (then ``stages`` must hold in-LLM stages).
        budget: the input stage's budget: tokens kept per image (int) or the share kept
            (float in (0, 1]).
        scorers: the input stage's scorers: names or instances, or ``(score_name, scorer)``
            pairs to rename the score a scorer writes.
        merger: the input stage's merger, if any.
        stages: ``Stage`` objects inside the vision tower (``vision_layer=K``) and inside the LLM
            (``layer=K``), each kind at increasing layers.
        config: the resolved config this pipeline was built from, if any.
    """

    def __init__(
        self,
        selector: str | Selector | None = "residual_energy",
        *,
        budget: Budget,
        scorers: Iterable[str | Scorer | tuple[str, str | Scorer]] = (),
        merger: str | Merger | None = None,
        stages: Iterable[Stage] = (),
        config: DictConfig | None = None,
        video_allocation: str = "global",
        video_budget_per: str = "video",
    ) -> None:
        self.budget = check_budget(budget)
        check_video_option("allocation", video_allocation, "video_allocation")
        check_video_option("budget_per", video_budget_per, "video_budget_per")
        self.video_allocation = video_allocation
        """How the input stage spends a video's budget over its frames (``global``, ``uniform`` or
        ``energy``)."""
        self.video_budget_per = video_budget_per
        """What an int budget counts for a video: tokens per ``video`` or per ``frame`` (pair)."""
        self.source: str | None = None  # the shipped config name or path it was loaded from, if any
        scorers = list(scorers)
        self.input_stage: Stage | None = None
        if selector is not None:
            self.input_stage = Stage(selector, budget=self.budget, scorers=scorers, merger=merger)
        elif scorers or merger is not None:
            raise ConfigError("scorers/merger were given without a selector: the input stage needs one "
                              "(or put them in an in-LLM Stage).")
        self.vision_stages: list[Stage] = []
        self.llm_stages: list[Stage] = []
        for stage in stages:
            if not isinstance(stage, Stage):
                raise ConfigError(f"stages: expected Stage objects, got {type(stage).__name__}.")
            if stage.layer is None and stage.vision_layer is None:
                raise ConfigError("stages: the input stage is given by selector/scorers/budget; every entry of "
                                  "stages needs layer=K (inside the LLM) or vision_layer=K (inside the vision tower).")
            kind, at = ((self.vision_stages, "vision_layer") if stage.vision_layer is not None
                        else (self.llm_stages, "layer"))
            if kind and getattr(stage, at) <= getattr(kind[-1], at):
                raise ConfigError(f"stages: {at}s must increase; {at} {getattr(stage, at)} comes after {at} "
                                  f"{getattr(kind[-1], at)}.")
            kind.append(stage)
        if self.input_stage is None and not self.llm_stages and not self.vision_stages:
            raise ConfigError("a pipeline needs a selector (input stage) or at least one stage inside the vision "
                              "tower or the LLM.")
        self.config = config

    @property
    def stages(self) -> list[Stage]:
        """Every stage in running order: inside the vision tower, the input stage (if any), inside
        the LLM."""
        return self.vision_stages + ([self.input_stage] if self.input_stage is not None else []) + self.llm_stages

    @property
    def selector(self) -> Selector | None:
        """The input stage's selector (``None`` without an input stage)."""
        return None if self.input_stage is None else self.input_stage.selector

    @selector.setter
    def selector(self, value: str | Selector) -> None:
        """Swap the input stage's selector (its scorers, merger and budget stay)."""
        if self.input_stage is None:
            raise ConfigError("this pipeline has no input stage to give a selector; build one with Pipeline(selector, ...).")
        s = self.input_stage
        self.input_stage = Stage(value, budget=s.budget, scorers=s.scorers, merger=s.merger)

    @property
    def scorers(self) -> list[tuple[str, Scorer]]:
        """The input stage's ``(score name, scorer)`` pairs."""
        return [] if self.input_stage is None else self.input_stage.scorers

    @property
    def merger(self) -> Merger | None:
        return None if self.input_stage is None else self.input_stage.merger

    # --- construction -----------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any, overrides: Iterable[str] | Mapping[str, Any] = (), **kwargs: Any) -> Pipeline:
        """Build from a shipped config name, a YAML path, a mapping or a loaded config."""
        cfg = config if isinstance(config, DictConfig) and not overrides and not kwargs and OmegaConf.is_readonly(config) \
            else load_config(config, overrides, **kwargs)
        def budget(st: Any) -> Any:
            own = OmegaConf.to_container(st.budget) if isinstance(st.budget, DictConfig) else st.budget
            return stage_budget(own, cfg.budget)

        stages = [Stage(_selector(st.selector), budget=budget(st), scorers=_scorers(st.scorers),
                        merger=_merger(st.merger), vision_layer=st.layer)
                  for st in cfg.vision_stages]
        stages += [Stage(_selector(st.selector), budget=budget(st), scorers=_scorers(st.scorers),
                         merger=_merger(st.merger), layer=st.layer, positions=st.positions)
                   for st in cfg.stages]
        selector = None if cfg.selector.name is None else _selector(cfg.selector)
        pipe = cls(selector, budget=cfg.budget, scorers=_scorers(cfg.scorers), merger=_merger(cfg.merger),
                   stages=stages, config=cfg, video_allocation=cfg.video.allocation,
                   video_budget_per=cfg.video.budget_per)
        pipe.source = config if isinstance(config, str) else None  # a shipped name: errors can point at variants
        return pipe

    @property
    def score_names(self) -> list[str]:
        """Names of the scores the input stage computes, in order."""
        return [] if self.input_stage is None else self.input_stage.score_names

    def requirements(self) -> tuple[tuple[str, frozenset[str]], ...]:
        """``(who, context fields)`` for each strategy of the input stage, in running order."""
        return () if self.input_stage is None else self.input_stage.requirements()

    @property
    def requires(self) -> frozenset[str]:
        """Every context field the input stage needs (in-LLM stages: ``Stage.requires``)."""
        return frozenset() if self.input_stage is None else self.input_stage.requires

    @property
    def resizes_images(self) -> bool:
        """Whether the input stage spends the budget by resizing images before the processor."""
        return self.input_stage is not None and self.input_stage.selector.resizes_images

    def prepare_images(self, images: Sequence[Any], processor: Any) -> list[Any]:
        """The images as the processor should get them: each PIL image resized by an input-stage
        selector that spends the budget before the processor (``downsample``), else unchanged.
        Every entry point that builds model inputs (the demo, sweeps, the lmms-eval model) calls it."""
        stage = self.input_stage
        if stage is None or not self.resizes_images:
            return list(images)
        from PIL import Image

        return [stage.selector.resize(im, stage.budget, processor) if isinstance(im, Image.Image) else im
                for im in images]

    def budget_for(self, n: int) -> int:
        """Tokens the input stage keeps out of ``n`` (all ``n`` without an input stage)."""
        return n if self.input_stage is None else self.input_stage.budget_for(n)

    # --- running ----------------------------------------------------------------------

    def run(self, context: PruneContext, *, scores: Mapping[str, Tensor] | None = None,
            k: int | None = None) -> Selection:
        """Prune the batch described by ``context`` (tokens ``[B, N, d]``) with the input stage.

        ``k`` overrides the budget (injectors use it to split one image's budget over tiles).
        """
        if self.input_stage is None:
            where = ", ".join(s.where for s in self.vision_stages + self.llm_stages)
            raise ConfigError(f"this pipeline has no input stage (it prunes at {where}); attach it to a model "
                              f"with pipeline.attach(model, processor).")
        return self.input_stage.run(context, scores=scores, k=k)

    def prune(self, tokens: Tensor, *, scores: Mapping[str, Any] | None = None, source: str = "caller",
              **context: Any) -> Selection:
        """Prune ``tokens`` (``[N, d]`` or ``[B, N, d]``) given context fields as keywords.

        Example: ``pipe.prune(v, text="What is the cat doing?", text_embedder=embed, grid=(24, 24))``.
        """
        v = check_tokens(tokens)
        return self.run(PruneContext(v, source=source, **context), scores=scores)

    def select(self, tokens: Tensor, **context: Any) -> Tensor:
        """Kept indices only, original order: ``[k]`` for 2-D tokens, ``[B, k]`` for 3-D."""
        sel = self.prune(tokens, **context)
        return sel.kept[0] if tokens.dim() == 2 else sel.kept

    def attach(self, model: Any, processor: Any = None, *, text: str | Sequence[str] | None = None,
               **params: Any) -> Attached:
        """Prune ``model``'s visual tokens with this pipeline until the handle is removed.

        Picks the injector registered for ``model.config.model_type``; ``processor`` (or a
        tokenizer) lets text-conditioned scorers read and embed the prompt; ``text``
        overrides the instruction per prompt; ``params`` are injector params (e.g.
        ``scope="per_tile"``). Use as ``with pipe.attach(model, processor) as attached:``.
        """
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        injector_cls = get_host().injector_for(model_type, model=model)
        injector = injector_cls({**self.backbone_params(injector_cls), **params})
        try:
            return injector.attach(model, self, processor, text=text)
        except (MissingContextError, IncompatibleBackboneError) as exc:
            variants = shipped_variants(self.source, model_type)
            if not variants:
                raise
            raise type(exc)(f"{exc} For {model_type} models, resprune ships "
                            f"{' and '.join(repr(v) for v in variants)}: run that config instead.") from None

    def backbone_params(self, injector_cls: type[Injector]) -> dict[str, Any]:
        """The config's ``backbone.params`` if they are meant for ``injector_cls`` (its
        ``backbone.model_type`` is one the injector handles), else ``{}`` with a warning."""
        if self.config is None or self.config.backbone.model_type is None:
            return {}
        wanted = self.config.backbone.model_type
        if wanted not in injector_cls.model_types:
            warnings.warn(f"pipeline config is for '{wanted}' models but the injector '{injector_cls.name}' handles "
                          f"{', '.join(injector_cls.model_types)}; its backbone.params are ignored.", UserWarning,
                          stacklevel=3)
            return {}
        return OmegaConf.to_container(self.config.backbone.params)  # type: ignore[return-value]

    # --- reporting --------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Budget, scorers, selector (and merger) of the input stage, and the in-LLM stages."""
        out: dict[str, Any] = {"budget": self.budget}
        if self.input_stage is not None:
            first = self.input_stage.describe()
            out.update({key: first[key] for key in ("scorers", "selector", "merger") if key in first})
        if self.vision_stages:
            out["vision_stages"] = [stage.describe() for stage in self.vision_stages]
        if self.llm_stages:
            out["stages"] = [stage.describe() for stage in self.llm_stages]
        video = {key: value for key, value, default in (("allocation", self.video_allocation, "global"),
                                                        ("budget_per", self.video_budget_per, "video"))
                 if value != default}
        if video:  # only then: runs recorded before the options keep their keys
            out["video"] = video
        return out

    def to_yaml(self) -> str:
        """The resolved config (saved beside results)."""
        if self.config is not None:
            return to_yaml(self.config)
        return OmegaConf.to_yaml(OmegaConf.create(self.describe()))

    def save_config(self, path: str | Path) -> Path:
        """Write ``to_yaml`` to ``path``."""
        path = Path(path)
        path.write_text(self.to_yaml())
        return path

    def summary(self) -> str:
        """One line per stage: where, budget, scorers, the selector's non-default params, the merger."""
        parts = [s.summary() for s in self.stages]
        if self.input_stage is not None and len(parts) == 1:
            return parts[0].removeprefix("input: ")
        return "; then ".join(parts)

    def __repr__(self) -> str:
        if self.input_stage is not None and len(self.stages) == 1:
            s = self.input_stage
            scorers = ", ".join(f"{n}={sc!r}" for n, sc in s.scorers)
            merger = f", merger={s.merger!r}" if s.merger is not None else ""
            return f"Pipeline(budget={self.budget!r}, scorers=[{scorers}], selector={s.selector!r}{merger})"
        return f"Pipeline({', '.join(repr(s) for s in self.stages)})"


def _selector(cfg: Any) -> Selector:
    return make_selector(cfg.name, OmegaConf.to_container(cfg.params))


def _scorers(entries: Any) -> list[tuple[str | None, Scorer]]:
    return [(sc.output or None, make_scorer(sc.name, OmegaConf.to_container(sc.params))) for sc in entries]


def _merger(cfg: Any) -> Merger | None:
    return None if cfg is None else make_merger(cfg.name, OmegaConf.to_container(cfg.params))


def load_pipeline(source: Any, overrides: Iterable[str] | Mapping[str, Any] = (), **kwargs: Any) -> Pipeline:
    """A ``Pipeline`` from a shipped config name, YAML path or mapping, with overrides.

    Example: ``resprune.load_pipeline("resprune-llava15", budget=64)``.
    """
    return Pipeline.from_config(source, overrides, **kwargs)
