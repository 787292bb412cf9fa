"""hypenet: kernels, a Hugging Face compatible model and HALO distillation for HypeNet hybrid linear-attention LMs."""

from . import ops

__version__ = "0.1.0"
