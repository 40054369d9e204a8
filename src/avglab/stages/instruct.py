"""Stage 2: visual instruction tuning (Eq. 2), finest granularity."""

from __future__ import annotations

from avglab.stages.pretrain import PretrainStage


class InstructStage(PretrainStage):
    """CE on answer tokens at the finest level (Eq. 2).

    The loss is Eq. 1's; what differs from stage 1 is what the stage config trains (vision
    encoder with its own lr, projector, LLM) and the instruction data.
    """
