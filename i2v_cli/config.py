"""The constants that define the Illustration2Vec networks and their input, in one place.

The transform, the model and the tag records are all built from these, so no magic number is repeated
elsewhere (as timm's ``data/config.py`` keeps preprocessing with the model's configuration).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Side of the square network input, in pixels.
INPUT_SIZE = 224
#: Per-channel mean of the training images, in BGR order, on a 0-255 scale (the release's ``image_mean``).
MEAN_BGR = (164.76139251, 167.47864617, 181.13838569)

#: Convolution layers in order, ``None`` marks a 2x2/2 max pooling. Shared by both networks up to conv6_3.
CONV_LAYERS: tuple[str | None, ...] = (
    "conv1_1", None,
    "conv2_1", None,
    "conv3_1", "conv3_2", None,
    "conv4_1", "conv4_2", None,
    "conv5_1", "conv5_2", None,
    "conv6_1", "conv6_2", "conv6_3",
)  # fmt: skip
CONV_NAMES: tuple[str, ...] = tuple(n for n in CONV_LAYERS if n is not None)
#: Channel widths of the released models (conv1_1 ... conv6_3).
RELEASE_WIDTHS: tuple[int, ...] = (64, 128, 256, 256, 512, 512, 512, 512, 1024, 1024, 1024)
#: Length of the semantic feature (``encode1``) in the released feature model.
RELEASE_FEATURE_DIM = 4096
#: Spatial side of conv6_3's output for a 224x224 input (five poolings).
FINAL_MAP_SIZE = INPUT_SIZE // 32

#: Number of tags the networks predict, in ``tag_list.json`` order.
NUM_TAGS = 1539


@dataclass(frozen=True)
class Category:
    """A contiguous block of output columns that share a meaning and a threshold."""

    name: str
    start: int
    stop: int


CATEGORIES: tuple[Category, ...] = (
    Category("general", 0, 512),
    Category("character", 512, 1024),
    Category("copyright", 1024, 1536),
    Category("rating", 1536, 1539),
)

#: Model kinds, as recorded in converted weight files.
TAG = "tag"
FEATURE = "feature"

#: Numeric precisions of ``--precision``: fp32 gives the reference results (IEEE, also on CUDA); tf32, bf16 and
#: fp16 are faster on GPUs; int8 (CPU) is the network quantised from a calibration set (:mod:`i2v_cli.quantize`).
PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "int8")
#: Inference backends of ``--backend``.
BACKENDS = ("auto", "torch", "onnxruntime")

#: Images in the calibration set of ``--precision int8`` (``i2v weights calibrate``), and the variable naming a
#: calibration file of the user's own.
CALIBRATION_COUNT = 128
CALIBRATION_ENV = "I2V_CALIBRATION"
