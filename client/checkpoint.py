"""Checkpoints of the trained layers, on disk or in Swift; nothing is pickled.

A checkpoint is two objects in a store:

- ``step-<n>.safetensors``: the tensors of the trainable layers
  (``layers.<index>.<name>``) and of the optimizer's state
  (``optimizer.<param>.<name>``);
- ``latest.json``: names that file and holds the optimizer's
  hyper-parameters and the trainer's resume state (plain JSON).

``latest.json`` is written after the tensors it names and the previous
tensors are deleted last, so a run killed at any point leaves a complete
checkpoint behind. The store is a folder or a Swift container
(:mod:`hapi.stores`).
"""

import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

LATEST = "latest.json"
FORMAT = "hapi-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not belong to this run."""


@dataclass
class Checkpoint:
    state: dict
    tensors: dict

    def restore(self, model, optimizer=None):
        """Load the trainable layers into ``model`` and, when given, the
        optimizer's state into ``optimizer``."""
        first = self.state["first_layer"]
        for index in range(first, len(model.layers)):
            prefix = f"layers.{index}."
            layer_state = {key[len(prefix):]: tensor for key, tensor in self.tensors.items()
                           if key.startswith(prefix)}
            model.layers[index].load_state_dict(layer_state)
        if optimizer is not None:
            optimizer.load_state_dict(self._optimizer_state())

    def _optimizer_state(self):
        saved = self.state["optimizer"]
        state = {int(param): dict(values) for param, values in saved["scalars"].items()}
        for key, tensor in self.tensors.items():
            kind, param, name = key.split(".", 2)
            if kind == "optimizer":
                state.setdefault(int(param), {})[name] = tensor
        return {"state": state, "param_groups": saved["param_groups"]}


def save_checkpoint(store, model, first_layer, optimizer, state):
    """Write layers ``[first_layer:]`` of ``model``, the optimizer and the JSON
    ``state`` (which must hold a unique ``step``) as the store's latest checkpoint."""
    tensors = {f"layers.{index}.{name}": tensor.detach().cpu().contiguous()
               for index in range(first_layer, len(model.layers))
               for name, tensor in model.layers[index].state_dict().items()}
    optimizer_state = optimizer.state_dict()
    scalars = {}
    for param, values in optimizer_state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param), {})[name] = value
    name = f"step-{state['step']:09d}.safetensors"
    store.put(name, st_save(tensors))
    previous = _read_latest(store)
    store.put(LATEST, json.dumps({
        **state, "format": FORMAT, "tensors": name, "first_layer": first_layer,
        "optimizer": {"param_groups": optimizer_state["param_groups"], "scalars": scalars},
    }, indent=1).encode())
    if previous is not None and previous["tensors"] != name:
        store.delete(previous["tensors"])


def load_checkpoint(store):
    """The store's latest :class:`Checkpoint`, or None when it has none."""
    state = _read_latest(store)
    if state is None:
        return None
    data = store.get(state["tensors"])
    if data is None:
        raise CheckpointError(f"{store}: {LATEST} names {state['tensors']}, which is missing")
    try:
        tensors = st_load(data)
    except SafetensorError as err:
        raise CheckpointError(f"{store}/{state['tensors']} is not valid safetensors: "
                              f"{err}") from None
    return Checkpoint(state=state, tensors=tensors)


def _read_latest(store):
    data = store.get(LATEST)
    if data is None:
        return None
    try:
        state = json.loads(data)
    except ValueError as err:
        raise CheckpointError(f"{store}/{LATEST} is not JSON: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{store}/{LATEST} is not a {FORMAT} checkpoint")
    return state
