"""What the iTPN network outputs: the one description of its stage and pyramid channels/strides.

HiViT's stage widths, the pyramid's laterals, the Detectron2 adapter's ``output_shape``, the
UPerNet concat channels and timm's ``feature_info`` all read it, so a change happens here once.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

# (name, stride, module) of the backbone stages and of the pyramid levels. Each stage merge halves
# the resolution and doubles the width, so a stage at stride s has embed_dim * s / 16 channels.
STAGES = (("c2", 4, "backbone.stage4"), ("c3", 8, "backbone.stage8"), ("c4", 16, "backbone.blocks"))
LEVELS = (("p2", 4, "pyramid.out4"), ("p3", 8, "pyramid.out8"), ("p4", 16, "pyramid.out16"))


def stage_channels(embed_dim: int) -> Tuple[int, ...]:
    """Channels of the stride-4, 8 and 16 backbone stages (``embed_dim`` / 4, / 2, / 1)."""
    top = STAGES[-1][1]
    return tuple(embed_dim * stride // top for _, stride, _ in STAGES)


def feature_info(embed_dim: int, fpn_dim: Optional[int] = None) -> List[Dict[str, Any]]:
    """Backbone stages ``c2``-``c4``, then (if ``fpn_dim``) pyramid levels ``p2``-``p4``.

    Entries use timm's keys (``num_chs``, ``reduction``, ``module``) plus ``name`` and ``kind``
    (``"stage"`` or ``"pyramid"``).

    Args:
        embed_dim: channels of the stride-16 stage.
        fpn_dim: pyramid channels; ``None`` or 0 for a model without pyramid.
    """
    info = [dict(name=name, kind="stage", num_chs=c, reduction=s, module=m)
            for (name, s, m), c in zip(STAGES, stage_channels(embed_dim))]
    if fpn_dim:
        info += [dict(name=name, kind="pyramid", num_chs=fpn_dim, reduction=s, module=m)
                 for name, s, m in LEVELS]
    return info
