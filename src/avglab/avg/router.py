"""AVG-LLaVA's visual granularity router (METHOD 1.2).

The selector interface and the fixed/random baselines are in ``avglab.core.selector``. Every selector
maps a batch to router logits (B, N) over the granularities (coarse to fine) and a chosen level per
sample. The router routes each tile (global view and local tiles) on its own, attending across that
tile's tokens (batch-first: pitfall 1), and averages the tile logits per image, so images of one batch
never see each other (pitfall 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avglab.core.selector import RouterInput


def filter_instruction(
    instruction: torch.Tensor, mask: torch.Tensor, visual: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keeps the k instruction tokens most similar to the finest visual tokens (METHOD 1.2 step 1).

    Args:
        instruction: (T, Q, C) instruction embeddings per tile.
        mask: (T, Q) valid instruction tokens.
        visual: (T, V, C) finest-level visual tokens per tile.
        k: tokens to keep.

    Returns:
        (T, k, C) kept tokens (zero where fewer than k were valid) and their (T, k) validity mask;
        padding is never picked because its score is -inf and its slot stays masked.
    """
    sim = F.normalize(instruction, dim=-1) @ F.normalize(visual, dim=-1).transpose(1, 2)  # (T, Q, V)
    score = sim.mean(dim=-1).masked_fill(~mask, float("-inf"))  # (T, Q)
    if score.shape[1] < k:  # fewer instruction slots than k: pad so topk is defined
        score = F.pad(score, (0, k - score.shape[1]), value=float("-inf"))
        instruction = F.pad(instruction, (0, 0, 0, k - instruction.shape[1]))
    top = score.topk(k, dim=1)
    kept = instruction.gather(1, top.indices[..., None].expand(-1, -1, instruction.shape[-1]))
    valid = torch.isfinite(top.values)
    return kept * valid[..., None], valid


