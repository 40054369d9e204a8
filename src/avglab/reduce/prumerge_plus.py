"""LLaVA-PruMerge+ (Shang et al. 2024, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient LMMs").

Before the LLM, per AnyRes tile (global view and each local tile: the method is defined per image
the vision encoder sees):

1. score every patch by the attention the vision encoder's [CLS] query pays it, in the layer that
   reads the selected features (single-head softmax(q_cls k^T / sqrt(C)) over all keys, as the public code);
2. keep the outliers by the interquartile-range rule (score > Q3 + 1.5 IQR: PruMerge's adaptive budget)
   plus spatially uniform samples (PruMerge+: the stride is a third of 1 / outlier share);
3. merge: every kept token adds the [CLS]-attention-weighted sum of its ``neighbours`` (32) most
   similar other tokens by key cosine similarity.

``keep`` replaces the adaptive budget by a fixed share (a quarter outliers by score, the rest uniform,
the adaptive default's proportion). At a pooled granularity a cell's score is the attention mass of
its patches and its key their mean. Differences from the public code, on purpose: merging acts on the
projected (LLM-space) tokens, where avglab pools; a tile without outliers keeps its top token; the
extra token the code appends (the attention-weighted sum of the pruned tokens) is left out, since it
has no place in AnyRes's row layout. A row of the local map whose tokens are all pruned loses its
``image_newline`` too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avglab.core.packing import pack_image
from avglab.reduce.base import ReduceConfigError, Reduction

NEWLINE_MARK = 2.0  # in the packed keep map: 1 kept, 0 pruned, 2 an image_newline


def cls_attention(hidden_states: tuple, vision_tower, feature_layer) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] attention over the patches and the patch keys, in the layer that reads the selected features.

    Args:
        hidden_states: the vision tower's hidden states (embeddings first), each (T, 1 + P, Cv).
        vision_tower: a CLIP-style vision model (``encoder.layers``, or under ``vision_model``, with
            ``layer_norm1`` and ``self_attn.q_proj``/``k_proj``).
        feature_layer: the config's ``vision_feature_layer`` (int or list; the last entry counts).

    Returns:
        (T, P) attention of [CLS] to each patch and (T, P, Cv) patch keys.
    """
    layers = getattr(vision_tower, "vision_model", vision_tower).encoder.layers
    index = feature_layer[-1] if isinstance(feature_layer, (list, tuple)) else feature_layer
    index = index % len(hidden_states)  # hidden_states[i] is the input of layers[i]
    if index >= len(layers):  # the last layer's output was selected: use the last layer's own attention
        index = len(layers) - 1
    layer = layers[index]
    normed = layer.layer_norm1(hidden_states[index])
    q = layer.self_attn.q_proj(normed[:, :1])  # (T, 1, Cv)
    k = layer.self_attn.k_proj(normed)  # (T, 1 + P, Cv)
    attn = ((q @ k.transpose(1, 2)).float() * k.shape[-1] ** -0.5).softmax(-1)[:, 0]  # (T, 1 + P)
    return attn[:, 1:], k[:, 1:]


