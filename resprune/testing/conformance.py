"""Conformance suites: the tests every built-in strategy passes, for your own.

Subclass and name your strategy; pytest collects the tests::

    from resprune.testing.conformance import SelectorConformance

    class TestFarthestPoint(SelectorConformance):
        selector = "farthest_point"          # registered name (or the class)

The suites check the interface contract (shapes, dtypes, every budget, determinism,
batch independence, bf16 input), that the strategy is reachable by name through the
plugin registry, and that a pipeline using it (in a stage inside the LLM, at layer 1, when
it reads the LLM's fields) runs on each tiny backbone
(``resprune.testing.tiny_lvlm``): the right number of tokens kept per image, and with a
budget at or above ``N`` outputs bit-identical to the unpruned model. A selector also runs at
a stage inside the CLIP towers (LLaVA-1.5, LLaVA-NeXT) when what it reads is there.

``InjectorConformance`` does the same for a backbone: subclass it with ``model_type`` (or your
own tiny model and inputs) for keep-all identity, budgets, equivalence to the masked unpruned
model and ``generate``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

from ..interfaces import Merger, Scorer, Selector
from ..plugins import get_host
from .contracts import check_merger_contract, check_scorer_contract, check_selector_contract, merger_selector, random_context

__all__ = ["SelectorConformance", "ScorerConformance", "MergerConformance", "InjectorConformance", "BACKBONES",
           "masked_out_dropped", "pruned_forward_positions", "assert_equal_at_kept_columns"]

BACKBONES = ("llava", "llava_next", "qwen2_5_vl", "llava_onevision", "gemma3", "qwen3_vl", "qwen3_5", "internvl")


def _photo(which: int = 0) -> Any:
    from PIL import Image

    from ..data import PHOTOS, photo_path

    return Image.open(photo_path(PHOTOS[which])).convert("RGB").resize((112, 84))


def _run_on_backbone(model_type: str, pipeline: Any, budget_all: Any) -> None:
    from ..tiny import tiny_inputs, tiny_lvlm

    model, processor = tiny_lvlm(model_type)
    kinds = getattr(model.config.get_text_config(), "layer_types", None) or []
    for stage in pipeline.llm_stages:
        if "llm_own_attention" in stage.requires and kinds and kinds[stage.layer] == "linear_attention":
            pytest.skip(f"{model_type}: layer {stage.layer} is a linear-attention layer (the strategy reads the "
                        f"attention of layer K itself)")
    requires = set().union(*(stage.requires for stage in pipeline.stages))
    if "frames" in requires:  # a strategy of videos: run it on two short clips
        missing = sorted(requires - _llm_fields() - set(get_host().injector_for(model_type).provides)
                         - {"text", "text_embedder"})
        if missing:
            pytest.skip(f"{model_type} cannot supply {missing} (the strategy reads videos)")
        from ..video import demo_clip, video_chat_inputs

        inputs = video_chat_inputs(processor, [[demo_clip("pan", frames=6)], [demo_clip("cut", frames=6)]],
                                   ["What happens?", "What changes?"])
    else:
        inputs = tiny_inputs(model_type, processor, [_photo(0), _photo(1)],
                             ["What is in the picture?", "Describe the colours."])
    with torch.no_grad():
        reference = model(**inputs).logits
        with pipeline.attach(model, processor) as attached:
            model(**inputs)
        stage = pipeline.stages[-1]
        selections = attached.last.stages[-1].selections if stage.layer is not None else attached.selections
        assert len(selections) == 2
        adaptive = stage.selector is not None and stage.selector.adaptive  # it decides each image's count
        for sel in selections:
            want = _wanted(stage, sel)
            assert (1 <= sel.k <= want) if adaptive else sel.k == want, \
                f"{model_type}: kept {sel.k} of {sel.n} ({stage.where})"
            assert len(set(sel.kept.tolist())) == sel.k
        if adaptive:  # a budget of every token only caps an adaptive count: there is no keep-all to compare
            return
        with budget_all.attach(model, processor):
            assert torch.equal(model(**inputs).logits, reference), f"{model_type}: keep-all is not the unpruned model"


def _wanted(stage: Any, sel: Any) -> int:
    """The tokens a stage keeps of an image: its budget, plus what a merger makes on top of it, for
    the whole image or, when the budget is split over its tiles (``groups``), tile by tile."""
    from ..image_selection import proportional_shares

    groups = None if stage.layer is not None or sel.geometry is None else sel.geometry.groups
    if groups is None:
        parts = [(stage.budget_for(sel.n), sel.n)]
    else:
        sizes = torch.bincount(groups.cpu()).tolist()
        sizes = [size for size in sizes if size]
        parts = list(zip(proportional_shares(stage.budget_for(sel.n), [float(s) for s in sizes], sizes), sizes))
    want = 0
    for k, n in parts:
        if stage.merger is not None and k < n:  # tokens a merger makes on top of the budget
            k += stage.merger.extra(k - stage.merger.slots(k, n), n)
        want += k
    return want


def _run_in_tower(model_type: str, selector: Selector, scorers: list[Any]) -> None:
    """The selector at a stage inside the vision tower (layer 1; a block merger from layer 0):
    the tower's tiles keep half their patch tokens, and keep-all is the unpruned model."""
    from ..interfaces import BlockMerging
    from ..pipeline import Pipeline
    from ..stages import Stage
    from ..tiny import tiny_inputs, tiny_lvlm

    model, processor = tiny_lvlm(model_type, vision_layers=3)
    inputs = tiny_inputs(model_type, processor, [_photo(0), _photo(1)],
                         ["What is in the picture?", "Describe the colours."])
    layer = 0 if isinstance(selector, BlockMerging) else 1
    with torch.no_grad():
        reference = model(**inputs).logits
        pipe = Pipeline(None, budget=1.0, stages=[Stage(selector, budget=0.5, vision_layer=layer, scorers=scorers)])
        with pipe.attach(model, processor) as attached:
            model(**inputs)
        stage, batch = pipe.vision_stages[0], attached.last
        tiles, length = batch.tower_tiles, batch.tower_schedule[0][1] // batch.tower_tiles
        assert batch.tower_schedule[-1][1] == tiles * (1 + stage.budget_for(length - 1)), \
            f"{model_type}: the tower's tiles kept {batch.tower_schedule} ({stage.where})"
        keep_all = Pipeline(None, budget=1.0, stages=[Stage(selector, budget=1.0, vision_layer=layer, scorers=scorers)])
        with keep_all.attach(model, processor):
            assert torch.equal(model(**inputs).logits, reference), f"{model_type}: keep-all in the tower is not the " \
                                                                   f"unpruned model"


