"""ringattn: exact, balanced, communication-lean ring attention over packed documents."""

from .attention import RingEoDAttention, ring_eod_attention
from .eod import EodMetadata, eod_metadata
from .groups import CPGroups, new_cp_groups
from .layout import DocLayout
from .plan import build_plan, rank_plan

__all__ = [
    "DocLayout",
    "RingEoDAttention",
    "ring_eod_attention",
    "eod_metadata",
    "EodMetadata",
    "build_plan",
    "rank_plan",
    "CPGroups",
    "new_cp_groups",
]
__version__ = "0.1.0"
