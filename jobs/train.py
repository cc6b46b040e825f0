"""Train one raymb run as a Ray job, on the cluster the job runs on.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/linear.toml \\
        --name demo --set run.storage_path=/shared/raymb-runs

The entrypoint joins the cluster (it never starts one), trains, and prints where the run's
summary.json is. Submitting again with the same --name resumes the run from its latest
checkpoint. See jobs/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# A job runs from Ray's copy of --working-dir (the repo), where raymb may not be installed:
# import it from that copy. The copy also wins over an installed raymb, so a job always
# runs the code it was submitted with.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402

import raymb  # noqa: E402
from raymb.cli import add_config_arguments  # noqa: E402
from raymb.config import RunSection, to_toml  # noqa: E402
from raymb.driver.report.summary import format_summary  # noqa: E402
from raymb.storage import is_uri  # noqa: E402

PROG = "jobs/train.py"
USAGE_ERROR = 2  # config and data mistakes, as argparse and the raymb CLI
FAILED = 1  # training started but did not finish


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = None
    try:
        config = _load(args)
        if args.print_config:
            print(to_toml(config), end="")
            return 0
        _check_storage(config.run.storage_path)
        run_dir = f"{os.path.expanduser(config.run.storage_path).rstrip('/')}/{config.run.name}"
        print(
            f"{PROG}: run {config.run.name!r} in {run_dir} (submit again with "
            f"--name {config.run.name} to resume it)",
            flush=True,
        )
        result = raymb.train(config, address="auto")  # the job's cluster
    except (raymb.ConfigError, raymb.DataError) as e:
        return _fail(_with_hint(str(e), config), USAGE_ERROR)
    except raymb.RaymbError as e:
        return _fail(str(e), FAILED)
    except ConnectionError as e:  # ray.init found no cluster
        return _fail(
            f"no Ray cluster to join ({_line(e)}); submit this with `ray job submit`, "
            "or run it on a node of a running cluster",
            FAILED,
        )
    except KeyboardInterrupt:
        return _fail("interrupted; submit again with the same --name to resume", 130)

    print(f"{PROG}: done")
    print(format_summary(result.summary, result.run_dir))
    print(f"{PROG}: summary {result.run_dir / 'summary.json'}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train one raymb run on the Ray cluster this runs on: the entrypoint of "
        "`ray job submit --working-dir . -- python jobs/train.py --config FILE ...`. It joins "
        "the cluster (it never starts one), and a run whose name exists is resumed from its "
        "latest checkpoint.",
        epilog="Paths in the config are read on the cluster: a relative path starts in Ray's "
        "copy of --working-dir, which leaves out what .gitignore lists (data/, runs/). Give "
        "data and run.storage_path as URIs of a bucket (s3://...) or as absolute paths on a "
        "filesystem every node shares. Exit status: 0 done, 1 training failed, 2 bad config or "
        "data, 130 interrupted.",
    )
    add_config_arguments(parser, required=True)
    parser.add_argument(
        "--name",
        metavar="RUN",
        help="run name, the run's directory under run.storage_path; an existing "
        "run of that name is resumed. Default: run.name if the config or --set "
        "gives one, else the config file's stem and the UTC time, e.g. "
        "linear-20261122-031500",
    )
    return parser


def _load(args: argparse.Namespace) -> raymb.Config:
    """The config with --set applied, then the run name: --name, else the config's, else derived."""
    config = raymb.load_config(args.config, args.overrides)
    if args.name is not None:
        name = args.name
    elif config.run.name != RunSection().name:
        return config
    else:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        # A run name may not start with '.' (raymb's temporary siblings do): .x.toml -> x-...
        name = f"{Path(args.config).stem.lstrip('.')}-{stamp}"
    try:
        run = dataclasses.replace(config.run, name=name)
    except raymb.ConfigError as e:  # the name came from --name or the file's name, not run.name
        if args.name is not None:
            raise raymb.ConfigError(f"--name: {e}") from None
        where = f"the run name from --config {args.config}"
        raise raymb.ConfigError(f"{where}: {e}; give --name NAME") from None
    return dataclasses.replace(config, run=run)


def _check_storage(path: str) -> None:
    """The run directory must outlive the job and be the same for every node and submission:
    an absolute path (on a filesystem every node shares) or an object-store URI."""
    if not is_uri(path) and not os.path.isabs(os.path.expanduser(path)):
        raise raymb.ConfigError(
            f"run.storage_path={path!r} is relative: in a Ray job the run would land in Ray's "
            "temporary copy of --working-dir and could not be resumed; set "
            "--set run.storage_path=DIR, an absolute DIR on a filesystem every node shares, or "
            "a bucket URI (s3://BUCKET/runs)"
        )


def _with_hint(message: str, config: raymb.Config | None) -> str:
    """Explain a missing relative data path, the usual first-job mistake."""
    if config is None:
        return message
    missing = [
        p
        for p in (config.data.train, config.data.val)
        if p
        and f"no such file or directory: {p}" in message
        and not os.path.isabs(os.path.expanduser(p))
    ]
    if not missing:
        return message
    return (
        f"{message} (relative to the job's directory {os.getcwd()}, Ray's copy of "
        "--working-dir, which leaves out .gitignored data/; give data.train and data.val as "
        "absolute paths every node can read, e.g. --set data.train=$PWD/data/linear/train)"
    )


def _line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