def _llm_fields() -> set[str]:
    """Fields only a stage inside the LLM has (a strategy reading them runs there, at layer 1)."""
    from ..llm_pruning import IMAGE_FIELDS, LLM_FIELDS

    return set(LLM_FIELDS) - IMAGE_FIELDS


def _llm_provides(model_type: str) -> set[str]:
    """What a stage inside the LLM of ``model_type`` has: the LLM's fields, and the image fields
    (``tiles``, ``frames``, ...) the backbone supplies."""
    from ..llm_pruning import IMAGE_FIELDS

    return _llm_fields() | (set(get_host().injector_for(model_type).provides) & IMAGE_FIELDS) | {"tokens", "positions"}


def _run_resized_on_backbone(model_type: str, selector: Selector) -> None:
    """A selector that resizes images before the processor: on a backbone whose processor gives a
    smaller image fewer tokens, the LLM gets the processor's count for the resized image, at most
    the budget, all kept; a fixed-resolution processor is refused with an ``InvalidInputError``."""
    from ..errors import InvalidInputError
    from ..pipeline import Pipeline
    from ..tiny import tiny_inputs, tiny_lvlm

    model, processor = tiny_lvlm(model_type)
    photos = [_photo(0), _photo(1)]
    full = tiny_inputs(model_type, processor, photos, ["What is in the picture?", "Describe the colours."])
    budget = 0.5
    pipe = Pipeline(selector, budget=budget)
    try:
        resized = pipe.prepare_images(photos, processor)
    except InvalidInputError as exc:
        pytest.skip(f"{model_type}: {exc}")
    inputs = tiny_inputs(model_type, processor, resized, ["What is in the picture?", "Describe the colours."])
    with torch.no_grad(), pipe.attach(model, processor) as attached:
        model(**inputs)
    assert int(inputs["attention_mask"].sum()) < int(full["attention_mask"].sum())
    with torch.no_grad(), Pipeline("uniform", budget=1.0).attach(model, processor) as plain:
        model(**full)
    for sel, before in zip(attached.selections, plain.selections):
        assert sel.k == sel.n <= max(1, int(budget * before.n + 0.5)) < before.n


