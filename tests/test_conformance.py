"""Every built-in strategy passes the conformance suites plugin authors run on theirs."""

from __future__ import annotations

from resprune.plugins import get_host
from resprune.strategies.cls_attention import ClsAttention
from resprune.testing.conformance import InjectorConformance, MergerConformance, ScorerConformance, SelectorConformance

SCORERS = {"hired": [("cls_attention_early", ClsAttention(layer=0))]}
"""Scores a built-in selector reads under names no scorer writes by default."""
MERGER_PARAMS = {"recycle": {"score": "norm"}, "prumerge": {"score": "norm"}}
"""Params of a built-in merger for the suites' stages (``topk`` by ``norm``)."""

for _entry in get_host().selectors.entries():
    if _entry.plugin.startswith("resprune."):
        globals()[f"TestSelector_{_entry.name}"] = type(f"TestSelector_{_entry.name}", (SelectorConformance,),
                                                        {"selector": _entry.name,
                                                         "scorers": SCORERS.get(_entry.name, [])})
for _entry in get_host().scorers.entries():
    if _entry.plugin.startswith("resprune."):
        globals()[f"TestScorer_{_entry.name}"] = type(f"TestScorer_{_entry.name}", (ScorerConformance,),
                                                      {"scorer": _entry.name})
for _entry in get_host().mergers.entries():
    if _entry.plugin.startswith("resprune."):
        globals()[f"TestMerger_{_entry.name}"] = type(f"TestMerger_{_entry.name}", (MergerConformance,),
                                                      {"merger": _entry.name,
                                                       "params": MERGER_PARAMS.get(_entry.name, {})})


class TestScorer_cls_attention_layer0(ScorerConformance):
    """``cls_attention`` at an encoder layer (the ``cls_attention_layers`` field)."""

    scorer = "cls_attention"
    params = {"layer": 0}


# --- injectors: every built-in backbone passes the suite a new backbone runs ------------------------


class TestInjector_llava(InjectorConformance):
    model_type = "llava"


class TestInjector_llava_next(InjectorConformance):
    model_type = "llava_next"


class TestInjector_llava_onevision(InjectorConformance):
    model_type = "llava_onevision"


class TestInjector_gemma3(InjectorConformance):
    model_type = "gemma3"


class TestInjector_qwen2_5_vl(InjectorConformance):
    """Qwen2.5-VL keeps each kept token's original M-RoPE position: its reference says so."""

    model_type = "qwen2_5_vl"

    def masked_reference(self, model, inputs, attached):
        reference = super().masked_reference(model, inputs, attached)
        positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                  inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
        return {**reference, "position_ids": positions}


class TestInjector_qwen3_vl(TestInjector_qwen2_5_vl):
    """Qwen3-VL keeps M-RoPE positions like Qwen2.5-VL, and its DeepStack features follow the kept tokens."""

    model_type = "qwen3_vl"


class TestInjector_qwen3_5(TestInjector_qwen2_5_vl):
    """Qwen3.5: Qwen3-VL's vision side before a hybrid LLM. Its Gated DeltaNet layers cannot mask a
    token out, so the reference is the model fed the pruned prompt, built by hand."""

    model_type = "qwen3_5"

    def reference_logits(self, model, inputs, attached):
        from test_backbones import at_original_columns, pruned_prompt_inputs

        reference, columns = pruned_prompt_inputs(model, inputs, attached.selections)
        return at_original_columns(model(**reference).logits, columns, inputs["input_ids"].shape[1])


class TestInjector_internvl(InjectorConformance):
    """InternVL3: crops and a thumbnail per image. The suite's budgets go below an image's 7 tiles, so
    one budget per image (``scope="global"``); budgets per tile are tested in tests/test_backbones.py."""

    model_type = "internvl"
    attach_params = {"scope": "global"}