class GranularityRouter(nn.Module):
    """AVG-LLaVA's router: instruction filter, one Transformer layer, MLP to N logits, voter W.

    Args:
        hidden_size: LLM embedding size C.
        tokens_per_tile: granularity token counts, coarse to fine (sets the sequence length).
        k: instruction tokens kept (0 = image-only router, ablation (c)).
        num_heads: attention heads of the Transformer layer.
        ffn_size: feed-forward size of the Transformer layer (None: the hidden size).
        mlp_size: hidden size of the token-to-logits MLP.
        dropout: dropout inside the Transformer layer.
        input_levels: indices (0 = coarsest) of the levels whose tokens form the sequence (None: all N,
            the paper). The router still scores all N levels; reading only the coarse ones shortens L
            from 1148 to e.g. 36+72+144+32 = 284 per tile, and attention is quadratic in L.
        width: size of the Transformer layer (None: the LLM hidden size C, the paper). Set, a linear map
            C -> width projects every token first, and the layer, FFN and MLP run at that width.
    """

    def __init__(
        self,
        hidden_size: int,
        tokens_per_tile: list[int],
        k: int = 32,
        num_heads: int = 8,
        ffn_size: int | None = None,
        mlp_size: int | None = None,
        dropout: float = 0.0,
        input_levels: list[int] | None = None,
        width: int | None = None,
    ):
        super().__init__()
        self.num_levels = len(tokens_per_tile)
        self.input_levels = check_input_levels(input_levels, self.num_levels)
        if width is not None and width < 1:
            raise ValueError(f"router.width must be >= 1 (null: the LLM hidden size), got {width}")
        # the narrow router's projection (a variant, not the paper): its layer costs (width / C)^2
        self.project = nn.Linear(hidden_size, width) if width else None
        width = width or hidden_size
        if k < 0:
            raise ValueError(f"router.k must be >= 0 (0 = image-only), got {k}")
        if width % num_heads:
            raise ValueError(f"router.num_heads={num_heads} must divide the router's width {width}")
        self.k = k
        # L = 36+72+144+288+576+32 = 1148 in the paper (all levels read)
        self.seq_len = sum(tokens_per_tile[i] for i in self.input_levels) + k
        self.layer = nn.TransformerEncoderLayer(
            width,
            num_heads,
            # FFN = hidden size by default: that is what makes the router 1.66% of the 7B model (METHOD 1.2)
            dim_feedforward=ffn_size or width,
            dropout=dropout,
            activation="gelu",
            batch_first=True,  # attend across the L tokens of a tile, not across tiles (pitfall 1)
            norm_first=True,
        )
        mlp_size = mlp_size or width
        self.mlp = nn.Sequential(nn.Linear(width, mlp_size), nn.GELU(), nn.Linear(mlp_size, self.num_levels))
        self.voter = nn.Parameter(torch.full((self.seq_len,), 1.0 / self.seq_len))  # W in R^{1 x L}

    def forward(self, inputs: RouterInput) -> torch.Tensor:
        """Router logits per sample.

        Returns:
            (B, N) logits: Z_final = W Z_out per tile, averaged over the tiles of each image.
            Samples without an image get zeros (a uniform distribution); so does a batch without
            any image (see :meth:`no_tile_logits`).
        """
        if not inputs.levels or not len(inputs.tile_owner):
            return self.no_tile_logits(inputs.batch_size)
        tokens = [lvl.flatten(2).transpose(1, 2) for lvl in inputs.levels]  # each (T, n_l, C)
        visual = torch.cat([tokens[i] for i in self.input_levels], dim=1)  # (T, sum n_l read, C)
        valid = torch.ones(visual.shape[:2], dtype=torch.bool, device=visual.device)
        if self.k:
            owner = inputs.tile_owner
            # the filter compares with the finest level even where the sequence leaves it out (step 1)
            kept, kept_valid = filter_instruction(
                inputs.instruction[owner], inputs.instruction_mask[owner], tokens[-1], self.k
            )
            # Slots no tile fills (instructions shorter than k) are masked keys that vote nothing: drop
            # them (exact; topk puts the valid slots first). With one image per call no mask is left, and
            # the layer's inference fast path without a padding mask is 2x faster on CPU.
            used = int(kept_valid.sum(1).max())
            visual = torch.cat([visual, kept[:, :used].to(visual.dtype)], dim=1)  # (T, L' <= L, C)
            valid = torch.cat([valid, kept_valid[:, :used]], dim=1)
        if self.project is not None:
            visual = self.project(visual)  # (T, L', width)
        hidden = self.layer(visual, src_key_padding_mask=None if bool(valid.all()) else ~valid)
        token_logits = self.mlp(hidden) * valid[..., None]  # Z_out (T, L', N); padding votes nothing
        voter = self.voter[: token_logits.shape[1]]  # W's dropped slots would multiply zeros
        tile_logits = torch.einsum("l,tln->tn", voter.to(token_logits.dtype), token_logits)
        return average_per_sample(tile_logits, inputs.tile_owner, inputs.batch_size)

    def no_tile_logits(self, batch_size: int) -> torch.Tensor:
        """(B, N) zero logits for a batch without any image, still a graph over every router parameter.

        Text-only samples carry no routing preference (pitfall 7), so a stage-4 step on a
        text-only micro-batch has an exact zero loss; through this graph its backward still gives
        every router parameter a (zero) gradient, so DDP with ``find_unused_parameters=false``
        reduces all its buckets on every rank, with or without gradient accumulation.
        """
        anchor = sum(p.sum() for p in self.parameters()) * 0.0
        return anchor.new_zeros(batch_size, self.num_levels) + anchor


def check_input_levels(input_levels: list[int] | None, num_levels: int) -> list[int]:
    """``router.input_levels`` as sorted level indices (all N for None); fails naming the key."""
    if input_levels is None:
        return list(range(num_levels))
    levels = sorted({int(i) for i in input_levels})
    if not levels or levels[0] < 0 or levels[-1] >= num_levels or len(levels) != len(input_levels):
        raise ValueError(
            f"router.input_levels={list(input_levels)}: give distinct level indices in [0, {num_levels - 1}] "
            "(0 = the coarsest), or null for all levels"
        )
    return levels


def average_per_sample(tile_values: torch.Tensor, owner: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean of (T, N) tile values per owning sample -> (B, N); samples with no tile get zeros."""
    total = tile_values.new_zeros(batch_size, tile_values.shape[1]).index_add(0, owner, tile_values)
    count = torch.bincount(owner, minlength=batch_size).clamp(min=1).to(tile_values.dtype)
    return total / count[:, None]
