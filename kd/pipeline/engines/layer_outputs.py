"""The outputs of chosen decoder layers, caught during a model's ordinary forward (feature distillation).

"Layer i" is the output of decoder layer i, 0-based: the residual stream after block i, before any
final norm. That equals Hugging Face's ``output_hidden_states[i + 1]`` for every layer but the last
(transformers overwrites its last entry with the normed final state). Both sides use this module:
stage one stores the teacher's layers (``kd cache-logits --hidden-layers``) and stage two pulls the
student's towards them (``kd train --feature-loss``), so the two mean the same thing by construction.

Forward hooks catch the layers' outputs instead of ``output_hidden_states=True``, which would keep
every layer's [B, L, d] tensor alive until the forward ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kd.errors import KdError


def decoder_layer_list(body: torch.nn.Module, flag: str) -> torch.nn.ModuleList:
    """The decoder layers of a model body (``model.model.layers`` for Llama-like models)."""
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise KdError(f"{flag}: {type(body).__name__} has no .layers list of decoder layers to take states from")
    return layers


@contextlib.contextmanager
def layer_outputs(layers: torch.nn.ModuleList, indices: tuple[int, ...]) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, each forward fills the yielded dict with {i: output of layers[i], [B, L, d]}.

    The tensors keep their autograd graph (the student's loss backpropagates through them).
    """
    caught: dict[int, torch.Tensor] = {}
    handles = []
    for index in indices:

        def hook(_module, _inputs, output, index=index):
            caught[index] = output[0] if isinstance(output, tuple) else output

        handles.append(layers[index].register_forward_hook(hook))
    try:
        yield caught
    finally:
        for handle in handles:
            handle.remove()
