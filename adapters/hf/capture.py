"""The one place that finds a HF model's decoder layers and captures their attention inputs.

KVzap scores the attention-layer input (the hidden states *after* the input norm), which transformers passes to
each layer's ``self_attn`` as ``hidden_states``. The session, surrogate training and the kvpress parity harness
all capture it through :func:`hook_attention_inputs`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def decoder_layers(model) -> list:
    """The decoder layers of a causal LM (``model.model.layers``); ValueError when there are none."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers on {type(model).__name__} (expected model.model.layers)")
    return list(layers)


def hook_attention_inputs(model, on_input: Callable[[int, torch.Tensor, dict], None]) -> list:
    """Forward pre-hooks on every layer's ``self_attn`` calling ``on_input(layer_idx, hidden_states, kwargs)``.

    Returns the hook handles; the caller removes them.
    """
    handles = []
    for idx, layer in enumerate(decoder_layers(model)):
        def hook(module, args, kwargs, idx=idx):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is not None:
                on_input(idx, hidden, kwargs)
        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def capture_attention_inputs(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention input for ``input_ids (1, T)`` from one plain forward: ``(T, hidden)`` float32."""
    captured: dict[int, torch.Tensor] = {}
    handles = hook_attention_inputs(model, lambda idx, hidden, _: captured.__setitem__(idx, hidden[0].detach().float()))
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in range(len(captured))]
