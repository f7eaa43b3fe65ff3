"""The same pytorch/examples recipe as reference_plain.py, written with PyTorch Lightning.

Same network, optimizer, schedule, batch sizes and data; one JSON line per epoch.
Needs `pip install lightning` (the `bench` extra).
"""
import argparse
import json
import sys
import time
from pathlib import Path

T_START = time.time()

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.optim.lr_scheduler import StepLR  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from reference_plain import Net, torchvision_root  # noqa: E402


class LitNet(L.LightningModule):
    def __init__(self, lr, gamma, n_test):
        super().__init__()
        self.net, self.lr, self.gamma, self.n_test = Net(), lr, gamma, n_test
        self.correct, self.t0, self.seen = 0, 0.0, 0

    def training_step(self, batch, _):
        x, y = batch
        self.seen += len(y)
        return F.nll_loss(self.net(x), y)

    def on_train_epoch_start(self):
        self.t0, self.seen = time.time(), 0

    def on_train_epoch_end(self):
        self.train_s = time.time() - self.t0

    def validation_step(self, batch, _):
        x, y = batch
        self.correct += (self.net(x).argmax(1) == y).sum().item()

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            self.correct = 0
            return
        print(json.dumps({"epoch": self.current_epoch + 1, "acc": self.correct / self.n_test,
                          "unix_time": time.time(), "start_time": T_START,
                          "img_s": round(self.seen / max(time.time() - self.t0, 1e-9), 1)}), flush=True)
        self.correct = 0

    def configure_optimizers(self):
        opt = torch.optim.Adadelta(self.parameters(), lr=self.lr)
        return [opt], [StepLR(opt, step_size=1, gamma=self.gamma)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    L.seed_everything(a.seed, verbose=False)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    root = torchvision_root(a.data)
    train = datasets.FashionMNIST(root, train=True, download=False, transform=tf)
    test = datasets.FashionMNIST(root, train=False, download=False, transform=tf)
    trainer = L.Trainer(max_epochs=a.epochs, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(LitNet(1.0, 0.7, len(test)), torch.utils.data.DataLoader(train, batch_size=64, shuffle=True),
                torch.utils.data.DataLoader(test, batch_size=1000))


if __name__ == "__main__":
    sys.exit(main())
