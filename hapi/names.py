"""The names a command line offers (models, presets, wire dtypes, weights),
importable without torch.

``hapi-train --help`` lists these before anything heavy is imported, so they
cannot come from the modules that define what they name (``hapi.zoo``,
``hapi.preprocess``, ``hapi.protocol``, which import torch). Each tuple here
is the key list of its definition, in the same order; tests/test_cli.py
checks that they agree.
"""

MODELS = ("alexnet", "resnet18", "resnet50", "vgg11", "vgg19", "densenet121", "vit_b_16",
          "mobilenet_v3_small", "efficientnet_lite0")  # hapi.zoo.MODELS
PRESET_SIZES = (32, 64, 112, 224)
PRESETS = (*(f"imagenet-{n}" for n in PRESET_SIZES),
           *(f"resize-{n}" for n in PRESET_SIZES))  # hapi.preprocess.PRESETS
DEFAULT_PRESET = "imagenet-224"  # hapi.protocol.DEFAULT_PRESET
WIRE_DTYPES = ("float32", "float16", "bfloat16")  # hapi.protocol.WIRE_DTYPES
DEFAULT_WEIGHTS = "pretrained"  # hapi.protocol.DEFAULT_WEIGHTS
