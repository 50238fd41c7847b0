"""Flax NNX layers; primitives shared by every layer family.

The primitives: RMS normalisation (plain and with a SiLU output gate), the short
depthwise causal convolution over time, and rotary position embeddings in the
Hugging Face Llama convention. See DESIGN.md §5.
"""

from jaxlin.layers.conv import ShortConv
from jaxlin.layers.norm import GatedRMSNorm, RMSNorm
from jaxlin.layers.rope import apply_rope, rope_frequencies

__all__ = [
    "GatedRMSNorm",
    "RMSNorm",
    "ShortConv",
    "apply_rope",
    "rope_frequencies",
]
