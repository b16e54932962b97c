"""Review: sampling with the EMA weights without a copy of the model, and ema-pytorch's options.

What must hold: ``DDPMTrainer.sample(weights="ema")`` / ``GANTrainer.sample(..., weights="ema")`` with
diffusers' ``EMAModel`` run the live model with the ``shadow_params`` themselves in its slots (no copy
of the parameters) and give bit for bit the samples of the former route, a deep copy of the model with
``ema.copy_to`` applied; the live model is left as it was (parameter and buffer tensors, values,
``requires_grad``, gradients, every submodule's mode), also when sampling raises half-way. ema-pytorch's
options under which ``update()`` is not one EMA step of the trained parameters (writing the EMA back
into the model, ignoring or copying a trained parameter, no EMA model yet) are refused when the trainer
(or an analyzer's ``bind(ema=)``) is built, naming the option and the fix; those that only change where
or how the same average is computed, and ignoring buffers or frozen parameters, are accepted and the
EMA ledger adds up.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.training_utils import EMAModel
from ema_pytorch import EMA

from genkernel.core.adapter import analysis_mode, output_tensor
from genkernel.core.tracking.ema import ema_weights
from genkernel.diffusion import reverse_sample
from test_trainer_ema import F64, analyzer, assert_ledger_adds_up, mlp, trainer
from test_trainer_ema_review import bn_model, gan_trainer, hand_loop, same

pytestmark = pytest.mark.usefixtures("one_thread")


def deep_copy_route(ema, model):
    """The former ``ema_weights_model`` for diffusers' EMAModel: a deep copy with the shadows copied in."""
    holder = copy.deepcopy(model)
    ema.copy_to(holder.parameters())
    return holder


def live_state(model):
    """Everything of the live model sampling must leave as it was."""
    return {
        "params": [(id(p), p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
                   for p in model.parameters()],
        "buffers": [(id(b), b.clone()) for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
    }


def assert_same_state(before, model):
    after = live_state(model)
    assert [(i, r) for i, _, r, _ in before["params"]] == [(i, r) for i, _, r, _ in after["params"]]
    for (_, value, _, grad), (_, now, _, grad_now) in zip(before["params"], after["params"]):
        assert torch.equal(value, now) and (grad is None) == (grad_now is None)
        assert grad is None or torch.equal(grad, grad_now)
    assert [i for i, _ in before["buffers"]] == [i for i, _ in after["buffers"]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before["buffers"], after["buffers"]))
    assert before["modes"] == after["modes"]


def record_weights(model):
    """A forward pre-hook keeping the data pointers of the parameters the module runs with."""
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append([p.data_ptr() for p in module.parameters()]))
    return seen, handle


# ------------------------------------------------------------------------------------------
# Faults (fail on the code before ema_weights)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [mlp, bn_model], ids=["mlp", "batchnorm"])
def test_ddpm_sampling_with_ema_model_runs_on_the_shadows_themselves_and_matches_the_deep_copy_bit_for_bit(build):
    model = build()
    run = trainer(model, EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, power=0.75))
    run.train(3)
    run.model.train()
    before, shadows = live_state(run.model), [t.clone() for t in run.ema.shadow_params]
    expected, expected_kept = reverse_sample(deep_copy_route(run.ema, run.model), run.scheduler, (5, 2),
                                             num_inference_steps=6, seed=3, keep=[20])
    seen, handle = record_weights(run.model)
    samples, kept = run.sample(5, weights="ema", num_inference_steps=6, seed=3, keep=[20])
    handle.remove()
    assert torch.equal(samples, expected) and kept.keys() == expected_kept.keys()
    assert all(torch.equal(kept[t], expected_kept[t]) for t in kept)
    # every forward ran with the EMA's own tensors: no copy of the parameters (the old route ran a copy)
    assert len(seen) == 6 and all(ptrs == [t.data_ptr() for t in run.ema.shadow_params] for ptrs in seen)
    assert_same_state(before, run.model)
    assert same(shadows, run.ema.shadow_params)
    trained, _ = run.sample(5, num_inference_steps=6, seed=3)  # the trained weights again, not the EMA's
    assert not torch.equal(trained, samples)


