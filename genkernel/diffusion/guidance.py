"""Classifier-free guidance for conditional denoisers: the conditioning dropout a trainer draws, and
the guided output a sampler steps with.

Training (Ho & Salimans, 2022): each example's class label y_n is replaced by a null class ∅ with
probability p, drawn per example, so one network learns both the conditional output
F(z, t, y) and the unconditional one F(z, t, ∅). The null class is an index of the model's class
embedding: diffusers' ``UNet2DModel(num_class_embeds=K + 1)`` with ∅ = K, as DiT's
``LabelEmbedding`` keeps its extra row at index ``num_classes``. The step's inputs hold the labels
the model was given, so every ledger books the step that was taken.

A model conditioned on embeddings (a text encoder's hidden states, ``UNet2DConditionModel``'s
``encoder_hidden_states``) drops them so (:class:`EmbeddingDropout`): each example's embedding is
replaced by a null embedding, the encoding of the empty prompt, as diffusers' text-to-image scripts
replace a caption by "" with probability ``proportion_empty_prompts`` before encoding it.

Sampling steps with the guided output (:func:`guided_output`)

    F̃ = F(z, t, ∅) + w (F(z, t, y) − F(z, t, ∅)),

w the guidance scale (w = 1: the conditional model itself, one pass; w = 0: the unconditional one),
applied to the model's raw output whatever it predicts (ε, v, x₀, a flow's velocity), as diffusers'
pipelines apply it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapter import as_tuple, output_tensor, unwrap
from ..core.tracking.batches import embedding_form, embedding_parts, embedding_shapes, map_embeddings
from ..core.tracking.io import data_fingerprint


def _check_probability(probability: Any) -> None:
    if isinstance(probability, bool) or not isinstance(probability, numbers.Real) or not 0 <= probability < 1:
        raise ValueError(f"class_dropout must be a probability in [0, 1), got {probability!r}")


def _dropped(conditioning: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """BoolTensor[B] on ``conditioning``'s device: which of its B rows are dropped, one uniform draw per row from
    ``generator`` (CPU, float64) below ``probability``."""
    draws = torch.rand(conditioning.shape[0], generator=generator, dtype=torch.float64)
    return (draws < probability).to(conditioning.device)


@dataclass(frozen=True)
class ClassDropout:
    """Per-example label dropout towards ``null_class`` with ``probability`` (0: none, nothing drawn)."""

    probability: float = 0.0
    null_class: int | None = None

    @classmethod
    def build(cls, probability: Any, null_class: Any, conditional: bool) -> "ClassDropout":
        """The checked setting of a trainer's ``class_dropout=`` and ``null_class=``."""
        _check_probability(probability)
        if null_class is not None and (isinstance(null_class, bool) or not isinstance(null_class, numbers.Integral)
                                       or null_class < 0):
            raise ValueError(f"null_class must be a class index >= 0, got {null_class!r}")
        if probability > 0 and not conditional:
            raise ValueError("class_dropout drops the class labels a conditional model is given: build the trainer "
                             "with conditional=True (and labels)")
        if probability > 0 and null_class is None:
            raise ValueError(
                "class_dropout needs null_class=, the class index the dropped labels take: an extra row of the "
                "model's class embedding (UNet2DModel(num_class_embeds=K + 1) for K classes, null_class=K)"
            )
        if null_class is not None and probability == 0:
            raise ValueError("null_class is the label class_dropout gives dropped examples: pass class_dropout > 0 "
                             "(0.1 is common), or leave null_class out")
        return cls(float(probability), None if null_class is None else int(null_class))

    @property
    def active(self) -> bool:
        return self.probability > 0

    def check_model(self, model: nn.Module) -> None:
        """Refuse a null class outside the model's table of class rows (diffusers' ``UNet2DModel``:
        ``config.num_class_embeds`` when ``class_embed_type`` is None, the only case with a table; DiT's
        ``LabelEmbedding``: its ``embedding_table``), and a ``LabelEmbedding`` that drops labels itself. The model's
        submodules are read too: a UNet inside a wrapper (``PositionalInputs``, a module of the user's) has the
        table, not the wrapper, whose missing ``config`` let a null class outside it through, to fail at the first
        step that drew a dropped label (a random step: with class_dropout=0.1 and batch 4, the first in 34 % of runs)."""
        if not self.active:
            return
        for name, module in model.named_modules():
            config = getattr(module, "config", None)
            embeds = getattr(config, "num_class_embeds", None)
            if (isinstance(embeds, int) and getattr(config, "class_embed_type", None) is None
                    and self.null_class >= embeds):
                where = f"the model's class embedding ({name}, " if name else "the model's class embedding ("
                fix = f"model.{name}" if name else "it"
                raise ValueError(
                    f"null_class={self.null_class} is not a row of {where}num_class_embeds={embeds}): build {fix} with "
                    f"num_class_embeds={self.null_class + 1}, one row more than the data's classes"
                )
        for name, module in model.named_modules():
            table = getattr(module, "embedding_table", None)
            if not (callable(getattr(module, "token_drop", None)) and isinstance(table, nn.Embedding)):
                continue
            if getattr(module, "dropout_prob", 0) > 0:
                raise ValueError(
                    f"the model drops class labels itself ({name}: a LabelEmbedding with dropout_prob="
                    f"{module.dropout_prob:g}, drawn from the global RNG in train mode): beside class_dropout each label "
                    f"would be dropped twice and the analyzers would book labels the model did not see; set "
                    f"model.{name}.dropout_prob = 0 (its null row {getattr(module, 'num_classes', '')} stays) and keep "
                    "class_dropout"
                )
            if self.null_class >= table.num_embeddings:
                raise ValueError(
                    f"null_class={self.null_class} is not a row of the model's class embedding ({name}.embedding_table, "
                    f"{table.num_embeddings} rows): pass null_class={getattr(module, 'num_classes', table.num_embeddings - 1)}, "
                    "its null row"
                )

    def check_conditioning(self, labels: torch.Tensor, where: str) -> None:
        """Refuse data labels that are the null class: its examples would mean 'no class' and a class at once."""
        if self.active and bool((labels == self.null_class).any()):
            raise ValueError(
                f"{where} contain the null class {self.null_class}, which class_dropout gives the dropped examples: "
                "pass a null_class no example has (the number of classes K, with num_class_embeds=K + 1)"
            )

    def draw(self, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labels given to the model [B], dropped BoolTensor[B])``: each label replaced by the null class
        with the set probability, one uniform draw per example from ``generator`` (CPU, float64)."""
        dropped = _dropped(labels, self.probability, generator)
        return torch.where(dropped, self.null_rows(labels), labels), dropped

    def null_rows(self, labels: torch.Tensor) -> torch.Tensor:
        """The null class in every row of ``labels`` ``[S]`` (the unconditional half of guided sampling)."""
        return torch.full_like(labels, self.null_class)

    def config(self) -> dict[str, Any]:
        return {"probability": self.probability, "null_class": self.null_class}


@dataclass(frozen=True, eq=False)
class EmbeddingDropout:
    """Per-example dropout of conditioning embeddings ``[B, *E]`` (or a tuple of them: a sequence and a pooled
    embedding, dropped together) towards ``null_embedding`` ``[*E]`` (the empty prompt's encoding; a tuple for a
    tuple) with ``probability`` (0: none, nothing drawn). The same draws as :class:`ClassDropout`: one uniform per
    example from the trainer's generator. A part of the null tuple that is None is not dropped: a dropped example
    keeps its own (SDXL's size and crop conditioning ``time_ids`` beside the prompt's two embeddings, which its
    script empties while the image's sizes stay), and guidance's unconditional rows take the sample's own."""

    probability: float = 0.0
    null_embedding: torch.Tensor | tuple[torch.Tensor, ...] | None = None

    @classmethod
    def build(cls, probability: Any, null_embedding: Any) -> "EmbeddingDropout":
        """The checked setting of a trainer's ``class_dropout=`` and ``null_embedding=`` (conditional="embeddings")."""
        _check_probability(probability)
        null_embedding = embedding_form(null_embedding, "null_embedding")
        parts = () if null_embedding is None else embedding_parts(null_embedding)
        kept = isinstance(null_embedding, tuple) and any(part is None for part in parts)
        if kept and all(part is None for part in parts):
            raise ValueError("null_embedding=(None, ...) drops no part of the embeddings: give the empty prompt's "
                             "encoding for the parts dropped, None only for those each example keeps")
        for part in parts:
            if kept and part is None:
                continue
            if not (isinstance(part, torch.Tensor) and part.is_floating_point()):
                found = part.dtype if isinstance(part, torch.Tensor) else type(part).__name__
                raise TypeError(f"null_embedding must be a floating Tensor [*E], one example's embedding (a tuple of "
                                f"them for embeddings given as a tuple, None for a part each example keeps), got {found}")
        if probability > 0 and null_embedding is None:
            raise ValueError(
                "class_dropout needs null_embedding=, the embedding dropped examples take: the encoding of the empty "
                "prompt (text_encoder(tokenizer('')) as the text-to-image scripts' proportion_empty_prompts), shaped as "
                "one example's embedding [*E]"
            )
        if null_embedding is not None and probability == 0:
            raise ValueError("null_embedding is what class_dropout gives dropped examples: pass class_dropout > 0 "
                             "(0.1 is common), or leave null_embedding out")
        null = None if null_embedding is None else map_embeddings(
            null_embedding, lambda part: None if part is None else part.detach().clone())
        return cls(float(probability), null)

    @property
    def active(self) -> bool:
        return self.probability > 0

    def check_model(self, model: nn.Module) -> None:
        """Nothing to check of the model: the null embedding is an input, not a row of a table."""

    def check_conditioning(self, embeddings: torch.Tensor | tuple[torch.Tensor, ...], where: str) -> None:
        """Refuse embeddings ``[B, *E]`` (or a tuple) whose rows are not shaped as the null embedding."""
        if not self.active:
            return
        null_shapes = map_embeddings(self.null_embedding, lambda part: None if part is None else tuple(part.shape))
        shapes = embedding_shapes(embeddings)
        if isinstance(embeddings, tuple) and isinstance(self.null_embedding, tuple) and \
                len(embeddings) == len(self.null_embedding):
            # (a part each example keeps has no null to match: compared as None; parts counted otherwise than the
            # null's are refused below, not by zip's strict count, whose error named neither)
            shapes = tuple(None if null is None else shape for shape, null in zip(shapes, self.null_embedding))
        if shapes != null_shapes:
            raise ValueError(f"{where} are shaped {shapes} per example, null_embedding {null_shapes}: pass the empty "
                             "prompt's embedding encoded as the data's (a tuple of as many parts for embeddings given "
                             "as a tuple, None for a part each example keeps)")

    def draw(self, embeddings: torch.Tensor | tuple[torch.Tensor, ...],
             generator: torch.Generator) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]:
        """``(embeddings given to the model [B, *E] (or a tuple), dropped BoolTensor[B])``: each example's
        embedding (every part of it) replaced by the null embedding with the set probability, one uniform draw
        per example from ``generator`` (CPU, float64)."""
        dropped = _dropped(embedding_parts(embeddings)[0], self.probability, generator)

        def drop(part: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
            return torch.where(dropped.view(-1, *([1] * (part.dim() - 1))), null, part)  # (a kept part: null is part)

        return map_embeddings(embeddings, drop, self.null_rows(embeddings)), dropped

    def null_rows(self, embeddings: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The null embedding in every row of ``embeddings`` ``[S, *E]`` (or a tuple), in their dtype and device; a
        part the null tuple leaves None is the rows' own."""
        return map_embeddings(embeddings, lambda part, null: part if null is None else null.to(part).expand_as(part),
                              self.null_embedding)

    def config(self) -> dict[str, Any]:
        if self.null_embedding is None:
            return {"probability": self.probability, "null_embedding": None}
        parts = [part.unsqueeze(0) for part in embedding_parts(self.null_embedding) if part is not None]
        config = {"probability": self.probability, "null_embedding": data_fingerprint(*parts)}
        kept = [i for i, part in enumerate(embedding_parts(self.null_embedding)) if part is None]
        if kept:  # (recorded only then: a checkpoint of a null dropping every part reads as before)
            config["kept_parts"] = kept
        return config


def class_tables(model: nn.Module) -> list[tuple[str, int]]:
    """The class-label embedding tables inside ``model`` as ``(where, rows)`` pairs: diffusers' ``UNet2DModel`` /
    ``UNet2DConditionModel`` ``config.num_class_embeds`` when ``class_embed_type`` is None (the only case with a
    table; where "name.num_class_embeds"), DiT's ``LabelEmbedding`` ``embedding_table`` (where
    "name.embedding_table"), the model's submodules read too; empty for a model with none (an unconditional
    model, one conditioned on embeddings). Only where the labels reach the tables as given: a diffusers model,
    bare or inside DDP / ``torch.compile`` / :class:`~genkernel.diffusion.models.PositionalInputs` /
    :class:`~genkernel.diffusion.models.ControlNetDenoiser`. A module of the user's around a UNet gives none: its
    forward may map the labels before the lookup (-1 to the null row, a label offset), which a check of the labels
    as given refused although the model runs them (its first step reports a label it cannot look up)."""
    from .models import ControlNetDenoiser, PositionalInputs  # (models imports nothing of this module's; kept lazy)

    model = unwrap(model)
    while isinstance(model, PositionalInputs):
        model = unwrap(model.model)
    if not (isinstance(model, ControlNetDenoiser) or type(model).__module__.split(".")[0] == "diffusers"):
        return []
    tables = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        embeds = getattr(config, "num_class_embeds", None)
        if isinstance(embeds, int) and not isinstance(embeds, bool) and getattr(config, "class_embed_type", None) is None:
            tables.append((f"{name}.num_class_embeds" if name else "num_class_embeds", embeds))
        table = getattr(module, "embedding_table", None)
        if callable(getattr(module, "token_drop", None)) and isinstance(table, nn.Embedding):
            tables.append((f"{name}.embedding_table" if name else "embedding_table", table.num_embeddings))
    return tables


def check_class_labels(tables: list[tuple[str, int]], labels: torch.Tensor, what: str) -> None:
    """Refuse class ``labels`` (an integer Tensor, ``what`` names them) outside any of the model's class-label
    ``tables`` (:func:`class_tables`): the model's embedding lookup failed on them with torch's "index out of range
    in self", which named neither the labels nor the table. A ValueError saying what the table holds, what was
    given and the fix; returns None."""
    if not tables:
        return
    # (one check, against the smallest table, a label outside any is outside it: DiT holds a table per block, each
    # read once a batch, a device sync each for labels on the GPU)
    where, rows = min(tables, key=lambda table: table[1])
    outside = labels[(labels < 0) | (labels >= rows)]
    if outside.numel():
        bad = sorted({int(v) for v in outside.tolist()})
        shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
        wider = (f", or build the model with a class embedding of {bad[-1] + 1} rows or more (UNet2DModel("
                 f"num_class_embeds={bad[-1] + 1}))" if bad[-1] >= rows else "")
        raise ValueError(
            f"{what} hold {shown}, outside the model's class embedding ({where} = {rows} rows: labels 0 to {rows - 1}): "
            f"pass class indices in [0, {rows - 1}] (a classifier-free guidance null class is one of those rows, the "
            f"last){wider}"
        )


def null_conditioning_rows(null_conditioning: Any, conditioning: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``null_conditioning`` (guidance's unconditional rows) as a tuple of tensors, a part given as None taken from
    ``conditioning`` (the samples' own: SDXL's ``time_ids``, which the null prompt does not replace); a TypeError
    or ValueError naming it otherwise."""
    if isinstance(null_conditioning, (tuple, list)) and any(part is None for part in null_conditioning):
        if len(null_conditioning) != len(conditioning) or all(part is None for part in null_conditioning):
            raise ValueError(
                f"null_conditioning has {len(null_conditioning)} parts, None for those each sample keeps, and "
                f"conditioning {len(conditioning)}: give one part per conditioning part, at least one of them a tensor"
            )
        null_conditioning = tuple(own if part is None else part for part, own in zip(null_conditioning, conditioning))
    return as_tuple(null_conditioning, name="null_conditioning")


def check_guidance_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"guidance_scale must be a finite number (1: no guidance), got {scale!r}")
    return float(scale)


def guided_output(model: nn.Module, state: torch.Tensor, timestep: torch.Tensor, conditioning: tuple[torch.Tensor, ...],
                  null_conditioning: tuple[torch.Tensor, ...], scale: float, *, unguided_channels: int = 0) -> torch.Tensor:
    """The guided output F̃ = F(z, t, ∅) + w (F(z, t, y) − F(z, t, ∅)) ``[S, *shape]``: one batched pass over
    the conditional and the null rows (scale 1: the conditional pass alone). The last ``unguided_channels``
    channels (dimension 1: a learned variance, :mod:`~genkernel.diffusion.learned_variance`) are the
    conditional output's, unguided, as DiT's ``forward_with_cfg`` keeps them."""
    if scale == 1.0:
        return output_tensor(model(state, timestep, *conditioning))
    both = output_tensor(model(torch.cat([state, state]), torch.cat([timestep, timestep]),
                               *(torch.cat([c, u]) for c, u in zip(conditioning, null_conditioning))))
    conditional, unconditional = both.chunk(2)
    guided = unconditional + scale * (conditional - unconditional)
    if unguided_channels == 0:
        return guided
    split = conditional.shape[1] - unguided_channels
    return torch.cat([guided[:, :split], conditional[:, split:]], dim=1)
