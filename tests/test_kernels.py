"""gradient_kernel and tangent_features against a brute-force autograd loop."""

import copy

import pytest
import torch
from torch import nn

from genkernel import gradient_kernel, normalize_kernel, tangent_features


@pytest.fixture(autouse=True)
def _float64(float64):
    yield


def brute_jacobians(model, x):
    """[M, d, P] by one autograd call per example and output."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for n in range(x.shape[0]):
        out = model(x[n : n + 1]).reshape(-1)
        rows.append(torch.stack([
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i], params, retain_graph=True)])
            for i in range(out.shape[0])
        ]))
    return torch.stack(rows)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.SiLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


CASES = {"mlp": (mlp, (3,)), "convnet": (convnet, (1, 8, 8))}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_and_features_match_autograd_loop(name):
    build, shape = CASES[name]
    model = build()
    x1, x2 = torch.randn(5, *shape), torch.randn(4, *shape)
    j1, j2 = brute_jacobians(model, x1), brute_jacobians(model, x2)
    expected = torch.einsum("mdp,ndp->mn", j1, j2)
    torch.testing.assert_close(gradient_kernel(model, x1, x2), expected, rtol=1e-8, atol=0)
    blocks = gradient_kernel(model, x1, x2, reduce="none")
    torch.testing.assert_close(blocks, torch.einsum("mdp,nep->mnde", j1, j2), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(tangent_features(model, x1), j1, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(tangent_features(model, x1, output_index=1), j1[:, 1], rtol=1e-8, atol=1e-14)
    feats = tangent_features(model, x1).flatten(1)
    torch.testing.assert_close(feats @ tangent_features(model, x2).flatten(1).T, expected, rtol=1e-8, atol=0)


def test_kernel_is_symmetric_psd_and_normalized_diagonal_is_one():
    model = mlp()
    x = torch.randn(12, 3)
    k = gradient_kernel(model, x)
    torch.testing.assert_close(k, k.T, rtol=1e-12, atol=0)
    assert torch.linalg.eigvalsh(k).min() > -1e-10 * k.diag().max()
    kn = gradient_kernel(model, x, normalize=True)
    torch.testing.assert_close(kn.diag(), torch.ones(12), rtol=1e-12, atol=1e-12)
    assert kn.abs().max() <= 1 + 1e-12
    kn_blocks = gradient_kernel(model, x, normalize=True, reduce="none")
    torch.testing.assert_close(torch.diagonal(kn_blocks, dim1=2, dim2=3)[range(12), range(12)], torch.ones(12, 2))


def test_chunking_under_a_tiny_budget_gives_the_same_kernel():
    model = mlp()
    x1, x2 = torch.randn(9, 3), torch.randn(7, 3)
    full = gradient_kernel(model, x1, x2, normalize=True)
    per_row = 2 * 2 * sum(p.numel() for p in model.parameters()) * 8
    torch.testing.assert_close(gradient_kernel(model, x1, x2, normalize=True, memory_budget=2 * per_row * 2), full)
    torch.testing.assert_close(gradient_kernel(model, x1, normalize=True, memory_budget=1), gradient_kernel(model, x1, normalize=True))


class TwoInput(nn.Module):
    """A denoiser-like model called as model(x, t) returning an object with .sample."""

    class Output:
        def __init__(self, sample):
            self.sample = sample

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 2))

    def forward(self, x, t):
        return self.Output(self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1)))


def test_tuple_inputs_and_wrapped_outputs():
    torch.manual_seed(0)
    model = TwoInput()
    x, t = torch.randn(4, 2), torch.tensor([1, 5, 9, 3])
    k = gradient_kernel(model, (x, t))
    plain = model.net
    expected = gradient_kernel(plain, torch.cat([x, t[:, None].double()], dim=1))
    torch.testing.assert_close(k, expected)


def test_frozen_parameters_are_not_in_the_kernel():
    model = mlp()
    model[0].weight.requires_grad_(False)
    x = torch.randn(3, 3)
    j = brute_jacobians(model, x)
    torch.testing.assert_close(gradient_kernel(model, x), torch.einsum("mdp,ndp->mn", j, j), rtol=1e-8, atol=0)
    assert tangent_features(model, x).shape == (3, 2, j.shape[2])


def test_bad_input_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match="reduce"):
        gradient_kernel(model, torch.randn(2, 3), reduce="sum")
    with pytest.raises(ValueError, match="do not fit"):
        gradient_kernel(model, torch.randn(2, 5))
    with pytest.raises(ValueError, match="output_index"):
        tangent_features(model, torch.randn(2, 3), output_index=4)
    with pytest.raises(TypeError, match="output_index must be None or an int"):
        tangent_features(model, torch.randn(2, 3), output_index=1.0)  # was an IndexError from slicing
    with pytest.raises(TypeError, match="output_index must be None or an int"):
        tangent_features(model, torch.randn(2, 3), output_index=True)  # was output 1
    with pytest.raises(ValueError, match="BatchNorm"):
        gradient_kernel(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), torch.randn(2, 3))
    with pytest.raises(TypeError, match="Tensor"):
        gradient_kernel(model, [1.0, 2.0])


def test_auto_engine_uses_factored_only_where_it_was_measured_faster():
    from genkernel.core.engine.factors import make_plan
    from genkernel.core.engine.kernels import choose_engine

    def _auto_picks_factored(plan, d):
        return choose_engine(plan, d) == "factored"

    assert _auto_picks_factored(make_plan(mlp()), 2)
    assert not _auto_picks_factored(make_plan(mlp()), 256)  # many outputs and no counts: the fixed cut-off (test_kernel_choice: with them)
    assert _auto_picks_factored(make_plan(convnet()), 3)  # convolutions held per layer: 2.2x faster

    class OwnParameter(nn.Module):  # nothing the factored engine supports
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return (x * self.scale).sum(1, keepdim=True)

    assert not _auto_picks_factored(make_plan(OwnParameter()), 1)


class Scaled(nn.Module):
    """The output times a constant (a buffer): every gradient scales with it."""

    def __init__(self, scale: float):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize("scale", [1e-14, 1e12])
@pytest.mark.parametrize("engine", ["functional", "factored"])
def test_normalized_float32_kernel_survives_gradients_whose_product_leaves_the_range(scale, engine):
    """k(x, x) k(x', x') leaves float32's range (k ≈ 1e-28 or 1e24) while k̂ is about 1: the
    float32 normalized kernel must equal the float64 one (it came out 0 or far below 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2), Scaled(scale))
    x = torch.randn(4, 3)
    model32 = copy.deepcopy(model).float()
    for reduce in ("trace", "none"):
        exact = gradient_kernel(model, x, normalize=True, reduce=reduce, engine=engine)  # float64 (the fixture)
        k32 = gradient_kernel(model32, x.float(), normalize=True, reduce=reduce, engine=engine)
        torch.testing.assert_close(k32.double(), exact, rtol=0, atol=1e-5)
    k = gradient_kernel(model32, x.float(), engine=engine)
    torch.testing.assert_close(normalize_kernel(k, k.diagonal()).double(), gradient_kernel(model, x, normalize=True),
                               rtol=0, atol=1e-5)


