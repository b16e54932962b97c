"""Every bad input named in the core's contract raises a clear error (and loses nothing)."""

import pytest
import torch
from torch import nn

from genkernel import NonFiniteError, PathKernelTracker, gradient_kernel
from genkernel.supervised import mse_loss


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))


def tracker_for(model, **kwargs):
    opt = kwargs.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.1)
    return PathKernelTracker(model, opt, mse_loss, torch.randn(3, 2), num_groups=2, **kwargs)


X, Y, G = torch.randn(4, 2), torch.randn(4, 1), torch.tensor([0, 1, 0, 1])


def test_batchnorm_in_training_mode_is_refused_by_per_example_routes_only():
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    for state in ("factored", "sketched"):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9 if state == "sketched" else 0.0)
        with pytest.raises(ValueError, match=r"BatchNorm1d.*group_state='dense' with gradient_route='graph'"):
            tracker_for(model, group_state=state, optimizer=optimizer)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        tracker_for(model, group_state="dense", gradient_route="example")
    assert tracker_for(model).group_state == "dense"  # "auto" picks the route where it is exact
    with pytest.raises(ValueError, match="BatchNorm1d.*eval"):
        gradient_kernel(model, X)  # per-example kernels are undefined with batch statistics
    model.eval()
    tracker_for(model).step(X, Y, G)  # eval-mode statistics are fine everywhere


def test_dropout_in_training_mode_is_refused_by_per_example_routes_only():
    model = nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="Dropout"):
        tracker_for(model, group_state="factored")
    with pytest.raises(ValueError, match="Dropout"):
        gradient_kernel(model, X)


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def forward(self, x):
        return self.lin(x) + 0.1 * torch.randn(x.shape[0], 1)


def test_hidden_randomness_is_detected_without_touching_the_global_rng():
    model, probes = Noisy(), torch.randn(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match="not deterministic"):
        PathKernelTracker(model, opt, mse_loss, probes, num_groups=2)
    assert torch.equal(state, torch.random.get_rng_state())


def test_no_trainable_parameters():
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        PathKernelTracker(model, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), mse_loss, X, num_groups=1)


def test_probes_and_inputs_that_do_not_fit():
    model = mlp()
    with pytest.raises(ValueError, match=r"probes of shapes \[\(3, 5\)\] do not fit"):
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, torch.randn(3, 5), num_groups=2)
    tracker = tracker_for(mlp())
    with pytest.raises(ValueError, match=r"inputs of shapes \[\(4, 3\)\] do not fit"):
        tracker.step(torch.randn(4, 3), Y, G)


def test_group_ids_out_of_range_wrong_length_or_type():
    tracker = tracker_for(mlp())
    with pytest.raises(ValueError, match=r"group ids must lie in \[0, 2\)"):
        tracker.step(X, Y, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"one id per example, shape \[4\]"):
        tracker.step(X, Y, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer Tensor"):
        tracker.step(X, Y, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="weights must be a Tensor of shape"):
        tracker.step(X, Y, G, weights=torch.ones(3))
    assert tracker.ledger.steps == 0


def test_scalar_loss_is_refused():
    model = mlp()
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                lambda out, y: ((out - y) ** 2).mean(), torch.randn(3, 2), num_groups=2)
    with pytest.raises(ValueError, match="per-example losses of shape \\[4\\]"):
        tracker.step(X, Y, G)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_ledger():
    model = mlp()
    tracker = tracker_for(model)
    tracker.step(X, Y, G)
    before = [p.detach().clone() for p in model.parameters()]
    kept = tracker.ledger.contributions.clone()
    bad = Y.clone()
    bad[2] = float("nan")
    with pytest.raises(NonFiniteError, match="step 2.*non-finite loss at examples \\[2\\].*keeps the 1 steps"):
        tracker.step(X, bad, G)
    assert tracker.ledger.steps == 1 and torch.equal(tracker.ledger.contributions, kept)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    tracker.step(X, Y, G)  # training can go on
    assert tracker.ledger.steps == 2


