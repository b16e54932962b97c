"""Review of the ledger, the quadrature rules and io against brute-force references: a hand-built
float64 numpy ledger, exact polynomial integrals, and clear errors for input that used to be
accepted silently (a wrong shape broadcast, a group id outside [0, G), a repeated id)."""

from __future__ import annotations

import json
import math
import os
import stat
from fractions import Fraction

import numpy as np
import pytest
import torch

from genkernel.core.tracking import io as gio
from genkernel.core.tracking.io import atomic_save, jsonable, load_state, to_device
from genkernel.core.tracking.ledger import PathKernelLedger
from genkernel.core.tracking.quadrature import QUADRATURE_RULES, QuadratureRule, quadrature_rule, residual_remedy

F64 = torch.float64
M, G, D = 5, 7, 3


def _steps(seed: int, count: int = 6):
    """Random steps, each with the columns it touches: every group, a consecutive run, scattered ids."""
    rng = np.random.default_rng(seed)
    layouts = [None, [2, 3, 4], [6, 0, 3], [1], [], None]
    for k in range(count):
        cols = layouts[k % len(layouts)]
        width = G if cols is None else len(cols)
        yield (cols, rng.normal(size=(M, width, D)), rng.normal(size=(M, D)), rng.normal(size=(M, D)) * 1e-3,
               rng.normal(size=(M, D)) * 0.1, rng.normal(size=(M, D)) * 0.01)


def _run(seed: int = 0, count: int = 6, snapshot_every: int = 0):
    """A ledger fed random steps, and the numpy float64 reference built by hand beside it."""
    rng = np.random.default_rng(100 + seed)
    f = rng.normal(size=(M, D))
    ledger = PathKernelLedger.empty(torch.tensor(f), G)
    ref = {"C": np.zeros((M, G, D)), "T": np.zeros((M, G)), "rest": np.zeros((M, D)), "sk": np.zeros((M, D)),
           "drift": np.zeros((M, D)), "f0": f.copy(), "f": f.copy()}
    for cols, c, rest, sk, jump, drift in _steps(seed, count):
        f_new = ref["f"] + c.sum(axis=1) + rest + sk + jump  # jump: what no term explains (the residual)
        index = list(range(G)) if cols is None else cols
        for j, g in enumerate(index):
            ref["C"][:, g] += c[:, j]
            ref["T"][:, g] += np.sqrt((c[:, j] ** 2).sum(axis=1))
        ref["rest"] += rest
        ref["sk"] += sk
        ref["drift"] += drift
        ref["f"] = f_new
        ledger.record(torch.tensor(c), torch.tensor(rest), torch.tensor(f_new), torch.tensor(sk), torch.tensor(drift),
                      columns=None if cols is None else torch.tensor(cols, dtype=torch.long))
        if snapshot_every and ledger.steps % snapshot_every == 0:
            ledger.snapshot()
    ref["R"] = ref["f"] - ref["f0"] - ref["C"].sum(axis=1) - ref["rest"] - ref["sk"]
    return ledger, ref


def _fields(ledger):
    return {k: getattr(ledger, k).clone() for k in
            ("contributions", "rest", "residual", "f_start", "f_end", "traffic", "buffer_drift", "sketch_error")}


# -- the ledger's numbers against a hand-built reference (coverage) -----------------------------
def test_ledger_fields_and_summaries_match_a_hand_built_float64_reference():
    ledger, ref = _run()
    for name, key in (("contributions", "C"), ("traffic", "T"), ("rest", "rest"), ("sketch_error", "sk"),
                      ("buffer_drift", "drift"), ("residual", "R"), ("f_end", "f")):
        np.testing.assert_allclose(getattr(ledger, name).numpy(), ref[key], rtol=0, atol=1e-12, err_msg=name)
    delta = ref["f"] - ref["f0"]
    norm2 = (delta ** 2).sum(axis=1)
    shares = ledger.shares()
    np.testing.assert_allclose(shares.groups.numpy(), np.einsum("mgd,md->mg", ref["C"], delta) / norm2[:, None], atol=1e-12)
    total = shares.groups.sum(1) + shares.rest + shares.residual + shares.sketch_error
    np.testing.assert_allclose(total.numpy(), np.ones(M), atol=1e-12)  # the shares sum to 1 per probe
    kappa = np.sqrt((ref["C"] ** 2).sum(axis=2)).sum(axis=1) / np.sqrt(norm2)
    np.testing.assert_allclose(ledger.cancellation_ratio().numpy(), kappa, rtol=1e-12)
    np.testing.assert_allclose(ledger.traffic_shares().numpy(), ref["T"] / ref["T"].sum(axis=1, keepdims=True), rtol=1e-12)
    assert ledger.relative_residual() == pytest.approx(np.linalg.norm(ref["R"]) / np.linalg.norm(delta), rel=1e-12)
    per_probe = np.sqrt((ref["R"] ** 2).sum(axis=1) / norm2)
    np.testing.assert_allclose(ledger.probe_relative_residual().numpy(), per_probe, rtol=1e-12)
    assert ledger.summary()["max_probe_relative_residual"] == pytest.approx(per_probe.max(), rel=1e-12)


