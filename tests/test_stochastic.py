"""Library tools behind the paper-experiment recipes: the stochastic-Domingos decomposition,
the preconditioned kernel, kernel statistics, checkpoint kernels, tangent SVMs, 2-D embeddings."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from genkernel import gradient_kernel, tangent_features
from genkernel.analysis.embedding import embed_2d
from genkernel.analysis.hutchinson import exact_trace_sigma_hessian
from genkernel.analysis.kernel_stats import centered_alignment, class_block_means, kernel_distance, within_between_gap
from genkernel.analysis.optimizer_kernels import adaptive_preconditioner, preconditioned_kernel
from genkernel.analysis.stochastic import expected_output_decomposition
from genkernel.supervised import SupervisedTrainer, mlp, mse_loss
from genkernel.supervised.checkpoint_kernels import CheckpointKernels, geometric_checkpoints
from genkernel.supervised.svm import fit_rbf_svm, fit_tangent_svm


def tiny_problem(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g, dtype=torch.float64) * 4 - 2
    torch.manual_seed(seed)
    return x, torch.sin(x), mlp(1, [6], 1, act="tanh").double()


def test_decomposition_is_a_taylor_expansion_of_each_run():
    x, y, model = tiny_problem()
    probes = torch.linspace(-1.5, 1.5, 3, dtype=torch.float64)[:, None]
    before = copy.deepcopy(model.state_dict())
    dec = expected_output_decomposition(model, x, y, mse_loss, probes, lr=0.02, batch_size=3, steps=5, seeds=[0, 1, 2],
                                        hutchinson_samples=4)
    assert dec.change.shape == (3, 3) and dec.ito.shape == (3, 3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model itself is not trained
    # first order + realized second order reproduce each run's change up to third order in η:
    # halving η divides what the first-order ledger leaves by ~4 and what both leave by ~8
    gaps = []
    for lr in (0.01, 0.005):
        d = expected_output_decomposition(model, x, y, mse_loss, probes, lr=lr, batch_size=3, steps=5, seeds=[0],
                                          hutchinson_samples=2)
        gaps.append(((d.change - d.first_order).abs().max(), (d.change - d.first_order - d.realized_second_order).abs().max()))
    assert 3.0 < gaps[0][0] / gaps[1][0] < 5.5 and 6.0 < gaps[0][1] / gaps[1][1] < 10.0
    assert gaps[1][1] < 0.05 * gaps[1][0]
    torch.testing.assert_close(dec.ledger_residual, dec.change - dec.first_order, rtol=0, atol=1e-12)
    shares = dec.shares(n_boot=200)
    total = sum(shares[k]["share"] for k in ("first_order", "deterministic", "ito", "remainder"))
    assert total == pytest.approx(1.0, abs=1e-12)
    assert 0.9 < shares["first_order"]["share"] < 1.1
    for v in shares.values():
        assert v["interval"][0] <= v["share"] + 1e-12 and v["share"] <= v["interval"][1] + 1e-12
    assert (dec.ito_stderr >= 0).all()
    # Different seeds draw different batch orders.
    assert not torch.allclose(dec.change[0], dec.change[1])


def test_decomposition_ito_term_matches_exact_trace_for_one_step():
    from genkernel.analysis.hutchinson import batch_ito_term
    from genkernel.core.adapter import trainable_parameters
    from genkernel.core.engine.gradients import group_gradients

    x, y, model = tiny_problem(n=6, seed=1)
    probes = x[:2]
    params = trainable_parameters(model)
    per_example, _ = group_gradients(model, params, (x,), y, mse_loss, torch.eye(6, dtype=torch.float64))
    # With B = N the batch is the training set: no sampling noise, no Itô term (sampling without replacement);
    # deterministic and realized terms coincide.
    dec = expected_output_decomposition(model, x, y, mse_loss, probes, lr=0.1, batch_size=6, steps=1, seeds=[0],
                                        hutchinson_samples=4)
    assert torch.all(dec.ito == 0) and torch.all(exact_trace_sigma_hessian(
        model, probes, per_example, 0.1, batch_size=6, sampling="without_replacement").abs() < 1e-15)
    torch.testing.assert_close(dec.deterministic, dec.realized_second_order, rtol=1e-8, atol=1e-14)
    # B = 3 of N = 6: the estimate matches its batch's own term (the batch the seed draws first)
    dec = expected_output_decomposition(model, x, y, mse_loss, probes, lr=0.1, batch_size=3, steps=1, seeds=[0],
                                        hutchinson_samples=400)
    batch = torch.randperm(6, generator=torch.Generator().manual_seed(0))[:3]
    target = batch_ito_term(model, probes, {k: v[batch] for k, v in per_example.items()}, 0.1,
                            sampling="without_replacement", population=6)
    assert ((dec.ito[0] - target).abs() <= 3 * dec.ito_stderr[0] + 1e-12).all()
    assert (target.abs() > 0).all()


def test_decomposition_rejects_bad_arguments():
    x, y, model = tiny_problem()
    with pytest.raises(ValueError, match="batch_size"):
        expected_output_decomposition(model, x, y, mse_loss, x[:2], lr=0.1, batch_size=20, steps=1, seeds=[0])
    with pytest.raises(ValueError, match="lr"):
        expected_output_decomposition(model, x, y, mse_loss, x[:2], lr=-1.0, batch_size=2, steps=1, seeds=[0])


def test_preconditioned_kernel_plain_and_adam():
    x, y, model = tiny_problem()
    plain = preconditioned_kernel(model, x[:3], x, None)
    torch.testing.assert_close(plain, gradient_kernel(model, x[:3], x).double(), rtol=1e-10, atol=1e-12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="not taken a step"):
        adaptive_preconditioner(model, opt)
    SupervisedTrainer(model, opt, mse_loss, batch_size=5).fit(x, y, steps=3)
    p = adaptive_preconditioner(model, opt)
    v = torch.cat([opt.state[q]["exp_avg_sq"].reshape(-1) for q in model.parameters()]).double() / (1 - 0.999**3)
    torch.testing.assert_close(p, 1 / (v.sqrt() + 1e-8))
    phi = tangent_features(model, x, output_index=0).double()
    torch.testing.assert_close(preconditioned_kernel(model, x[:3], x, p), phi[:3] @ (p[:, None] * phi.T))
    k = preconditioned_kernel(model, x, x, p, normalize=True)
    torch.testing.assert_close(k.diagonal(), torch.ones(10, dtype=torch.float64))
    with pytest.raises(TypeError, match="no diagonal preconditioner"):
        adaptive_preconditioner(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_kernel_statistics_on_a_block_kernel():
    labels = torch.tensor([0, 0, 1, 1, 1])
    k = torch.where(labels[:, None] == labels[None, :], 0.9, 0.2).double()
    k.fill_diagonal_(1.0)
    classes, means = class_block_means(k, labels)
    assert classes.tolist() == [0, 1] and np.allclose(means, [[0.9, 0.2], [0.2, 0.9]])
    gap = within_between_gap(k, labels)
    assert gap.gap == pytest.approx(0.7) and np.allclose(gap.per_class, 0.7)
    cross = within_between_gap(k[:2], labels[:2], labels)  # rectangular: self pairs kept
    assert cross.within == pytest.approx((1.0 * 2 + 0.9 * 2) / 4)
    y = torch.nn.functional.one_hot(labels).double()
    assert centered_alignment(y @ y.T, y) == pytest.approx(1.0)
    d = kernel_distance(k)
    assert np.allclose(np.diag(d), 0) and d[0, 2] == pytest.approx(np.sqrt(1.6))
    with pytest.raises(ValueError, match="one label per"):
        within_between_gap(k, labels[:3])
    with pytest.raises(TypeError, match="integer"):
        class_block_means(k, labels.float())


def test_checkpoint_kernels_weights_and_path_kernel():
    x, y, model = tiny_problem()
    probe = torch.tensor([[0.3], [2.5]], dtype=torch.float64)
    rec = CheckpointKernels(x, probe, every=4, steps=10)
    SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, batch_size=10,
                      callbacks=[rec]).fit(x, y, steps=10)
    assert rec.checkpoints == [0, 4, 8] and rec.weights == pytest.approx([0.4, 0.4, 0.2])
    gram, cross, self_k = rec.path_kernel()
    torch.testing.assert_close(gram[:, :], sum(w * g for w, g in zip(rec.weights, rec.grams)))
    # the last checkpoint's kernel is the kernel at θ_8; its diagonal of probes matches a fresh kernel
    assert gram.shape == (10, 10) and cross.shape == (2, 10) and (self_k > 0).all()
    with pytest.raises(RuntimeError, match="no checkpoint"):
        CheckpointKernels(x, probe, every=2, steps=4).path_kernel()
    with pytest.raises(ValueError, match="start at 0"):
        CheckpointKernels(x, probe, at=[1, 3], steps=4)
    assert geometric_checkpoints(2000, 20)[:4] == [0, 1, 2, 4] and geometric_checkpoints(2000, 20)[-1] == 1999


def test_checkpoint_kernel_machine_reproduces_small_steps():
    x, y, model = tiny_problem()
    probe = torch.tensor([[0.3], [2.5]], dtype=torch.float64)
    f0 = model(probe).detach()
    rec = CheckpointKernels(x, probe, at=list(range(30)), steps=30)
    SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.005), mse_loss, batch_size=10,
                      callbacks=[rec]).fit(x, y, steps=30)
    real = model(probe).detach() - f0
    machine = rec.kernel_machine_change(lambda f: 2 * (f - y))
    assert float((machine - real).norm() / real.norm()) < 0.02


def test_tangent_svm_and_embedding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g)
    y = torch.where(x[:, 0] > 0, 1.0, -1.0)
    torch.manual_seed(0)
    model = mlp(2, [8], 1)
    svm = fit_tangent_svm(model, x, y)
    assert svm.features(x).shape == (40, 2 * 8 + 8 + 8 + 1)
    assert 0.8 <= svm.accuracy(x, y) <= 1.0
    assert svm.decision_function(x[:5]).shape == (5,)
    assert fit_rbf_svm(x, y).score(x.double().numpy(), y.numpy()) > 0.8
    d = kernel_distance(gradient_kernel(model, x[:12], normalize=True))
    coords, method = embed_2d(d, method="tsne", seed=0)
    assert coords.shape == (12, 2) and np.isfinite(coords).all() and method == "t-SNE"
    with pytest.raises(ValueError, match="square"):
        embed_2d(d[:3])


def test_decomposition_batches_are_b_subsets_when_b_does_not_divide_n(monkeypatch):
    # The Itô term is scaled for batches that are uniform B-subsets (no example twice). With N = 4, B = 3 the
    # rest of an epoch used to be joined to the next permutation: 5 of 12 batches held an example twice.
    import genkernel.analysis.stochastic as stochastic

    n, b = 4, 3
    x = torch.linspace(-1, 1, n, dtype=torch.float64)[:, None]
    ids = torch.arange(n, dtype=torch.float64)[:, None]  # targets identify the examples
    torch.manual_seed(0)
    model = mlp(1, [3], 1, act="tanh").double()
    seen = []
    original = stochastic.group_gradients

    def recording(net, params, inputs, targets, *args, **kwargs):
        seen.append(targets[:, 0].long().tolist())
        return original(net, params, inputs, targets, *args, **kwargs)

    monkeypatch.setattr(stochastic, "group_gradients", recording)
    expected_output_decomposition(model, x, ids, mse_loss, x[:2], lr=0.01, batch_size=b, steps=4, seeds=[0, 1, 2],
                                  hutchinson_samples=2)
    assert len(seen) == 12 and all(len(batch) == b for batch in seen)
    assert all(len(set(batch)) == b for batch in seen), seen


def test_decomposition_sign_streams_are_no_replicates_batch_orders(monkeypatch):
    # Replicate s drew its Hutchinson signs from seed s + 1, the next replicate's batch-order seed: the
    # replicates, the units of every interval over seeds, were not independent. Each replicate's signs now
    # come from their own stream, distinct from every batch-order seed and from one another.
    import genkernel.analysis.stochastic as stochastic

    x = torch.linspace(-1, 1, 6, dtype=torch.float64)[:, None]
    torch.manual_seed(0)
    model = mlp(1, [3], 1, act="tanh").double()
    sign_seeds, order_seeds = [], []
    original_ito, original_randperm = stochastic.ito_term_estimate, torch.randperm

    def recording_ito(*args, generator, **kwargs):
        sign_seeds.append(generator.initial_seed())
        return original_ito(*args, generator=generator, **kwargs)

    def recording_randperm(n, *, generator, **kwargs):
        order_seeds.append(generator.initial_seed())
        return original_randperm(n, generator=generator, **kwargs)

    monkeypatch.setattr(stochastic, "ito_term_estimate", recording_ito)
    monkeypatch.setattr(stochastic.torch, "randperm", recording_randperm)
    seeds = [0, 1, 2]
    expected_output_decomposition(model, x, torch.sin(x), mse_loss, x[:2], lr=0.01, batch_size=2, steps=2, seeds=seeds,
                                  hutchinson_samples=2)
    assert sorted(set(order_seeds)) == seeds  # the batch orders are the seeds' own, as before
    assert len(set(sign_seeds)) == len(seeds) and not set(sign_seeds) & set(range(-10, 1000)), sign_seeds


def test_decomposition_refuses_bad_counts_up_front():
    x, y, model = tiny_problem()
    with pytest.raises(ValueError, match="no spread"):
        expected_output_decomposition(model, x, y, mse_loss, x[:2], lr=0.1, batch_size=1, steps=1, seeds=[0])
    with pytest.raises(ValueError, match="batch_size must be an int"):
        expected_output_decomposition(model, x, y, mse_loss, x[:2], lr=0.1, batch_size=2.5, steps=1, seeds=[0])
    with pytest.raises(ValueError, match="hutchinson_samples"):
        expected_output_decomposition(model, x, y, mse_loss, x[:2], lr=0.1, batch_size=2, steps=1, seeds=[0],
                                      hutchinson_samples=1)
    with pytest.raises(ValueError, match="lr"):
        expected_output_decomposition(model, x, y, mse_loss, x[:2], lr=float("inf"), batch_size=2, steps=1, seeds=[0])


def test_decomposition_refuses_coupled_examples_and_vector_outputs_with_the_fix():
    # BatchNorm with batch statistics used to crash deep in torch.func ("attempted to call in-place operation"),
    # and a two-output model failed with "pass output_index", an argument this function does not take.
    from torch import nn

    x, y, _ = tiny_problem(n=8)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    with pytest.raises(ValueError, match="eval mode"):
        expected_output_decomposition(net, x, y, mse_loss, x[:2], lr=0.01, batch_size=4, steps=1, seeds=[0])
    stats = copy.deepcopy(net[1].state_dict())
    net.eval()  # with running statistics the examples are independent, and the model is left as it was
    dec = expected_output_decomposition(net, x, y, mse_loss, x[:2], lr=0.01, batch_size=4, steps=1, seeds=[0])
    assert torch.isfinite(dec.change).all()
    assert all(torch.equal(stats[k], v) for k, v in net[1].state_dict().items())
    two = mlp(1, [4], 2, act="tanh").double()
    with pytest.raises(ValueError, match="one scalar output"):
        expected_output_decomposition(two, x, torch.cat([y, y], 1), mse_loss, x[:2], lr=0.01, batch_size=4, steps=1,
                                      seeds=[0])
