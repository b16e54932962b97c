"""Architectures researchers train today (DiT, Transformer2DModel, ResNet-18 with BatchNorm, a ViT,
sequence-first encoders and RNNs), tiny and in float64, against an independent brute force:
per-example Jacobians one example and one output at a time, group gradients from the batch's own
graph, the optimizers' maths written out, midpoint contributions J(θ_k + Δ/2) u_g by a double
backward pass. Coverage of models the other tests barely touch (these pass on the reviewed
commit as well: the review found them exact)."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import genkernel
from genkernel import PathKernelTracker

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency")
torchvision = pytest.importorskip("torchvision", reason="torchvision is an optional dependency")


# -- the brute force ------------------------------------------------------------------------------
def _out(o):
    return o.sample if hasattr(o, "sample") else o


def _randomize(model, scale, seed=0):
    """Nonzero everywhere (AdaLN-Zero and zero-initialized output layers would hide parameters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def brute_jacobian(model, xs):
    """``[M, d, P]``: one example and one output at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(xs[0].shape[0]):
        out = _out(model(*(t[i : i + 1] for t in xs))).reshape(-1)
        rows.append(torch.stack([
            torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                       for g, p in zip(torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True), params)])
            for o in range(out.numel())
        ]))
    return torch.stack(rows)


def rel(a, b):
    return float((a - b).norm() / b.norm())


class Reference:
    """The dense ledger by hand: ĝ_g = ∇ Σ_{n∈g} ℓ_n / B through the batch graph (train mode),
    SGD (momentum, coupled decay: a rest pseudo-group) or Adam (per-group first moments, the shared
    second moment, coupled decay) written out, contributions J(x; θ_k + Δ_k/2) u_g in eval mode."""

    def __init__(self, model, kind, hp, groups, loss_fn):
        self.model, self.kind, self.hp, self.groups, self.loss_fn = copy.deepcopy(model), kind, hp, groups, loss_fn
        if getattr(self.model, "gradient_checkpointing", False):
            # A checkpoint recomputes in the backward, after functional_call has put the module's own
            # parameters back: the double backward below would differentiate at θ_{k+1}, not θ_k + Δ/2.
            self.model.disable_gradient_checkpointing()
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.state, self.k = {}, 0

    def outputs(self, probes, params=None):
        training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = _out(functional_call(self.model, params or dict(self.model.named_parameters()), probes))
        self.model.train(training)
        return out.reshape(probes[0].shape[0], -1)

    def step(self, inputs, targets, ids, probes):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        model, hp = self.model, self.hp
        named = dict(model.named_parameters())
        params = [named[n] for n in self.names]
        losses = self.loss_fn(_out(model(*inputs)), targets)
        batch = losses.shape[0]
        rows = []
        for g in range(self.groups):
            mask = (ids == g).to(losses.dtype)
            grads = torch.autograd.grad((losses * mask).sum() / batch, params, retain_graph=True, allow_unused=True)
            rows.append([torch.zeros_like(p) if x is None else x.detach() for x, p in zip(grads, params)])
        f_before = self.outputs(probes)  # buffers as the training forward left them
        theta = [p.detach().clone() for p in params]
        decay = hp.get("weight_decay", 0.0)
        rows.append([decay * t for t in theta])  # the rest pseudo-group
        self.k += 1
        if self.kind == "adam":
            (b1, b2), lr, eps = hp["betas"], hp["lr"], hp["eps"]
            v = self.state.setdefault("v", [torch.zeros_like(t) for t in theta])
            for i in range(len(theta)):
                v[i].mul_(b2).add_((1 - b2) * sum(r[i] for r in rows) ** 2)
            denom = [(vi / (1 - b2**self.k)).sqrt() + eps for vi in v]
            m = self.state.setdefault("m", [[torch.zeros_like(t) for t in theta] for _ in rows])
            for r, row in enumerate(rows):
                for i in range(len(theta)):
                    m[r][i].mul_(b1).add_((1 - b1) * row[i])
            updates = [[-lr * m[r][i] / (1 - b1**self.k) / denom[i] for i in range(len(theta))] for r in range(len(rows))]
        else:
            mu, lr = hp.get("momentum", 0.0), hp["lr"]
            if "b" not in self.state:
                self.state["b"] = [[x.clone() for x in row] for row in rows]
            else:
                for buf, row in zip(self.state["b"], rows):
                    for i in range(len(theta)):
                        buf[i].mul_(mu).add_(row[i])
            updates = [[-lr * x for x in buf] for buf in self.state["b"]]
        delta = [sum(u[i] for u in updates) for i in range(len(theta))]
        with torch.no_grad():
            for p, t, d in zip(params, theta, delta):
                p.copy_(t + d)
        training = model.training
        model.eval()
        mid = {n: v.detach() for n, v in named.items()}
        for n, t, d in zip(self.names, theta, delta):
            mid[n] = t + 0.5 * d
        pushes = []
        with sdpa_kernel(SDPBackend.MATH):  # CPU flash attention has no double backward
            for u in updates:  # J u = ∂/∂w ⟨Jᵀ w, u⟩
                at = {n: v.clone().requires_grad_(n in self.names) for n, v in mid.items()}
                out = _out(functional_call(model, at, probes)).reshape(probes[0].shape[0], -1)
                w = torch.zeros_like(out, requires_grad=True)
                grads = torch.autograd.grad(out, [at[n] for n in self.names], w, create_graph=True, allow_unused=True)
                dot = sum((g * x).sum() for g, x in zip(grads, u) if g is not None)
                pushes.append(torch.autograd.grad(dot, w)[0].detach())
        model.train(training)
        return dict(contributions=torch.stack(pushes[:-1], 1), rest=pushes[-1], f_before=f_before,
                    f_after=self.outputs(probes))


def check_tracker(model, make_optimizer, kind, hp, loss_fn, batches, probes, groups, train=True, tol=1e-10, **kwargs):
    """Runs the tracker and the reference side by side; returns the worst relative gaps."""
    reference = Reference(model, kind, hp, groups, loss_fn)
    model = copy.deepcopy(model).train(train)
    reference.model.train(train)
    tracker = PathKernelTracker(model, make_optimizer(model), loss_fn, probes, num_groups=groups, **kwargs)
    f_prev = reference.outputs(probes)
    worst = {"contributions": 0.0, "rest": 0.0, "residual": 0.0}
    for inputs, targets, ids in batches:
        got = tracker.step(inputs, targets, ids)
        want = reference.step(inputs, targets, ids, probes)
        drift, f_prev = want["f_before"] - f_prev, want["f_after"]
        change = (want["f_after"] - want["f_before"]).norm()
        worst["contributions"] = max(worst["contributions"], rel(got.contributions, want["contributions"]))
        worst["rest"] = max(worst["rest"], float((got.rest - want["rest"] - drift).norm() / change))
        # The ledger identity with the tracker's own numbers: a fresh forward minus the pieces.
        identity = want["f_after"] - want["f_before"] - got.contributions.sum(1) - (got.rest - drift) - got.residual
        assert float(identity.norm() / change) < 1e-10
        worst["residual"] = max(worst["residual"], float(got.residual.norm() / change))
    assert worst["contributions"] < tol and worst["rest"] < tol, worst
    return worst


def mse(out, target):
    return ((out - target) ** 2).flatten(1).mean(1)


def cross_entropy(out, target):
    return nn.functional.cross_entropy(out, target, reduction="none")


# -- 1. diffusers' DiT and Transformer2DModel -----------------------------------------------------
def tiny_dit(label_dropout=0.0, out_channels=2):
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=2, out_channels=out_channels, num_layers=1, norm_num_groups=2,
        sample_size=8, patch_size=4, num_embeds_ada_norm=10,
    ).double()
    _randomize(model, 0.2)
    model.transformer_blocks[0].norm1.emb.class_embedder.dropout_prob = label_dropout
    return model


def dit_batch(gen, b):
    x = torch.randn(b, 2, 8, 8, generator=gen, dtype=torch.float64)
    t, y = torch.randint(0, 1000, (b,), generator=gen), torch.randint(0, 10, (b,), generator=gen)
    return (x, t, y), torch.randn(b, 2, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (b,), generator=gen)


@pytest.mark.parametrize("engine", ["auto", "factored", "functional"])
def test_dit_kernels_equal_per_example_autograd(engine):
    model = tiny_dit(out_channels=1).eval()  # d = 64 outputs: "auto" takes the factored engine
    (x, t, y), _, _ = dit_batch(torch.Generator().manual_seed(1), 3)
    jac = brute_jacobian(model, (x, t, y))  # [3, 64, P]
    kernel = genkernel.gradient_kernel(model, (x, t, y), engine=engine)
    assert rel(kernel, torch.einsum("mdp,ndp->mn", jac, jac)) < 1e-12
    blocks = genkernel.gradient_kernel(model, (x, t, y), (x[:2], t[:2], y[:2]), engine=engine, reduce="none")
    assert rel(blocks, torch.einsum("mdp,nep->mnde", jac, jac[:2])) < 1e-12


def test_transformer2d_cross_attention_kernels_equal_per_example_autograd():
    torch.manual_seed(0)
    inner = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=2,
                                         cross_attention_dim=6, num_layers=1).double()
    _randomize(inner, 0.2).eval()

    class Denoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x, context):
            return self.inner(x, encoder_hidden_states=context).sample

    model = Denoiser()
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(3, 8, 4, 4, generator=gen, dtype=torch.float64), torch.randn(3, 5, 6, generator=gen, dtype=torch.float64)
    jac = brute_jacobian(model, (x, context))
    want = torch.einsum("mdp,ndp->mn", jac, jac)
    for engine in ("auto", "factored", "functional"):
        assert rel(genkernel.gradient_kernel(model, (x, context), engine=engine), want) < 1e-12


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("route", ["graph", "example", "factored"])
def test_dit_adam_ledger_equals_the_brute_force_on_every_gradient_route(route, checkpointing):
    gen = torch.Generator().manual_seed(1)
    batches = [dit_batch(gen, 6) for _ in range(2)]
    probes = dit_batch(gen, 3)[0]
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    model = tiny_dit()
    if checkpointing:
        model.enable_gradient_checkpointing()
    worst = check_tracker(model, lambda m: torch.optim.Adam(m.parameters(), **hp), "adam", hp, mse, batches, probes, 3,
                          group_state="dense", gradient_route=route)
    assert worst["residual"] < 1e-2  # midpoint's O(Δ³) at lr 1e-3 (measured 2.4e-3)


def test_dit_noise_level_analyzer_through_the_conditional_trainer():
    from genkernel.diffusion import NoiseLevelAnalyzer
    from genkernel.diffusion.objectives import make_scheduler
    from genkernel.diffusion.trainer import DDPMTrainer

    model = tiny_dit(label_dropout=0.1)  # diffusers' default classifier-free guidance dropout
    gen = torch.Generator().manual_seed(1)
    data, labels = torch.randn(16, 2, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 10, (16,), generator=gen)
    scheduler = make_scheduler(100)
    analyzer = NoiseLevelAnalyzer(scheduler, data[:4], num_bins=3, num_probes=4, kernel_points=2,
                                  probe_conditioning=labels[:4])
    trainer = DDPMTrainer(model, scheduler, data, labels=labels, conditional=True, batch_size=8, callbacks=[analyzer],
                          progress=False)
    trainer.train(2)
    residual = analyzer.residual()
    assert residual["steps"] == 2 and residual["relative_residual"] < 1e-2


# -- 2. torchvision ResNet-18 (BatchNorm) ---------------------------------------------------------
def tiny_resnet(trainable=("conv1", "bn1", "layer1.0.", "fc")):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(trainable))
    return model


def check_image_kernels(model, *, blocks: bool) -> torch.Tensor:
    """Every engine's trace kernel (and, with ``blocks``, its per-output blocks against 2 other
    inputs) of 3 images [3, 3, 16, 16] equals per-example autograd to 1e-12; returns the Jacobians."""
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    jac = brute_jacobian(model, (x,))
    want = torch.einsum("mdp,ndp->mn", jac, jac)
    for engine in ("auto", "factored", "functional"):
        assert rel(genkernel.gradient_kernel(model, x, engine=engine), want) < 1e-12
        if blocks:
            got = genkernel.gradient_kernel(model, x, x[:2], engine=engine, reduce="none")
            assert rel(got, torch.einsum("mdp,nep->mnde", jac, jac[:2])) < 1e-12
    return x, jac


def test_resnet18_eval_kernels_equal_per_example_autograd():
    model = tiny_resnet().eval()
    x, jac = check_image_kernels(model, blocks=False)
    assert rel(genkernel.tangent_features(model, x, engine="factored"), jac) < 1e-12


def test_resnet18_training_mode_sgd_momentum_ledger_is_exact_on_the_graph_route_and_refused_per_example():
    gen = torch.Generator().manual_seed(1)

    def batch(b):
        return ((torch.randn(b, 3, 16, 16, generator=gen, dtype=torch.float64),),
                torch.randint(0, 10, (b,), generator=gen), torch.randint(0, 3, (b,), generator=gen))

    batches, probes = [batch(6) for _ in range(2)], batch(3)[0]
    hp = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)

    def make(m):
        return torch.optim.SGD([p for p in m.parameters() if p.requires_grad], **hp)

    # Frozen BatchNorms further down still move their running statistics: buffer drift, in the rest.
    check_tracker(tiny_resnet(), make, "sgd", hp, cross_entropy, batches, probes, 3, tol=1e-9,
                  group_state="dense", gradient_route="graph")
    for route in ("example", "factored"):
        model = tiny_resnet().train()
        with pytest.raises(ValueError, match="BatchNorm2d.*gradient_route='graph'"):
            tracker = PathKernelTracker(model, make(model), cross_entropy, probes, num_groups=3, group_state="dense",
                                        gradient_route=route)
            tracker.step(*batches[0])


# -- 3. torchvision VisionTransformer -------------------------------------------------------------
def tiny_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                                                 mlp_dim=32, num_classes=10).double()
    return _randomize(model, 0.2)


def test_vit_kernels_and_features_equal_per_example_autograd():
    model = tiny_vit().eval()
    x, jac = check_image_kernels(model, blocks=True)
    for engine in ("auto", "factored", "functional"):
        assert rel(genkernel.tangent_features(model, x, engine=engine), jac) < 1e-12
    # The class token, the positional embedding and the packed in_proj weights are read outside a
    # Linear's forward: torch.func takes them, the Linear layers stay factored.
    plan = genkernel.core.engine.kernels.kernel_plan(model, x, engine="factored")
    assert plan.engine == "factored" and 0 < plan.factored_fraction < 1


@pytest.mark.parametrize("route", ["graph", "example", "factored"])
def test_vit_adam_ledger_equals_the_brute_force(route):
    gen = torch.Generator().manual_seed(1)

    def batch(b):
        return ((torch.randn(b, 3, 16, 16, generator=gen, dtype=torch.float64),),
                torch.randint(0, 10, (b,), generator=gen), torch.randint(0, 3, (b,), generator=gen))

    batches, probes = [batch(6) for _ in range(2)], batch(3)[0]
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    # Adam's first step divides tiny gradients by tiny second moments: 1.6e-12 measured.
    check_tracker(tiny_vit(), lambda m: torch.optim.Adam(m.parameters(), **hp), "adam", hp, cross_entropy, batches,
                  probes, 3, tol=1e-10, group_state="dense", gradient_route=route)


# -- 4. sequence-first layouts whose sequence length equals the batch -----------------------------
class SequenceFirst(nn.Module):
    """``x [B, T, 3]`` -> sequence-first ``[T, B, 8]`` core (batch_first=False) -> ``[B, 2]``."""

    def __init__(self, kind):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.core = {
            "linear": lambda: nn.Linear(8, 8),
            "encoder": lambda: nn.TransformerEncoder(
                nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False), 1, enable_nested_tensor=False),
            "lstm": lambda: nn.LSTM(8, 8),
            "gru": lambda: nn.GRU(8, 8),
        }[kind]()
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.core(self.inp(x).transpose(0, 1))
        h = h[0] if isinstance(h, tuple) else h
        return self.out(torch.tanh(h).mean(0))


@pytest.mark.filterwarnings("ignore:torch.func.vmap cannot batch")
@pytest.mark.parametrize("kind", ["linear", "encoder", "lstm", "gru"])
def test_sequence_first_cores_with_length_equal_to_the_batch(kind):
    torch.manual_seed(0)
    model = SequenceFirst(kind).double().eval()
    x = torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # T == B
    jac = brute_jacobian(model, (x,))
    want = torch.einsum("mdp,ndp->mn", jac, jac)
    for engine in ("auto", "factored", "functional"):
        assert rel(genkernel.gradient_kernel(model, x, engine=engine), want) < 1e-12
        assert rel(genkernel.gradient_kernel(model, x, x[:3], engine=engine), want[:, :3]) < 1e-12
        assert rel(genkernel.tangent_features(model, x, engine=engine), jac) < 1e-12


@pytest.mark.filterwarnings("ignore:torch.func.vmap cannot batch")
@pytest.mark.parametrize("route", ["graph", "example", "factored"])
def test_sequence_first_encoder_ledger_with_length_equal_to_the_batch(route):
    torch.manual_seed(0)
    model = SequenceFirst("encoder").double()
    gen = torch.Generator().manual_seed(1)

    def batch(b):
        return ((torch.randn(b, 6, 3, generator=gen, dtype=torch.float64),),  # T = 6 = B
                torch.randn(b, 2, generator=gen, dtype=torch.float64), torch.randint(0, 3, (b,), generator=gen))

    batches, probes = [batch(6) for _ in range(2)], batch(4)[0]
    hp = dict(lr=1e-2, momentum=0.9)
    check_tracker(model, lambda m: torch.optim.SGD(m.parameters(), **hp), "sgd", hp, mse, batches, probes, 3, tol=1e-10,
                  group_state="dense", gradient_route=route)


# -- 5. ConvNeXt blocks (depthwise convolution, layer scale) and a GPT with tied embeddings --------
class TinyConvNeXt(nn.Module):
    def __init__(self, stochastic_depth=0.0):
        super().__init__()
        from torchvision.models.convnext import CNBlock

        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.blocks = nn.Sequential(CNBlock(8, 0.5, stochastic_depth), CNBlock(8, 0.5, stochastic_depth))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class TiedGPT(nn.Module):
    """Causal pre-norm encoder over token ids ``[B, 5]``; the output head shares the embedding's
    weight (read by the Embedding and by the head's Linear); next-token logits ``[B, 11]``."""

    def __init__(self, vocab=11, width=8, length=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.1 * torch.randn(length, width))
        layer = nn.TransformerEncoderLayer(width, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, ids):
        return self.head(self.ln(self.enc(self.emb(ids) + self.pos, mask=self.mask, is_causal=True)))[:, -1]


@pytest.mark.parametrize("name", ["convnext", "gpt"])
def test_convnext_and_tied_gpt_kernels_equal_per_example_autograd(name):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "convnext":
        model, x = TinyConvNeXt().double().eval(), torch.randn(3, 3, 16, 16, generator=gen, dtype=torch.float64)
    else:
        model, x = TiedGPT().double().eval(), torch.randint(0, 11, (3, 5), generator=gen)
    jac = brute_jacobian(model, (x,))
    want = torch.einsum("mdp,ndp->mn", jac, jac)
    for engine in ("auto", "factored", "functional"):
        assert rel(genkernel.gradient_kernel(model, x, engine=engine), want) < 1e-12
        assert rel(genkernel.gradient_kernel(model, x, x[:2], engine=engine, reduce="none"),
                   torch.einsum("mdp,nep->mnde", jac, jac[:2])) < 1e-12
        assert rel(genkernel.tangent_features(model, x, engine=engine, output_index=-1), jac[:, -1]) < 1e-12


@pytest.mark.parametrize("state", [dict(group_state="factored"), dict(group_state="dense", gradient_route="factored")])
def test_tied_gpt_sgd_ledger_equals_the_brute_force(state):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)

    def batch(b):
        return ((torch.randint(0, 11, (b, 5), generator=gen),), torch.randint(0, 11, (b,), generator=gen),
                torch.randint(0, 3, (b,), generator=gen))

    hp = dict(lr=0.05)
    check_tracker(TiedGPT().double(), lambda m: torch.optim.SGD(m.parameters(), **hp), "sgd", hp, cross_entropy,
                  [batch(6) for _ in range(2)], batch(3)[0], 3, tol=1e-10, **state)


