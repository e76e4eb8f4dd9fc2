#!/usr/bin/env python3
"""A small, deterministic PyTorch training job to protect with automigrate.

An LSTM learns to predict the next value of a noisy sum of two sines (generated from the seed,
or read from a CSV file of one value per line). It runs on the CPU only, with one thread and in
float64, with every seed fixed, so two runs with the same arguments print bit-identical losses:
a run restored from a checkpoint prints, from its checkpointed epoch on, exactly the lines an
uninterrupted run prints, while a restart from scratch is visible at once (a new `run=` tag and
`epoch=1` again).

Checkpoint-friendly by construction, for `automigrate.dev/mode: transparent` (CRIU dumps the
process): no GPU, no network, no DataLoader worker processes, and no file kept open between
writes (CRIU restores open files by path and size, and the work directory on the target node is
not the one on the source). Each progress line is appended with one write and closed at once.

Progress, on stdout and appended to <work>/progress.log:
    start run=<tag> t=<unix seconds> torch=<version> data=<generated|path>
    epoch=<n> loss=<repr> hex=<float.hex> val=<repr> run=<tag> t=<unix seconds>
    done epochs=<n> loss=<repr> hex=<float.hex> run=<tag> t=<unix seconds>
and the final training loss alone in <work>/final-loss.txt.

Try it on this machine (Debian: apt-get install python3-torch):
    /usr/bin/python3 examples/pytorch/train.py --work /tmp/pt --epochs 3
"""

import argparse
import math
import os
import random
import time

# One thread before torch starts its pools: reproducible sums, and nothing to contend for.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import torch  # noqa: E402


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/work", help="where progress.log and final-loss.txt go")
    parser.add_argument("--data", default="", help="CSV of one value per line (default: generated)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=24)
    parser.add_argument("--window", type=int, default=32, help="values the model sees per prediction")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument(
        "--epoch-seconds",
        type=float,
        default=0.0,
        help="pause after each epoch, so a short job lasts long enough to be checkpointed and moved",
    )
    return parser.parse_args()


def series(args):
    """The values to learn, and where they came from."""
    if args.data:
        with open(args.data) as handle:
            return [float(line) for line in handle if line.strip()], args.data
    noise = random.Random(args.seed)
    values = [
        math.sin(2 * math.pi * t / 50) + 0.5 * math.sin(2 * math.pi * t / 17 + 1.0)
        + noise.gauss(0.0, 0.05)
        for t in range(1200)
    ]
    return values, "generated"


class Forecaster(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.lstm = torch.nn.LSTM(input_size=1, hidden_size=hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1, :])


def main():
    args = arguments()
    os.makedirs(args.work, exist_ok=True)
    progress = os.path.join(args.work, "progress.log")
    # Drawn at start: a restored process keeps it, a fresh start draws a new one.
    run_tag = random.SystemRandom().randrange(1, 2**31)

    def log(line):
        print(line, flush=True)
        fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float64)
    device = torch.device("cpu")

    values, source = series(args)
    data = torch.tensor(values)
    windows = data.unfold(0, args.window + 1, 1)  # every run of window+1 consecutive values
    x, y = windows[:, :-1].unsqueeze(-1), windows[:, -1:]
    split = int(len(x) * 0.8)
    train_x, train_y, val_x, val_y = x[:split], y[:split], x[split:], y[split:]

    model = Forecaster(args.hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = torch.nn.MSELoss()
    log("start run=%d t=%.6f torch=%s data=%s" % (run_tag, time.time(), torch.__version__, source))

    loss = float("nan")
    for epoch in range(1, args.epochs + 1):
        # The batch order of each epoch depends on the seed and the epoch only.
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        model.train()
        total = 0.0
        for start in range(0, len(order), args.batch):
            picked = order[start:start + args.batch]
            optimizer.zero_grad()
            batch_loss = loss_fn(model(train_x[picked]), train_y[picked])
            batch_loss.backward()
            optimizer.step()
            total += batch_loss.item() * len(picked)
        loss = total / len(order)
        model.eval()
        with torch.no_grad():
            val = loss_fn(model(val_x), val_y).item()
        log("epoch=%d loss=%r hex=%s val=%r run=%d t=%.6f" % (epoch, loss, loss.hex(), val, run_tag, time.time()))
        if args.epoch_seconds > 0:
            time.sleep(args.epoch_seconds)

    log("done epochs=%d loss=%r hex=%s run=%d t=%.6f" % (args.epochs, loss, loss.hex(), run_tag, time.time()))
    final = os.path.join(args.work, "final-loss.txt")
    with open(final + ".tmp", "w") as handle:
        handle.write("%r %s\n" % (loss, loss.hex()))
    os.replace(final + ".tmp", final)


if __name__ == "__main__":
    main()
