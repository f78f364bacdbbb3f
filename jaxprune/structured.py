"""Structured pruning: dependency groups of whole neurons, filters, channels and heads, their
scores and masks, and the surgery that physically removes them.

`find_groups` traces a model's jaxpr to find which slices of which leaves must go together,
`group_scores` / `group_masks` rank and select whole groups, and `shrink` cuts them out so the
model really gets smaller. With ``stacked=`` (layers stacked by ``nn.scan`` or ``nnx.vmap``), a
group whose members all lie on stacked leaves is scored, selected and cut in each layer.
"""

from jaxprune._src.groups import find_groups as find_groups
from jaxprune._src.groups import find_groups_nnx as find_groups_nnx
from jaxprune._src.groups import make_group as make_group
from jaxprune._src.groups import Group as Group
from jaxprune._src.groups import Member as Member
from jaxprune._src.groups import SUPPORTED_PRIMITIVES as SUPPORTED_PRIMITIVES
from jaxprune._src.group_scores import group_scores as group_scores
from jaxprune._src.group_scores import group_masks as group_masks
from jaxprune._src.group_scores import apply_group_masks as apply_group_masks
from jaxprune._src.surgery import shrink as shrink
from jaxprune._src.surgery import shrink_nnx as shrink_nnx
from jaxprune._src.surgery import linen_features as linen_features

__all__ = [
    "Group", "Member", "SUPPORTED_PRIMITIVES", "apply_group_masks", "find_groups",
    "find_groups_nnx", "group_masks", "group_scores", "linen_features", "make_group", "shrink",
    "shrink_nnx",
]
