"""A refusal's cheaper options state what each would save of the peak, not the size of the parts it changes.

Before: "fewer probes" said its pushes and ledgers "take" X GiB, "group_state='factored'" saved "most of the
group arrays' X GiB", whether or not those parts were in the phase the peak is reached in: a cost hunt had a
dense-route step whose peak was the training pass (a 1.59 GiB row backward) told that fewer probes would help,
where they save nothing. Now each option's number is the fall of the peak (the phases recomputed with the parts
changed), and 0.00 where the parts are outside the peak phase."""
import re

import torch

from genkernel.core.cost import GiB, STEP_TEMPORARIES, CostEstimate, _cheaper_options


def estimate(training_activations: float, pushes: float, group_state: float) -> CostEstimate:
    memory = {"training_activations": int(training_activations * GiB), "probe_pushes": int(pushes * GiB),
              "ledgers": int(0.01 * GiB), "group_state": int(group_state * GiB),
              "group_updates": int(0.5 * group_state * GiB)}
    phases = {"training pass": ("training_activations",), "analysis": STEP_TEMPORARIES}
    return CostEstimate(memory, 0, {"pushes": 1.0}, 1.0, 0, phases=phases,
                        settings={"rows": 8, "probes": 64, "ema": False, "quadrature_nodes": 1})


def saving(options: list[str], name: str) -> float:
    [text] = [o for o in options if o.startswith(name)]
    return float(re.search(r"the peak falls by (?:at most )?([0-9.]+) GiB", text).group(1))


def options_of(e: CostEstimate) -> list[str]:
    return _cheaper_options(e, "dense", torch.float64, True, ("groups", "group_state", "state_dtype", "probes"),
                            ("dense", "factored", "sketched"))


def test_parts_outside_the_peak_phase_save_nothing():
    """Fails on the old code (no saving stated: "their pushes and the ledgers take 1.01 GiB"): the peak is the
    training pass's 4 GiB, and the probes' pushes (1 GiB) are in the analysis phase: only the ledgers (0.01 GiB,
    held throughout) come off."""
    e = estimate(training_activations=4.0, pushes=1.0, group_state=0.2)
    assert e.peak_phase == "training pass"
    options = options_of(e)
    assert saving(options, "fewer probes") == 0.01
    # the group state is held throughout: all of it comes off the peak, the updates (analysis phase) do not
    assert saving(options, "group_state='factored'") == 0.2
    assert saving(options, "state_dtype=torch.float32") == 0.1


def test_parts_in_the_peak_phase_save_down_to_the_next_phase():
    """Fails on the old code: the analysis phase (3 GiB of pushes) is the peak, 1 GiB above the training pass:
    fewer probes lower the peak by at most that 1 GiB and the ledgers' 0.01 (where the old text named 3.01 GiB)."""
    e = estimate(training_activations=2.0, pushes=3.0, group_state=0.0)
    assert e.peak_phase == "analysis"
    assert saving(options_of(e), "fewer probes") == 1.01


def test_describe_says_what_is_free_and_what_is_held():
    """Fails on the old code, which read "(...; 0.5 GiB, 2.00 GiB of the training step already held free)": the held
    bytes are not free. Now "0.5 GiB free, beside the training step's 2.00 GiB already held"."""
    e = estimate(training_activations=1.0, pushes=0.5, group_state=0.1)
    e.available, e.held = int(0.5 * GiB), int(2 * GiB)
    text = e.describe()
    assert "0.5 GiB free, beside the training step's 2.00 GiB already held)" in text and "held free" not in text
    e.available = None
    assert "free memory unknown, beside" in e.describe()
