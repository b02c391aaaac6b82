"""The layer-indexed model zoo that both tiers share.

Every model is an ordered list of layers; the boundaries between layers are
the split points. Boundary ``i`` is the input of layer ``i``: with split
``s`` the storage tier runs ``layers[0:s]`` and the trainer ``layers[s:]``.
The layers are the modules of the torchvision (or timm) model itself, so a
state dict in the original model's key space, loaded before the model is
decomposed, gives the pre-trained layered model; where the original
``forward`` does functional work (flatten, class token, ...), a small module
here does exactly the same.

A freeze index ``f`` marks ``layers[0:f]`` as frozen: no gradients, and
always run in eval mode (BatchNorm uses its running statistics, Dropout is
off), on the storage tier and on the trainer alike. A split never goes above
the freeze index.

Layers and default freeze indices (``len`` is the number of layers):

==================  ===  ======  =====  =============================================
model               len  freeze  paper  trainable part (layers[freeze:])
==================  ===  ======  =====  =============================================
alexnet              22      18     17  classifier.3 (Dropout) ... classifier.6
resnet18             15      11     11  layer4.1, avgpool, flatten, fc
resnet50             23      22     21  fc
vgg11                30      26     25  classifier.3 (Linear) ... classifier.6
vgg19                46      36     36  features.36 (MaxPool), avgpool, ..., classifier
densenet121          16      11     20  features.norm5, relu, avgpool, ..., classifier
vit_b_16             19      18     17  heads
mobilenet_v3_small   19      15      -  classifier.0 ... classifier.3
efficientnet_lite0   23      21      -  dropout, classifier
==================  ===  ======  =====  =============================================

The paper's indices (HAPI, Petrescu et al., SoCC 2024) count the layers of
its own decomposition: every ``nn.Sequential`` flattened, no flatten layer,
DenseNet's transitions split into their four modules, and timm's ViT. Each
is mapped here to the boundary in front of the same module: AlexNet and VGG
gain one index from the flatten layer when the paper's index lies in the
classifier; ResNet-50's index 21 (the input of ``fc``) becomes 22 for the
same reason; DenseNet's 20 (the input of ``norm5``) is 11 here, where each
transition is one layer; ViT's 17 (the input of the head) is 18.
MobileNetV3-Small and EfficientNet-Lite0 are not in the paper: everything
below the classifier head is frozen.

EfficientNet-Lite0 is timm's ``tf_efficientnet_lite0`` (TensorFlow "same"
padding and BatchNorm epsilon), the architecture of the TensorFlow-trained
weights that :func:`hapi.weights.pretrained_state_dict` loads. Those weights
expect inputs normalised with mean and std 0.5 (``ModelInfo.mean``/``std``);
every other model here uses the ImageNet statistics.
"""

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch
import torchvision.models as tvm
from torch import Tensor, nn

from hapi import names
from hapi.weights import EFFICIENTNET_LITE0_TIMM_ARCH, WeightsError

