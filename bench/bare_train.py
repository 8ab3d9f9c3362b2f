"""The baseline for a train stage: what a user writes with pyarrow and torch, nothing else.

Usage (in a project whose data/ is generated): python bench/bare_train.py EPOCHS OUT.safetensors
Reads the train and val splits from Parquet, trains the default MLP (params.yaml's mlp block:
widths, activation, Adam, cosine schedule, batch size) for EPOCHS epochs with an eager loop and a
validation loss per epoch, and saves the weights.
"""

import sys

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn

epochs, out = int(sys.argv[1]), sys.argv[2]
p = yaml.safe_load(open("params.yaml"))
mlp = p["mlp"]


def read(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = pq.read_table(f"data/{split}.parquet")
    X = torch.stack([torch.from_numpy(table.column(c).to_numpy()) for c in table.column_names[:-1]], dim=1)
    return X, torch.from_numpy(table.column("y").to_numpy()).unsqueeze(1)


X, y = read("train")
X_val, y_val = read("val")
torch.manual_seed(p["seed"])
act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}[mlp["activation"]]
layers, width = [], X.shape[1]
for hidden in mlp["hidden"]:
    layers += [nn.Linear(width, hidden), act()]
    width = hidden
model = nn.Sequential(*layers, nn.Linear(width, 1))
opt = torch.optim.Adam(model.parameters(), lr=mlp["lr"])
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=mlp["epochs"])
batch = mlp["batch_size"]
for epoch in range(epochs):
    perm = torch.randperm(X.shape[0])
    for i in range(0, X.shape[0], batch):
        idx = perm[i : i + batch]
        loss = F.mse_loss(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    sched.step()
    with torch.no_grad():
        val = F.mse_loss(model(X_val), y_val).item()
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
