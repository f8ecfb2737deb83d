"""The plugin interfaces: Scorer, Selector, Merger and Injector.

A strategy is a class with a registry ``name``, a ``Params`` dataclass (the schema of
its ``params:`` block in YAML) and the context fields it ``requires``. It is built with
validated params: ``MySelector(alpha=0.5)`` or ``MySelector({"alpha": 0.5})``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from .params import build_params

if TYPE_CHECKING:
    from .context import PruneContext

__all__ = ["Strategy", "Scorer", "Selector", "Merger", "BlockMerging", "Injector"]


class Strategy:
    """Common base: name, params schema, context requirements."""

    kind: ClassVar[str] = "strategy"
    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()

    @dataclass
    class Params:
        """No parameters."""

    def __init__(self, params: Mapping[str, Any] | Any | None = None, /, **kwargs: Any) -> None:
        if params is not None and kwargs:
            raise TypeError(f"{type(self).__name__}: pass params either as a mapping or as keywords, not both")
        values = kwargs if params is None else params
        self.params = build_params(type(self), values, where=f"{self.kind} '{self.name}' params")

    def describe(self) -> dict[str, Any]:
        """Name and resolved params (saved beside results)."""
        return {"name": self.name, "params": asdict(self.params)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in asdict(self.params).items())
        return f"{type(self).__name__}({args})"


class Scorer(Strategy, ABC):
    """Produces one score per visual token, written under a name (``output``)."""

    kind: ClassVar[str] = "scorer"
    output: ClassVar[str]
    """Default name of the score this scorer writes (a pipeline may rename it)."""

    @abstractmethod
    def score(self, context: PruneContext) -> Tensor:
        """Return a float tensor ``[B, N]`` for the ``B`` images of ``context``."""


class Selector(Strategy, ABC):
    """Picks ``k`` distinct tokens from the tokens and the named scores."""

    kind: ClassVar[str] = "selector"
    default_merger: ClassVar[str | None] = None
    """The merger a stage runs with this selector when its config names none (``pool``: average
    pooling needs its cells merged); ``None``: no merger."""
    resizes_images: ClassVar[bool] = False
    """Whether the selector spends the budget before the processor, by resizing each image
    (``resize``; ``downsample``). Its stage then keeps what the tower yields: an int budget is
    still checked, a float one (a share of the image's own count) was applied by ``resize``."""

    def required_scores(self) -> frozenset[str]:
        """Score names this selector cannot work without (under its current params)."""
        return frozenset()

    def resize(self, image: Any, budget: int | float, processor: Any) -> Any:
        """The image the processor should get, for a selector that ``resizes_images``."""
        return image

    @property
    def adaptive(self) -> bool:
        """Whether the selector decides how many tokens each image keeps (``count``)."""
        return False

    def count(self, scores: Mapping[str, Tensor], context: PruneContext) -> list[int]:
        """Tokens each image keeps, when ``adaptive`` (PruMerge's and TRIM's IQR outliers): the
        stage keeps ``max(1, min(count, budget))`` of each image, which it then runs alone (the
        input stage only)."""
        raise NotImplementedError(f"selector '{self.name}' is not adaptive")

    def optional_scores(self) -> frozenset[str]:
        """Score names this selector uses when they are present."""
        return frozenset()

    @abstractmethod
    def select(self, tokens: Tensor, k: int, scores: Mapping[str, Tensor], context: PruneContext) -> Tensor:
        """Pick tokens.

        Args:
            tokens: float32 ``[B, N, d]``, finite.
            k: number of tokens to keep, ``1 <= k <= N``.
            scores: score name -> float32 ``[B, N]``; contains every required score.
            context: the rest of what is known about the images.

        Returns:
            int64 ``[B, k]``: distinct indices per row, in the order they were picked.
        """


class BlockMerging(ABC):
    """A selector that, at a stage inside the vision tower, merges tokens **inside** the encoder
    blocks (ToMe) instead of once between two of them.

    Every block from the stage's layer to the one the features are read from calls
    ``block_merge`` between its attention and its MLP, with ``r`` tokens to merge (together
    they meet the stage's budget); with ``proportional_attention`` the next blocks add
    ``log(size)`` to their attention logits. Outside the tower the selector's ``select`` runs.
    """

    @property
    def proportional_attention(self) -> bool:
        """Add ``log(size)`` to the attention logits of the blocks after a merge."""
        return True

    @property
    def sequence_order(self) -> bool:
        """The tower's tokens reach the LLM in the order of its sequence (``False``: each at the
        place of the token it took over, in raster order)."""
        return True

    @abstractmethod
    def block_merge(self, hidden: Tensor, keys: Tensor, r: int, size: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Merge ``r`` tokens of a block's residual stream.

        Args:
            hidden: ``[T, S, C]`` the stream after the attention, the CLS token first (protected).
            keys: ``[T, S, head_dim]`` the block's keys averaged over heads.
            r: tokens to remove, ``1 <= r <= (S - 1) // 2``.
            size: ``[T, S, 1]`` how many original tokens each token stands for.

        Returns:
            ``(hidden [T, S - r, C], size [T, S - r, 1], source [T, S - r])``: ``source`` gives,
            for each output token, the input token whose place it takes (CLS first).
        """


class Merger(Strategy, ABC):
    """Turns the tokens a selector dropped into tokens within the same budget.

    A stage with a merger asks it how many of the ``k`` budget tokens it makes
    (``slots``), lets the selector pick the other ``k - slots``, then calls ``merge``.
    """

    kind: ClassVar[str] = "merger"
    selector: ClassVar[str | None] = None
    """The selector whose picks this merger needs (``pool``: the centres of its cells); a stage
    with another selector is refused when it is built. ``None``: any selector."""

    def slots(self, k: int, n: int) -> int:
        """How many of the ``k`` tokens kept out of ``n`` this merger makes from dropped ones
        (``0 <= slots < k``; ``0`` when nothing is dropped)."""
        return 0

    def required_scores(self) -> frozenset[str]:
        """Score names this merger reads: a stage without them refuses to run, and a config whose
        scorers write none of them is refused when it loads."""
        return frozenset()

    def extra(self, k: int, n: int) -> int:
        """How many tokens it makes from dropped ones **on top of** the ``k`` the selector picks
        (``0 <= extra <= n - k``; SparseVLM's recycling). Default 0: mergers work within the budget."""
        return 0

    @abstractmethod
    def merge(self, tokens: Tensor, kept: Tensor, slots: int, scores: Mapping[str, Tensor],
              context: PruneContext) -> tuple[Tensor, Tensor]:
        """Merge the dropped tokens.

        Args:
            tokens: float32 ``[B, N, d]``.
            kept: int64 ``[B, k - slots]`` the selector's picks, ascending.
            slots: how many merged tokens to make.
            scores: the stage's named scores ``[B, N]``.
            context: the stage's context.

        Returns:
            ``(indices, features)``: int64 ``[B, k]`` distinct token indices whose places the
            output takes (the kept ones plus ``slots`` dropped ones that carry the merged
            tokens), and float32 ``[B, k, d]`` the features of those tokens. Ascending indices
            keep every token at its place; in any other order the tokens enter the sequence in
            that order (they fill the same places, sorted), e.g. merged tokens after the kept ones.
        """


class Injector(Strategy, ABC):
    """Attaches a pipeline to a model whose ``config.model_type`` is in ``model_types``."""

    kind: ClassVar[str] = "injector"
    model_types: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[frozenset[str]] = frozenset({"tokens"})
    """Context fields this backbone can supply to scorers and selectors."""

    @abstractmethod
    def attach(self, model: Any, pipeline: Any, processor: Any = None, *,
               text: str | Sequence[str] | None = None) -> Any:
        """Patch ``model`` so it prunes with ``pipeline``; return a handle that restores it.

        ``processor`` (or a tokenizer) lets text-conditioned scorers read the prompt; ``text``
        overrides the instruction per prompt. ``Pipeline.attach`` calls this with the
        injector registered for the model's ``model_type``, built with its params. The handle
        is a context manager (``with injector.attach(...) as attached:``) with a ``remove()``
        method; after it the model is exactly as before.
        """
