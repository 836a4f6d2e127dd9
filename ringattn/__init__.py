"""ringattn: exact, balanced, communication-lean ring attention over packed documents."""
from .attention import RingEoDAttention, ring_eod_attention
from .eod import EodMetadata, eod_metadata
from .layout import DocLayout
from .plan import build_plan, rank_plan

__all__ = ["DocLayout", "RingEoDAttention", "ring_eod_attention", "eod_metadata", "EodMetadata", "build_plan", "rank_plan"]
__version__ = "0.1.0"
