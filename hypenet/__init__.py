"""hypenet: kernels, a Hugging Face compatible model and HALO distillation for HypeNet hybrid linear-attention LMs.

Importing the package registers "hypenet" with transformers' AutoConfig / AutoModelForCausalLM.
"""

from . import ops
from .cache import HypeNetCache
from .config import HypeNetConfig
from .convert import convert_qwen3
from .modeling import HypeNetForCausalLM, HypeNetModel

__version__ = "0.1.0"

__all__ = ["HypeNetCache", "HypeNetConfig", "HypeNetForCausalLM", "HypeNetModel", "convert_qwen3", "ops"]
