"""Classifier-free guidance in DDPMTrainer: label dropout drawn from the trainer's generator, booked by
the analyzers with the labels the model was given, resumed bit for bit; guided sampling equal to a
hand-written guidance loop; bad set-ups refused with the fix."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler
from genkernel.diffusion.trainer import make_sampler
from test_ddpm_trainer import ConditionalMLP, StepRecorder, params_equal, ring
from test_failed_step_retry import RefusesOnce
from test_resume import assert_resumes_bit_for_bit

T = 50
P, NULL = 0.3, 3  # three data classes 0..2, the null class 3

pytestmark = pytest.mark.usefixtures("one_thread")


def labels_of(n, seed=1):
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))


def trainer(*callbacks, model=None, data=None, labels=None, **kwargs):
    settings = dict(conditional=True, class_dropout=P, null_class=NULL)
    settings.update(kwargs)
    data = ring(40) if data is None else data
    if isinstance(data, torch.Tensor):
        settings.update(labels=labels_of(40) if labels is None else labels, batch_size=16)
    return DDPMTrainer(ConditionalMLP(num_classes=4) if model is None else model, make_scheduler(T), data, lr=1e-2,
                       progress=False, callbacks=list(callbacks), **settings)


def test_each_label_is_dropped_to_the_null_class_by_one_draw_after_the_noise():
    recorder = StepRecorder()
    ours = trainer(recorder)
    ours.train(6)
    twin = trainer(class_dropout=0.0, null_class=None)  # the same batches, timesteps and noise, then the draw by hand
    dropped_total = 0
    for step in range(6):
        batch = twin.next_batch()
        dropped = torch.rand(16, generator=twin.generator, dtype=torch.float64) < P
        expected = torch.where(dropped, torch.full_like(batch["labels"], NULL), batch["labels"])
        assert torch.equal(ours.model.seen[step], expected)  # what the model was given
        assert torch.equal(recorder.labels[step], expected)  # what the analyzers get as class_labels
        assert torch.equal(recorder.clean[step], batch["clean"])
        dropped_total += int(dropped.sum())
    assert 0 < dropped_total < 6 * 16


def test_without_dropout_the_draws_are_the_ones_before_class_dropout_existed():
    plain = trainer(class_dropout=0.0, null_class=None)
    plain.train(3)
    # no dropout draw: the generator has drawn exactly order, timesteps and noise (the twin's calls)
    twin = trainer(class_dropout=0.0, null_class=None)
    for _ in range(3):
        twin.next_batch()
    assert torch.equal(plain.generator.get_state(), twin.generator.get_state())


def test_the_analyzer_books_the_labels_the_model_was_given_and_training_is_unchanged():
    analyzer = NoiseLevelAnalyzer(make_scheduler(T), ring(8, seed=4), num_bins=3, num_probes=6, kernel_points=2,
                                  probe_conditioning=torch.arange(8) % 4, num_classes=4, progress=False)
    recorder = StepRecorder()
    analyzed = trainer(analyzer, recorder)
    analyzed.train(5)
    bare = trainer()
    bare.train(5)
    assert params_equal(analyzed.model, bare.model) and analyzed.losses == bare.losses
    for ledger in analyzer.ledgers.values():
        torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta,
                                   rtol=0, atol=1e-12)
    assert analyzer.residual()["relative_residual"] < 1e-3
    # the level × class split books the dropped examples in the null class's groups (bin b: column 4 b + 3)
    assert int((torch.cat(recorder.labels) == NULL).sum()) > 0
    level, level_class = analyzer.ledgers["level"], analyzer.ledgers["level_class"]
    null_groups = level_class.contributions[:, [4 * b + NULL for b in range(3)]]
    assert float(null_groups.abs().sum()) > 0
    torch.testing.assert_close(level_class.contributions.reshape(6, 3, 4, -1).sum(2), level.contributions,
                               rtol=0, atol=1e-12 * float(level.contributions.abs().max()))


def test_a_run_with_class_dropout_resumes_bit_for_bit_and_another_rate_is_refused(tmp_path):
    assert_resumes_bit_for_bit(trainer, tmp_path, 6, 3)
    with pytest.raises(ValueError, match="class_dropout"):
        trainer(class_dropout=0.2).resume(tmp_path / "checkpoint.pt")


def test_a_refused_step_on_a_dataloader_hands_back_the_datas_labels_not_the_dropped_ones():
    data = TensorDataset(ring(40), labels_of(40))

    def loader():
        return DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2))

    straight = trainer(data=loader())
    straight.train(6)
    refused = trainer(RefusesOnce(3), data=loader())
    with pytest.raises(RuntimeError, match="refused"):
        refused.train(6)
    refused.train(6 - refused.global_step)
    assert params_equal(straight.model, refused.model) and straight.losses == refused.losses
    assert len(refused.model.seen) == 6  # (refused before its forward)
    assert all(torch.equal(a, b) for a, b in zip(straight.model.seen, refused.model.seen))


def guided_by_hand(model, labels, scale, seed=0, null=None):
    """DDPM ancestral sampling of points stepping with F(∅) + w (F(y) − F(∅)), two separate passes per step;
    ∅ = ``null`` (default: the null class in every row)."""
    scheduler = make_scheduler(T)
    sampler = make_sampler(scheduler)
    sampler.set_timesteps(T)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(labels.shape[0], 2, generator=generator, dtype=torch.float64)
    null = torch.full_like(labels, NULL) if null is None else null
    model.eval()
    with torch.no_grad():
        for t in sampler.timesteps:
            timestep = t.repeat(x.shape[0])
            conditional, unconditional = model(x, timestep, labels), model(x, timestep, null)
            x = sampler.step(unconditional + scale * (conditional - unconditional), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_guided_samples_are_the_hand_written_guidance_loops(scale, tmp_path):
    run = trainer()
    run.train(4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    samples, _ = run.sample(6, labels=labels, guidance_scale=scale)
    assert run.model.training  # put back
    run.model.record = False
    expected = guided_by_hand(run.model, labels, scale)
    torch.testing.assert_close(samples, expected, rtol=0, atol=1e-12)
    # scale 1 is the conditional model: not the guided samples
    plain, _ = run.sample(6, labels=labels)
    assert not torch.allclose(plain, samples)
    run.model.train()
    saved = run.save_samples(tmp_path / "guided.png", 6, labels=labels, guidance_scale=scale)
    assert torch.equal(saved, samples) and torch.equal(torch.load(tmp_path / "guided.pt"), samples.cpu())


@pytest.mark.parametrize("kwargs,match", [
    (dict(conditional=False, labels=None), "conditional=True"),
    (dict(class_dropout=1.0), r"probability in \[0, 1\)"),
    (dict(class_dropout=-0.1), r"probability in \[0, 1\)"),
    (dict(null_class=None), "needs null_class="),
    (dict(class_dropout=0.0), "pass class_dropout > 0"),
    (dict(null_class=-1), "class index >= 0"),
    (dict(null_class=2), "contain the null class 2"),
])
def test_bad_class_dropout_settings_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        trainer(**kwargs)


def test_a_null_class_in_a_dataloaders_labels_is_refused_at_its_batch():
    data = DataLoader(TensorDataset(ring(16), torch.full((16,), NULL)), batch_size=8)
    run = trainer(data=data)
    with pytest.raises(ValueError, match="the batch's class labels contain the null class 3"):
        run.train(1)
    assert run.global_step == 0


def test_a_null_class_outside_a_unets_class_embedding_is_refused():
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=3, add_attention=False,
    )
    images = torch.randn(8, 1, 8, 8)
    with pytest.raises(ValueError, match="num_class_embeds=4"):
        trainer(model=unet, data=images, labels=labels_of(8))


def test_guidance_needs_a_model_trained_with_class_dropout():
    run = trainer(class_dropout=0.0, null_class=None)
    run.train(1)
    with pytest.raises(ValueError, match="never learned an unconditional one"):
        run.sample(3, labels=torch.tensor([0, 1, 2]), guidance_scale=2.0)
    with pytest.raises(ValueError, match="finite number"):
        run.sample(3, labels=torch.tensor([0, 1, 2]), guidance_scale=float("nan"))


def flat_jacobian(model, x, t, y):
    """``[d, P]`` Jacobian of one example's output with respect to every parameter (torch.func)."""
    from torch.func import functional_call, jacrev

    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x[None], t[None], y[None]))[0])(params)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], dim=1)