def _skip_unless_supplied(model_type: str, strategy: Any, also: set[str] = frozenset(),
                          inside: bool | None = None) -> None:
    """Skip the test when what ``strategy`` reads is not there: inside the LLM (``inside``; by
    default where it runs if it reads the LLM's fields) or from ``model_type``'s injector (``also``:
    fields counted as there)."""
    inside = _inside_llm([strategy]) if inside is None else inside
    provides = _llm_provides(model_type) if inside else set(get_host().injector_for(model_type).provides)
    if not set(strategy.requires) <= provides | set(also):
        where = f"{model_type}, inside the LLM," if inside else model_type
        pytest.skip(f"{where} cannot supply {sorted(set(strategy.requires) - provides)}")


def _inside_llm(strategies: list[Any]) -> bool:
    """Whether the strategies read fields only a stage inside the LLM has (then they run at layer 1)."""
    extra = _llm_fields()
    return any(set(s.requires) & extra for s in strategies)


def _pipeline(selector: Selector, scorers: list[Any], budget: Any, merger: Merger | None = None) -> Any:
    from ..pipeline import Pipeline
    from ..stages import Stage

    def scorer_of(entry: Any) -> Any:  # a scorer, or an (output, scorer or its name) pair
        if not isinstance(entry, tuple):
            return entry
        return get_host().scorers.get(entry[1]) if isinstance(entry[1], str) else entry[1]

    strategies = [selector] + [scorer_of(s) for s in scorers]
    if _inside_llm(strategies) or (merger is not None and _inside_llm([merger])):
        return Pipeline(None, budget=budget, stages=[Stage(selector, budget=budget, scorers=scorers, merger=merger,
                                                           layer=1)])
    return Pipeline(selector, budget=budget, scorers=scorers, merger=merger)


def _scorers_for(selector: Selector, model_type: str, given: list[tuple[str, Any]] = ()) -> list[Any]:
    """Scorers writing what the selector needs, from what the backbone can supply: ``given``
    ones (output name, scorer or its name), then the scorers whose default output is the name."""
    writers = {e.cls.output: e.name for e in get_host().scorers.entries()}
    provides = get_host().injector_for(model_type).provides
    out = []
    for name, scorer in given:
        made = get_host().scorers.get(scorer)() if isinstance(scorer, str) else scorer
        if set(made.requires) <= provides:
            out.append((name, made))
    for name in sorted(selector.required_scores() | selector.optional_scores()):
        if name in writers and name not in {n for n, _ in out} and \
                set(get_host().scorers.get(writers[name])().requires) <= provides | _llm_fields():
            out.append((name, writers[name]))
    return out