def test_gan_sampling_with_ema_model_runs_on_the_shadows_and_matches_the_deep_copy_bit_for_bit():
    run = gan_trainer("diffusers")
    run.train(3)
    z = torch.randn(7, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    holder = deep_copy_route(run.ema, run.generator)
    with torch.no_grad(), analysis_mode(holder):
        expected = output_tensor(holder(z))
    before = live_state(run.generator)
    seen, handle = record_weights(run.generator)
    samples = run.sample(z, weights="ema")
    handle.remove()
    assert torch.equal(samples, expected)
    assert seen == [[t.data_ptr() for t in run.ema.shadow_params]]
    assert_same_state(before, run.generator)
    assert not torch.equal(run.sample(z), samples)


def test_ema_weights_converts_only_a_shadow_of_another_dtype_as_copy_to_does():
    # a float64 EMAModel of a float32 model (more precise: accepted); copy_to casts each shadow on the way in
    torch.manual_seed(0)
    model = mlp().float()
    ema = EMAModel([p.detach().double() for p in model.parameters()], decay=0.9)
    for p in ema.shadow_params:
        p.add_(torch.randn_like(p) * 1e-3)
    scheduler = trainer(mlp()).scheduler
    expected, _ = reverse_sample(deep_copy_route(ema, model), scheduler, (4, 2), num_inference_steps=5, seed=1)
    with ema_weights(ema, model) as weighted:
        assert all(p.dtype == torch.float32 for p in weighted.parameters())
        samples, _ = reverse_sample(weighted, scheduler, (4, 2), num_inference_steps=5, seed=1)
    assert samples.dtype == torch.float32 and torch.equal(samples, expected)


# ------------------------------------------------------------------------------------------
# ema-pytorch options that make update() something else than one EMA step: refused, with the fix
# ------------------------------------------------------------------------------------------
REFUSED = {
    "update_model_with_ema_every": (dict(update_model_with_ema_every=2, update_model_with_ema_beta=0.5),
                                    r"update_model_with_ema_every=2 \(update_model_with_ema_beta=0.5\).*writes the EMA "
                                    r"back into the model.*without update_model_with_ema_every"),
    "ignore_names": (dict(ignore_names={"layers.0.weight", "other"}),
                     r"ignore_names covering the trained parameters \['layers.0.weight'\].*last warm-up copy.*"
                     r"Drop them from ignore_names.*requires_grad=False"),
    "ignore_startswith_names": (dict(ignore_startswith_names={"out."}),
                                r"ignore_startswith_names covering the trained parameters \['out.bias', 'out.weight'\]"),
    "param_or_buffer_names_no_ema": (dict(param_or_buffer_names_no_ema={"time_proj.bias"}),
                                     r"param_or_buffer_names_no_ema covering the trained parameters \['time_proj.bias'\]"
                                     r".*copies them at each update"),
    "lazy_init_ema": (dict(lazy_init_ema=True), r"lazy_init_ema=True.*no EMA model yet.*ema.init_ema\(\)"),
}


@pytest.mark.parametrize("option", sorted(REFUSED))
def test_an_ema_pytorch_option_that_is_not_one_ema_step_of_the_model_is_refused_with_its_name_and_fix(option):
    # before: accepted; with an analyzer the run stopped at step 2-3 (the model "changed outside the tracked
    # optimizer step", or the EMA ledger's β check), and lazy_init_ema claimed the EMA "has no parameters"
    kwargs, message = REFUSED[option]
    model = mlp()
    with pytest.raises(ValueError, match=message):
        trainer(model, EMA(model, beta=0.8, update_after_step=1, update_every=1, **kwargs))
    # the documented user loop's bind(ema=) refuses it too, before any step
    watcher = analyzer()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=message):
        watcher.bind(model, optimizer, ema=EMA(model, beta=0.8, update_after_step=1, update_every=1, **kwargs))


