"""Every built-in strategy passes the conformance suites plugin authors run on theirs."""

from __future__ import annotations

from resprune.plugins import get_host
from resprune.testing.conformance import MergerConformance, ScorerConformance, SelectorConformance

for _entry in get_host().selectors.entries():
    if _entry.plugin.startswith("resprune."):
        globals()[f"TestSelector_{_entry.name}"] = type(f"TestSelector_{_entry.name}", (SelectorConformance,),
                                                        {"selector": _entry.name})
for _entry in get_host().scorers.entries():
    if _entry.plugin.startswith("resprune."):
        globals()[f"TestScorer_{_entry.name}"] = type(f"TestScorer_{_entry.name}", (ScorerConformance,),
                                                      {"scorer": _entry.name})
for _entry in get_host().mergers.entries():
    if _entry.plugin.startswith("resprune."):
        globals()[f"TestMerger_{_entry.name}"] = type(f"TestMerger_{_entry.name}", (MergerConformance,),
                                                      {"merger": _entry.name})
