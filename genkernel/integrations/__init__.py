"""Observing training loops genkernel does not own.

The analyzers and the tracker attach to any loop through ``bind(model, optimizer)`` and
``observe(per_example_losses, ...)`` before the loop's backward; the loop's own
``optimizer.step()`` records each step through the optimizer's step hooks. Wrapped models and
optimizers (DistributedDataParallel, ``torch.compile``, accelerate's prepared objects, Lightning's
``LightningOptimizer``) are read through by the library (:func:`genkernel.core.adapter.unwrap`,
:func:`genkernel.core.adapter.unwrap_optimizer`), so an accelerate script needs nothing more on the
CPU; on a GPU, one call before training, :func:`genkernel.set_exact_cuda_mode` (trackers refuse
TF32 convolutions, torch's default there).

:mod:`genkernel.integrations.lightning` adds a Lightning ``Callback`` that binds an analyzer at the
start of training, finishes it at the end and keeps its state in Lightning's checkpoints (import it
only where Lightning is installed: ``pip install genkernel[integrations]``).
"""