def test_non_finite_gradient():
    model = mlp()
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                lambda out, y: (out - y).abs().sqrt().reshape(-1), torch.randn(3, 2), num_groups=2)
    tracker.step(X, model(X).detach() + 1.0, G)
    with pytest.raises(NonFiniteError, match="step 2.*non-finite gradient"):
        tracker.step(X, model(X).detach(), G)
    tracker.step(X, model(X).detach() + 1.0, G)  # the failed step's backward is not "accumulation"
    assert tracker.ledger.steps == 2


def test_parameters_not_owned_by_the_optimizer_and_foreign_parameters():
    model = mlp()
    with pytest.raises(ValueError, match="not owned by the optimizer"):
        tracker_for(model, optimizer=torch.optim.SGD(model[0].parameters(), lr=0.1))
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not trainable parameters of the tracked model"):
        tracker_for(model, optimizer=torch.optim.SGD(list(model.parameters()) + list(other.parameters()), lr=0.1))


def test_unknown_optimizer_names_the_supported_ones():
    model = mlp()
    with pytest.raises(TypeError, match="Rprop is not supported.*SGD.*Adam.*AdamW.*RMSprop.*Adagrad.*Adamax.*RAdam.*NAdam.*Adafactor"):
        tracker_for(model, optimizer=torch.optim.Rprop(model.parameters()))


def test_an_optimizer_whose_step_is_not_linear_in_the_gradient_is_refused_saying_why():
    """Rprop and Muon are refused (as before) with the reason no split can follow them, beside the supported list."""
    model = mlp()
    with pytest.raises(TypeError, match=r"Rprop is not supported \(Rprop steps by the sign of each gradient.*SGD"):
        tracker_for(model, optimizer=torch.optim.Rprop(model.parameters()))
    matrices = nn.Sequential(nn.Linear(2, 4, bias=False), nn.Tanh(), nn.Linear(4, 1, bias=False))
    with pytest.raises(TypeError, match=r"Muon is not supported \(Muon orthogonalizes its momentum"):
        tracker_for(matrices, optimizer=torch.optim.Muon(matrices.parameters()))
    class SignSGD(torch.optim.Optimizer):  # an optimizer genkernel knows nothing about
        def __init__(self, params):
            super().__init__(params, {"lr": 0.01})

    with pytest.raises(TypeError, match=r"SignSGD is not supported: the ledger"):  # (no reason known: the list only)
        tracker_for(model, optimizer=SignSGD(model.parameters()))


def test_parameters_changed_outside_the_step():
    model = mlp()
    tracker = tracker_for(model)
    tracker.step(X, Y, G)
    with torch.no_grad():
        model[0].weight.mul_(0.99)
    with pytest.raises(RuntimeError, match="changed outside the tracked optimizer step"):
        tracker.step(X, Y, G)


def test_parameters_changed_between_building_the_tracker_and_its_first_step():
    """The ledger starts at the outputs seen when the tracker was built: an untracked step in between
    would land in the residual (0.44 of the change in the supervised review's warm-up), so it is refused
    before anything moves; a tracker built after the change tracks it exactly."""
    model = mlp()
    tracker = tracker_for(model)
    optimizer = tracker.optimizer
    mse_loss(model(X), Y).mean().backward()
    optimizer.step()  # a warm-up step the tracker does not see
    optimizer.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="changed since the tracker was built, before its first step"):
        tracker.step(X, Y, G)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and tracker.ledger.steps == 0
    tracker = tracker_for(model)
    tracker.step(X, Y, G)
    assert tracker.ledger.relative_residual() < 1e-3  # quadrature only (1.6e-5 here)


def test_gradient_accumulation_is_refused():
    model = mlp()
    tracker = tracker_for(model)
    tracker.step(X, Y, G)
    mse_loss(model(X), Y).mean().backward()
    with pytest.raises(RuntimeError, match="gradient accumulation is not supported"):
        tracker.step(X, Y, G)


def test_mixed_precision_is_refused():
    tracker = tracker_for(mlp())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="mixed precision"):
            tracker.step(X, Y, G)


