"""The remembered pass measures keep the recently used signatures.

Before: past SIGNATURES_KEPT the oldest remembered signature went, used or not: a loop that alternates one steady
signature (its training batches) with a stream of new ones (ragged last batches, new probe sets) measured the steady
one again every SIGNATURES_KEPT calls (a forward and backward on one and two examples each time)."""

from __future__ import annotations

from torch import nn

from genkernel.core.engine.gradients import SIGNATURES_KEPT, _Measures


def test_a_recalled_signature_outlives_newer_ones():
    model = nn.Linear(3, 2)
    measures = _Measures()
    for k in range(SIGNATURES_KEPT):
        measures.remember(model, ("batch", k), None, k)
    assert measures.recall(model, ("batch", 0), None) == 0  # the steady one, used again
    measures.remember(model, ("batch", SIGNATURES_KEPT), None, SIGNATURES_KEPT)
    assert measures.recall(model, ("batch", 0), None) == 0
    assert measures.recall(model, ("batch", 1), None) is None  # the least recently used went
    assert len(measures[model]) == SIGNATURES_KEPT


def test_remembering_a_kept_signature_again_refreshes_it():
    model = nn.Linear(3, 2)
    measures = _Measures()
    for k in range(SIGNATURES_KEPT):
        measures.remember(model, ("batch", k), None, k)
    measures.remember(model, ("batch", 0), None, "again")
    measures.remember(model, ("batch", SIGNATURES_KEPT), None, SIGNATURES_KEPT)
    assert measures.recall(model, ("batch", 0), None) == "again"
    assert measures.recall(model, ("batch", 1), None) is None