def test_zero_change_gives_nan_ratios_not_numbers():
    """0/0: a probe that did not move has no share, κ or relative residual (coverage)."""
    ledger = PathKernelLedger.empty(torch.zeros(2, 1, dtype=F64), 2)
    c = torch.tensor([[[1.0], [-1.0]], [[0.5], [0.25]]], dtype=F64)
    ledger.record(c, torch.zeros(2, 1, dtype=F64), c.sum(1))  # probe 0: +1 − 1, no change
    assert torch.isnan(ledger.shares().groups[0]).all() and torch.isnan(ledger.cancellation_ratio()[0])
    assert ledger.cancellation_ratio()[1] == pytest.approx(1.0)
    assert torch.isnan(ledger.probe_relative_residual()[0])


# -- record: bad input refused before anything is written (fail on old) ------------------------
@pytest.mark.parametrize("case", ["one_column_for_all", "rest_without_probes", "f_new_of_one_probe"])
def test_record_refuses_steps_of_another_shape(case):
    """Old code broadcast a [M, 1, d] step into all G groups (G times the contribution booked, while
    the running residual stayed at its old value), and a [d] rest or f_new into every probe."""
    ledger, _ = _run(count=2)
    before = _fields(ledger)
    c, rest, f_new = torch.ones(M, G, D, dtype=F64), torch.zeros(M, D, dtype=F64), ledger.f_end + G
    if case == "one_column_for_all":
        c = torch.ones(M, 1, D, dtype=F64)
    elif case == "rest_without_probes":
        rest = torch.zeros(D, dtype=F64)
    else:
        f_new = f_new[0]
    with pytest.raises(ValueError, match="must have shape"):
        ledger.record(c, rest, f_new)
    for key, value in _fields(ledger).items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("columns", [[-1], [G], [G - 1, G], [3, 3], [5, 1, 5]])
def test_record_refuses_columns_outside_the_groups_or_repeated(columns):
    """Old code: id −1 or G made an empty slice that the step broadcast into (its contribution
    vanished from every group, into the residual); a repeated id added the norms of the pieces to
    traffic instead of the norm of the group's step contribution."""
    ledger, _ = _run(count=2)
    before = _fields(ledger)
    c = torch.ones(M, len(columns), D, dtype=F64)
    with pytest.raises(ValueError, match="columns must be"):
        ledger.mark(torch.tensor(columns))
    with pytest.raises(ValueError, match="columns must be"):
        ledger.record(c, torch.zeros(M, D, dtype=F64), ledger.f_end + c.sum(1), columns=torch.tensor(columns))
    for key, value in _fields(ledger).items():
        assert torch.equal(value, before[key]), key


def test_float32_steps_keep_the_residual_equal_to_its_definition():
    """Old code summed a float32 step over its groups in float32 for the running residual (and took
    traffic norms in float32): with 3000 groups the residual was 8.8e-6 off its definition
    f_end − f_start − Σ C − rest − sketch error, which the same ledger gave as 0."""
    gen = torch.Generator().manual_seed(0)
    groups = 3000
    ledger = PathKernelLedger.empty(torch.zeros(4, 3, dtype=F64), groups)
    c = torch.randn(4, groups, 3, generator=gen).float()
    ledger.record(c, torch.zeros(4, 3, dtype=F64), c.double().sum(1))
    definition = ledger.delta - ledger.contributions.sum(1) - ledger.rest - ledger.sketch_error
    assert float((ledger.residual - definition).abs().max()) <= 1e-12
    assert float((ledger.traffic - c.double().norm(dim=2)).abs().max()) <= 1e-12