def test_normalized_kernel_of_a_zero_gradient_example_is_zero_not_nan():
    class Weighted(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return (x * self.w).sum(1, keepdim=True)

    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # the middle one: J = x = 0
    kn = gradient_kernel(Weighted(), x, normalize=True)
    expected = torch.zeros(3, 3)
    expected[0, 0] = expected[2, 2] = 1.0
    expected[0, 2] = expected[2, 0] = 1.0 / 14**0.5  # <(1,2,3), (1,0,0)> / (|.| |.|)
    torch.testing.assert_close(kn, expected, rtol=1e-12, atol=1e-15)


def test_make_states_is_point_major_and_refuses_levels_and_noise_that_add_noise_would_misread():
    from genkernel.diffusion import make_scheduler, make_states

    scheduler = make_scheduler(100)
    clean, noise, levels = torch.randn(3, 2), torch.randn(3, 2), torch.tensor([5, 50, 5, 99])
    z, t = make_states(scheduler, clean, noise, levels)
    abar = scheduler.alphas_cumprod.to(torch.float64)
    expected = torch.stack([abar[a].sqrt() * clean[i] + (1 - abar[a]).sqrt() * noise[i]
                            for i in range(3) for a in levels])
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-7)  # row i·L + a: input i at level a
    assert t.tolist() == levels.tolist() * 3
    # add_noise reads ᾱ[-1] (the last level) for t = -1, while the state says t = -1.
    with pytest.raises(ValueError, match=r"must lie in \[0, 100\)"):
        make_states(scheduler, clean, noise, torch.tensor([-1, 5]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 100\)"):
        make_states(scheduler, clean, noise, torch.tensor([100]))
    with pytest.raises(TypeError, match="integer timesteps"):
        make_states(scheduler, clean, noise, torch.tensor([5.0]))
    with pytest.raises(ValueError, match="empty"):
        make_states(scheduler, clean, noise, torch.tensor([], dtype=torch.long))
    # One noise row (or one noise value per input) would broadcast to every input.
    for bad in (noise[:1], noise[:, :1]):
        with pytest.raises(ValueError, match="same shape"):
            make_states(scheduler, clean, bad, levels)


def test_sketched_state_kernel_refuses_others_with_another_output_size():
    from genkernel.diffusion import state_kernel

    class PerPixel(nn.Module):  # fully convolutional: d follows the input's size
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 1)

        def forward(self, z, t):
            return self.conv(z[:, None, :] * t[:, None, None]).flatten(1)

    torch.manual_seed(0)
    states, others = (torch.randn(3, 4), torch.ones(3)), (torch.randn(2, 1), torch.ones(2))
    with pytest.raises(ValueError, match="outputs per example"):
        state_kernel(PerPixel(), states, others)
    with pytest.raises(ValueError, match="states give 4 outputs per example but others give 1"):
        state_kernel(PerPixel(), states, others, output_sketch=3)  # d = 1 broadcast against the 4 directions


