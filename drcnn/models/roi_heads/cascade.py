"""Cascade R-CNN RoI head: the standard head's stage loop with one full head per stage.

Each stage samples at its own IoU threshold (0.5 / 0.6 / 0.7 from ``cfg.model.roi_head.stages``)
and trains on the previous stage's refined RoIs (gt re-added); at inference every stage
classifies the boxes it sees, the class scores are averaged over the stages, and the boxes come
from the last stage. All of that is the loop in :class:`StandardRoIHeads`; this class only lifts
the one-stage limit.
"""

from __future__ import annotations

from drcnn.models.roi_heads.standard import StandardRoIHeads


class CascadeRoIHeads(StandardRoIHeads):
    """Cascade R-CNN: ``stages`` = one :class:`FastRCNNHead` per configured stage."""

    max_stages = 4
