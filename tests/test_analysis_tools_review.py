"""Review of loss_sharpness, adaptive_preconditioner / preconditioned_kernel and embed_2d against
brute-force references: a dense float64 Hessian (torch.autograd.functional.hessian), PyTorch's own
Adam / RMSprop steps unrolled by hand, numpy linear algebra."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from genkernel import tangent_features
from genkernel.analysis.optimizer_kernels import adaptive_preconditioner, preconditioned_kernel
from genkernel.analysis.sharpness import loss_sharpness
from genkernel.supervised import mse_loss


def _dense_hessian_eigenvalues(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Eigenvalues of the float64 Hessian of the mean loss over the trainable parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    flat = torch.cat([p.detach().double().reshape(-1) for _, p in named])
    model64 = copy.deepcopy(model).double()

    def loss_of(vector):
        pieces = torch.split(vector, [int(np.prod(s)) for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes)}
        return loss_fn(torch.func.functional_call(model64, params, (x.double(),)), y.double()).mean()

    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat)).numpy()


def _mlp(seed: int, *layers: nn.Module) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), *layers, nn.Linear(8, 1))


def _data():
    x = torch.linspace(-3, 3, 20)[:, None]
    return x, torch.sin(x).reshape(-1)


# --- loss_sharpness ---------------------------------------------------------------------------


def test_sharpness_under_autocast_is_the_model_s_own_precision():
    # Called inside a bfloat16 autocast region (a mixed-precision validation loop), the old code ran
    # every Hessian-vector product in bfloat16: 6.5915 against 6.6092, 2.7e-3 off, with no sign of it.
    model = _mlp(1)
    x, y = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss_sharpness(model, mse_loss, x, y)
    expected = _dense_hessian_eigenvalues(model, mse_loss, x, y).max()  # float32 weights, float64 Hessian
    assert value == pytest.approx(expected, rel=1e-6)


def test_sharpness_refuses_dropout_in_training_mode_and_matches_the_dense_hessian_in_eval_mode():
    # The old code ran Lanczos on an operator that drew a new dropout mask in every product and
    # returned a number (6.82, then 6.80 on the same inputs; 6.43 in eval mode).
    model = _mlp(0, nn.Dropout(0.5)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 1, dtype=torch.float64, generator=g)
    y = torch.randn(30, dtype=torch.float64, generator=g)
    with pytest.raises(ValueError, match="model.eval"):
        loss_sharpness(model, mse_loss, x, y)
    model.eval()
    expected = _dense_hessian_eigenvalues(model, mse_loss, x, y).max()
    assert loss_sharpness(model, mse_loss, x, y) == pytest.approx(expected, rel=1e-9)


def test_sharpness_refuses_batchnorm_in_training_mode_and_leaves_its_statistics_alone():
    # old: torch.func's "attempted to call in-place operation ... mutate a captured Tensor"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.float64)
    before = model[1].running_mean.clone()
    with pytest.raises(ValueError, match="model.eval"):
        loss_sharpness(model, mse_loss, x, y)
    assert torch.equal(model[1].running_mean, before) and int(model[1].num_batches_tracked) == 0
    model.eval()
    assert loss_sharpness(model, mse_loss, x, y) == pytest.approx(
        _dense_hessian_eigenvalues(model, mse_loss, x, y).max(), rel=1e-9)


def test_sharpness_of_a_loss_linear_in_the_parameters_is_zero():
    # Hessian identically 0: the old code raised ARPACK's "Starting vector is zero"
    model = nn.Linear(3, 1).double()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert loss_sharpness(model, lambda out, target: out.reshape(-1) - target, x, torch.zeros(5)) == 0.0


def test_sharpness_names_a_nan_loss_and_bad_solver_settings():
    model = nn.Linear(6, 1, bias=False).double()
    x = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(10, dtype=torch.float64)
    # old: ARPACK error -9999 ("Could not build an Arnoldi factorization"), LAPACK noise on stderr
    with pytest.raises(ValueError, match="NaN or infinite"):
        loss_sharpness(model, mse_loss, x, torch.full_like(y, float("nan")))
    # old: tol=-1 accepted silently, tol=NaN an ARPACK error 3
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tol must be"):
            loss_sharpness(model, mse_loss, x, y, tol=bad)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_iterations must be"):
            loss_sharpness(model, mse_loss, x, y, max_iterations=bad)


def test_sharpness_is_the_largest_algebraic_eigenvalue_of_an_indefinite_or_negative_hessian():
    # coverage: λ_max of L = Σ 0.01 o1² − 100 o2² is 0.01·λ_max(2XᵀX/B), not the −100·… of largest
    # magnitude; of a concave loss, a negative number.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, dtype=torch.float64, generator=g) * torch.linspace(0.5, 3, 6, dtype=torch.float64)
    second = 2 / 20 * (x.T @ x).numpy()
    model = nn.Linear(6, 2, bias=False).double()
    value = loss_sharpness(model, lambda o, t: 0.01 * o[:, 0] ** 2 - 100 * o[:, 1] ** 2, x, torch.zeros(20))
    assert value == pytest.approx(np.linalg.eigvalsh(np.kron(np.diag([0.01, -100.0]), second)).max(), rel=1e-9)
    concave = loss_sharpness(nn.Linear(6, 1, bias=False).double(), lambda o, t: -(o.reshape(-1) ** 2), x,
                             torch.zeros(20))
    assert concave == pytest.approx(-np.linalg.eigvalsh(second).min(), rel=1e-9) and concave < 0


# --- adaptive_preconditioner / preconditioned_kernel ------------------------------------------


def _adam_run(steps: int, skip_first_layer_for: int, **adam):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(model.parameters(), **adam)
    params = list(model.parameters())
    for k in range(steps):
        opt.zero_grad(set_to_none=True)
        ((model(x) - y) ** 2).mean().backward()
        if k < skip_first_layer_for:
            model[0].weight.grad = None  # a branch switched off: PyTorch's Adam skips it (its step count too)
        m_prev = [opt.state[p]["exp_avg"].clone() if p in opt.state else torch.zeros_like(p) for p in params]
        before = [p.detach().clone() for p in params]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        opt.step()
    return model, opt, params, m_prev, before, grads


def test_adam_first_moment_weight_of_a_parameter_that_missed_steps():
    # After 8 steps in which the first layer's weight sat out the first six (t = 2 against t = 8),
    # the gradient of the last step enters its update with weight (1 − β1)/(1 − β1^t): 0.53 for that
    # weight, 0.18 for the rest. The old diagonal left the factor out as "common" and so weighed the
    # weight's kernel contribution 3x too low against the others, silently.
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    model, opt, params, m_prev, before, grads = _adam_run(8, 6, lr=lr, betas=(b1, b2), eps=eps)
    with pytest.raises(ValueError, match="first_moment_weight=True"):
        adaptive_preconditioner(model, opt, scale_by_lr=True)
    diag = adaptive_preconditioner(model, opt, scale_by_lr=True, first_moment_weight=True)
    # by hand: Δθ = −η (β1 m_prev + (1 − β1) g)/(1 − β1^t) ⊘ (sqrt(v/(1 − β2^t)) + ε); the share of
    # g is Δθ + η β1 m_prev/(1 − β1^t) ⊘ (…), which must equal −diag ⊙ g
    share = []
    for p, m, b in zip(params, m_prev, before):
        t = float(opt.state[p]["step"])
        a = (opt.state[p]["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps
        share.append(((p.detach() - b) + lr * b1 * m / (1 - b1**t) / a).reshape(-1))
    g = torch.cat([q.reshape(-1) for q in grads])
    torch.testing.assert_close(torch.cat(share), -diag * g, rtol=1e-9, atol=1e-15)
    # where every parameter took every step the factor is common and the default is unchanged
    model, opt, *_ = _adam_run(3, 0, lr=lr)
    plain = adaptive_preconditioner(model, opt)
    torch.testing.assert_close(adaptive_preconditioner(model, opt, first_moment_weight=True),
                               plain * (1 - 0.9) / (1 - 0.9**3), rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_update_is_minus_lr_times_bias_corrected_first_moment_times_the_preconditioner(amsgrad):
    # coverage: the whole Adam update, as PyTorch takes it, is −η m̂_t ⊙ P_t with m̂ = m/(1 − β1^t)
    # (ε outside the square root, v̂ bias-corrected, AMSGrad's running maximum), at step 5.
    lr, b1 = 3e-2, 0.8
    model, opt, params, _, before, _ = _adam_run(5, 0, lr=lr, betas=(b1, 0.99), eps=1e-3, amsgrad=amsgrad)
    diag = adaptive_preconditioner(model, opt)
    m_hat = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in params]) / (1 - b1**5)
    delta = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before)])
    torch.testing.assert_close(delta, -lr * m_hat * diag, rtol=1e-10, atol=1e-15)


def test_rmsprop_update_is_minus_lr_times_gradient_times_the_preconditioner():
    # coverage: RMSprop (no bias correction, ε outside the square root) at its third step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-2, alpha=0.9, eps=1e-4)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        opt.step()
    delta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    diag = adaptive_preconditioner(model, opt)
    torch.testing.assert_close(delta, -1e-2 * g * diag, rtol=1e-10, atol=1e-15)
    # the kernel through that diagonal: a probe's first-order change, J(probe) Δθ
    phi = tangent_features(model, x, output_index=0).double()
    torch.testing.assert_close(preconditioned_kernel(model, x[:2], x, diag), phi[:2] @ (diag[:, None] * phi.T),
                               rtol=1e-12, atol=1e-15)


def test_preconditioned_kernel_refuses_a_complex_preconditioner():
    # old: cast to float64 with only a warning, the imaginary part dropped
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(TypeError, match="must be real"):
        preconditioned_kernel(model, x, x, torch.ones(n, dtype=torch.complex128) * (1 + 1j))
    with pytest.raises(TypeError, match="first_moment_weight must be a bool"):
        adaptive_preconditioner(model, torch.optim.Adam(model.parameters()), first_moment_weight="yes")


def test_sharpness_refuses_losses_that_are_not_per_example():
    # nn.MSELoss(reduction="none") on two outputs gives [B, 2]; the old code averaged it over B·2 and
    # returned half the sharpness of the per-example loss Σ_d (o_d − y_d)² that the trainer's step
    # would ask for (it refuses such a loss), so η λ_max < 2 read as stable at twice the edge.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, dtype=torch.float64, generator=g)
    y = torch.randn(20, 2, dtype=torch.float64, generator=g)
    model = nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match=r"shape \[20\], got \(20, 2\)"):
        loss_sharpness(model, nn.MSELoss(reduction="none"), x, y)
    per_example = lambda o, t: ((o - t) ** 2).sum(dim=1)  # noqa: E731
    expected = _dense_hessian_eigenvalues(model, per_example, x, y).max()
    assert loss_sharpness(model, per_example, x, y) == pytest.approx(expected, rel=1e-9)
    # (2/B) Σ x̃x̃ᵀ per output block, x̃ = (x, 1): a closed form
    xt = np.hstack([x.numpy(), np.ones((20, 1))])
    assert expected == pytest.approx(np.linalg.eigvalsh(2 / 20 * xt.T @ xt).max(), rel=1e-10)


def test_embed_2d_refuses_complex_distances():
    # old: cast to float64 with only a ComplexWarning, the imaginary part dropped
    from genkernel.analysis.embedding import embed_2d

    points = np.random.default_rng(0).normal(size=(8, 3))
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    for bad in (d + 0j, torch.from_numpy(d).to(torch.complex128)):
        with pytest.raises(TypeError, match="must be real"):
            embed_2d(bad, method="tsne")


def test_adaptive_preconditioner_names_a_scheduler_passed_for_the_optimizer():
    # old: AttributeError ("'StepLR' object has no attribute 'param_groups'"), from reading the groups
    # before checking the type
    model = nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(TypeError, match="not its learning-rate scheduler"):
        adaptive_preconditioner(model, torch.optim.lr_scheduler.StepLR(opt, step_size=1))


def test_loss_sharpness_leaves_a_shared_module_its_parameters():
    """Fails on the old code: torch.func.functional_call (torch 2.14) left a module registered under two
    names (self.b = self.a) holding a plain tensor in place of its Parameter, so later optimizer steps on
    the Parameter no longer reached the forward. λ_max itself was right (2.0763172 both ways)."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.h = nn.Linear(4, 4), nn.Linear(4, 2)
            self.b = self.a

        def forward(self, x):
            return self.h(torch.tanh(self.b(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    model = Shared().double()
    weight = model.a.weight
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    loss_sharpness(model, lambda out, t: ((out - t) ** 2).mean(1), x, y)
    assert model.a.weight is weight and model.b.weight is weight