class SelectorConformance:
    """Base class of a selector's conformance tests; set ``selector`` (and ``params``)."""

    selector: ClassVar[Any] = None
    params: ClassVar[dict[str, Any]] = {}
    scorers: ClassVar[list[tuple[str, Any]]] = []
    """Scores the selector reads under names no scorer writes by default, as ``(name, scorer)``
    pairs, e.g. ``[("cls_attention_early", ClsAttention(layer=0))]``; used on the backbones."""

    def make(self) -> Selector:
        if self.selector is None:
            pytest.skip("set `selector` on the subclass")
        if isinstance(self.selector, str):
            return get_host().selectors.get(self.selector)(dict(self.params))
        return self.selector(dict(self.params))

    def test_contract(self) -> None:
        check_selector_contract(self.make())

    @pytest.mark.parametrize("case", ["bf16", "one-token", "wide"])
    def test_contract_on_other_inputs(self, case: str) -> None:
        ctx = {"bf16": lambda: random_context(dtype=torch.bfloat16),
               "one-token": lambda: random_context(b=1, rows=1, cols=1),
               "wide": lambda: random_context(b=3, rows=4, cols=6, d=32, seed=5)}[case]()
        check_selector_contract(self.make(), context=ctx)

    def test_reachable_by_name(self) -> None:
        sel = self.make()
        assert get_host().selectors.get(sel.name) is type(sel)

    @pytest.mark.parametrize("model_type", BACKBONES)
    def test_runs_on_backbone(self, model_type: str) -> None:
        sel = self.make()
        if sel.resizes_images:
            _run_resized_on_backbone(model_type, sel)
            return
        _skip_unless_supplied(model_type, sel, also={"text", "text_embedder"})
        scorers = _scorers_for(sel, model_type, self.scorers)
        missing = sel.required_scores() - {name for name, _ in scorers}
        if missing:
            pytest.skip(f"{model_type} cannot supply score(s) {sorted(missing)}")
        _run_on_backbone(model_type, _pipeline(sel, scorers, 0.25), _pipeline(sel, scorers, 1.0))

    @pytest.mark.parametrize("model_type", ["llava", "llava_next"])
    def test_runs_in_the_vision_tower(self, model_type: str) -> None:
        sel = self.make()
        offered = get_host().injector_for(model_type).vision_provides
        if _inside_llm([sel]) or not set(sel.requires) <= offered:
            pytest.skip(f"selector '{sel.name}' reads {sorted(set(sel.requires) - offered)}, which a stage inside "
                        f"the vision tower does not have")
        writers = {e.cls.output: e.cls for e in get_host().scorers.entries()}
        scorers = [(name, writers[name]()) for name in sorted(sel.required_scores() | sel.optional_scores())
                   if name in writers and set(writers[name].requires) <= offered]
        missing = sel.required_scores() - {name for name, _ in scorers}
        if missing:
            pytest.skip(f"no scorer writes {sorted(missing)} inside the vision tower")
        _run_in_tower(model_type, sel, scorers)


class ScorerConformance:
    """Base class of a scorer's conformance tests; set ``scorer`` (and ``params``)."""

    scorer: ClassVar[Any] = None
    params: ClassVar[dict[str, Any]] = {}

    def make(self) -> Scorer:
        if self.scorer is None:
            pytest.skip("set `scorer` on the subclass")
        if isinstance(self.scorer, str):
            return get_host().scorers.get(self.scorer)(dict(self.params))
        return self.scorer(dict(self.params))

    def test_contract(self) -> None:
        check_scorer_contract(self.make())
        check_scorer_contract(self.make(), context=random_context(b=3, rows=2, cols=5, d=16, seed=2))

    def test_reachable_by_name(self) -> None:
        sc = self.make()
        assert get_host().scorers.get(sc.name) is type(sc)

    @pytest.mark.parametrize("model_type", BACKBONES)
    def test_runs_on_backbone(self, model_type: str) -> None:
        sc = self.make()
        _skip_unless_supplied(model_type, sc)
        topk = get_host().selectors.get("topk")({"score": sc.output})
        _run_on_backbone(model_type, _pipeline(topk, [sc], 0.25), _pipeline(topk, [sc], 1.0))


class MergerConformance:
    """Base class of a merger's conformance tests; set ``merger`` (and ``params``)."""

    merger: ClassVar[Any] = None
    params: ClassVar[dict[str, Any]] = {}

    def make(self) -> Merger:
        if self.merger is None:
            pytest.skip("set `merger` on the subclass")
        if isinstance(self.merger, str):
            return get_host().mergers.get(self.merger)(dict(self.params))
        return self.merger(dict(self.params))

    def test_contract(self) -> None:
        check_merger_contract(self.make())
        check_merger_contract(self.make(), context=random_context(b=3, rows=4, cols=6, d=16, seed=3))

    def test_reachable_by_name(self) -> None:
        m = self.make()
        assert get_host().mergers.get(m.name) is type(m)

    @pytest.mark.parametrize("model_type", BACKBONES)
    @pytest.mark.parametrize("inside", [False, True], ids=["input", "layer-1"])
    def test_runs_on_backbone(self, model_type: str, inside: bool) -> None:
        from ..pipeline import Pipeline
        from ..stages import Stage

        m = self.make()
        selector, scorers = merger_selector(m)
        _skip_unless_supplied(model_type, m, inside=inside)

        def pipe(budget: Any) -> Pipeline:
            if inside:
                return Pipeline(None, budget=budget, stages=[Stage(selector, budget=budget, scorers=scorers, merger=m,
                                                                   layer=1)])
            return Pipeline(selector, budget=budget, scorers=scorers, merger=m)

        _run_on_backbone(model_type, pipe(0.25), pipe(1.0))


