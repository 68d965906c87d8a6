"""quantframe: low-precision weights as PyTorch tensor subclasses.

    from quantframe import quantize_, int8_weight_only_quantized_training
    quantize_(model, int8_weight_only_quantized_training())
"""

from quantframe.affine import (
    AffineQuantizedTensor,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    int4_weight_only,
    int8_dynamic_activation_int8_weight,
    int8_weight_only,
    intx_weight_only,
)
from quantframe.api import QuantConfig, SkipModule, quantize_, register_quantize_handler, summary
from quantframe.gptq import GPTQLinearWeight, from_gptq, load_gptq_linear_, to_gptq
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
from quantframe.llm_int8 import LLMInt8Config, LLMInt8Weight, llm_int8
from quantframe.nf4 import NF4Tensor, NF4WeightOnlyConfig, nf4_weight_only
from quantframe.nn import DoRAConfig, DoRALinear, apply_adapters_, dora, lora, merge_adapters_
from quantframe.tensor import QuantTensor
from quantframe.ternary import (
    BitNetTrainingConfig,
    BitNetTrainingLinearWeight,
    TernaryWeight,
    TernaryWeightOnlyConfig,
    bitnet_training,
    convert_bitnet_to_ternary_,
    ternary_weight_only,
)

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
    "NF4Tensor",
    "NF4WeightOnlyConfig",
    "nf4_weight_only",
    "AffineQuantizedTensor",
    "Int8WeightOnlyConfig",
    "Int4WeightOnlyConfig",
    "IntxWeightOnlyConfig",
    "Int8DynamicActivationInt8WeightConfig",
    "int8_weight_only",
    "int4_weight_only",
    "intx_weight_only",
    "int8_dynamic_activation_int8_weight",
    "DoRAConfig",
    "DoRALinear",
    "dora",
    "lora",
    "apply_adapters_",
    "merge_adapters_",
    "GPTQLinearWeight",
    "from_gptq",
    "to_gptq",
    "load_gptq_linear_",
    "LLMInt8Weight",
    "LLMInt8Config",
    "llm_int8",
    "BitNetTrainingConfig",
    "BitNetTrainingLinearWeight",
    "TernaryWeight",
    "TernaryWeightOnlyConfig",
    "bitnet_training",
    "convert_bitnet_to_ternary_",
    "ternary_weight_only",
]
