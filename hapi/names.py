"""The names a command line offers (models, presets, wire dtypes and
encodings, weights), importable without torch.

``hapi-train --help`` lists these before anything heavy is imported, so they
live here, once: ``hapi.zoo``, ``hapi.preprocess``, ``hapi.protocol`` and
``hapi.wire`` build their tables from these lists.
"""

MODELS = ("alexnet", "resnet18", "resnet50", "vgg11", "vgg19", "densenet121", "vit_b_16",
          "mobilenet_v3_small", "efficientnet_lite0")
PRESET_SIZES = (32, 64, 112, 224)
PRESETS = (*(f"imagenet-{n}" for n in PRESET_SIZES),
           *(f"resize-{n}" for n in PRESET_SIZES))
DEFAULT_PRESET = "imagenet-224"
WIRE_DTYPES = ("float32", "float16", "bfloat16", "uint8")
DEFAULT_WIRE_DTYPE = "float32"
WIRE_ENCODINGS = ("raw", "zstd")
DEFAULT_WIRE_ENCODING = "raw"
# The trainer's --wire_dtype/--wire_encoding: "auto" leaves them to the
# automatic split, which chooses them with the split.
WIRE_AUTO = "auto"
# The automatic split's predictions this close (relative) are ties, won by
# the fewest bytes on the wire: the default spans the measurements' noise;
# the trainer's --split_tie raises it to trade time for bytes.
SPLIT_TIE = 0.02
DEFAULT_WEIGHTS = "pretrained"