def test_bad_tracker_options():
    with pytest.raises(ValueError, match="unknown quadrature 'gauss'"):
        tracker_for(mlp(), quadrature="gauss")
    with pytest.raises(ValueError, match="num_groups"):
        PathKernelTracker(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1), mse_loss, X, num_groups=0)
    with pytest.raises(ValueError, match="contribution_route"):
        tracker_for(mlp(), contribution_route="magic")
    with pytest.raises(ValueError, match="max_grad_norm"):
        tracker_for(mlp(), max_grad_norm=0.0).step(X, Y, G)


def test_kernel_refuses_dropout():
    with pytest.raises(ValueError, match="dropout"):
        gradient_kernel(nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.2)), X)


def test_out_of_memory_and_collective_failures_in_a_forward_are_not_blamed_on_the_inputs():
    """A forward that runs out of memory, or whose collective lost its peer, must reach the caller as
    that error (a loop may catch torch.OutOfMemoryError and retry smaller); only errors that can mean
    ill-fitting inputs become the "inputs ... do not fit" ValueError."""
    from genkernel.core.adapter import checked_forward
    from genkernel.core.tracking.step import OptimizerStep

    class Failing(nn.Module):
        def __init__(self, error):
            super().__init__()
            self.linear, self.error = nn.Linear(2, 1), error

        def forward(self, x):
            raise self.error

    for error in (torch.OutOfMemoryError("CUDA out of memory"), torch.distributed.DistBackendError("peer closed")):
        model = Failing(error)
        with pytest.raises(type(error)):
            checked_forward(model, (X,), name="probes")
        step = OptimizerStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, X, Y)
        with pytest.raises(type(error)):
            step.compute_gradients()
    model = Failing(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(ValueError, match=r"inputs of shapes \[\(4, 2\)\] do not fit Failing"):
        OptimizerStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, X, Y).compute_gradients()


def test_reentrant_checkpointing_is_refused_with_the_setting_that_works():
    """torch.func cannot run an old-style autograd.Function, and reentrant activation checkpointing
    is one: the refusal named no cause ("replace the layer the message names")."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 8), nn.Linear(8, 1)

        def forward(self, x):
            return self.b(checkpoint(lambda h: torch.tanh(self.a(h)), x, use_reentrant=True))

    model = Checkpointed()
    with pytest.raises(ValueError, match="use_reentrant=False"):
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, torch.randn(3, 2), num_groups=2)


def test_a_trainer_given_a_module_without_parameters_names_it():
    """next(model.parameters()) raised a bare StopIteration from inside the trainers' constructors (a module
    whose weights sit elsewhere, a wrapper passed by mistake)."""
    from genkernel.diffusion import DDPMTrainer, make_scheduler
    from genkernel.gan import GANTrainer, MLPDiscriminator
    from genkernel.supervised import SupervisedTrainer

    empty = nn.Identity()
    with pytest.raises(ValueError, match=r"the model \(Identity\) has no parameters or buffers"):
        DDPMTrainer(empty, make_scheduler(10), torch.randn(8, 2), progress=False)
    with pytest.raises(ValueError, match=r"the model \(Identity\) has no parameters or buffers"):
        SupervisedTrainer(empty, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), mse_loss, batch_size=2)
    with pytest.raises(ValueError, match=r"the generator \(Identity\) has no parameters or buffers"):
        GANTrainer(empty, MLPDiscriminator(2, hidden=4, depth=1), torch.randn(8, 2), batch_size=4, latent_dim=2)


def test_the_clipping_mismatch_names_the_trackers_setting_to_change():
    from genkernel.core.tracking.step import OptimizerStep

    model = mlp()
    tracker = tracker_for(model)
    step = OptimizerStep(model, tracker.optimizer, mse_loss, X, Y, max_grad_norm=0.5)
    with pytest.raises(ValueError, match=r"build the PathKernelTracker with max_grad_norm=0.5"):
        tracker.track(step, G)
