"""The rest of a real DDPM set-up in DDPMTrainer: DataLoader data, class labels for conditional
denoisers, and samplers other than DDPM (DDIM) for sampling and the retrieval analysis.

Every check is exact: bit-for-bit training against the equivalent Tensor data or an
uninterrupted run, the labels the model received, a hand-written DDIM chain.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from genkernel import TrainerCallback
from genkernel.diffusion import (
    DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler, retrieval_attribution, reverse_sample,
)

T = 100
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def ring(n, seed=0):
    angle = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 * math.pi
    return 2 * torch.stack([angle.cos(), angle.sin()], dim=1)


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser(hidden=16, depth=2, time_dim=8).double()


class ConditionalMLP(nn.Module):
    """``model(x_t, t, y)``: an MLP denoiser of x_t shifted by a class embedding; keeps the labels it saw."""

    def __init__(self, num_classes=3, seed=0, record=True):
        super().__init__()
        self.record = record
        torch.manual_seed(seed)
        self.net = MLPDenoiser(hidden=16, depth=2, time_dim=8)
        self.embed = nn.Embedding(num_classes, 2)
        self.double()
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t, t, y):
        if self.record:
            self.seen.append(y.detach().clone())
        return self.net(x_t + self.embed(y), t)


class StepRecorder(TrainerCallback):
    """Keeps every step's clean batch and class labels (``step.info``)."""

    def __init__(self):
        self.clean, self.labels = [], []

    def on_step_end(self, trainer, step):
        self.clean.append(step.info["clean"].clone())
        self.labels.append(step.info.get("class_labels"))


