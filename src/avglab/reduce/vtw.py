"""VTW (Lin et al. 2024, "Boosting Multimodal LLMs with Visual Tokens Withdrawal"): all visual tokens leave.

After layer K every visual token is withdrawn: by then, the paper argues, their information has moved
into the text tokens (it picks K by a KL-divergence criterion on held-out data; here K is a setting).
K = L withdraws nothing; K = 0 feeds the LLM no visual token at all.
"""

from __future__ import annotations

import torch

from avglab.reduce.base import InLLMReduction


class VTW(InLLMReduction):
    """VTW: no visual token after layer K.

    Args:
        layer: K (0..L).
    """

    name = "vtw"

    @property
    def label(self) -> str:
        """Row name with the settings."""
        return f"vtw(K={self.layer})"

    def settings(self) -> dict:
        """The settings behind the label."""
        return {"name": self.name, "layer": self.layer}

    def choose(self, layer, hidden, position_embeddings, mask, visual) -> torch.Tensor:
        """None of them."""
        return torch.zeros_like(visual)
