"""The pytorch/examples MNIST recipe, written plainly in PyTorch, on Fashion-MNIST.

Network: 2 conv + 2 FC with dropout; Adadelta lr 1.0, batch 64, StepLR gamma 0.7, test batch 1000,
ToTensor + Normalize. After each epoch prints one JSON line: epoch, test accuracy, unix time, img/s.
Usage: python benchmarks/reference_plain.py --data /usr/share/datasets/fashion-mnist --epochs 6
"""
import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

T_START = time.time()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.optim.lr_scheduler import StepLR  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def torchvision_root(idx_folder: Path) -> Path:
    """A root in torchvision's layout (FashionMNIST/raw/, uncompressed) holding the given idx files."""
    root = Path(tempfile.mkdtemp(prefix="fmnist-tv-"))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in idx_folder.iterdir():
        if f.suffix == ".gz":
            (raw / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
        else:
            os.symlink(f, raw / f.name)
    return root


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--gamma", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    root = torchvision_root(a.data)
    train = datasets.FashionMNIST(root, train=True, download=False, transform=tf)
    test = datasets.FashionMNIST(root, train=False, download=False, transform=tf)
    kw = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
    train_loader = torch.utils.data.DataLoader(train, batch_size=a.batch_size, shuffle=True, **kw)
    test_loader = torch.utils.data.DataLoader(test, batch_size=1000, **kw)
    model = Net().to(device)
    opt = torch.optim.Adadelta(model.parameters(), lr=a.lr)
    sched = StepLR(opt, step_size=1, gamma=a.gamma)
    for epoch in range(1, a.epochs + 1):
        model.train()
        t0, n = time.time(), 0
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = F.nll_loss(model(x), y)
            loss.backward()
            opt.step()
            n += len(y)
        train_s = time.time() - t0
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                x, y = x.to(device), y.to(device)
                correct += (model(x).argmax(1) == y).sum().item()
        sched.step()
        print(json.dumps({"epoch": epoch, "acc": correct / len(test), "unix_time": time.time(),
                          "start_time": T_START, "img_s": round(n / train_s, 1)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
