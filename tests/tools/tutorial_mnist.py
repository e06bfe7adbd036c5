"""The reference for `make bench`: the classic PyTorch MNIST tutorial's training loop, as written there.

    python tests/tools/tutorial_mnist.py --data data [--epochs 1] [--device cpu|cuda]

torchvision's MNIST dataset decodes every digit through PIL, then ToTensor and Normalize
run per sample; a DataLoader (batch 64, shuffled, no workers) collates them; the net,
SGD (lr 0.01, momentum 0.5), the log every 10 batches, the test pass (batch 1000) and, on
CUDA, one loader worker with pinned memory are the tutorial's. Nothing here comes from
the job package, so the job's speed-ups cannot leak into the reference. Prints one JSON
line: training samples/s over the training loop only, the test accuracy, and the device the
model trained on.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn, optim
from torchvision import datasets, transforms


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def train(model, device, loader, optimizer, epoch, log_interval=10):
    model.train()
    for batch_idx, (data, target) in enumerate(loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % log_interval == 0:
            print(
                f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(loader.dataset)} "
                f"({100.0 * batch_idx / len(loader):.0f}%)]\tLoss: {loss.item():.6f}"
            )


def test(model, device, loader):
    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in loader:
            data, target = data.to(device), target.to(device)
            correct += model(data).argmax(dim=1).eq(target).sum().item()
    return correct / len(loader.dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data", help="directory holding MNIST/raw/")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.manual_seed(1)
    device = torch.device(args.device)
    loader_kwargs = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = datasets.MNIST(args.data, train=True, download=False, transform=transform)
    test_set = datasets.MNIST(args.data, train=False, download=False, transform=transform)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True, **loader_kwargs)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=1000, shuffle=False, **loader_kwargs)
    model = Net().to(device)
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    seconds = 0.0
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        train(model, device, train_loader, optimizer, epoch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
    accuracy = test(model, device, test_loader)
    samples = args.epochs * len(train_set)
    device_used = next(model.parameters()).device.type
    print(
        json.dumps(
            {
                "train_samples_per_second": samples / seconds,
                "test_accuracy": accuracy,
                "seconds": seconds,
                "device": device_used,
            }
        )
    )


if __name__ == "__main__":
    main()