def params_equal(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------------------------------
# DataLoader data
# ------------------------------------------------------------------------------------------
def test_a_dataloader_trains_as_the_same_tensor_data_in_the_same_order():
    scheduler = make_scheduler(T)
    data = ring(64)
    reference = DDPMTrainer(small_mlp(), scheduler, data, shuffle=False, batch_size=16, lr=1e-2, progress=False)
    reference.train(6)  # 1.5 epochs of 4 batches: the second epoch restarts the data
    batch_forms = {
        "tuple": DataLoader(TensorDataset(data), batch_size=16, shuffle=False),  # batches are [x]
        "tensor": DataLoader(data, batch_size=16, shuffle=False),
        "dict": [{"pixel_values": x} for x in data.split(16)],
        "list": list(data.split(16)),
    }
    for form, loader in batch_forms.items():
        trainer = DDPMTrainer(small_mlp(), scheduler, loader, lr=1e-2, progress=False)
        trainer.train(6)
        assert params_equal(trainer.model, reference.model), form
        assert trainer.losses == reference.losses, form


def test_a_loader_seeded_through_its_generator_resumes_to_the_same_batch_order(tmp_path):
    scheduler = make_scheduler(T)
    data = ring(32)

    def make(recorder):
        loader = DataLoader(TensorDataset(data), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
        return DDPMTrainer(small_mlp(), scheduler, loader, lr=1e-2, progress=False, callbacks=[recorder],
                           checkpoint_dir=tmp_path)

    straight_batches = StepRecorder()
    straight = make(straight_batches)
    straight.train(7)  # 4 batches per epoch

    first_batches = StepRecorder()
    first = make(first_batches)
    first.train(3)
    first.save_checkpoint()
    resumed_batches = StepRecorder()
    resumed = make(resumed_batches)  # a fresh loader: its generator's state comes from the checkpoint
    assert resumed.resume()
    resumed.train(4)
    seen = first_batches.clean + resumed_batches.clean
    assert all(torch.equal(a, b) for a, b in zip(seen, straight_batches.clean)) and len(seen) == 7
    assert params_equal(resumed.model, straight.model) and resumed.global_step == 7
    # the epochs really were shuffled differently
    assert not torch.equal(straight_batches.clean[0], straight_batches.clean[4])
    # a checkpoint written before the first batch resumes too
    make(StepRecorder()).save_checkpoint(tmp_path / "start.pt")
    from_start_batches = StepRecorder()
    from_start = make(from_start_batches)
    assert from_start.resume(tmp_path / "start.pt")
    from_start.train(2)
    assert all(torch.equal(a, b) for a, b in zip(from_start_batches.clean, straight_batches.clean[:2]))
    # a checkpoint of loader data does not load into a trainer of Tensor data
    with pytest.raises(ValueError, match="iterable data, this one trains on Tensor data"):
        DDPMTrainer(small_mlp(), scheduler, data, progress=False).resume(tmp_path / "checkpoint.pt")


def test_bad_iterable_data_is_refused_with_the_fix():
    scheduler = make_scheduler(T)
    data = ring(16)
    loader = DataLoader(TensorDataset(data), batch_size=8)
    with pytest.raises(TypeError, match="iterator"):
        DDPMTrainer(small_mlp(), scheduler, iter(loader), progress=False)
    with pytest.raises(ValueError, match="labels= is for Tensor data"):
        DDPMTrainer(small_mlp(), scheduler, loader, labels=torch.zeros(16, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="batch_size= is for Tensor data"):
        DDPMTrainer(small_mlp(), scheduler, loader, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="no batch"):
        DDPMTrainer(small_mlp(), scheduler, [], progress=False).train(1)
    with pytest.raises(TypeError, match="'images', 'pixel_values', 'input'"):
        DDPMTrainer(small_mlp(), scheduler, [{"x": data}], progress=False).train(1)
    with pytest.raises(TypeError, match="floating Tensor"):
        DDPMTrainer(small_mlp(), scheduler, [data.long()], progress=False).train(1)
    with pytest.raises(TypeError, match="class labels"):  # conditional, but the batches carry no labels
        DDPMTrainer(ConditionalMLP(), scheduler, loader, conditional=True, progress=False).train(1)
    with pytest.raises(ValueError, match="give labels="):
        DDPMTrainer(ConditionalMLP(), scheduler, data, conditional=True, progress=False)
    with pytest.raises(RuntimeError, match="train a step first"):
        DDPMTrainer(small_mlp(), scheduler, loader, progress=False).sample(2)


# ------------------------------------------------------------------------------------------
# class labels
# ------------------------------------------------------------------------------------------
def test_class_labels_reach_a_conditional_model_and_the_analyzers():
    scheduler = make_scheduler(T)
    data, labels = ring(24), torch.arange(24) % 3
    recorder = StepRecorder()
    trainer = DDPMTrainer(ConditionalMLP(), scheduler, data, labels=labels, conditional=True, batch_size=8, lr=1e-2,
                          progress=False, callbacks=[recorder])
    trainer.train(3)
    assert len(trainer.model.seen) == 3  # one training forward per step
    for clean, given, seen in zip(recorder.clean, recorder.labels, trainer.model.seen):
        rows = [int((data == x).all(1).nonzero()) for x in clean]  # the batch's rows of the data
        assert torch.equal(given, labels[rows]) and torch.equal(seen, labels[rows])
    # an analyzer splitting level × class gets the same labels: its groups add up to the level groups
    analyzer = NoiseLevelAnalyzer(scheduler, ring(6, seed=3), num_bins=2, num_probes=4, kernel_points=2,
                                  probe_conditioning=torch.arange(6) % 3, num_classes=3)
    DDPMTrainer(ConditionalMLP(record=False), scheduler, data, labels=labels, conditional=True, batch_size=8, lr=1e-2,
                progress=False, callbacks=[analyzer]).train(3)
    level, level_class = analyzer.ledgers["level"], analyzer.ledgers["level_class"]
    torch.testing.assert_close(level_class.contributions.reshape(4, 2, 3, -1).sum(2), level.contributions,
                               rtol=0, atol=1e-12 * float(level.contributions.abs().max()))
    assert sum(analyzer.bin_counts[0]) == 8
    # sampling a conditional model takes the classes to sample
    samples, _ = trainer.sample(4, labels=torch.tensor([0, 1, 2, 0]), num_inference_steps=5)
    assert samples.shape == (4, 2) and torch.equal(trainer.model.seen[-1], torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="pass labels"):
        trainer.sample(4)

    # batches (x, y) of a loader: y reaches the conditional model; an unconditional model gets x alone
    loader = DataLoader(TensorDataset(data, labels), batch_size=8, shuffle=False)
    conditional = DDPMTrainer(ConditionalMLP(), scheduler, loader, conditional=True, lr=1e-2, progress=False)
    conditional.train(3)
    assert [seen.tolist() for seen in conditional.model.seen] == [labels[i:i + 8].tolist() for i in (0, 8, 16)]
    recorder = StepRecorder()
    DDPMTrainer(small_mlp(), scheduler, loader, lr=1e-2, progress=False, callbacks=[recorder]).train(2)
    assert torch.equal(recorder.labels[1], labels[8:16])  # still there for the analyzers


# ------------------------------------------------------------------------------------------
# samplers other than DDPM
# ------------------------------------------------------------------------------------------
def trained_mlp():
    scheduler = make_scheduler(T)
    trainer = DDPMTrainer(small_mlp(), scheduler, ring(64), batch_size=16, lr=1e-2, progress=False)
    trainer.train(5)
    return trainer.model, scheduler


def test_ddim_sampling_with_eta_zero_is_the_deterministic_ddim_chain():
    from diffusers import DDIMScheduler

    model, scheduler = trained_mlp()
    steps = list(range(90, -1, -10))  # DDIM's "leading" spacing: 10 steps of T = 100
    samples, kept = reverse_sample(model, scheduler, (5, 2), sampler=DDIMScheduler, num_inference_steps=10, seed=4,
                                   keep=steps)
    assert sorted(kept, reverse=True) == steps
    # by hand: x_prev = sqrt(ᾱ_prev) x̂0 + sqrt(1 − ᾱ_prev) ε̂, no noise drawn (eta = 0); the schedule's
    # constants in float32, as the scheduler keeps them
    abar = scheduler.alphas_cumprod
    x = kept[90]
    model.eval()
    with torch.no_grad():
        for t in steps:
            torch.testing.assert_close(x, kept[t], rtol=1e-12, atol=1e-12)
            eps = model(x, torch.full((5,), t))
            prev = abar[t - 10] if t >= 10 else torch.tensor(1.0)  # DDIM's set_alpha_to_one
            x0 = (x - (1 - abar[t]) ** 0.5 * eps) / abar[t] ** 0.5
            x = prev ** 0.5 * x0 + (1 - prev) ** 0.5 * eps
    torch.testing.assert_close(samples, x, rtol=1e-10, atol=1e-10)
    # deterministic given the initial noise: the same seed gives the same samples, with eta = 0 said or not
    instance = DDIMScheduler.from_config(scheduler.config)
    again, _ = reverse_sample(model, scheduler, (5, 2), sampler=instance, num_inference_steps=10, seed=4,
                              step_kwargs={"eta": 0.0})
    assert torch.equal(again, samples)
    stochastic, _ = reverse_sample(model, scheduler, (5, 2), sampler=DDIMScheduler, num_inference_steps=10, seed=4,
                                   step_kwargs={"eta": 1.0})
    assert not torch.allclose(stochastic, samples)
    # the default is DDPM, as before; a sampler on another noise schedule is refused
    ddpm, _ = reverse_sample(model, scheduler, (5, 2), num_inference_steps=10, seed=4)
    assert not torch.allclose(ddpm, samples)
    with pytest.raises(ValueError, match="noise schedule"):
        other = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
        reverse_sample(model, scheduler, (5, 2), sampler=other)
    with pytest.raises(TypeError, match="diffusers scheduler"):
        reverse_sample(model, scheduler, (5, 2), sampler=torch.optim.SGD)


def test_the_retrieval_analysis_runs_on_the_ddim_chain():
    from diffusers import DDIMScheduler

    model, scheduler = trained_mlp()
    train = ring(12, seed=5)
    result = retrieval_attribution(model, scheduler, train, num_samples=3, num_stages=3, num_inference_steps=10, top_k=2,
                                   sampler=DDIMScheduler, seed=1)
    assert result.stages.tolist() == [90, 50, 0]  # the stages snapped to DDIM's steps
    assert result.kernel.shape == (3, 3, 12) and torch.isfinite(result.entropy).all()
    assert ((result.entropy >= 0) & (result.entropy <= 1 + 1e-12)).all()
    samples, _ = reverse_sample(model, scheduler, (3, 2), sampler=DDIMScheduler, num_inference_steps=10, seed=1)
    assert torch.equal(result.samples, samples)


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("other", [dict(beta_schedule="squaredcos_cap_v2"), dict(beta_end=0.01),
                                   dict(rescale_betas_zero_snr=True)])
def test_a_checkpoint_of_another_noise_schedule_is_refused(tmp_path, other):
    # Only T and the prediction type were compared: a run resumed on another beta schedule trained on
    # other noisy inputs and targets from the checkpoint on, silently.
    trainer = DDPMTrainer(small_mlp(), make_scheduler(T), ring(16), batch_size=8, progress=False)
    trainer.train(1)
    path = trainer.save_checkpoint(tmp_path / "checkpoint.pt")
    resumed = DDPMTrainer(small_mlp(), make_scheduler(T, **other), ring(16), batch_size=8, progress=False)
    before = [p.clone() for p in resumed.model.parameters()]
    key = next(iter(other))
    with pytest.raises(ValueError, match=f"noise_schedule.*{key}"):
        resumed.resume(path)
    assert all(torch.equal(p, q) for p, q in zip(before, resumed.model.parameters()))
    same = DDPMTrainer(small_mlp(), make_scheduler(T), ring(16), batch_size=8, progress=False)
    assert same.resume(path) and same.global_step == 1


def test_settings_for_a_named_optimizer_beside_an_optimizer_object_are_refused():
    """``lr=`` beside an optimizer object was ignored silently (the object keeps its own lr): a run
    the user asked for at 1e-4 trained at the optimizer's 1e-3. Refused, naming the fix; an object
    alone, or a named optimizer with its settings, is accepted."""
    import pytest
    import torch

    from genkernel.diffusion import DDPMTrainer, MLPDenoiser, make_scheduler

    model = MLPDenoiser(2, hidden=8, depth=1)
    data = torch.randn(16, 2)
    with pytest.raises(ValueError, match=r"\['lr'\] are for a named optimizer.*keeps its own settings"):
        DDPMTrainer(model, make_scheduler(10), data, optimizer=torch.optim.Adam(model.parameters()), lr=1e-4,
                    progress=False)
    with pytest.raises(ValueError, match=r"\['weight_decay', 'momentum'\]"):
        DDPMTrainer(model, make_scheduler(10), data, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    weight_decay=0.1, momentum=0.9, progress=False)
    own = torch.optim.Adam(model.parameters(), lr=1e-4)
    assert DDPMTrainer(model, make_scheduler(10), data, optimizer=own, progress=False).optimizer is own
    named = DDPMTrainer(model, make_scheduler(10), data, optimizer="adamw", lr=1e-4, weight_decay=0.1, progress=False)
    assert named.optimizer.param_groups[0]["lr"] == 1e-4 and named.optimizer.param_groups[0]["weight_decay"] == 0.1
