"""Flax NNX layers; primitives shared by every layer family.

The primitives: RMS normalisation (plain and with a SiLU output gate), the short
depthwise causal convolution over time, and rotary position embeddings in the
Hugging Face Llama convention. See docs/design.md §5.
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

# gate parametrisations of the linear-attention layers and their registry
from jaxlin.layers.gates import (
    GATES,
    FixedDecay,
    GateContext,
    GateOut,
    GateSpec,
    HGRN2Gate,
    LowRankLogSigmoidGate,
    Mamba2Decay,
    RWKV6Decay,
    RWKV6TokenShift,
    NoGate,
    alibi_slopes,
    lightning_log_decay,
    register_gate,
    retention_log_decay,
    shift_tokens,
)

__all__ += [
    "GATES",
    "FixedDecay",
    "GateContext",
    "GateOut",
    "GateSpec",
    "HGRN2Gate",
    "LowRankLogSigmoidGate",
    "Mamba2Decay",
    "RWKV6Decay",
    "RWKV6TokenShift",
    "NoGate",
    "alibi_slopes",
    "lightning_log_decay",
    "register_gate",
    "retention_log_decay",
    "shift_tokens",
]

# channel mixers: dense SwiGLU MLP and Mixture-of-Experts 
from jaxlin.layers.mlp import SwiGLU, swiglu_param_count
from jaxlin.layers.base import ParamCounts
from jaxlin.layers.moe import MoE, expert_capacity, moe_param_counts
from jaxlin.layers.routing import Routing, load_balance_loss, route, router_z_loss

__all__ += [
    "MoE",
    "ParamCounts",
    "Routing",
    "SwiGLU",
    "expert_capacity",
    "load_balance_loss",
    "moe_param_counts",
    "route",
    "router_z_loss",
    "swiglu_param_count",
]

# softmax attention (the N layer of hybrid models)
from jaxlin.layers.attention import SoftmaxAttention, document_positions

__all__ += [
    "SoftmaxAttention",
    "document_positions",
]

# Mixture-of-Memories over any linear-attention variant as its core
from jaxlin.layers.mom import MixtureOfMemories

__all__ += ["MixtureOfMemories"]

# linear-attention token mixer (every L variant) and its feature maps 
from jaxlin.layers.feature_maps import FEATURE_MAPS, FeatureMap
from jaxlin.layers.linear_attention import (VARIANTS, LinearAttention, OpStages, Variant,
                                            register_variant)

__all__ += [
    "FEATURE_MAPS",
    "FeatureMap",
    "LinearAttention",
    "OpStages",
    "VARIANTS",
    "Variant",
    "register_variant",
]