@pytest.mark.parametrize("output_sketch", [None, 3])
def test_retrieval_of_guided_samples_uses_the_guided_functions_gradient(output_sketch):
    from genkernel.diffusion import retrieval_attribution
    from genkernel.diffusion.objectives import noisy_input

    run = trainer()
    run.train(3)
    model = run.model
    model.record = False
    scale, seed = 2.5, 1
    train, train_labels = ring(6, seed=8), torch.tensor([0, 1, 2, 0, 1, 2])
    labels = torch.tensor([0, 2, 1])
    null = torch.full_like(labels, NULL)
    result = retrieval_attribution(model, make_scheduler(T), train, num_samples=3, stages=[40, 5], top_k=2,
                                   num_inference_steps=T, seed=seed, conditioning=labels,
                                   train_conditioning=train_labels, guidance_scale=scale, null_conditioning=null,
                                   output_sketch=output_sketch)
    assert model.training
    # the samples are the guided ones
    torch.testing.assert_close(result.samples, guided_by_hand(model, labels, scale, seed=seed), rtol=0, atol=1e-12)
    model.train()
    # brute force: J̃ = w J(x, y) + (1 − w) J(x, ∅) against J(z_n, y_n), the trace kernel (or its sketch)
    noise = torch.randn(train.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    directions = torch.eye(2, dtype=torch.float64) if output_sketch is None else (
        torch.randint(0, 2, (output_sketch, 2), generator=torch.Generator().manual_seed(seed)) * 2 - 1).double()
    model.eval()
    for k, stage in enumerate(result.stages.tolist()):
        t = torch.full((1,), stage, dtype=torch.long)[0]
        guided = [directions @ (scale * flat_jacobian(model, x, t, y) + (1 - scale) * flat_jacobian(model, x, t, u))
                  for x, y, u in zip(result.states[k], labels, null)]
        z = noisy_input(make_scheduler(T), train, noise, torch.full((6,), stage))
        others = [directions @ flat_jacobian(model, x, t, y) for x, y in zip(z, train_labels)]
        kernel = torch.tensor([[float((a * b).sum()) for b in others] for a in guided], dtype=torch.float64)
        norms_a = torch.tensor([float((a * a).sum()) for a in guided], dtype=torch.float64).sqrt()
        norms_b = torch.tensor([float((b * b).sum()) for b in others], dtype=torch.float64).sqrt()
        expected = kernel / norms_a[:, None] / norms_b[None, :]
        torch.testing.assert_close(result.kernel[k], expected, rtol=1e-9, atol=1e-12)
    model.train()
    # guidance changes the kernel: not the conditional branch's
    plain = retrieval_attribution(model, make_scheduler(T), train, num_samples=3, stages=[40, 5], top_k=2,
                                  num_inference_steps=T, seed=seed, conditioning=labels,
                                  train_conditioning=train_labels, output_sketch=output_sketch)
    assert not torch.allclose(plain.kernel, result.kernel)