class MinibatchStd(nn.Module):
    """A ProGAN/StyleGAN discriminator's minibatch-std feature: each output reads every row of the batch."""

    def __init__(self):
        super().__init__()
        self.features, self.head = nn.Linear(4, 6), nn.Linear(7, 1)

    def forward(self, x):
        h = torch.tanh(self.features(x))
        spread = h.var(0, unbiased=False).mean().expand(h.shape[0], 1)
        return self.head(torch.cat([h, spread], 1))


def test_a_plan_checked_on_one_example_is_not_reused_for_a_batch_whose_rows_interact():
    """The covering check of a one-example call cannot see a forward that mixes the batch's rows;
    its outcome was remembered for every later batch of the same kind (the factored engine then
    credited the batch's coupling to each example: 0.078 off on a kernel of size 4.4)."""
    torch.manual_seed(0)
    model = MinibatchStd()
    x = torch.randn(6, 4)
    gradient_kernel(model, x[:1])  # checked on one example
    reference = gradient_kernel(model, x, engine="functional")  # per example: each example alone
    torch.testing.assert_close(gradient_kernel(model, x), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gradient_kernel(model, x, engine="factored"), reference, rtol=1e-10, atol=1e-12)


def test_a_cross_kernel_from_one_example_checks_the_other_sides_batch(float64):
    """A cross kernel k(x1, x2) with one example in x1 captures x1's row beside x2's rows in one
    pass; checked on x1 alone, a forward that mixes those rows went unseen (the factored engine
    was up to 50 % off the functional reference on this model)."""
    torch.manual_seed(0)
    model, x = MinibatchStd(), torch.randn(6, 4)
    reference = gradient_kernel(model, x[:1], x, engine="functional")
    torch.testing.assert_close(gradient_kernel(model, x[:1], x, engine="factored"), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gradient_kernel(model, x[:1], x), reference, rtol=1e-10, atol=1e-12)