def test_empty_refuses_outputs_that_are_not_a_matrix():
    with pytest.raises(ValueError, match="f_start must be the probes' outputs as an \\[M, d\\]"):
        PathKernelLedger.empty(torch.zeros(4, dtype=F64), 2)
    with pytest.raises(ValueError, match="num_groups"):
        PathKernelLedger.empty(torch.zeros(4, 1, dtype=F64), -1)


# -- mark / restore / snapshots ------------------------------------------------------------------
@pytest.mark.parametrize("columns", [None, [2, 3, 4], [6, 0, 3]])
def test_restore_undoes_a_record_and_its_snapshot_exactly(columns):
    """coverage: mark, record, snapshot, restore gives the ledger back bit for bit."""
    ledger, _ = _run(count=3, snapshot_every=1)
    before, history, steps = _fields(ledger), len(ledger.history), ledger.steps
    cols = None if columns is None else torch.tensor(columns)
    mark = ledger.mark(cols)
    width = G if columns is None else len(columns)
    ledger.record(torch.randn(M, width, D, dtype=F64), torch.randn(M, D, dtype=F64), ledger.f_end + 1,
                  torch.randn(M, D, dtype=F64), torch.randn(M, D, dtype=F64), columns=cols)
    ledger.snapshot()
    ledger.restore(mark)
    assert ledger.steps == steps and len(ledger.history) == history
    for key, value in _fields(ledger).items():
        assert torch.equal(value, before[key]), key


def test_snapshots_hold_the_buffer_drift():
    """The docstring says a snapshot holds the fields (``rest`` and the part of it that is buffer
    drift): old snapshots left ``buffer_drift`` out, so a snapshot's rest could not be split."""
    ledger, ref = _run(count=4, snapshot_every=2)
    assert [h["step"] for h in ledger.history] == [2, 4]
    np.testing.assert_allclose(ledger.history[-1]["buffer_drift"].numpy(), ref["drift"], atol=1e-12)


# -- windows, copies, states -----------------------------------------------------------------------
def test_since_is_the_ledger_of_the_later_steps_and_refuses_another_ledger():
    """The window's fields equal a ledger started at the earlier copy and fed the later steps
    (coverage); an "earlier" copy of another ledger with the same shape was accepted (fail on old)."""
    steps = list(_steps(3, 6))
    rng = np.random.default_rng(7)
    f0 = torch.tensor(rng.normal(size=(M, D)))
    whole = PathKernelLedger.empty(f0, G)
    earlier = None
    for k, (cols, c, rest, sk, jump, drift) in enumerate(steps):
        if k == 3:
            earlier, tail = whole.copy(), PathKernelLedger.empty(whole.f_end, G)
        f_new = whole.f_end + torch.tensor(c.sum(axis=1) + rest + sk + jump)
        args = (torch.tensor(c), torch.tensor(rest), f_new, torch.tensor(sk), torch.tensor(drift))
        kwargs = {"columns": None if cols is None else torch.tensor(cols, dtype=torch.long)}
        whole.record(*args, **kwargs)
        if k >= 3:
            tail.record(*args, **kwargs)
    window = whole.since(earlier)
    assert window.steps == tail.steps == 3
    for key in ("contributions", "rest", "residual", "f_start", "f_end", "traffic", "buffer_drift", "sketch_error"):
        torch.testing.assert_close(getattr(window, key), getattr(tail, key), rtol=0, atol=1e-12)
    stranger = PathKernelLedger.empty(f0 + 1, G)
    with pytest.raises(ValueError, match="earlier copy of this same ledger"):
        whole.since(stranger)


def test_from_state_dict_gives_a_ledger_of_its_own():
    """Old code built the ledger on the state's own tensors and history list: record (which adds in
    place) into one ledger changed the state and every other ledger loaded from it (two trackers
    loaded from one state dict)."""
    ledger, _ = _run(count=3, snapshot_every=1)
    state = ledger.state_dict()
    a, b = PathKernelLedger.from_state_dict(state), PathKernelLedger.from_state_dict(state)
    kept = _fields(b)
    a.record(torch.ones(M, G, D, dtype=F64), torch.ones(M, D, dtype=F64), a.f_end + G + 1)
    a.snapshot()
    for key, value in _fields(b).items():
        assert torch.equal(value, kept[key]), key
    assert torch.equal(state["contributions"], kept["contributions"]) and len(state["history"]) == 3 == len(b.history)


