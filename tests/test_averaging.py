"""stage.ema_decay: the EMA of the trainable parameters becomes the stage output, and survives a resume."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from stage_config import compose_run
from torch import nn

from avglab.run import build_trainer
from avglab.stages.averaging import TrainableEMA

DECAY = 0.5


class Toy(L.LightningModule):
    """One trainable and one frozen layer; one fixed batch per epoch, so a step is an epoch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trained, self.frozen = nn.Linear(3, 2), nn.Linear(3, 2)
        self.frozen.requires_grad_(False)
        self.seen: list[torch.Tensor] = []  # trainable weights after every optimizer step

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.trained(x) + self.frozen(x) - y) ** 2).mean()

    def on_train_batch_end(self, *args):
        self.seen.append(self.trained.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.trained.parameters(), lr=0.5)

    def train_dataloader(self):
        torch.manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(4, 3), torch.randn(4, 2))
        return torch.utils.data.DataLoader(data, batch_size=4)


def fit(module: Toy, steps: int, ckpt_path=None, root=None) -> L.Trainer:
    saving = [ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1)] if root else []
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[TrainableEMA(DECAY), *saving],
        logger=False,
        enable_checkpointing=bool(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=False)
    return trainer


def test_the_stage_output_is_the_average_of_the_trainable_parameters():
    module = Toy()
    start, frozen = module.trained.weight.detach().clone(), module.frozen.weight.detach().clone()
    fit(module, 4)
    expected = start
    for weights in module.seen:  # EMA_t = decay * EMA_{t-1} + (1 - decay) * W_t
        expected = DECAY * expected + (1 - DECAY) * weights
    assert not torch.allclose(module.seen[-1], expected, atol=1e-4)  # the average is not the last step
    torch.testing.assert_close(module.trained.weight.detach(), expected)
    torch.testing.assert_close(module.frozen.weight, frozen)


def test_resuming_keeps_the_average(tmp_path):
    straight = Toy()
    fit(straight, 4)
    fit(Toy(), 2, root=tmp_path)  # "killed" after step 2: last.ckpt is the step-2 checkpoint
    resumed = Toy()
    fit(resumed, 4, ckpt_path=tmp_path / "last.ckpt")
    torch.testing.assert_close(resumed.trained.weight, straight.trained.weight)


def test_decay_outside_zero_one_names_the_key():
    with pytest.raises(ValueError, match="stage.ema_decay"):
        TrainableEMA(1.0)


def test_every_trainer_of_a_stage_with_ema_decay_averages(tmp_path):
    cfg = compose_run(tmp_path, tmp_path / "run", "stage=rglf")  # the tiny recipe sets stage.ema_decay
    emas = [c for c in build_trainer(cfg, tmp_path / "run").callbacks if isinstance(c, TrainableEMA)]
    assert len(emas) == 1
    off = compose_run(tmp_path, tmp_path / "off", "stage=rglf", "stage.ema_decay=null")
    assert not any(isinstance(c, TrainableEMA) for c in build_trainer(off, tmp_path / "off").callbacks)
