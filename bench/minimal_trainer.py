"""A minimal Ray Train script: the baseline bench/startup.py times against `raymb train`.

What raymb's run does up to its first step, written plainly: start a local Ray, read the
parquet with Ray Data, a TorchTrainer with the same workers and CPUs per worker, an mlp
under DDP, batches from iter_torch_batches, one report per step. A callback on the
controller (as raymb's metrics.csv writer is) writes --first-step-file at the first report.

    python bench/minimal_trainer.py --data DIR --storage DIR --first-step-file FILE
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="parquet directory (features, label)")
    parser.add_argument("--storage", required=True, help="Ray Train storage_path")
    parser.add_argument("--first-step-file", required=True, help="written at the first report")
    parser.add_argument("--name", default="minimal", help="run name")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--classes", type=int, default=3)
    args = parser.parse_args()
    from raymb.timeline import stamp  # bench/startup.py's phases (RAYMB_TIMELINE)

    stamp("checked")
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    W = args.workers
    # The same cluster and worker size as raymb.driver.connect chooses.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, W + 1), include_dashboard=False)
    stamp("ray", session_dir=ray._private.worker._global_node.get_session_dir_path())
    total = ray.cluster_resources()["CPU"]
    cpus = min(1.0, max(total - 1, total / 2) / W)
    ray.data.DataContext.get_current().execution_options.preserve_order = True

    class FirstReport(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            path = Path(args.first_step_file)
            if not path.exists():
                path.write_text(f"{metrics[0]['step']}\n")

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "batch": args.global_batch // W,
            "steps": args.steps,
            "features": args.features,
            "classes": args.classes,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=W, resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name=args.name,
            storage_path=str(Path(args.storage).resolve()),
            callbacks=[FirstReport()],
        ),
        datasets={"train": ray.data.read_parquet(args.data)},
    )
    stamp("read")  # nothing read yet: the workers read the dataset as they iterate
    trainer.fit()
    ray.shutdown()


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from torch import nn

    from raymb.timeline import process_started, stamp

    rank = ray.train.get_context().get_world_rank()
    stamp("worker process", rank, t=process_started())
    stamp("loop", rank)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(config["features"], 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, config["classes"]),
    )
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=config["batch"])
    for step, batch in enumerate(batches, start=1):
        loss = nn.functional.cross_entropy(model(batch["features"]), batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1:
            stamp("first step", rank)
        ray.train.report({"step": step, "loss": loss.item()})
        if step == config["steps"]:
            break


if __name__ == "__main__":
    main()