__all__ = [
    "MODELS", "LayeredModel", "ModelInfo", "UnknownModel", "build_model", "canonical_name",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NamedLayers = list[tuple[str, nn.Module]]


class UnknownModel(ValueError):
    """The name is not a model of the zoo."""

    def __init__(self, name):
        super().__init__(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
        self.name = name


# Modules for the functional steps of the original forward methods ---------


class ClassToken(nn.Module):
    """Prepend the class token to a batch of patch tokens (ViT)."""

    def __init__(self, token: nn.Parameter):
        super().__init__()
        self.token = token

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)


class PositionEmbedding(nn.Module):
    """Add the position embedding, then dropout: the start of ViT's encoder."""

    def __init__(self, embedding: nn.Parameter, dropout: nn.Module):
        super().__init__()
        self.embedding = embedding
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(x + self.embedding)


class PatchTokens(nn.Module):
    """(N, C, H, W) feature map to (N, H * W, C) tokens (ViT)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).permute(0, 2, 1)


class SelectClassToken(nn.Module):
    """Keep the class token of each sequence (ViT)."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


# Decompositions: original model -> named layers ---------------------------


def _children(prefix: str, module: nn.Module) -> NamedLayers:
    return [(f"{prefix}.{name}", child) for name, child in module.named_children()]


def _alexnet_vgg_layers(model: nn.Module) -> NamedLayers:
    return [
        *_children("features", model.features),
        ("avgpool", model.avgpool),
        ("flatten", nn.Flatten(1)),
        *_children("classifier", model.classifier),
    ]


def _resnet_layers(model: tvm.ResNet) -> NamedLayers:
    stem = [(name, getattr(model, name)) for name in ("conv1", "bn1", "relu", "maxpool")]
    blocks = [_children(stage, getattr(model, stage))
              for stage in ("layer1", "layer2", "layer3", "layer4")]
    return [
        *stem,
        *chain.from_iterable(blocks),
        ("avgpool", model.avgpool),
        ("flatten", nn.Flatten(1)),
        ("fc", model.fc),
    ]


def _densenet_layers(model: tvm.DenseNet) -> NamedLayers:
    return [
        *_children("features", model.features),
        ("relu", nn.ReLU(inplace=True)),
        ("avgpool", nn.AdaptiveAvgPool2d((1, 1))),
        ("flatten", nn.Flatten(1)),
        ("classifier", model.classifier),
    ]


def _vit_layers(model: tvm.VisionTransformer) -> NamedLayers:
    encoder = model.encoder
    return [
        ("conv_proj", model.conv_proj),
        ("patch_tokens", PatchTokens()),
        ("class_token", ClassToken(model.class_token)),
        ("encoder.pos_embedding", PositionEmbedding(encoder.pos_embedding, encoder.dropout)),
        *_children("encoder.layers", encoder.layers),
        ("encoder.ln", encoder.ln),
        ("select_class_token", SelectClassToken()),
        ("heads", model.heads),
    ]


def _mobilenet_v3_layers(model: tvm.MobileNetV3) -> NamedLayers:
    return [
        *_children("features", model.features),
        ("avgpool", model.avgpool),
        ("flatten", nn.Flatten(1)),
        *_children("classifier", model.classifier),
    ]


def _efficientnet_lite0() -> nn.Module:
    """timm's EfficientNet-Lite0; timm is imported here, on first use (as in
    ``hapi.weights``), because importing it costs seconds that every other
    model, a proxy's start and the trainer's ``--help`` would pay for nothing."""
    import timm

    # drop_rate 0.2: the dropout in front of the classifier that timm trains
    # EfficientNet-Lite0 with; the other timm defaults match the TF weights.
    return timm.create_model(EFFICIENTNET_LITE0_TIMM_ARCH, drop_rate=0.2)


def _timm_efficientnet_layers(model: nn.Module) -> NamedLayers:
    blocks = [_children(f"blocks.{i}", stage) for i, stage in enumerate(model.blocks)]
    return [
        ("conv_stem", model.conv_stem),
        ("bn1", model.bn1),
        *chain.from_iterable(blocks),
        ("conv_head", model.conv_head),
        ("bn2", model.bn2),
        ("global_pool", model.global_pool),  # pools and flattens
        ("dropout", nn.Dropout(model.drop_rate)),
        ("classifier", model.classifier),
    ]


# The zoo ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """A model of the zoo.

    ``builder()`` returns the original torchvision/timm model, randomly
    initialised; ``decompose(model)`` returns its ``(name, layer)`` pairs in
    order. ``default_freeze`` is the freeze index in this zoo's layering,
    ``paper_freeze`` the HAPI paper's index for the same boundary (None when
    the paper does not use the model). ``input_size`` is the side of the
    square images the model was trained on; ``fixed_input_size`` says that
    it takes no other. ``mean`` and ``std`` are the input normalisation the
    pre-trained weights expect.
    """

    name: str
    builder: Callable[[], nn.Module]
    decompose: Callable[[nn.Module], NamedLayers]
    default_freeze: int
    input_size: int = 224
    description: str = ""
    paper_freeze: int | None = None
    fixed_input_size: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


_INFOS = {info.name: info for info in (
    ModelInfo("alexnet", tvm.alexnet, _alexnet_vgg_layers, default_freeze=18, paper_freeze=17,
              description="AlexNet (torchvision), 61M parameters"),
    ModelInfo("resnet18", tvm.resnet18, _resnet_layers, default_freeze=11, paper_freeze=11,
              description="ResNet-18 (torchvision), 11.7M parameters"),
    ModelInfo("resnet50", tvm.resnet50, _resnet_layers, default_freeze=22, paper_freeze=21,
              description="ResNet-50 (torchvision), 25.6M parameters"),
    ModelInfo("vgg11", tvm.vgg11, _alexnet_vgg_layers, default_freeze=26, paper_freeze=25,
              description="VGG-11 (torchvision), 133M parameters"),
    ModelInfo("vgg19", tvm.vgg19, _alexnet_vgg_layers, default_freeze=36, paper_freeze=36,
              description="VGG-19 (torchvision), 144M parameters"),
    ModelInfo("densenet121", tvm.densenet121, _densenet_layers, default_freeze=11,
              paper_freeze=20, description="DenseNet-121 (torchvision), 8.0M parameters"),
    ModelInfo("vit_b_16", tvm.vit_b_16, _vit_layers, default_freeze=18, paper_freeze=17,
              fixed_input_size=True, description="ViT-B/16 (torchvision), 86.6M parameters"),
    ModelInfo("mobilenet_v3_small", tvm.mobilenet_v3_small, _mobilenet_v3_layers,
              default_freeze=15, description="MobileNetV3-Small (torchvision), 2.5M parameters"),
    ModelInfo("efficientnet_lite0", _efficientnet_lite0, _timm_efficientnet_layers,
              default_freeze=21, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
              description="EfficientNet-Lite0 (timm tf_efficientnet_lite0), 4.7M parameters"),
)}
# The zoo's models, in hapi.names' order (the list the command line offers).
MODELS: dict[str, ModelInfo] = {name: _INFOS[name] for name in names.MODELS}

_ALIASES = {"vit": "vit_b_16"}


def canonical_name(name: str) -> str:
    """The zoo's name for ``name``: case-insensitive, ``-`` read as ``_``,
    and the original HAPI client's ``my`` prefix dropped (``myalexnet`` is
    ``alexnet``). Raises :class:`UnknownModel`."""
    key = name.strip().lower().replace("-", "_")
    for candidate in (key, key.removeprefix("my")):
        candidate = _ALIASES.get(candidate, candidate)
        if candidate in MODELS:
            return candidate
    raise UnknownModel(name)


class LayeredModel(nn.Module):
    """A model as an ordered list of layers that can run any contiguous range.

    ``layer_names[i]`` is the path of ``layers[i]`` in the original model (or
    a descriptive name for the modules standing in for functional steps).
    ``frozen`` is the current freeze index, set by :meth:`freeze`.
    """

    def __init__(self, name: str, named_layers: NamedLayers, default_freeze: int):
        super().__init__()
        self.name = name
        self.layer_names = [layer_name for layer_name, _ in named_layers]
        self.layers = nn.ModuleList(layer for _, layer in named_layers)
        self.default_freeze = default_freeze
        self.frozen = 0

    def __len__(self) -> int:
        return len(self.layers)

    def _check_boundary(self, index: int, what: str) -> None:
        if not 0 <= index <= len(self):
            raise ValueError(f"{what} {index} is outside [0, {len(self)}] for {self.name}")

    def forward(self, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Run ``layers[start:stop]`` on ``x``: ``x`` is the input of layer
        ``start``, the result the input of layer ``stop``.

        Like the original models, some layers (``ReLU(inplace=True)``) write
        into their input: a tensor passed in at such a boundary may change.
        """
        stop = len(self) if stop is None else stop
        self._check_boundary(start, "start")
        self._check_boundary(stop, "stop")
        if start > stop:
            raise ValueError(f"start {start} is after stop {stop}")
        for index in range(start, stop):
            x = self.layers[index](x)
        return x

    def freeze(self, index: int) -> "LayeredModel":
        """Freeze ``layers[:index]`` and make ``layers[index:]`` trainable.

        Frozen layers get ``requires_grad=False`` and stay in eval mode
        whatever mode the model is put in, so that they compute exactly what
        the storage tier computes for them.
        """
        self._check_boundary(index, "freeze index")
        for position, layer in enumerate(self.layers):
            layer.requires_grad_(position >= index)
        self.frozen = index
        return self.train(self.training)

    def train(self, mode: bool = True) -> "LayeredModel":
        """Set the training mode of the layers above the freeze index; the
        frozen layers always stay in eval mode."""
        super().train(mode)
        for index in range(self.frozen):
            self.layers[index].eval()
        return self

    def boundary_shapes(self, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Per-sample tensor shapes at every boundary, ``len(self) + 1`` of
        them: boundary 0 is ``input_shape`` (e.g. ``(3, 224, 224)``), the last
        one the output. A dry run on the meta device: no memory, no compute.
        """
        x = torch.empty((2, *input_shape), device="meta")  # 2: BatchNorm in train mode
        shapes = [tuple(input_shape)]
        with torch.no_grad():
            for layer in self.layers:
                x = _meta_call(layer, x)
                shapes.append(tuple(x.shape[1:]))
        return shapes

    def boundary_bytes(self, input_shape: Sequence[int],
                       dtype: torch.dtype = torch.float32) -> list[int]:
        """Per-sample size in bytes of the tensor at every boundary, in
        ``dtype``: float32 as the activations sit in memory, or the wire dtype
        (``hapi.wire.TORCH_DTYPES``) as features cross the network. The split
        cost model takes its boundary sizes from here."""
        return [math.prod(shape) * dtype.itemsize for shape in self.boundary_shapes(input_shape)]

    def replace_head(self, num_classes: int) -> nn.Linear:
        """Replace the final classifier ``Linear`` by a new, randomly
        initialised one with ``num_classes`` outputs, and return it."""
        path, old = next((path, module) for path, module in reversed(
            list(self.layers.named_modules())) if isinstance(module, nn.Linear))
        parent_path, _, attribute = path.rpartition(".")
        head = nn.Linear(old.in_features, num_classes,
                         device=old.weight.device, dtype=old.weight.dtype)
        setattr(self.layers.get_submodule(parent_path), attribute, head)
        return head


def _meta_call(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` with meta stand-ins for its parameters and buffers."""
    tensors = chain(module.named_parameters(), module.named_buffers())
    meta = {name: torch.empty_like(tensor, device="meta") for name, tensor in tensors}
    return torch.func.functional_call(module, meta, (x,))


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Run the block with the CPU random generator seeded, and restore it after."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _load_strict(model: nn.Module, state_dict: dict[str, Tensor], name: str) -> None:
    """Load ``state_dict`` into ``model``, built on the meta device: the
    model takes the tensors themselves, in the model's dtypes."""
    expected = model.state_dict()
    problems = []
    if missing := [key for key in expected if key not in state_dict]:
        problems.append(f"{len(missing)} missing ({_some(missing)})")
    if unexpected := [key for key in state_dict if key not in expected]:
        problems.append(f"{len(unexpected)} unexpected ({_some(unexpected)})")
    if misshapen := [f"{key} is {tuple(state_dict[key].shape)}, not {tuple(tensor.shape)}"
                     for key, tensor in expected.items()
                     if key in state_dict and state_dict[key].shape != tensor.shape]:
        problems.append(f"{len(misshapen)} of the wrong shape ({_some(misshapen)})")
    if problems:
        raise WeightsError(f"the weights do not fit {name}: {'; '.join(problems)}")
    model.load_state_dict({key: state_dict[key].to(tensor.dtype)
                           for key, tensor in expected.items()}, assign=True)


def _some(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def build_model(name: str, *, state_dict: dict[str, Tensor] | None = None,
                seed: int | None = None) -> LayeredModel:
    """Build a zoo model as a :class:`LayeredModel` in eval mode.

    With ``state_dict`` (in the original torchvision/timm model's key space)
    the model is built without initialising any weights and takes the
    tensors of ``state_dict`` (no copy); a state dict that does not fit
    exactly raises :class:`hapi.weights.WeightsError`. Without it, the
    weights are random, drawn from ``seed`` when given: the same seed gives
    the same weights in every process.
    """
    info = MODELS[canonical_name(name)]
    if state_dict is None:
        with _seeded(seed):
            model = info.builder()
    else:
        with torch.device("meta"):
            model = info.builder()
        _load_strict(model, state_dict, info.name)
    return LayeredModel(info.name, info.decompose(model), info.default_freeze).eval()
