"""quantframe: low-precision weights as PyTorch tensor subclasses.

    from quantframe import quantize_, int8_weight_only_quantized_training
    quantize_(model, int8_weight_only_quantized_training())
"""

from quantframe.api import QuantConfig, SkipModule, quantize_, register_quantize_handler, summary
from quantframe.int8_mixed_precision import (
    Int8MixedPrecisionLinearWeight,
    Int8MixedPrecisionQTLinearWeight,
    Int8MixedPrecisionTrainingConfig,
    int8_mixed_precision_training,
)
from quantframe.int8_training import (
    Int8QTLinearWeight,
    Int8WeightOnlyQuantizedTrainingConfig,
    int8_weight_only_quantized_training,
)
from quantframe.tensor import QuantTensor

__version__ = "0.1.0"

__all__ = [
    "QuantConfig",
    "QuantTensor",
    "SkipModule",
    "quantize_",
    "register_quantize_handler",
    "summary",
    "Int8QTLinearWeight",
    "Int8WeightOnlyQuantizedTrainingConfig",
    "int8_weight_only_quantized_training",
    "Int8MixedPrecisionLinearWeight",
    "Int8MixedPrecisionQTLinearWeight",
    "Int8MixedPrecisionTrainingConfig",
    "int8_mixed_precision_training",
]
