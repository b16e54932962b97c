"""Batches of a DataLoader (or any re-iterable) read by a built-in trainer epoch after epoch, with a
position a checkpoint records and a resume restores exactly (``DDPMTrainer``, ``GANTrainer``).

Lifecycle: :class:`IterableBatches` ``(data, check)``; :meth:`~IterableBatches.next` gives the next
batch (its raw form passed through ``check``), restarting the iterable when an epoch ends;
:meth:`~IterableBatches.hand_back` keeps the batch of a step that failed before its update, to be
given again; :meth:`~IterableBatches.state_dict` / :meth:`~IterableBatches.load_state_dict` save and
restore the position.

What a checkpoint reproduces. It records how many batches of the current epoch were trained on
and, when the loader draws its order from a ``torch.Generator`` (``DataLoader(..., shuffle=True,
generator=g)``, or a sampler's or batch sampler's ``generator``), that generator's state at the start
of the epoch: resuming restores the state, restarts the epoch and skips (loads and discards) the
batches already trained on, so the batches continue in the order an uninterrupted run sees, and so
do random augmentations drawn in worker processes (they are seeded from the loader's generator). A
sampler with ``set_epoch`` (``DistributedSampler``, whose order is drawn from seed + epoch) is told
each epoch's number before the epoch starts, as Lightning and accelerate tell it. The global RNG's
state at the start of the epoch is recorded as well and the skipped batches are replayed from it, so
an order drawn from the global RNG (``shuffle=True`` without ``generator=``) and the workers' seeds
continue too; the trainer restores the global RNG's state at the checkpoint (dropout, random
augmentations in the main process) after the skip. A batch handed back is drawn again on resume from
the global RNG's state it was first drawn at. Not reproduced: any iterable whose batches differ from
epoch to epoch for other reasons.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch

IMAGE_KEYS = ("images", "pixel_values", "input")  # where a dict batch holds its inputs ("input": diffusers' example)
LABEL_KEYS = ("class_labels", "labels", "label")  # ... and its class labels
EMBEDDING_KEYS = ("encoder_hidden_states", "prompt_embeds", "embeddings")  # ... and conditioning embeddings
POOLED_KEYS = ("pooled_projections", "pooled_prompt_embeds")  # ... and a pooled text embedding beside them (SD3, FLUX)
# SDXL's size-and-crop conditioning in its script's batches (its time_ids, or the sizes and crops they are built
# from): no dict key gives it to the model, so a dict batch holding it is refused rather than trained without it
SIZE_CONDITIONING_KEYS = ("add_time_ids", "time_ids", "original_sizes", "crop_top_lefts", "target_sizes")
_END = object()


def split_batch(batch: Any) -> tuple[Any, Any]:
    """The inputs and the class labels of one batch of iterable data.

    A batch is a Tensor of inputs; a tuple or list whose first element is (its second, if any, is
    the candidate class labels: an ``ImageFolder`` batch is ``(images, classes)``); or a dict with
    the inputs under "images", "pixel_values" or "input" and labels, if any, under "class_labels",
    "labels" or "label".

    Returns:
        ``(inputs, labels or None)`` as found in the batch (not yet checked).
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        image_key = next((key for key in IMAGE_KEYS if key in batch), None)
        if image_key is None:
            raise TypeError(f"a dict batch needs its inputs under one of {IMAGE_KEYS}; its keys are {list(batch)}")
        label_key = next((key for key in LABEL_KEYS if key in batch), None)
        return batch[image_key], None if label_key is None else batch[label_key]
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], batch[1] if len(batch) > 1 else None
    raise TypeError(
        "a batch must be a Tensor of inputs, a tuple/list whose first element is, or a dict with the inputs "
        f"under one of {IMAGE_KEYS}; got {type(batch).__name__}"
    )