def masked_out_dropped(model: Any, inputs: Any, attached: Any) -> dict[str, Any]:
    """``inputs`` with the attention mask at 0 on every image or video placeholder the last pruned
    call of ``attached`` dropped: the unpruned model that sees only the kept visual tokens."""
    ids, cols = inputs["input_ids"], attached.last.columns
    mask = inputs["attention_mask"].clone()
    rows = torch.arange(ids.shape[0])[:, None].expand_as(cols)
    kept = torch.zeros_like(mask, dtype=torch.bool)
    kept[rows[cols >= 0], cols[cols >= 0]] = True
    placeholder = torch.isin(ids, torch.tensor(attached.injector.placeholder_ids(model), device=ids.device))
    mask[placeholder & ~kept] = 0
    return {**inputs, "attention_mask": mask}


def pruned_forward_positions(columns: Tensor, input_ids: Tensor) -> Tensor:
    """``[B, L]`` position ids for the unpruned prompt that give each kept column the position the
    pruned forward gives it: its place in the re-padded row (1-D positions, as LLaVA's)."""
    positions = torch.zeros_like(input_ids)
    for r in range(input_ids.shape[0]):
        valid = columns[r] >= 0
        positions[r, columns[r][valid]] = torch.arange(columns.shape[1], device=input_ids.device)[valid]
    return positions


def assert_equal_at_kept_columns(pruned: Tensor, reference: Tensor, columns: Tensor, atol: float = 1e-5) -> None:
    """The pruned sequence's outputs ``[B, L', ...]`` equal the reference's ``[B, L, ...]`` at the
    original column of every kept column (``columns``: ``PrunedBatch.columns``), within ``atol``."""
    for r in range(columns.shape[0]):
        valid = columns[r] >= 0
        torch.testing.assert_close(pruned[r, valid], reference[r, columns[r][valid]], rtol=0, atol=atol)


