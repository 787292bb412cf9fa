"""The mixers of HypeNet, built from projections and calls into hypenet.ops."""

from .hype_attention import HypeAttention
from .lightning import LightningAttention, alibi_slopes
from .norm import HypeNetRMSNorm
from .rotary import identity_rope_tables, rope_tables

__all__ = ["HypeAttention", "HypeNetRMSNorm", "LightningAttention", "alibi_slopes", "identity_rope_tables",
           "rope_tables"]
