import pytest
import torch
from tiny_batches import LEVELS

from avglab.core.seqpack import first_fit_rows, pack_rows


def test_first_fit_rows_places_every_sequence_once_within_capacity():
    lengths = [9, 2, 5, 4, 1, 7]
    rows = first_fit_rows(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert rows == [[0, 4], [5, 1], [2, 3]]  # longest first, each into the first row with room


def test_first_fit_rows_refuses_a_sequence_longer_than_a_row():
    with pytest.raises(ValueError, match="does not fit a row of 4"):
        first_fit_rows([3, 5], 4)


def test_pack_rows_restarts_positions_and_never_targets_a_sequence_start():
    embeds = [torch.full((n, 2), float(i)) for i, n in enumerate([4, 1, 3])]
    labels = [torch.tensor([7, 8, 9, 10]), torch.tensor([11]), torch.tensor([12, 13, 14])]
    out, positions, labs, segments = pack_rows(embeds, labels)
    assert out.shape == (2, 4, 2)  # [seq 0], [seq 2, seq 1]
    assert positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]
    assert segments.tolist() == [[0, 0, 0, 0], [2, 2, 2, 1]]
    assert labs.tolist() == [[-100, 8, 9, 10], [-100, 13, 14, -100]]
    assert out[1, :, 0].tolist() == [2.0, 2.0, 2.0, 1.0]


def test_packed_scores_equal_one_sequence_per_row(routed_core, batch):
    n = len(LEVELS)
    encoded = routed_core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
    levels = torch.arange(n).repeat(len(batch["input_ids"]))
    visual = routed_core.pack(encoded, batch["image_sizes"], levels)
    args = [batch[k].repeat_interleave(n, 0) for k in ("input_ids", "attention_mask")]
    labels = batch["labels"].repeat_interleave(n, 0)
    with torch.no_grad():
        padded = routed_core.splice(*args, visual, labels)
        packed = routed_core.splice_packed(*args, visual, labels)
        assert len(packed.embeds) < len(padded.embeds)  # variants really share rows
        assert packed.embeds.numel() < 0.7 * padded.embeds.numel()
        ref_mean, ref_count, ref_loss = routed_core.score(padded)
        mean, count, loss = routed_core.score(packed)
    assert count.tolist() == ref_count.tolist()
    torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