def test_state_round_trip_through_a_file_is_exact_and_float64(tmp_path):
    """coverage: save/load gives every field and snapshot back bit for bit, float64 on the CPU."""
    ledger, _ = _run(count=4, snapshot_every=2)
    ledger.save(tmp_path / "ledger.pt")
    loaded = PathKernelLedger.load(tmp_path / "ledger.pt")
    assert loaded.steps == ledger.steps and len(loaded.history) == 2
    for key, value in _fields(ledger).items():
        assert getattr(loaded, key).dtype == F64 and torch.equal(getattr(loaded, key), value), key
    for mine, theirs in zip(ledger.history, loaded.history):
        assert mine.keys() == theirs.keys() and all(
            torch.equal(v, theirs[k]) if isinstance(v, torch.Tensor) else v == theirs[k] for k, v in mine.items())


def test_from_state_dict_refuses_inconsistent_or_foreign_states():
    """Old code accepted fields of disagreeing shapes (a rest of other probes) and failed later, or
    never, with broadcast numbers; an unknown key gave a bare TypeError."""
    ledger, _ = _run(count=1)
    state = ledger.state_dict()
    with pytest.raises(ValueError, match="disagree with contributions"):
        PathKernelLedger.from_state_dict({**state, "rest": torch.zeros(M + 1, D, dtype=F64)})
    with pytest.raises(ValueError, match="disagree with contributions"):
        PathKernelLedger.from_state_dict({**state, "traffic": torch.zeros(M, G + 1, dtype=F64)})
    with pytest.raises(ValueError, match="not a PathKernelLedger state"):
        PathKernelLedger.from_state_dict({**state, "kernel": torch.zeros(1)})


def test_from_state_dict_makes_a_float32_state_float64():
    """The ledger is float64 whatever the model's dtype: a float32 state (written by hand, or
    moved with .float()) was kept float32, and every later record rounded to float32 (fail on old)."""
    ledger, _ = _run(count=1)
    state = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in ledger.state_dict().items()}
    loaded = PathKernelLedger.from_state_dict(state)
    assert all(getattr(loaded, key).dtype == F64 for key in _fields(loaded))
    small = torch.full((M, G, D), 1e-9, dtype=F64)
    loaded.record(small, torch.zeros(M, D, dtype=F64), loaded.f_end)
    torch.testing.assert_close(loaded.contributions, state["contributions"].double() + small, rtol=0, atol=1e-15)


# -- quadrature -------------------------------------------------------------------------------------
def _degree_of_exactness(rule: QuadratureRule) -> int:
    """The largest p with Σ_q w_q s_q^k = 1/(k + 1) for every k ≤ p (exact rationals for the reference)."""
    p = -1
    for k in range(40):
        approx = math.fsum(w * s ** k for s, w in zip(rule.nodes, rule.weights))
        if abs(approx - float(Fraction(1, k + 1))) > 1e-13:
            break
        p = k
    return p


def test_every_rule_is_exact_to_its_degree_and_its_order_follows():
    """coverage: n-point Gauss–Legendre integrates degree 2n − 1 on [0, 1] exactly (and not 2n);
    Simpson 3, midpoint and trapezoid 1, left 0; the per-step error exponent is degree + 2."""
    expected = {"left": 0, "midpoint": 1, "trapezoid": 1, "simpson": 3,
                **{f"gauss{n}": 2 * n - 1 for n in range(2, 9)}}
    assert set(QUADRATURE_RULES) == set(expected)
    for name, degree in expected.items():
        rule = quadrature_rule(name)
        assert rule.name == name and _degree_of_exactness(rule) == degree, name
        assert rule.order == degree + 2, name
        assert all(0.0 <= s <= 1.0 for s in rule.nodes) and math.fsum(rule.weights) == pytest.approx(1.0, abs=1e-15)


def test_quadrature_rule_refuses_malformed_rules_and_names():
    """Old code built a rule with 3 nodes and 2 weights (the tracker's zip dropped a node), weights
    summing to 2 or a node outside the step; an unhashable name gave a bare TypeError."""
    with pytest.raises(ValueError, match="as many weights as nodes"):
        QuadratureRule("bad", (0.0, 0.5, 1.0), (0.5, 0.5), 3)
    with pytest.raises(ValueError, match="sum to 1"):
        QuadratureRule("bad", (0.5,), (2.0,), 3)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        QuadratureRule("bad", (1.5,), (1.0,), 3)
    with pytest.raises(ValueError, match="choose one of"):
        quadrature_rule(["simpson"])


