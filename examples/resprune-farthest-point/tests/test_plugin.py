"""The example plugin passes resprune's conformance suites and runs in a pipeline."""

from __future__ import annotations

import torch

import resprune
from resprune.testing.conformance import ScorerConformance, SelectorConformance


class TestFarthestPoint(SelectorConformance):
    selector = "farthest_point"


class TestFarthestPointSeeded(SelectorConformance):
    selector = "farthest_point"
    params = {"seed": "distinctiveness"}


class TestDistinctiveness(ScorerConformance):
    scorer = "distinctiveness"


def test_installed_plugin_is_listed_with_its_distribution():
    row = next(r for r in resprune.list_plugins() if r["plugin"] == "farthest_point")
    assert row["distribution"] == "resprune-farthest-point"
    assert row["selectors"] == ["farthest_point"] and row["scorers"] == ["distinctiveness"]


def test_farthest_point_is_k_center_greedy():
    v = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 1.0], [5.0, 5.0], [9.0, 1.0]])
    # largest norm first (10, 0), then the farthest from it (0, 1), then (5, 5)
    assert resprune.select(v, 3, selector="kcenter", order="selection").tolist() == [1, 2, 3]


def test_a_yaml_pipeline_using_the_plugin_on_a_tiny_llava(tiny_llava):
    model, processor = tiny_llava
    pipe = resprune.load_pipeline({"budget": 8, "scorers": [{"name": "distinctiveness"}],
                                   "selector": {"name": "farthest_point", "params": {"seed": "distinctiveness"}}})
    from resprune.testing import tiny_inputs
    from resprune.data import photo_path
    from PIL import Image

    inputs = tiny_inputs("llava", processor, [Image.open(photo_path("coffee"))], ["What color is the cup?"])
    with pipe.attach(model, processor) as attached, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3)
    (sel,) = attached.selections
    assert sel.k == 8 and sel.order[0] == int(sel.scores["distinctiveness"].argmax())
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