class LongContext(nn.Module):
    """Sequences longer than 4 tokens add a path that reads ``proj.weight`` outside ``proj``'s forward."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.proj(x))
        if x.shape[1] > 4:
            h = h + torch.nn.functional.linear(x, self.proj.weight)
        return self.head(h.mean(1))


@pytest.mark.parametrize("budget", [2**29, 3000])
def test_cross_kernel_between_inputs_of_two_shapes_checks_both_and_captures_them_apart(budget):
    """x2 with other per-example shapes than x1 (longer sequences): the covering plan was checked on
    x1 alone (a read of a weight that only x2's forward makes was lost: 16% off), and with factors
    recomputed per pair of chunks (small budget) the two chunks were concatenated (a crash)."""
    torch.manual_seed(0)
    model = LongContext()
    x1, x2 = torch.randn(4, 3, 3), torch.randn(5, 6, 3)
    j1, j2 = brute_jacobians(model, x1), brute_jacobians(model, x2)
    for engine in ("auto", "factored"):
        kernel = gradient_kernel(model, x1, x2, engine=engine, memory_budget=budget)
        torch.testing.assert_close(kernel, torch.einsum("mdp,ndp->mn", j1, j2), rtol=1e-10, atol=1e-12)
        blocks = gradient_kernel(model, x1, x2, engine=engine, memory_budget=budget, reduce="none", normalize=True)
        want = torch.einsum("mdp,nep->mnde", j1, j2)
        want = want / ((j1 * j1).sum(2).sqrt()[:, None, :, None] * (j2 * j2).sum(2).sqrt()[None, :, None, :])
        torch.testing.assert_close(blocks, want, rtol=1e-10, atol=1e-12)


def test_kernels_and_features_under_inference_mode_equal_those_outside_it():
    """Lightning runs validation and test steps under torch.inference_mode, where no pass records a
    graph: the factored engine failed there (an IndexError, or Unfactorable out of
    tangent_features) once a first call outside it had remembered the model's plan, and an input
    made under inference mode could not be saved for the backward."""
    from genkernel.core.engine.projections import sketched_tangent_features

    model = convnet()
    x = torch.randn(5, 1, 8, 8)
    j = brute_jacobians(model, x)
    kernel = torch.einsum("mdp,ndp->mn", j, j)
    sketch = sketched_tangent_features(model, x, k=4)
    with torch.inference_mode():
        noised = x * 1.0  # an inference tensor, as a validation step's noised images are
        for engine in ("auto", "factored", "functional"):
            torch.testing.assert_close(gradient_kernel(model, x, engine=engine), kernel, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(gradient_kernel(model, noised, x[:2], engine=engine), kernel[:, :2], rtol=1e-10,
                                       atol=1e-12)
            torch.testing.assert_close(tangent_features(model, noised, engine=engine), j, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(sketched_tangent_features(model, noised, k=4, engine=engine), sketch, rtol=1e-10,
                                       atol=1e-12)


class OptionalLabel(nn.Module):
    """Classifier-free guidance's denoiser shape: the class label is optional (None: unconditional)."""

    def __init__(self):
        super().__init__()
        self.inp, self.emb, self.norm, self.out = nn.Linear(3, 4), nn.Embedding(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)

    def forward(self, x, y=None):
        h = self.inp(x)
        if y is not None:
            h = h + self.norm(self.emb(y))
        return self.out(torch.tanh(h))


def test_cross_kernel_between_unconditional_and_conditional_inputs():
    """x1 = (x,) against x2 = (x, y): with factors recomputed per pair of chunks (a small budget),
    the two chunks were joined by zip, which dropped x2's labels: every x2 example ran
    unconditional, 70% off, silently; with x1 conditional and x2 held, the label path's
    LayerNorm (materialized on one side, not called on the other) crashed in a matmul."""
    torch.manual_seed(0)
    model = OptionalLabel()
    x, x2, y2 = torch.randn(4, 3), torch.randn(3, 3), torch.tensor([0, 2, 1])
    params = list(model.parameters())

    def jacobians(*inputs):  # [M, d, P]; an unconditional example has no embedding gradient: zeros
        rows = []
        for n in range(inputs[0].shape[0]):
            out = model(*(t[n : n + 1] for t in inputs)).reshape(-1)
            rows.append(torch.stack([
                torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                           for p, g in zip(params, torch.autograd.grad(o, params, retain_graph=True, allow_unused=True))])
                for o in out
            ]))
        return torch.stack(rows)

    j1, j2 = jacobians(x), jacobians(x2, y2)
    want = torch.einsum("mdp,ndp->mn", j1, j2)
    for budget in (2**29, 2000, 1):
        for engine in ("auto", "factored"):
            torch.testing.assert_close(gradient_kernel(model, (x,), (x2, y2), engine=engine, memory_budget=budget), want,
                                       rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(gradient_kernel(model, (x2, y2), (x,), engine=engine, memory_budget=budget), want.T,
                                       rtol=1e-10, atol=1e-12)
