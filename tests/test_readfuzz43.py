"""The reading side against brute force (helper "readfuzz43", session 43).

The fuzzer (kept outside the repository) built small diffusion and GAN analyzers over random settings (bins, probe
levels listed in any order or repeated, one probe or many, controls 0-4, bands, the EMA weights' ledgers, float32
and float64, dense / factored group state, track_steps windows, comparison groupings), trained a few steps and
recomputed every readout by hand from the ledgers' raw contributions: shares, traffic shares, the noise × noise
matrices, locality (band totals, the clustered measured-minus-control interval, the per-level interval over the
partitions), the residual, the GAN partition statistics (matrices, own share, interaction, minus control), and the
summary of the saved state against the live analyzer's readout; genkernel.stats' intervals against scipy and
brute-force formulas; kernel_stats and neighbours against pairwise brute force. These tests pin what it found.
"""


import pytest
import torch

from genkernel.core import grouping

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def test_a_level_whose_band_covers_every_bin_is_never_held_per_level():
    """Three bins, band 1, one probe at a level of each bin: the middle level's band holds all three bins, so its
    measured and control band totals are the whole traffic share, 1 for every partition but for rounding (here
    1 + 2⁻⁵¹ measured against 1, 1, 1 − 2⁻⁵³, 1). The overall claim is not covering (the levels in bins 0 and 2 have
    a bin outside their band), but the middle level's own per-level entry has nothing outside it either: it must
    never be held, as the covering band is not.

    Fails on the old code: per_level[1]["traffic"]["held"] (and "share") was True, a difference of 4.4e-16 with the
    interval [2.2e-16, 6.7e-16] over the control partitions. In a trained analyzer (6 bins, band=4, 4 controls, the
    report's own band) a level in bin 1 read traffic held with a difference of 3.3e-16, interval [1.1e-17, 6.6e-16];
    the fuzzer found such rounding "held" levels in 5 of 650 trained configurations, for the net share too (a
    float32 model with num_bins=2 and band=1, which the analyzer accepts: a difference of 9.2e-8, interval
    [4.9e-8, 1.4e-7]; the EMA weights' ledgers alike)."""
    eps = 2.0 ** -52
    measured = torch.tensor([[0.75, 0.25, 0.0], [0.5, 0.5 + 2 * eps, 0.0], [0.0, 0.25, 0.75]], dtype=F64)
    controls = []
    for low in (0.5, 0.5, 0.5 - eps / 2, 0.5):
        controls.append(torch.tensor([[0.75, 0.25, 0.0], [low, 0.5, 0.0], [0.0, 0.25, 0.75]], dtype=F64))
    probe_groups = torch.tensor([0, 1, 2])
    out = grouping.band_locality(measured, measured, controls, controls, probe_groups, 1, 3, torch.arange(3),
                                 [(5, 0), (20, 1), (40, 2)])
    middle = out["per_level"][1]
    # the arithmetic the interval rests on: a rounding-sized difference and spread (not a real effect)
    assert 0 < middle["traffic"]["difference"] < 4 * eps
    assert "why" not in out["traffic"]  # the overall band is not covering: bins 0 and 2 have a bin outside
    for key in ("traffic", "share"):
        assert middle[key]["held"] is False
        assert "holds all 3 bins" in middle[key]["why"]
    for i in (0, 2):  # the levels with a bin outside their band keep their own reading (here: no control spread)
        assert "holds all" not in out["per_level"][i]["traffic"].get("why", "")
