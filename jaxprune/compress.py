"""Compression and export of pruned models: sparse storage, checkpoints and quantization.

`compact` stores pruned leaves as BCSR/BCOO sparse arrays, `save_compressed` /
`load_compressed` write and read them bit-exactly, and `quantize` adds per-channel integer
quantization on top.
"""

from jaxprune._src.export import compact as compact
from jaxprune._src.export import densify as densify
from jaxprune._src.export import compact_bytes as compact_bytes
from jaxprune._src.export import sparse_matmul as sparse_matmul
from jaxprune._src.export import save_compressed as save_compressed
from jaxprune._src.export import load_compressed as load_compressed
from jaxprune._src.quantize import quantize as quantize
from jaxprune._src.quantize import dequantize as dequantize
from jaxprune._src.quantize import quantize_array as quantize_array
from jaxprune._src.quantize import dequantize_array as dequantize_array
from jaxprune._src.quantize import quantization_error as quantization_error
from jaxprune._src.quantize import QuantizedArray as QuantizedArray

__all__ = [
    "QuantizedArray", "compact", "compact_bytes", "densify", "dequantize", "dequantize_array",
    "load_compressed", "quantization_error", "quantize", "quantize_array", "save_compressed",
    "sparse_matmul",
]