@pytest.mark.parametrize("points", [5, 6, 7])
def test_residual_remedy_never_advises_fewer_nodes(points):
    """Old advice for gauss5 to gauss7 was 'gauss4' to 'gauss8': fewer nodes, a larger residual."""
    advice = residual_remedy(f"gauss{points}")
    named = [int(n) for n in __import__("re").findall(r"'gauss(\d)'", advice)]
    assert named and min(named) > points, advice


# -- io ------------------------------------------------------------------------------------------------
def test_jsonable_gives_strict_json_for_numpy_arrays_tensors_and_non_finite_numbers():
    """numpy arrays raised "can only convert an array of size 1" (fail on old)."""
    value = {1: np.array([1.5, np.nan, np.inf]), "t": torch.tensor([[1.0, float("-inf")]]), "s": np.float32(np.nan),
             "i": np.int64(3), "b": np.bool_(True), "n": (float("nan"), 2), "z": np.array(2.5)}
    out = json.loads(json.dumps(jsonable(value), allow_nan=False))
    assert out == {"1": [1.5, None, None], "t": [[1.0, None]], "s": None, "i": 3, "b": True, "n": [None, 2], "z": 2.5}


def test_atomic_save_keeps_the_files_permissions(tmp_path):
    """mkstemp's file is owner-only (0600) and the rename kept that: old code turned a 0644 results
    file, or a new one, unreadable to anyone else."""
    target = tmp_path / "state.pt"
    atomic_save({"a": torch.zeros(1)}, target)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask
    os.chmod(target, 0o640)
    atomic_save({"a": torch.ones(1)}, target)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640


def test_atomic_save_interrupted_leaves_the_previous_file(tmp_path, monkeypatch):
    """coverage: a KeyboardInterrupt half-way through the write leaves the old state and no temporary file."""
    target = tmp_path / "state.pt"
    atomic_save({"format": "x", "a": torch.arange(3.0)}, target)

    def half_then_interrupt(obj, handle):
        handle.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(gio.torch, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"format": "x", "a": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(load_state(target, "x")["a"], torch.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


class _Boom:
    def __reduce__(self):
        return (os.getpid, ())


def test_load_state_refuses_pickled_objects_and_foreign_formats(tmp_path):
    """coverage: weights_only: an arbitrary pickled object is refused with a clear error, never run."""
    torch.save({"x": _Boom()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a genkernel state file"):
        load_state(tmp_path / "evil.pt")
    atomic_save({"format": "other/1"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a 'genkernel.PathKernelLedger/1' state"):
        PathKernelLedger.load(tmp_path / "other.pt")


def test_to_device_moves_every_nested_tensor():
    """coverage: through dicts, lists and tuples, keeping dtypes and the containers."""
    value = {"a": [torch.zeros(2, dtype=F64), (torch.ones(1, dtype=torch.int64), 3)], "b": "s"}
    moved = to_device(value, "meta")
    assert moved["a"][0].is_meta and moved["a"][0].dtype == F64 and moved["a"][1][0].is_meta
    assert isinstance(moved["a"][1], tuple) and moved["a"][1][1] == 3 and moved["b"] == "s"


def test_worst_probe_residual_does_not_hide_a_probe_that_did_not_move():
    """A probe whose output did not change while the ledger books a change there (R = −C ≠ 0) has
    no finite ratio. Old code reported the moved probes' maximum (0.0 here): the worst probe looked
    perfect while every number booked at probe 1 was wrong (fail on old). NaN, as when no probe moved."""
    ledger = PathKernelLedger.empty(torch.zeros(2, 1, dtype=F64), 1)
    c = torch.tensor([[[1.0]], [[1.0]]], dtype=F64)
    ledger.record(c, torch.zeros(2, 1, dtype=F64), torch.tensor([[1.0], [0.0]], dtype=F64))
    assert ledger.residual.tolist() == [[0.0], [-1.0]]
    assert math.isnan(ledger.summary()["max_probe_relative_residual"])
    assert ledger.relative_residual() == pytest.approx(1.0)  # ‖R‖ / ‖Δf‖ over all probes: 1 / 1
    moved = PathKernelLedger.empty(torch.zeros(2, 1, dtype=F64), 1)  # both moved: the true maximum
    moved.record(c, torch.zeros(2, 1, dtype=F64), torch.tensor([[1.0], [0.5]], dtype=F64))
    assert moved.summary()["max_probe_relative_residual"] == pytest.approx(1.0)