def floating_inputs(inputs: Any, what: str) -> torch.Tensor:
    """``inputs`` checked to be a floating Tensor ``[B, ...]``; a TypeError naming ``what`` otherwise."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or not inputs.is_floating_point():
        found = f"{inputs.dtype} {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise TypeError(f"a batch's {what} must be a floating Tensor [B, ...], got {found}")
    return inputs


def split_floating_batch(batch: Any, what: str, conditioning_fix: str) -> tuple[torch.Tensor, Any]:
    """:func:`split_batch` for a trainer that gives its model the inputs (and class labels, if any) alone, its
    inputs checked.

    Returns:
        ``(inputs [B, ...] floating, labels or None)``; a TypeError naming ``what`` (the inputs, e.g. "clean
        inputs") when the inputs are not floating ``[B, ...]``, and a ValueError ending in ``conditioning_fix``
        (how this trainer takes conditioning) when the batch holds conditioning it would leave out: a dict's
        entry under one of :data:`EMBEDDING_KEYS` / :data:`POOLED_KEYS`, or a tuple's floating Tensor ``[B, ...]``
        past its inputs (a ``TensorDataset(latents, prompt_embeds)``'s batch; class labels are integers).
    """
    inputs, labels = split_batch(batch)
    inputs = floating_inputs(inputs, what)
    if isinstance(batch, Mapping):
        left_out = [f"under {key!r}" for key in EMBEDDING_KEYS + POOLED_KEYS if key in batch]
    else:
        left_out = [f"at position {position} (a floating Tensor {tuple(part.shape)})"
                    for position, part in enumerate(batch[1:] if isinstance(batch, (tuple, list)) else (), start=1)
                    if isinstance(part, torch.Tensor) and part.is_floating_point() and part.dim() >= 1
                    and part.shape[0] == inputs.shape[0]]
    if left_out:
        # (trained without it, the model learns the unconditional distribution of data meant to condition it:
        # every caption's encoding ignored, no error anywhere)
        raise ValueError(
            f"a {type(batch).__name__} batch holds conditioning {left_out[0]} beside its {what}, which this trainer "
            f"does not give the model (it would train without it): {conditioning_fix}, or leave it out of the batches "
            "(class labels, which it reads, are integers [B]: one-hot rows as labels.argmax(1))"
        )
    return inputs, labels


def embedding_parts(embeddings: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Conditioning embeddings as a tuple of tensors: one ``[B, *E]``, or several (a sequence and a pooled one)."""
    return embeddings if isinstance(embeddings, tuple) else (embeddings,)


def embedding_form(embeddings: Any, what: str) -> Any:
    """``embeddings`` in the one form the trainer keeps: a list as a tuple, a tuple of one part as that part
    (``model(x_t, t, e)`` either way: one form, so that a one-part tuple and a plain Tensor check, drop and
    resume alike); anything else as given (the caller checks its parts). An empty tuple is a TypeError naming
    ``what``: it would call ``model(x_t, t)``, a conditional model trained without its conditioning."""
    embeddings = tuple(embeddings) if isinstance(embeddings, list) else embeddings
    if isinstance(embeddings, tuple) and not embeddings:
        raise TypeError(f"{what} is an empty tuple: pass a floating Tensor, or a tuple of them (a sequence embedding "
                        "and a pooled one)")
    return embeddings[0] if isinstance(embeddings, tuple) and len(embeddings) == 1 else embeddings


def embedding_shapes(embeddings: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple:
    """The per-example shapes of ``embeddings`` ``[B, *E]``: ``E``, or a tuple of them for a tuple."""
    return map_embeddings(embeddings, lambda part: tuple(part.shape[1:]))


def map_embeddings(embeddings: torch.Tensor | tuple[torch.Tensor, ...],
                   function: Callable[..., torch.Tensor], *others: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``function`` applied to each part of ``embeddings`` (with the same part of each of ``others``), in the
    form given: a tensor for a tensor, a tuple for a tuple."""
    # (strict: a null of fewer parts than the data's would drop the pooled embedding without a word)
    parts = [function(*args) for args in zip(embedding_parts(embeddings), *map(embedding_parts, others), strict=True)]
    return tuple(parts) if isinstance(embeddings, tuple) else parts[0]


def split_embedding_batch(batch: Any, what: str) -> tuple[torch.Tensor, Any, Any]:
    """The inputs, conditioning embeddings and class labels of one batch of a model conditioned on embeddings.

    A batch is a tuple or list ``(inputs, embeddings[, labels])`` (embeddings a Tensor, or a tuple of them:
    a sequence and a pooled embedding), or a dict with the inputs under one of :data:`IMAGE_KEYS`, the
    embeddings under "encoder_hidden_states", "prompt_embeds" or "embeddings" (and a pooled one, if any,
    under "pooled_projections" or "pooled_prompt_embeds": then the two as a tuple) and labels, if any,
    under one of :data:`LABEL_KEYS` (a text-to-image script's batch with its captions encoded beforehand).

    Returns:
        ``(inputs [B, ...] floating, embeddings (floating [B, ...], or a tuple of them), labels or None)``;
        a TypeError naming what is missing or mistyped otherwise (the embeddings' shapes are checked by
        the trainer).
    """
    if isinstance(batch, Mapping):
        inputs, labels = split_batch(batch)
        key = next((key for key in EMBEDDING_KEYS if key in batch), None)
        if key is None:
            raise TypeError(f"a dict batch of a model conditioned on embeddings needs them under one of {EMBEDDING_KEYS}; "
                            f"its keys are {list(batch)}")
        pooled = [key for key in POOLED_KEYS if key in batch]
        if len(pooled) > 1:  # (one of them taken without a word would train on the other's absence)
            raise TypeError(f"a dict batch holds pooled embeddings under both {pooled}: keep the one the model takes")
        sizes = [key for key in SIZE_CONDITIONING_KEYS if key in batch]
        if sizes:  # (trained without it, or on a fixed added_cond_kwargs' time_ids: every image's own sizes ignored)
            raise TypeError(
                f"a dict batch holds size-and-crop conditioning under {sizes[0]!r} (SDXL's time_ids), which a dict "
                "batch does not give the model: give batches as tuples (images, (prompt_embeds, pooled_prompt_embeds, "
                "time_ids [B, 6])) to a PositionalInputs(unet, (..., 'added_cond_kwargs.text_embeds', "
                "'added_cond_kwargs.time_ids')), or leave it out of the batches"
            )
        embeddings = batch[key] if not pooled else (batch[key], batch[pooled[0]])
    elif isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        inputs, embeddings = batch[0], batch[1]
        labels = batch[2] if len(batch) == 3 else None
        if isinstance(labels, torch.Tensor) and labels.is_floating_point():
            # (a TensorDataset(latents, prompt_embeds, pooled_prompt_embeds)'s batch: its pooled embedding, taken
            # for labels that are not class labels, was passed over and the model trained without it)
            raise TypeError(
                f"a {type(batch).__name__} batch (inputs, embeddings, labels) holds a floating Tensor "
                f"{tuple(labels.shape)} where its class labels go: a pooled embedding goes beside the sequence as "
                "(inputs, (embeddings, pooled)) (or a dict's 'pooled_prompt_embeds'); class labels are integers"
            )
    else:
        raise TypeError(
            "a batch of a model conditioned on embeddings is a tuple (inputs, embeddings[, labels]) or a dict with the "
            f"embeddings under one of {EMBEDDING_KEYS}; got "
            + (f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__)
        )
    return floating_inputs(inputs, what), embedding_form(embeddings, "a batch's conditioning embeddings"), labels


def is_class_labels(labels: Any, n: int) -> bool:
    """Whether ``labels`` are integer class labels of ``n`` examples (a non-bool integer Tensor ``[n]``)."""
    integer = isinstance(labels, torch.Tensor) and not (labels.is_floating_point() or labels.is_complex())
    return integer and labels.dtype != torch.bool and labels.shape == (n,)


def class_labels(labels: Any, n: int, what: str) -> torch.Tensor:
    """``labels`` as a LongTensor[n] of class labels; a TypeError naming ``what`` otherwise."""
    if not is_class_labels(labels, n):
        found = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"{what} must be integer class labels, a LongTensor[{n}], got {found}")
    return labels.long()


def loader_batch_size(loader: Any, batches: int = 1) -> int | None:
    """The examples ``batches`` full batches of a loader hold (a step accumulating them): ``batches`` × its
    ``batch_size``, capped by the examples its sampler gives an epoch when it keeps a partial batch
    (``drop_last=False``: a loader of batch 16 over 10 examples, or 10 on this rank of a ``DistributedSampler``,
    trains 10 a step); None where the loader does not say (a ``batch_sampler``, an iterable without
    ``batch_size``)."""
    per_batch = getattr(loader, "batch_size", None)
    if isinstance(per_batch, bool) or not isinstance(per_batch, int):
        return None
    step = per_batch * batches
    sampler = getattr(loader, "sampler", None)
    if not getattr(loader, "drop_last", True) and hasattr(sampler, "__len__"):
        try:
            examples = len(sampler)
        except TypeError:  # (a sampler whose length is undefined)
            return step
        if examples:
            return min(step, examples)
    return step


def check_reiterable(data: Any, tensor_form: str) -> None:
    """Raise a TypeError unless ``data`` can be iterated epoch after epoch (a DataLoader, a list of
    batches); ``tensor_form`` names the Tensor the trainer takes instead."""
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, Mapping)):
        raise TypeError(
            f"data must be a Tensor {tensor_form} or a re-iterable of batches (a DataLoader, a list), "
            f"got {type(data).__name__}"
        )
    if isinstance(data, Iterator):
        raise TypeError(
            f"data is an iterator ({type(data).__name__}), which cannot restart for the next epoch: pass the "
            "DataLoader (or a list of batches) itself"
        )


def _samplers(data: Any) -> list[Any]:
    """A DataLoader's sampler, its batch sampler and the batch sampler's own sampler (where given: a
    ``DataLoader(batch_sampler=BatchSampler(RandomSampler(..., generator=g), ...))`` keeps a default
    ``SequentialSampler`` as its ``sampler``)."""
    batch_sampler = getattr(data, "batch_sampler", None)
    owners = [getattr(data, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)]
    found: list[Any] = []
    for owner in owners:
        if owner is not None and all(owner is not o for o in found):
            found.append(owner)
    return found


def order_generators(data: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a DataLoader draws its order (and workers' seeds) from: the
    loader's ``generator`` and its samplers' (often the same object)."""
    found: list[torch.Generator] = []
    for owner in (data, *_samplers(data)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def set_sampler_epoch(data: Any, epoch: int) -> None:
    """Tell the samplers that order an epoch by its number (``DistributedSampler``'s ``set_epoch``: its
    order is drawn from seed + epoch) which epoch starts, as Lightning and accelerate do; without it
    every epoch repeats the first one's order."""
    for owner in _samplers(data):
        if callable(getattr(owner, "set_epoch", None)):
            owner.set_epoch(epoch)


def _label_source(dataset: Any) -> tuple[Any, str | None]:
    """``(labels, None)``: the labels ``dataset``'s ``__getitem__`` gives, read without loading a sample, or
    ``(None, why not)``. Trusted only where that ``__getitem__`` is known to return them: torchvision's
    ``MNIST`` / ``CIFAR10`` (and subclasses keeping their ``__getitem__``: FashionMNIST, CIFAR100, ...) return
    ``targets[i]``, a ``DatasetFolder`` (``ImageFolder``) its ``samples[i][1]`` (read from ``samples``: a
    ``samples`` list edited without its ``targets`` gives the edited labels), a ``TensorDataset`` its tensors'
    rows. Any other ``__getitem__`` (a Dataset subclass's own) may give other labels than its ``targets``."""
    from torch.utils.data import TensorDataset

    name = type(dataset).__name__
    getitem = getattr(type(dataset), "__getitem__", None)
    known = {TensorDataset.__getitem__: "TensorDataset"}
    try:
        from torchvision.datasets import CIFAR10, MNIST, DatasetFolder
    except ImportError:  # torchvision absent: only TensorDataset
        pass
    else:
        known.update({MNIST.__getitem__: "MNIST", CIFAR10.__getitem__: "CIFAR10", DatasetFolder.__getitem__: "DatasetFolder"})
    kind = known.get(getitem)
    if kind is None:
        own = hasattr(dataset, "targets") or isinstance(dataset, TensorDataset)
        has = "has its own __getitem__, which need not return its labels" if own else (
            "has no `targets` (a torchvision data set's)")
        return None, (f"its dataset ({name}) {has}; labels are read only from torchvision's MNIST, CIFAR10, "
                      "ImageFolder (DatasetFolder) or a TensorDataset of (samples, labels), whose __getitem__ returns them")
    if kind == "TensorDataset":
        if len(dataset.tensors) != 2:
            return None, f"its dataset is a TensorDataset of {len(dataset.tensors)} tensors, not (samples, labels)"
        return dataset.tensors[1], None
    if getattr(dataset, "target_transform", None) is not None:
        return None, "its dataset has a target_transform, so its batches' labels are not its `targets`"
    if kind == "DatasetFolder":
        return [sample[1] for sample in dataset.samples], None
    return dataset.targets, None


def dataset_class_labels(data: Any) -> torch.Tensor:
    """``LongTensor[N]``: the class label of every example a DataLoader's batches hold in an epoch, read without
    loading a sample (so without drawing from any RNG): from its dataset's ``targets`` (torchvision's ``MNIST``,
    ``CIFAR10``), ``samples`` (``ImageFolder``) or a two-tensor ``TensorDataset``'s second tensor (see
    :func:`_label_source`). With ``drop_last`` and a ``SequentialSampler`` the examples of the dropped last
    batch are left out (never seen); a ``RandomSampler`` with ``drop_last`` drops each example equally often, so
    all are kept. A ValueError naming what is missing unless those are the labels its batches carry, each
    example equally often: a dataset whose ``__getitem__`` is not one of those (its ``targets`` need not be what
    it returns; ``Subset`` and ``ConcatDataset`` included), a ``target_transform`` or a ``collate_fn`` of its
    own (the batches' labels may be changed), a sampler other than a ``RandomSampler`` without replacement or
    a ``SequentialSampler`` over the whole dataset (a weighted, distributed or subset sampler draws another
    class mix), or a batch sampler other than torch's ``BatchSampler``."""
    from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler
    from torch.utils.data._utils.collate import default_collate, default_convert

    dataset = getattr(data, "dataset", None)
    targets, why = (None, "it has no `dataset` (it is no DataLoader)") if dataset is None else _label_source(dataset)
    size = None
    if why is None:
        try:
            size = len(dataset)
        except TypeError:
            why = f"its dataset ({type(dataset).__name__}) has no length"
    if why is None:
        collate = getattr(data, "collate_fn", default_collate)
        if collate is not default_collate and collate is not default_convert:
            why = (f"it has a collate_fn of its own ({getattr(collate, '__name__', type(collate).__name__)}), which "
                   "may change its batches' labels")
    drop_tail = 0
    if why is None:
        owners = _samplers(data)
        batchers = [o for o in owners if isinstance(o, BatchSampler)]
        order = [o for o in owners if not isinstance(o, BatchSampler)]
        odd = [type(o).__name__ for o in batchers if type(o).__iter__ is not BatchSampler.__iter__]
        full = [(isinstance(o, SequentialSampler) or (isinstance(o, RandomSampler) and not o.replacement
                                                      and o.num_samples == size))
                and len(o.data_source) == size for o in order]
        if odd:
            why = (f"its batch sampler ({', '.join(odd)}) is not torch's BatchSampler, so its batches need not hold "
                   "each example once an epoch")
        elif not order or not all(full):
            names = [type(o).__name__ for o in order]
            why = (f"its sampler ({', '.join(names) or 'none'}) is not a RandomSampler without replacement or a "
                   f"SequentialSampler over all {size} examples, so its batches need not hold each example once an "
                   "epoch")
        elif batchers and all(isinstance(o, SequentialSampler) for o in order) and batchers[0].drop_last:
            drop_tail = size % batchers[0].batch_size  # the same last examples, never seen
            if drop_tail == size:
                why = (f"drop_last=True with batch_size={batchers[0].batch_size} drops all {size} examples: it "
                       "gives no batch")
    if why is not None:
        raise ValueError(why)
    try:
        labels = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"its dataset's labels are not integer classes ({type(exc).__name__}: {exc})") from exc
    if labels.dim() != 1 or labels.shape[0] != size or labels.is_floating_point() or labels.is_complex() or (
            labels.dtype == torch.bool):
        raise ValueError(f"its dataset's labels are not one integer class per example (shape {tuple(labels.shape)}, "
                         f"dtype {labels.dtype}, {size} examples)")
    return labels[:size - drop_tail].long().cpu()


class IterableBatches:
    """The batches of ``data`` (a re-iterable, :func:`check_reiterable`), each passed through ``check``
    (raw batch → the trainer's dict of tensors), epoch after epoch (module docstring)."""

    def __init__(self, data: Any, check: Callable[[Any], dict[str, torch.Tensor]]) -> None:
        self.data = data
        self.check = check
        # finished epochs, batches of this epoch trained on, the order generators' and the global RNG's
        # states at the epoch's start; _iterator None with _reopen: restore them and skip the batches
        self.epoch = 0
        self.batches_in_epoch = 0
        self._epoch_states: list[torch.Tensor] | None = None
        self._epoch_global_state: torch.Tensor | None = None
        self._iterator: Iterator[Any] | None = None
        self._reopen = False
        self._held: dict[str, torch.Tensor] | None = None  # a failed step's batch, given next
        # the global RNG's state as the held batch was drawn (just before its next()): a resume draws it again
        # from there (a Dataset's random augmentations draw from the global RNG as the batch is loaded)
        self._held_global: torch.Tensor | None = None
        self._batch_global: torch.Tensor | None = None  # the same, for the batch of the step under way
        self._given = False  # whether the last batch next() gave is still out (hand_back takes that one back)

    @property
    def batches_per_epoch(self) -> int | None:
        """The batches an epoch yields, None when ``data`` does not say (a DataLoader of an
        ``IterableDataset`` without ``__len__``, a streaming data set: its ``len()`` raises a TypeError)."""
        try:
            return len(self.data)
        except TypeError:
            return None

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch, checked; an epoch that ends restarts the iterable."""
        self._given = False  # (the last batch given is taken, trained on; set again once this one is given)
        while True:
            if self._iterator is None:
                self._open_epoch()
            if self._held is not None:  # handed back by a step that failed before its update
                batch, self._held = self._held, None
                self._batch_global, self._held_global = self._held_global, None
                self.batches_in_epoch += 1
                self._given = True
                return batch
            self._batch_global = torch.get_rng_state()
            raw = next(self._iterator, _END)
            if raw is not _END:
                # counted before its check: a batch the check refuses is passed over, by the next call and by a
                # resume from a checkpoint written now alike
                self.batches_in_epoch += 1
                batch = self.check(raw)  # (a batch the check refuses is not out: hand_back refuses it)
                self._given = True
                return batch
            if self.batches_in_epoch == 0:
                raise ValueError("data yielded no batch in a whole epoch: pass a non-empty DataLoader or list of batches")
            self._iterator = None
            self.epoch += 1

    def hand_back(self, batch: dict[str, torch.Tensor]) -> None:
        """Keep ``batch`` (as :meth:`next` gave it, or the part of it a retry needs) for the next
        :meth:`next`: the step that drew it failed before its update, and no longer counts it. Once per
        batch :meth:`next` gave: a second hand_back (or one before any batch) would uncount a batch that
        was trained on, and a resume would then give it again."""
        if not self._given:
            raise ValueError(
                "hand_back takes back the batch the last next() gave, once: no batch is out (none drawn since the "
                "last hand_back or load_state_dict); call next() for a batch before handing it back"
            )
        self._given = False
        self._held = batch
        self.batches_in_epoch -= 1
        self._held_global = self._batch_global

    def _open_epoch(self) -> None:
        """Start an epoch, noting the state of its order generators; after a resume, first restore the
        saved states, then skip the batches the checkpoint trained on."""
        generators = order_generators(self.data)
        skip = 0
        if self._reopen and self._epoch_states is not None:  # (None: saved before its first batch)
            saved = self._epoch_states
            if len(saved) != len(generators):
                raise ValueError(
                    f"the checkpoint's data drew its order from {len(saved)} torch.Generator(s), this data from "
                    f"{len(generators)}: resume with a DataLoader built as the saved run's was"
                )
            for generator, state in zip(generators, saved):
                generator.set_state(state)
            skip = self.batches_in_epoch
        # The global RNG as the checkpoint left it: restored once the skipped batches are replayed
        # from the epoch's start (which draws a shuffle=True loader's order and its workers' seed).
        resume_global = torch.get_rng_state() if self._reopen and self._epoch_global_state is not None else None
        held_global = self._held_global if self._reopen else None
        if resume_global is not None:
            torch.set_rng_state(self._epoch_global_state)
        self._reopen = False
        self._epoch_states = [generator.get_state() for generator in generators]
        self._epoch_global_state = torch.get_rng_state()
        set_sampler_epoch(self.data, self.epoch)
        self._iterator = iter(self.data)
        try:
            for skipped in range(skip):
                if next(self._iterator, _END) is _END:
                    raise ValueError(
                        f"the checkpoint had trained on {skip} batches of this epoch, but the data yields only "
                        f"{skipped}: resume with the data the run was saved with"
                    )
            if held_global is not None:
                # Saved after a step that failed before its update (its batch was handed back): that batch is
                # drawn again here from the global RNG's state as the saved run drew it (a Dataset's random
                # augmentations, a sampler seeded from the global RNG at its first batch), and given next.
                torch.set_rng_state(held_global)
                held = next(self._iterator, _END)
                if held is _END:
                    raise ValueError(
                        f"the checkpoint had trained on {skip} batches of this epoch and held the next one back "
                        f"(a step that failed before its update), but the data yields only {skip}: resume with the "
                        "data the run was saved with"
                    )
                try:
                    self._held = self.check(held)
                except BaseException:
                    # passed over, as next() passes over a batch its check refuses: counted, not held
                    self._held_global, self.batches_in_epoch = None, skip + 1
                    raise
        finally:
            if resume_global is not None:
                torch.set_rng_state(resume_global)
        self.batches_in_epoch = skip

    def state_dict(self) -> dict[str, Any]:
        """The position: finished epochs, batches of this epoch trained on, the order generators' and the
        global RNG's states at the epoch's start, and the held batch's global RNG state (None: none held)."""
        return {"epoch": self.epoch, "batches": self.batches_in_epoch, "generator_states": self._epoch_states,
                "global_state": self._epoch_global_state, "held_global_state": self._held_global}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (the epoch restarts, its trained batches skipped, at the next batch)."""
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches"]
        self._epoch_states = state["generator_states"]
        self._epoch_global_state = state.get("global_state")  # (None in older checkpoints)
        self._iterator, self._reopen, self._held, self._given = None, True, None, False
        self._held_global = state.get("held_global_state")  # (None: no batch was handed back)


__all__ = ["EMBEDDING_KEYS", "IMAGE_KEYS", "LABEL_KEYS", "POOLED_KEYS", "embedding_form", "embedding_parts", "embedding_shapes", "map_embeddings", "IterableBatches", "check_reiterable", "loader_batch_size", "class_labels", "is_class_labels",
           "order_generators", "set_sampler_epoch", "split_batch", "split_embedding_batch",
           "split_floating_batch"]