# -- 6. randomness in training mode other than nn.Dropout (needs the adapter's RANDOM_IN_TRAINING) --
def _random_in_training_case(name):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "stochastic_depth":  # ConvNeXt's and Swin's default (torchvision StochasticDepth)
        model = TinyConvNeXt(stochastic_depth=0.5).double()
        x, y = torch.randn(8, 3, 16, 16, generator=gen, dtype=torch.float64), torch.randint(0, 10, (8,), generator=gen)
        return model, (x,), y, cross_entropy, "StochasticDepth, p=0.5"
    model = tiny_dit(label_dropout=0.5)  # classifier-free guidance's label dropout (diffusers' LabelEmbedding)
    inputs, targets, _ = dit_batch(gen, 8)
    return model, inputs, targets, mse, "LabelEmbedding, p=0.5"


@pytest.mark.parametrize("name", ["stochastic_depth", "label_dropout"])
@pytest.mark.parametrize("state", [dict(group_state="dense", gradient_route="factored"),
                                   dict(group_state="dense", gradient_route="example"), dict(group_state="factored")])
def test_per_example_routes_refuse_stochastic_depth_and_label_dropout_naming_the_graph_route(name, state):
    model, inputs, targets, loss_fn, label = _random_in_training_case(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match=f"{label} in training mode.*gradient_route='graph'"):
        tracker = PathKernelTracker(model, opt, loss_fn, tuple(t[:2] for t in inputs), num_groups=8, **state)
        for _ in range(3):  # before: a LedgerCheckError at the first step that drew a drop
            tracker.step(inputs, targets, torch.arange(8))


@pytest.mark.parametrize("name", ["stochastic_depth", "label_dropout"])
def test_auto_route_takes_the_graph_for_stochastic_depth_and_label_dropout(name):
    model, inputs, targets, loss_fn, _ = _random_in_training_case(name)
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.01), loss_fn,
                                tuple(t[:2] for t in inputs), num_groups=8)
    for _ in range(3):  # before: "the group gradients ... do not add up to the real gradient" (example route)
        result = tracker.step(inputs, targets, torch.arange(8))
    assert tracker.route.uses_graph()
    assert float(result.residual.norm()) < 1e-2 * float(tracker.ledger.contributions.sum(1).norm())
