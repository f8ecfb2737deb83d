"""Pipeline: several scorers (each writes a named score) + one selector + a budget."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from .budget import Budget, check_budget, resolve_budget
from .config import load_config, to_yaml
from .context import PruneContext
from .errors import ConfigError
from .interfaces import Injector, Scorer, Selector
from .plugins import get_host
from .selection import Selection, check_scores, check_tokens, make_scorer, make_selector, run_scorer, run_selector

if TYPE_CHECKING:
    from .injection import Attached

__all__ = ["Pipeline", "load_pipeline"]


class Pipeline:
    """Scores tokens, picks ``k`` of them per image, returns a ``Selection``.

    Args:
        selector: a registry name or a ``Selector`` instance.
        budget: tokens kept per image (int) or the share kept (float in (0, 1]).
        scorers: scorer names or instances, or ``(score_name, scorer)`` pairs to rename the
            score a scorer writes.
        config: the resolved config this pipeline was built from, if any.
    """

    def __init__(
        self,
        selector: str | Selector = "residual_energy",
        *,
        budget: Budget,
        scorers: Iterable[str | Scorer | tuple[str, str | Scorer]] = (),
        config: DictConfig | None = None,
    ) -> None:
        self.selector = make_selector(selector)
        self.budget = check_budget(budget)
        self.scorers: list[tuple[str, Scorer]] = []
        for item in scorers:
            out, scorer = item if isinstance(item, tuple) else (None, item)
            scorer = make_scorer(scorer)
            self.scorers.append((out or scorer.output, scorer))
        names = [n for n, _ in self.scorers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"two scorers write score '{dupes[0]}'; rename one (output=...).")
        self.config = config
        self._requirements = tuple([(f"scorer '{s.name}'", frozenset(s.requires)) for _, s in self.scorers]
                                   + [(f"selector '{self.selector.name}'", frozenset(self.selector.requires))])
        self._requires = frozenset().union(*(needs for _, needs in self._requirements))

    # --- construction -----------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any, overrides: Iterable[str] | Mapping[str, Any] = (), **kwargs: Any) -> Pipeline:
        """Build from a shipped config name, a YAML path, a mapping or a loaded config."""
        cfg = config if isinstance(config, DictConfig) and not overrides and not kwargs and OmegaConf.is_readonly(config) \
            else load_config(config, overrides, **kwargs)
        scorers = [
            (sc.output or None, make_scorer(sc.name, OmegaConf.to_container(sc.params)))
            for sc in cfg.scorers
        ]
        selector = make_selector(cfg.selector.name, OmegaConf.to_container(cfg.selector.params))
        return cls(selector, budget=cfg.budget, scorers=scorers, config=cfg)

    @property
    def score_names(self) -> list[str]:
        """Names of the scores this pipeline computes, in order."""
        return [n for n, _ in self.scorers]

    def requirements(self) -> tuple[tuple[str, frozenset[str]], ...]:
        """``(who, context fields)`` for each scorer and the selector, in running order
        (computed once: the strategies of a pipeline do not change)."""
        return self._requirements

    @property
    def requires(self) -> frozenset[str]:
        """Every context field the scorers and the selector need."""
        return self._requires

    def budget_for(self, n: int) -> int:
        """Tokens kept out of ``n``."""
        return resolve_budget(self.budget, n)

    # --- running ----------------------------------------------------------------------

    def run(self, context: PruneContext, *, scores: Mapping[str, Tensor] | None = None,
            k: int | None = None) -> Selection:
        """Prune the batch described by ``context`` (tokens ``[B, N, d]``).

        ``k`` overrides the budget (injectors use it to split one image's budget over tiles).
        """
        for requester, needs in self._requirements:  # all of it up front, before any scorer runs
            context.check(needs, requester=requester)
        tokens = context.tokens
        b, n = tokens.shape[:2]
        computed = check_scores(scores, b, n)
        for name, scorer in self.scorers:
            computed[name] = run_scorer(scorer, context, checked=True)
        k = self.budget_for(n) if k is None else min(int(k), n)
        order = run_selector(self.selector, tokens, k, computed, context, checked=True)
        return Selection(kept=order.sort(dim=-1).values, order=order, k=k, n=n, scores=computed)

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
        return injector.attach(model, self, processor, text=text)

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
        """Budget, scorers and selector with their resolved params."""
        return {
            "budget": self.budget,
            "scorers": [{**s.describe(), "output": n} for n, s in self.scorers],
            "selector": self.selector.describe(),
        }

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
        """One line: budget, scorers and the selector's params that differ from their defaults."""
        sel = self.selector
        defaults = type(sel).Params()
        changed = {k: v for k, v in vars(sel.params).items() if getattr(defaults, k) != v}
        args = ", ".join(f"{k}={v}" for k, v in changed.items())
        scorers = ", ".join(n if n == s.name else f"{s.name}->{n}" for n, s in self.scorers) or "none"
        return f"budget {self.budget}; scorers: {scorers}; selector: {sel.name}({args})"

    def __repr__(self) -> str:
        scorers = ", ".join(f"{n}={s!r}" for n, s in self.scorers)
        return f"Pipeline(budget={self.budget!r}, scorers=[{scorers}], selector={self.selector!r})"


def load_pipeline(source: Any, overrides: Iterable[str] | Mapping[str, Any] = (), **kwargs: Any) -> Pipeline:
    """A ``Pipeline`` from a shipped config name, YAML path or mapping, with overrides.

    Example: ``resprune.load_pipeline("resprune-llava15", budget=64)``.
    """
    return Pipeline.from_config(source, overrides, **kwargs)
