"""A hand-written torchrun script: the baseline bench/epochs.py times `raymb train` against.

What a practitioner writes without a framework: read the parquet with pyarrow into tensors,
an mlp under DDP (gloo), each epoch a fresh seeded permutation split across the ranks, the
same optimizer, global batch and epochs as raymb's run. Rank 0 writes a JSON line per epoch
(and one at the first step) to --times, with time.time() stamps.

    python -m torch.distributed.run --nproc-per-node 2 bench/ddp_baseline.py --data DIR ...
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="parquet directory (features, label)")
    parser.add_argument("--times", required=True, help="JSON lines of timestamps (rank 0)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist
    from torch import nn

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    table = pq.read_table(args.data)
    x = torch.from_numpy(
        np.stack(table.column("features").to_numpy(zero_copy_only=False)).astype(np.float32)
    )
    y = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    torch.manual_seed(args.seed)
    layers, width = [], x.shape[1]
    for h in args.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(*layers, nn.Linear(width, int(y.max()) + 1))
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    usable = len(y) // world * world

    def stamp(**fields) -> None:
        if rank == 0:
            with open(args.times, "a") as f:
                f.write(json.dumps({"t": time.time(), **fields}) + "\n")

    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))[:usable]
        for start in range(0, usable, args.global_batch):
            rows = order[start : start + args.global_batch]
            mine = rows[rank * len(rows) // world : (rank + 1) * len(rows) // world]
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[mine]), y[mine]).backward()
            optimizer.step()
            step += 1
            if step == 1:
                stamp(first_step=True)
        stamp(epoch=epoch + 1, samples=(epoch + 1) * usable)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