def pool_cues(attn: torch.Tensor, keys: torch.Tensor, grid: int, kernel) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and keys at a pooled level: attention mass and mean key per cell.

    Args:
        attn: (T, g*g) [CLS] attention.
        keys: (T, g*g, Cv) patch keys.
        grid: g, patches per tile side.
        kernel: the level's pooling kernel.

    Returns:
        (T, N) and (T, N, Cv) over the level's N cells (row-major).
    """
    kernel = tuple(kernel) if isinstance(kernel, (list, tuple)) else (kernel, kernel)
    tiles = len(attn)
    area = kernel[0] * kernel[1]
    mass = F.avg_pool2d(attn.view(tiles, 1, grid, grid), kernel) * area
    mean_keys = F.avg_pool2d(keys.transpose(1, 2).reshape(tiles, -1, grid, grid).float(), kernel)
    return mass.flatten(1), mean_keys.flatten(2).transpose(1, 2)


def iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    """(N,) bool: scores above Q3 + 1.5 (Q3 - Q1) (PruMerge's adaptive selection)."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    return scores > q3 + 1.5 * (q3 - q1)


def select_tokens(scores: torch.Tensor, keep: float | None) -> torch.Tensor:
    """One tile's kept cells: top-scored plus spatially uniform samples.

    Args:
        scores: (N,) [CLS] attention per cell.
        keep: None for the adaptive budget (IQR outliers, uniform stride ``int(1/ratio) // 3``), or a share.

    Returns:
        (N,) bool.
    """
    n = len(scores)
    order = torch.sort(scores, descending=True, stable=True).indices
    kept = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if keep is None:
        top = max(int(iqr_outliers(scores).sum()), 1)
        kept[order[:top]] = True
        step = int(n / top)  # int(1 / ratio)
        kept[torch.arange(step // 6, n - 1, max(step // 3, 1), device=scores.device)] = True
        return kept
    total = min(max(int(round(keep * n)), 1), n)
    top = max(int(round(total / 4)), 1)
    kept[order[:top]] = True
    rest = (~kept).nonzero()[:, 0]
    if total > top:  # evenly spread over the cells not yet kept
        pick = torch.linspace(0, len(rest) - 1, total - top, device=scores.device).round().long()
        kept[rest[pick]] = True
    return kept


def merge_tokens(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor, neighbours: int
) -> torch.Tensor:
    """Each kept token plus the score-weighted sum of its most key-similar other tokens.

    Args:
        features: (N, C) one tile's tokens.
        scores: (N,) their [CLS] attention.
        keys: (N, Cv) their keys.
        kept: (N,) bool.
        neighbours: tokens merged into each kept one (the paper's code: 32).

    Returns:
        (N, C) with the kept rows updated (the others unchanged; they are dropped afterwards).
    """
    index = kept.nonzero()[:, 0]
    count = min(neighbours, len(features) - 1)
    if count < 1 or not len(index):
        return features
    unit = F.normalize(keys.float(), dim=-1)
    similarity = unit[index] @ unit.T  # (k, N)
    similarity[torch.arange(len(index)), index] = -torch.inf  # never itself
    near = similarity.topk(count, dim=1).indices  # (k, count)
    added = (scores[near, None].to(features.dtype) * features[near]).sum(1)
    merged = features.clone()
    merged[index] = features[index] + added
    return merged


def keep_newlines(marks: torch.Tensor, base: int) -> torch.Tensor:
    """Which packed tokens stay: kept cells, and each ``image_newline`` whose row kept a cell.

    Args:
        marks: (n,) packed keep map (1 kept, 0 pruned, ``NEWLINE_MARK`` newline).
        base: tokens before the first row that a newline ends (the global view of a multi-tile image).
    """
    newline = marks == NEWLINE_MARK
    row = torch.cumsum(newline.long(), 0) - newline.long()  # a newline belongs to the row it ends
    row[:base] = -1
    kept = marks == 1
    rows_kept = torch.zeros(int(row.max()) + 2, dtype=torch.bool, device=marks.device)
    rows_kept[row[kept & (row >= 0)]] = True
    return kept | (newline & rows_kept[row.clamp(min=0)] & (row >= 0))


class PruMergePlus(Reduction):
    """PruMerge+ on each tile, at the level the selector (or a fixed level) chose.

    Args:
        keep: None for the paper's adaptive budget, or a share of each tile's tokens.
        neighbours: tokens merged into each kept token.
    """

    name = "prumerge_plus"
    needs_vision_cues = True

    def __init__(self, keep: float | None = None, neighbours: int = 32):
        if keep is not None and not 0.0 < float(keep) <= 1.0:
            raise ReduceConfigError(f"reduce.keep={keep}: a share of each tile's tokens in (0, 1], or null")
        if neighbours < 0:
            raise ReduceConfigError(f"reduce.neighbours={neighbours}: must be >= 0")
        self.keep = None if keep is None else float(keep)
        self.neighbours = int(neighbours)

    @property
    def label(self) -> str:
        """Row name with the settings."""
        return "prumerge_plus" if self.keep is None else f"prumerge_plus(keep={self.keep:g})"

    def settings(self) -> dict:
        """The settings behind the label."""
        return {"name": self.name, "keep": self.keep, "neighbours": self.neighbours}

    def vision_cues(self, hidden_states: tuple, vision_tower, feature_layer):
        """What ``pack_image`` needs from the vision pass: [CLS] attention and keys per tile."""
        attn, keys = cls_attention(hidden_states, vision_tower, feature_layer)
        return attn.detach(), keys.detach()

    def pack_image(self, core, tiles: torch.Tensor, cues, image_size, level: int) -> torch.Tensor:
        """One image's visual tokens: per tile select and merge, then AnyRes packing of the kept cells.

        Args:
            core: the ``AvgCore`` (geometry, newline).
            tiles: (T, C, rows, cols) the image's pooled tiles at ``level``.
            cues: ((T, g*g), (T, g*g, Cv)) from ``vision_cues`` for these tiles.
            image_size: original (height, width).
            level: granularity index.

        Returns:
            (n, C) packed tokens, n <= the unreduced count.
        """
        kernel = core.scaler.kernels[level]
        scores, keys = pool_cues(*cues, core.grid, kernel)
        count, channels, rows, cols = tiles.shape
        flat = tiles.flatten(2).transpose(1, 2)  # (T, N, C)
        merged, kept = [], []
        for t in range(count):
            keep = select_tokens(scores[t], self.keep)
            merged.append(merge_tokens(flat[t], scores[t], keys[t], keep, self.neighbours))
            kept.append(keep)
        merged = torch.stack(merged).transpose(1, 2).reshape(count, channels, rows, cols)
        marks = torch.stack(kept).to(tiles.dtype).view(count, 1, rows, cols)
        geometry = (image_size, core.config.image_grid_pinpoints, core.tile_size, core.grid, kernel)
        packed = pack_image(merged, *geometry, core.llava.model.image_newline)
        packed_marks = pack_image(marks, *geometry, torch.full((1,), NEWLINE_MARK, dtype=tiles.dtype))[:, 0]
        base = rows * cols if count > 1 else 0
        return packed[keep_newlines(packed_marks, base)]
