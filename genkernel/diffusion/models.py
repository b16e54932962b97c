"""Denoisers for the DDPM trainer: a time-embedded MLP for 2-D points, a small diffusers
``UNet2DModel`` for images, and the sanity-check denoisers of docs/diffusion.md.

Every denoiser is called as ``model(x_t, t)`` with ``x_t: Tensor[B, *shape]`` and integer
timesteps ``t: LongTensor[B]`` (a 0-d or 1-element ``t`` is broadcast; ``MLPDenoiser(time_input=
"continuous")`` takes the real timesteps t = σ·T of flow matching), and returns a tensor
shaped like ``x_t`` (the UNet returns diffusers' output object with ``.sample``; the core's
adapter unwraps it).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ..core.adapter import first_tensor, positive_int, unwrap

__all__ = [
    "sinusoidal_embedding",
    "MLPDenoiser",
    "BinnedDenoiser",
    "TimeIgnoringDenoiser",
    "tiny_unet",
    "freeze_attention_key_biases",
    "PositionalInputs",
    "ControlNetDenoiser",
    "wrapper_settings",
]


def sinusoidal_embedding(t: torch.Tensor, dim: int, *, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style embedding of timesteps ``t [B]`` -> ``[B, dim]`` (cos | sin halves)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"the time-embedding dimension must be an even number >= 2, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


TIME_INPUTS = ("integer", "continuous")  # DDPM's integer timesteps; flow matching's real t = σ·T


def _timesteps(t: torch.Tensor | int, batch: int, device: torch.device, time_input: str = "integer") -> torch.Tensor:
    continuous = time_input == "continuous"
    number = numbers.Real if continuous else numbers.Integral
    if isinstance(t, bool) or not isinstance(t, (torch.Tensor, number)):
        kind = "real numbers (a float or a Tensor [B])" if continuous else "integers (an int or a LongTensor [B])"
        raise TypeError(f"timesteps must be {kind}, got {type(t).__name__} {t!r}")
    if not isinstance(t, torch.Tensor):
        t = torch.tensor([t], device=device)
    # a dtype check, not a value check: it holds under vmap/jvp. A float t would be embedded (and binned)
    # between the integer levels a DDPM scheduler trains.
    if t.is_complex() or t.dtype == torch.bool or (t.is_floating_point() and not continuous):
        raise TypeError(
            f"timesteps must be integer timesteps (a LongTensor), got dtype {t.dtype}"
            + ("; a flow-matching model takes real t = σ·T: MLPDenoiser(time_input='continuous')" if t.is_floating_point() else "")
        )
    t = t.reshape(-1).to(device)
    if t.numel() == 1 and batch != 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"need one timestep per example: x_t has batch {batch}, t has {t.numel()} values")
    return t


class MLPDenoiser(nn.Module):
    """ε-network for low-dimensional points: an MLP on [x_t, emb(t)] with SiLU activations.

    Smooth activations keep the ledger's quadrature accurate (ReLU kinks break the midpoint
    rule, docs/ledger.md, "Quadrature and the residual"). The time embedding is sinusoidal, then a learned linear layer;
    with ``film=True`` every hidden layer is additionally scaled and shifted by the embedding
    (the "blocks modulated by time" architecture, for comparison with the concatenated one).

    Args:
        data_dim: dimension of the points (2 for the toy sets).
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        time_dim: width of the time embedding.
        film: FiLM-modulate every hidden layer by the time embedding.
        time_input: "integer" (DDPM timesteps, a LongTensor; a float t is refused) or "continuous"
            (flow matching's real t = σ·T in [0, T], EDM's t = ¼ ln σ).

    Shapes: ``forward(x_t [B, data_dim], t [B]) -> [B, data_dim]``.
    """

    def __init__(self, data_dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32, *, film: bool = False,
                 time_input: str = "integer"):
        super().__init__()
        if time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {TIME_INPUTS}, got {time_input!r}")
        self.time_input = time_input
        if depth < 1 or hidden < 1 or data_dim < 1:
            raise ValueError(f"data_dim, hidden and depth must be positive, got {data_dim}, {hidden}, {depth}")
        if time_dim < 2 or time_dim % 2:
            raise ValueError(f"time_dim must be an even number >= 2 (cos | sin halves), got {time_dim}")
        self.data_dim, self.time_dim, self.film = data_dim, time_dim, film
        self.time_proj = nn.Linear(time_dim, time_dim)
        layers = []
        width = data_dim + time_dim
        for _ in range(depth):
            layers.append(nn.Linear(width, hidden))
            width = hidden
        self.layers = nn.ModuleList(layers)
        self.films = nn.ModuleList([nn.Linear(time_dim, 2 * hidden) for _ in range(depth)]) if film else None
        self.out = nn.Linear(hidden, data_dim)
        self.act = nn.SiLU()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _timesteps(t, x_t.shape[0], x_t.device, self.time_input)
        emb = self.act(self.time_proj(sinusoidal_embedding(t, self.time_dim).to(x_t.dtype)))
        h = torch.cat([x_t, emb], dim=1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if self.films is not None:
                scale, shift = self.films[i](emb).chunk(2, dim=1)
                h = h * (1 + scale) + shift
            h = self.act(h)
        return self.out(h)


class BinnedDenoiser(nn.Module):
    """One independent :class:`MLPDenoiser` per noise-level bin (docs/diffusion.md, "The built-in sanity case").

    Timestep t is served by expert ``bin(t)``: ``floor(t * num_bins / num_train_timesteps)``, or the
    bin of ``edges`` (the first timestep of every bin, then T: an analyzer's ``bins.edges``). No
    parameter is shared between bins, so training at level t cannot move the output at a level s
    in another bin: the ledger's off-diagonal contributions are exactly zero. All experts are
    evaluated and masked (no data-dependent indexing), so ``vmap`` and ``jvp`` pass through.
    """

    def __init__(self, num_bins: int, num_train_timesteps: int = 1000, *, edges: torch.Tensor | None = None,
                 **mlp_kwargs):
        super().__init__()
        # positive_int: num_bins=True (a bool) was one bin, a float 2.5 failed in range()
        num_bins = positive_int(num_bins, "num_bins")
        num_train_timesteps = positive_int(num_train_timesteps, "num_train_timesteps")
        self.num_bins, self.num_train_timesteps = num_bins, num_train_timesteps
        if edges is None:
            edges = torch.tensor([-(-g * num_train_timesteps // num_bins) for g in range(num_bins + 1)])
        given = torch.as_tensor(edges)
        # a float tensor of real edges (flow matching's NoiseBins.edges) would be truncated to other bins:
        # [0., 2.5, 5.] routed t = 2 to the second expert, the first by the edges given
        if given.is_complex() or given.dtype == torch.bool or (
                given.is_floating_point() and not bool((given == given.round()).all())):
            raise TypeError(
                f"edges must be integer timesteps (a DDPM NoiseBins.edges), got {given.tolist()} ({given.dtype}): "
                "BinnedDenoiser serves integer timesteps; flow matching and EDM levels are real"
            )
        edges = given.to(torch.long)
        if edges.shape != (num_bins + 1,):
            raise ValueError(f"edges must hold num_bins + 1 = {num_bins + 1} timesteps, got {tuple(edges.shape)}")
        # searchsorted needs sorted edges (unsorted ones route timesteps to arbitrary experts), and the
        # first and last must be 0 and T so that every timestep in [0, T) has exactly one expert
        if int(edges[0]) != 0 or int(edges[-1]) != num_train_timesteps or not bool((edges[1:] > edges[:-1]).all()):
            raise ValueError(
                f"edges must increase strictly from 0 to num_train_timesteps={num_train_timesteps} (the first timestep "
                f"of every bin, then T, as NoiseBins.edges), got {edges.tolist()}"
            )
        self.register_buffer("edges", edges, persistent=False)
        self.experts = nn.ModuleList([MLPDenoiser(**mlp_kwargs) for _ in range(num_bins)])

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _timesteps(t, x_t.shape[0], x_t.device)
        bins = (torch.searchsorted(self.edges, t, right=True) - 1).clamp(0, self.num_bins - 1)
        outs = torch.stack([expert(x_t, t) for expert in self.experts], dim=1)  # [B, G, D]
        mask = (bins[:, None] == torch.arange(self.num_bins, device=bins.device)).to(outs.dtype)  # [B, G]
        return (outs * mask[:, :, None]).sum(dim=1)


class TimeIgnoringDenoiser(nn.Module):
    """A denoiser that ignores t (an SiLU MLP on x_t only): k̂((z, s), (z, t)) = 1 for every s, t."""

    def __init__(self, data_dim: int = 2, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(data_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, data_dim))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x_t)


def tiny_unet(
    sample_size: int = 16,
    in_channels: int = 1,
    *,
    channels: tuple[int, ...] = (16, 32),
    attention: bool = True,
    layers_per_block: int = 1,
    norm_num_groups: int = 4,
    attention_head_dim: int = 8,
):
    """A small ``diffusers.UNet2DModel`` whose blocks are modulated by the time embedding.

    Args:
        sample_size: image side (16 for the upsampled digits, 28/32 for MNIST/CIFAR-10), a multiple of
            ``2 ** (len(channels) - 1)`` (each width after the first halves the side).
        in_channels: 1 (grey) or 3 (RGB); the output has the same channels.
        channels: block widths, one per resolution.
        attention: put self-attention in the lowest-resolution down and up blocks
            (``AttnDownBlock2D`` / ``AttnUpBlock2D``, plus the mid-block's attention).
        layers_per_block, norm_num_groups, attention_head_dim: as in diffusers.

    GroupNorm only (no BatchNorm, no dropout): per-example gradients are well defined. The
    attention key biases are frozen (:func:`freeze_attention_key_biases`: their gradient is
    exactly zero in exact arithmetic).
    """
    # sizes are checked here: in_channels=0 built a UNet with no input or output channels,
    # norm_num_groups=0 raised ZeroDivisionError, channels=() an IndexError
    positive_int(in_channels, "in_channels")
    positive_int(layers_per_block, "layers_per_block")
    positive_int(norm_num_groups, "norm_num_groups")
    if isinstance(channels, (str, bytes)) or not hasattr(channels, "__iter__") or not len(channels := tuple(channels)):
        raise TypeError(f"channels must be a non-empty tuple of block widths, one per resolution, e.g. (16, 32); "
                        f"got {channels!r}")
    channels = tuple(positive_int(c, "every entry of channels") for c in channels)
    # n resolutions halve the side n - 1 times; a side they do not divide fails in the forward with a
    # tensor-size mismatch in the skip connections (28 with four widths: 28 -> 14 -> 7 -> 4 -> 8 != 7)
    step = 2 ** (len(channels) - 1)
    if positive_int(sample_size, "sample_size") % step:
        raise ValueError(
            f"sample_size={sample_size} must be a multiple of {step}: {len(channels)} block widths halve the image "
            f"side {len(channels) - 1} times; pad or resize the images, or pass fewer widths"
        )
    if any(c % norm_num_groups or c // norm_num_groups < 2 for c in channels):
        raise ValueError(
            f"every channel count {channels} must be a multiple of norm_num_groups={norm_num_groups} with at least 2 "
            "channels per group: with one channel per group, GroupNorm removes every per-channel bias and the time "
            "embedding added before it (their gradients are exactly zero and the block loses its time modulation)"
        )
    if attention and (isinstance(attention_head_dim, bool) or not isinstance(attention_head_dim, int)
                      or attention_head_dim < 1 or channels[-1] % attention_head_dim):
        raise ValueError(
            f"attention_head_dim={attention_head_dim!r} must be a positive int dividing the attention blocks' width "
            f"{channels[-1]}: diffusers builds {channels[-1]} // attention_head_dim heads of that size, so a remainder "
            "projects the queries, keys and values to fewer channels than the block has"
        )
    from diffusers import UNet2DModel

    n = len(channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    model = UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
        add_attention=attention,
        dropout=0.0,
    )
    freeze_attention_key_biases(model)
    return model


KEY_BIAS_SUFFIXES = ("to_k.bias", "k_proj.bias")  # diffusers' Attention, transformers' (CLIP's text encoder)


def freeze_attention_key_biases(model: nn.Module) -> list[str]:
    """Freeze the key-projection biases of attention layers (diffusers' ``*.to_k.bias``, transformers'
    ``*.k_proj.bias``: a CLIP text encoder trained beside the UNet); return their names.

    Softmax attention is invariant to a bias added to every key (it shifts all logits of a query
    by the same amount), so these biases have gradient exactly zero in exact arithmetic. In
    floating point the batched backward leaves rounding noise (~1e-10) that differs from the sum
    of per-example gradients, and Adam normalizes that noise into steps of size ~lr: the ledger's
    check then (correctly) refuses the step. Freezing them changes no function the model can
    represent and makes training reproducible to the ledger.
    """
    frozen = []
    for name, p in model.named_parameters():
        if name.endswith(KEY_BIAS_SUFFIXES) and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def wrapper_settings(model: nn.Module) -> dict | None:
    """``{class name: settings}`` of a denoiser wrapper of this module (:class:`PositionalInputs`,
    :class:`ControlNetDenoiser`), found through DDP / ``torch.compile`` wrappers; None for any other model."""
    module = unwrap(model)
    settings = getattr(module, "settings", None)
    if isinstance(module, (PositionalInputs, ControlNetDenoiser)) and callable(settings):
        return {type(module).__name__: settings()}
    return None


class PositionalInputs(nn.Module):
    """A denoiser whose forward takes its inputs by name, called positionally as ``model(x_t, t[, c])``: the form
    the trainers, the analyzers and the engine call a model in.

    diffusers' text-conditioned transformers order their inputs otherwise than ``UNet2DConditionModel``'s
    ``(sample, timestep, encoder_hidden_states)``: ``PixArtTransformer2DModel(hidden_states,
    encoder_hidden_states, timestep, added_cond_kwargs)``, so ``model(z, t, e)`` would hand it the timesteps as
    the text. ``PositionalInputs(pixart, ("hidden_states", "timestep", "encoder_hidden_states"),
    added_cond_kwargs={"resolution": None, "aspect_ratio": None})`` is called as ``DDPMTrainer(...,
    conditional="embeddings")`` calls its model. A name ``"outer.inner"`` puts its input in the dict argument
    ``outer`` under ``inner``: SDXL's ``UNet2DConditionModel`` takes its pooled text embedding and its size
    and crop conditioning as ``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}``, so
    ``PositionalInputs(unet, ("sample", "timestep", "encoder_hidden_states", "added_cond_kwargs.text_embeds",
    "added_cond_kwargs.time_ids"))`` is ``model(z, t, e, pooled, time_ids)``. The wrapped model's parameters
    are this module's (under ``model.``); its output is the model's own (``.sample`` is read by the adapter).

    Args:
        model: the denoiser.
        names: the keyword of each positional input, in order (the first two: the noisy input and the timesteps);
            ``"outer.inner"`` for an entry of a dict argument.
        **fixed: keyword arguments passed unchanged at every call (inputs that do not vary per example); a dict
            given for an argument that dotted names fill is merged with their entries.
    """

    def __init__(self, model: nn.Module, names: tuple[str, ...], **fixed) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        names = tuple(names) if isinstance(names, (tuple, list)) else names
        if not (isinstance(names, tuple) and names and all(isinstance(n, str) for n in names)):
            raise TypeError(f"names must be a tuple of the model's input keywords, e.g. ('hidden_states', 'timestep', "
                            f"'encoder_hidden_states'), got {names!r}")
        repeated = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(fixed)))
        if repeated:
            raise ValueError(f"each input is named once: {repeated} given twice (in names or also in the fixed keywords)")
        nested = {n.split(".")[0] for n in names if "." in n}
        deep = [n for n in names if n.count(".") > 1 or "" in n.split(".")]
        if deep:
            raise ValueError(f"a dotted name is 'argument.key' (one dict level), got {deep}")
        clashes = sorted((nested & set(names)) | {n for n in nested if n in fixed and not isinstance(fixed[n], dict)})
        if clashes:
            raise ValueError(f"{clashes} are filled entry by entry by dotted names, so they cannot also be given whole "
                             "(in names, or fixed as something other than a dict of the other entries)")
        overlap = sorted(n for n in names if "." in n and n.split(".")[1] in fixed.get(n.split(".")[0], {}))
        if overlap:
            raise ValueError(f"each input is named once: {overlap} given twice (by name and in the fixed dict)")
        self.model = model
        self.names = names
        self.fixed = fixed

    def settings(self) -> dict:
        """What a checkpoint must share with the run that resumes it: the names, in order, and the fixed keywords'
        names (their values are passed as they are: tensors are not compared)."""
        return {"names": list(self.names), "fixed": sorted(self.fixed)}

    def forward(self, *inputs):
        if len(inputs) != len(self.names):
            raise TypeError(f"called with {len(inputs)} inputs, but names has {len(self.names)} ({self.names}): name "
                            "every input the model is given, in order (a trainer on embeddings given as a tuple, or "
                            "batches with a pooled embedding, gives the model x_t, t, then each part)")
        arguments = {name: dict(value) if isinstance(value, dict) else value for name, value in self.fixed.items()}
        for name, value in zip(self.names, inputs):
            outer, _, inner = name.partition(".")
            if inner:  # an entry of a dict argument (SDXL's added_cond_kwargs)
                arguments.setdefault(outer, {})[inner] = value
            else:
                arguments[name] = value
        return self.model(**arguments)


class ControlNetDenoiser(nn.Module):
    """A frozen ``UNet2DConditionModel`` steered by a trainable ``ControlNetModel``, called as
    ``model(z, t, e, control_image[, *added])``: diffusers' ``train_controlnet.py`` (and, with ``added_cond_keys``,
    ``train_controlnet_sdxl.py``) training forward as one module, so that
    :class:`~genkernel.diffusion.trainer.DDPMTrainer` (``conditional="embeddings"``, embeddings
    ``(prompt_embeds, control_images[, pooled, time_ids])``), the analyzers and the engine call it as any denoiser.

    The forward is the scripts' two calls: the ControlNet's residuals
    ``controlnet(z, t, encoder_hidden_states=e, controlnet_cond=c, conditioning_scale=s, added_cond_kwargs=a,
    return_dict=False)``, then ``unet(z, t, encoder_hidden_states=e, added_cond_kwargs=a,
    down_block_additional_residuals=[r.to(unet dtype) ...], mid_block_additional_residual=m.to(unet dtype))``'s
    sample, with ``a`` the inputs after the control image under ``added_cond_keys`` (SDXL: ``("text_embeds",
    "time_ids")``, the pooled prompt embedding and the size-and-crop conditioning; none: no ``added_cond_kwargs``).
    The control image is given as the scripts give it (pixels in [0, 1], at the images' resolution: the
    ControlNet's conditioning embedding brings it to the latents'). Freeze the UNet (``unet.requires_grad_(False)``,
    as the scripts do) and give the optimizer the ControlNet's parameters (``ControlNetModel.from_unet(unet)``:
    its zero convolutions make the first output the UNet's own); keep the frozen UNet in float32 beside autocast
    (an analyzer refuses a half-precision frozen base: its own passes would run in it). The frozen UNet stays in
    eval mode when the module is put in train mode (:meth:`train`), as the scripts keep it.

    Args:
        unet: the denoiser (``UNet2DConditionModel``).
        controlnet: the ``ControlNetModel`` (or a module with its call: ``return_dict=False`` gives
            ``(down_block_residuals, mid_block_residual)``).
        conditioning_scale: the residuals' scale (the pipelines' ``controlnet_conditioning_scale``; training: 1).
        added_cond_keys: the ``added_cond_kwargs`` entries the inputs after the control image fill, in order.
    """

    def __init__(self, unet: nn.Module, controlnet: nn.Module, conditioning_scale: float = 1.0,
                 added_cond_keys: tuple[str, ...] = ()) -> None:
        super().__init__()
        for name, module in (("unet", unet), ("controlnet", controlnet)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(module).__name__}")
        if isinstance(conditioning_scale, bool) or not isinstance(conditioning_scale, numbers.Real) or not math.isfinite(
                conditioning_scale):
            raise ValueError(f"conditioning_scale must be a finite number, got {conditioning_scale!r}")
        keys = tuple(added_cond_keys) if isinstance(added_cond_keys, (tuple, list)) else added_cond_keys
        if not (isinstance(keys, tuple) and all(isinstance(k, str) for k in keys)) or len(set(keys)) != len(keys):
            raise TypeError(f"added_cond_keys must be a tuple of distinct names (SDXL: ('text_embeds', 'time_ids')), "
                            f"got {added_cond_keys!r}")
        self.unet, self.controlnet = unet, controlnet
        self.conditioning_scale, self.added_cond_keys = float(conditioning_scale), keys

    def settings(self) -> dict:
        """What a checkpoint must share with the run that resumes it."""
        return {"conditioning_scale": self.conditioning_scale, "added_cond_keys": list(self.added_cond_keys)}

    def train(self, mode: bool = True) -> "ControlNetDenoiser":
        """This module, the ControlNet in ``mode``; a frozen UNet (no trainable parameter) stays in eval mode, as the
        scripts leave it (``from_pretrained`` returns it in eval mode and they call ``controlnet.train()`` alone): its
        dropout off, its normalization on its statistics, whatever the trainer's ``model.train()``. A UNet with
        trainable parameters follows ``mode``."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.unet.parameters()):
            self.unet.train(False)
        return self

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, *added: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction ``[B, C, H, W]`` under the ControlNet's residuals for ``controlnet_cond``
        ``[B, 3, h, w]``; ``added``: the values of ``added_cond_keys``, in order."""
        if len(added) != len(self.added_cond_keys):
            raise TypeError(f"called with {len(added)} inputs after the control image, but added_cond_keys names "
                            f"{len(self.added_cond_keys)} {self.added_cond_keys}: give the embeddings' parts as "
                            "(prompt_embeds, control_images, *added_cond_kwargs values)")
        extra = {"added_cond_kwargs": dict(zip(self.added_cond_keys, added))} if added else {}
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=controlnet_cond, conditioning_scale=self.conditioning_scale,
                                    return_dict=False, **extra)
        dtype = first_tensor(self.unet, "the UNet").dtype
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         down_block_additional_residuals=[r.to(dtype) for r in down],
                         mid_block_additional_residual=mid.to(dtype), return_dict=False, **extra)[0]