def test_the_gan_trainer_refuses_an_ema_pytorch_ema_that_writes_back_into_the_generator():
    with pytest.raises(ValueError, match="update_model_with_ema_every=3"):
        gan_trainer("ema_pytorch", ema=lambda G: EMA(G, beta=0.8, update_after_step=1, update_every=1,
                                                    update_model_with_ema_every=3))


# ------------------------------------------------------------------------------------------
# Coverage (pass on the code before): the live model after a failed sampling, the accepted options
# ------------------------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("build", [mlp, bn_model], ids=["mlp", "batchnorm"])
def test_coverage_a_sampling_that_raises_half_way_leaves_the_live_model_and_the_ema_as_they_were(build):
    model = build()
    run = trainer(model, EMAModel(model.parameters(), decay=0.9))
    run.train(2)
    run.model.train()
    next(iter(run.model.children())).eval()  # a mixed mode, to be kept module by module
    first = next(run.model.parameters())
    first.grad = torch.full_like(first, 0.5)
    last = list(run.model.parameters())[-1]
    last.requires_grad_(False)
    before, shadows = live_state(run.model), [t.clone() for t in run.ema.shadow_params]
    calls = []

    def explode(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise Boom("the third reverse step fails")

    handle = run.model.register_forward_pre_hook(explode)
    with pytest.raises(Boom):
        run.sample(4, weights="ema", num_inference_steps=5, seed=2)
    handle.remove()
    assert_same_state(before, run.model)
    assert same(shadows, run.ema.shadow_params)
    last.requires_grad_(True)
    # inside a block, a training-mode forward writes copies of the buffers, as it wrote the deep copy's
    x, t = torch.randn(8, 2, dtype=F64), torch.randint(0, 40, (8,))
    before = live_state(run.model)
    with pytest.raises(Boom):
        with ema_weights(run.ema, run.model) as weighted:
            weighted.train()
            weighted(x, t)
            raise Boom("after a training-mode forward")
    assert_same_state(before, run.model)
    # and sampling afterwards is the deep copy's, bit for bit
    samples, _ = run.sample(4, weights="ema", num_inference_steps=5, seed=2)
    expected, _ = reverse_sample(deep_copy_route(run.ema, run.model), run.scheduler, (4, 2), num_inference_steps=5, seed=2)
    assert torch.equal(samples, expected)


def frozen_time_mlp(seed=0):
    model = mlp(seed)
    model.time_proj.weight.requires_grad_(False)
    return model


ACCEPTED = {
    "include_online_model": (mlp, dict(include_online_model=True)),
    "use_foreach": (mlp, dict(use_foreach=True)),
    "allow_different_devices": (mlp, dict(allow_different_devices=True, move_ema_to_online_device=True)),
    "ignore_names_frozen": (frozen_time_mlp, dict(ignore_names={"time_proj.weight"})),
    "no_ema_buffers": (bn_model, dict(param_or_buffer_names_no_ema={"norm.running_mean", "norm.running_var"})),
    "ignore_buffers": (bn_model, dict(ignore_startswith_names={"norm.running"})),
}


@pytest.mark.parametrize("option", sorted(ACCEPTED))
def test_coverage_an_accepted_ema_pytorch_option_averages_as_by_hand_and_its_ema_ledger_adds_up(option):
    build, kwargs = ACCEPTED[option]

    def make(model):
        return EMA(model, beta=0.8, update_after_step=1, update_every=1, **kwargs)

    model = build()
    watcher = analyzer()
    run = trainer(model, make(model), callbacks=[watcher])
    run.train(5)
    _, hand_ema = hand_loop(build, make, 5)
    assert same(run.ema.ema_model.parameters(), hand_ema.ema_model.parameters())
    assert same(run.ema.ema_model.buffers(), hand_ema.ema_model.buffers())
    decays = watcher.report()["ema"]["decays"]
    assert len(decays) == 5 and decays[0] == 0.0 and 0 < decays[-1] <= 0.8
    for ledger in watcher.ema_ledgers.values():
        assert_ledger_adds_up(ledger)
    assert watcher.residual(weights="ema")["relative_residual"] < 1e-3
