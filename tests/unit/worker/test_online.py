"""Online training (--follow) without Ray: which files are taken, how each step's rows split
over the workers, and the settings refused before Ray starts.

The runs, files arriving while the run goes and exactly once across a restart:
tests/integration/test_online_ray.py.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from online_files import G, follow_config, write_file

from raymb import ConfigError, DataError
from raymb.core.order import rank_rows
from raymb.data.arrivals import NotRegular, next_file, open_arrival, open_directory
from raymb.driver.run import follow
from raymb.worker.follow import step_sizes

pytestmark = pytest.mark.timeout(600)


def test_nothing_arriving_is_a_one_line_error(tmp_path):
    started = time.monotonic()
    with pytest.raises(DataError, match="no complete \\*.parquet file arrived within 1 s"):
        follow(follow_config(tmp_path), tmp_path, idle_timeout=1)
    assert time.monotonic() - started >= 1
    with pytest.raises(DataError, match="not a directory"):
        follow(follow_config(tmp_path), tmp_path / "missing", idle_timeout=1)


def test_only_complete_files_are_taken(tmp_path):
    fs, root = open_directory(tmp_path)
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "notes.txt").write_text("")
    write_file(tmp_path, "b.parquet", 5, seed=0)
    (tmp_path / ".a.parquet.tmp").write_bytes((tmp_path / "b.parquet").read_bytes())
    (tmp_path / "a.parquet").write_bytes((tmp_path / "b.parquet").read_bytes()[:-20])
    assert next_file(fs, root, set()) == ("b.parquet", 5)  # a.parquet: its footer is cut off
    assert next_file(fs, root, {"b.parquet"}) is None
    write_file(tmp_path, "a.parquet", 3, seed=1)  # rewritten whole: now it is taken, by name first
    assert next_file(fs, root, set()) == ("a.parquet", 3)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_or_a_device_in_dir_is_skipped_unopened(tmp_path, capsys):
    fs, root = open_directory(tmp_path)
    os.mkfifo(tmp_path / "a.parquet")  # opened for reading, it would block the run
    (tmp_path / "b.parquet").symlink_to("/dev/zero")  # read, it would never end
    write_file(tmp_path, "c.parquet", 4, seed=0)
    warned: set[str] = set()
    assert next_file(fs, root, set(), warned) == ("c.parquet", 4)
    assert next_file(fs, root, {"c.parquet"}, warned) is None
    err = capsys.readouterr().err
    assert "skipping a.parquet for now: it is a FIFO, not a regular file" in err
    assert "skipping b.parquet for now: it is a character device, not a regular file" in err
    assert err.count("skipping a.parquet") == 1  # once per name
    # A name swapped for a FIFO after the listing: refused once open, nothing read.
    with pytest.raises(NotRegular, match="a FIFO"), open_arrival(fs, root, "a.parquet"):
        pass


@pytest.mark.parametrize("rows,world", [(37, 2), (1, 2), (64, 2), (23, 3), (5, 4)])
def test_steps_split_every_row_once(rows, world):
    covered = []
    for start, n in zip(np.cumsum([0, *step_sizes(rows, G)]), step_sizes(rows, G)):
        parts = [rank_rows(int(start), n, world, r) for r in range(world)]
        sizes = [p.stop - p.start for p in parts]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
        covered += [i for p in parts for i in range(p.start, p.stop)]
    assert covered == list(range(rows))
    assert step_sizes(rows, "all") == [rows]


def test_settings_follow_cannot_honour_are_errors(tmp_path):
    write_file(tmp_path, "a.parquet", 4, seed=0)
    with pytest.raises(ConfigError, match="optim.schedule='cosine'"):
        follow(follow_config(tmp_path, "optim.schedule=cosine"), tmp_path, idle_timeout=1)
    with pytest.raises(ConfigError, match="idle-timeout"):
        follow(follow_config(tmp_path), tmp_path, idle_timeout=0)
    labels = tmp_path / "labels"
    labels.mkdir()
    write_file(labels, "a.parquet", 4, seed=0, classes=True)
    with pytest.raises(ConfigError, match="model.num_classes"):
        follow(follow_config(tmp_path), labels, idle_timeout=1)