class InjectorConformance:
    """Base class of an injector's conformance tests: the checks every built-in backbone passes.

    Set ``model_type`` to a type ``resprune.testing.tiny_lvlm`` builds, or override ``load``
    (``(model, processor)`` of a tiny model of your backbone with ``attn_implementation``) and
    ``inputs`` (a left-padded batch of ``batch`` one-image chats). The tests:

    - keep-all (a budget at or above ``N``) is bit-identical to the unpruned model, ``forward``
      logits and every ``generate`` step, SDPA and eager, batch 1 and 2; the model is unchanged
      after the handle is removed;
    - a budget keeps exactly that many tokens per image, every text column, in order;
    - pruned ``forward`` equals the unpruned model with the dropped image tokens masked out of
      attention, within ``1e-5`` (``masked_reference``: positions re-indexed contiguously, as
      for the LLaVA family; override it for a backbone that keeps original positions, as
      Qwen2.5-VL's M-RoPE; override ``reference_logits`` where layers cannot mask, as Qwen3.5's
      linear attention);
    - ``generate`` returns the caller's prompt and the new tokens, greedy and with beams.
    """

    model_type: ClassVar[str | None] = None
    prompts: ClassVar[tuple[str, ...]] = ("What is in the picture?", "Describe the colours of the sky, please.")
    attach_params: ClassVar[dict[str, Any]] = {}
    """Injector params for every ``attach`` (InternVL: ``scope="global"``, so that budgets below an
    image's tile count are allowed)."""

    def load(self, attn: str = "sdpa") -> tuple[Any, Any]:
        if self.model_type is None:
            pytest.skip("set `model_type` (or override `load` and `inputs`) on the subclass")
        from ..tiny import tiny_lvlm

        return tiny_lvlm(self.model_type, seed=0, attn_implementation=attn)

    def inputs(self, processor: Any, batch: int) -> Any:
        from ..tiny import tiny_inputs

        return tiny_inputs(self.model_type, processor, [_photo(i) for i in range(batch)], list(self.prompts[:batch]))

    def pipeline(self, budget: Any) -> Any:
        """The pipeline the tests attach: norm-seeded ResPrune (no CLS attention needed)."""
        from ..pipeline import Pipeline

        selector = get_host().selectors.get("residual_energy")({"seed": "norm"})
        return Pipeline(selector, budget=budget, scorers=["norm"])

    def masked_reference(self, model: Any, inputs: Any, attached: Any) -> dict[str, Any]:
        """The unpruned inputs with the dropped image tokens masked out and each kept column at
        the position it has in the pruned forward (its place in the re-padded row)."""
        reference = masked_out_dropped(model, inputs, attached)
        return {**reference, "position_ids": pruned_forward_positions(attached.last.columns, inputs["input_ids"])}

    def reference_logits(self, model: Any, inputs: Any, attached: Any) -> Tensor:
        """Logits ``[B, L, V]`` at the columns of the unpruned prompt that the pruned forward must
        match at its kept columns: the unpruned model on ``masked_reference``. Override it for a
        backbone whose layers cannot mask a token out (linear attention, as Qwen3.5's): there the
        reference is the model fed the pruned prompt directly, its logits put at their columns."""
        return model(**self.masked_reference(model, inputs, attached)).logits

    @staticmethod
    def _generate(model: Any, inputs: Any, **kw: Any) -> Any:
        kw = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_logits": True, **kw}
        return model.generate(**inputs, **kw)

    @pytest.mark.parametrize("attn", ["sdpa", "eager"])
    @pytest.mark.parametrize("batch", [1, 2])
    def test_keep_all_is_bit_identical(self, attn: str, batch: int) -> None:
        model, processor = self.load(attn)
        inputs = self.inputs(processor, batch)
        before = set(model.__dict__)
        with torch.no_grad():
            logits = model(**inputs).logits
            reference = self._generate(model, inputs)
            with self.pipeline(10**9).attach(model, processor, **self.attach_params) as attached:
                assert torch.equal(model(**inputs).logits, logits), "keep-all forward differs from the model"
                out = self._generate(model, inputs)
            assert all(s.k == s.n for s in attached.selections)
        assert torch.equal(out.sequences, reference.sequences), "keep-all generate differs from the model"
        assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits))
        assert set(model.__dict__) == before, "the model keeps attributes after the handle is removed"

    @pytest.mark.parametrize("budget", [1, 3, 0.5])
    def test_a_budget_keeps_that_many_tokens_per_image_and_every_text_column(self, budget: Any) -> None:
        from ..budget import resolve_budget

        model, processor = self.load()
        inputs = self.inputs(processor, 2)
        with self.pipeline(budget).attach(model, processor, **self.attach_params) as attached, torch.no_grad():
            batch = attached.prune(inputs)
        assert [s.k for s in batch.selections] == [resolve_budget(budget, s.n) for s in batch.selections]
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        placeholder = torch.isin(ids, torch.tensor(attached.injector.placeholder_ids(model)))
        for r in range(ids.shape[0]):
            cols = batch.columns[r][batch.columns[r] >= 0]
            assert torch.equal(cols, cols.sort().values), "kept columns are out of order"
            text = (mask[r] & ~placeholder[r]).nonzero().flatten()
            assert set(text.tolist()) <= set(cols.tolist()), "a text column was dropped"
            assert torch.equal(batch.input_ids[r][batch.columns[r] >= 0], ids[r, cols])
        assert torch.equal(batch.attention_mask.bool(), batch.columns >= 0)

    @pytest.mark.parametrize("budget", [1, 0.3])
    def test_pruned_forward_equals_the_masked_unpruned_model(self, budget: Any) -> None:
        model, processor = self.load()
        inputs = self.inputs(processor, 2)
        with self.pipeline(budget).attach(model, processor, **self.attach_params) as attached, torch.no_grad():
            logits = model(**inputs).logits
        with torch.no_grad():
            reference = self.reference_logits(model, inputs, attached)
        assert_equal_at_kept_columns(logits, reference, attached.last.columns)

    @pytest.mark.parametrize("mode", [{}, {"num_beams": 2, "num_return_sequences": 2}])
    def test_generate_returns_the_callers_prompt_then_new_tokens(self, mode: dict[str, Any]) -> None:
        model, processor = self.load()
        inputs = self.inputs(processor, 2)
        with self.pipeline(3).attach(model, processor, **self.attach_params), torch.no_grad():
            out = self._generate(model, inputs, **mode).sequences
        prompt = inputs["input_ids"].repeat_interleave(mode.get("num_return_sequences", 1), 0)
        assert torch.equal(out[:, : prompt.shape[1]], prompt)
        assert out.shape[1] <= prompt.shape[1] + 4
