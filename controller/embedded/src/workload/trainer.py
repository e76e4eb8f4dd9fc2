# The demo's training workload: a small two-layer network (tanh hidden layer, softmax output)
# trained with mini-batch SGD on the dataset under /data, in float64 with one BLAS thread so
# every run computes bit-identical losses. It keeps no file open between writes: CRIU restores
# open files by path and size, and the progress file on the target node differs from the one on
# the source. Each progress line is appended with one write and closed at once.
#
# Progress lines (parsed by workload.rs):
#   start run=<tag> t=<unix seconds>
#   epoch=<n> loss=<repr> hex=<float.hex> run=<tag> t=<unix seconds>
#   done epochs=<n> run=<tag> t=<unix seconds>
# The run tag is drawn when the program starts: a restored process keeps it, a fresh start
# draws a new one. That is how the demo tells a resumed run from a restarted one.
import json
import os
import random
import sys
import time

os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
import numpy as np  # noqa: E402

data_dir, work_dir = sys.argv[1], sys.argv[2]
epochs, hidden, seed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
learning_rate = float(sys.argv[6])
run_tag = random.SystemRandom().randrange(1, 2**31)


def log(line):
    fd = os.open(os.path.join(work_dir, "progress.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


with open(os.path.join(data_dir, "dataset.json")) as handle:
    meta = json.load(handle)
features, classes = meta["features"], meta["classes"]
paths = [os.path.join(data_dir, entry["path"]) for entry in meta["files"]]

rng = np.random.default_rng(seed)
w1 = rng.standard_normal((features, hidden)) / np.sqrt(features)
b1 = np.zeros(hidden)
w2 = rng.standard_normal((hidden, classes)) / np.sqrt(hidden)
b2 = np.zeros(classes)


def load(path):
    rows = np.fromfile(path, dtype="<f4").astype(np.float64).reshape(-1, features + 1)
    return rows[:, :features], rows[:, features].astype(np.int64)


log("start run=%d t=%.6f" % (run_tag, time.time()))
for epoch in range(1, epochs + 1):
    total, count = 0.0, 0
    for path in paths:
        x, y = load(path)
        for start in range(0, len(y), 128):
            xb, yb = x[start:start + 128], y[start:start + 128]
            h = np.tanh(xb @ w1 + b1)
            z = h @ w2 + b2
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            picked = np.arange(len(yb))
            total += float(-np.log(p[picked, yb]).sum())
            count += len(yb)
            g = p
            g[picked, yb] -= 1.0
            g /= len(yb)
            grad_w2, grad_b2 = h.T @ g, g.sum(axis=0)
            gh = (g @ w2.T) * (1.0 - h * h)
            grad_w1, grad_b1 = xb.T @ gh, gh.sum(axis=0)
            w1 -= learning_rate * grad_w1
            b1 -= learning_rate * grad_b1
            w2 -= learning_rate * grad_w2
            b2 -= learning_rate * grad_b2
    loss = total / count
    log("epoch=%d loss=%r hex=%s run=%d t=%.6f" % (epoch, loss, loss.hex(), run_tag, time.time()))
log("done epochs=%d run=%d t=%.6f" % (epochs, run_tag, time.time()))
