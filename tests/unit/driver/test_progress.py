"""The progress display on a fake clock: the start-up phases, and an ETA from the step rate of a
moving window, worked out by hand (raymb.driver.report.progress.Display)."""

from __future__ import annotations

import io

import pytest

from raymb.driver.report.progress import RATE_WINDOW_S, Display


class Clock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def rows(*steps: int) -> list[dict[str, str]]:
    """metrics.csv rows as the tail reads them (strings)."""
    return [{"step": str(s), "train_loss": "0.5", "samples_per_s": "100"} for s in steps]


def test_the_eta_ignores_the_start_up_and_rows_read_together() -> None:
    clock = Clock()
    display = Display(io.StringIO(), 1000, line_every=10, tty=False, clock=clock)
    display.add([], False)  # the first read: no file yet
    clock.now += 20  # 20 s of start-up
    # The first rows come all at once (10 steps gathered in one read): no rate from one read,
    # where the ETA read 0.0s.
    display.add(rows(*range(10, 110, 10)), False)
    assert display.last.step == 100 and display.eta_s() is None
    clock.now += 2
    display.add(rows(110, 120, 130, 140), False)  # 40 steps in 2 s: 20 steps/s
    assert display.rate() == pytest.approx(20.0)
    assert display.eta_s() == pytest.approx((1000 - 140) / 20)  # 43 s; the 20 s start-up not in it
    assert "ETA 43.0s" in display.text(clock.now)


def test_the_rate_follows_a_slowdown_within_the_window() -> None:
    clock = Clock()
    display = Display(io.StringIO(), 10_000, line_every=10, tty=False, clock=clock)
    display.add([], False)
    step = 0
    for _ in range(40):  # 40 s at 10 steps/s
        clock.now += 1
        step += 10
        display.add(rows(step), False)
    assert display.rate() == pytest.approx(10.0)
    for _ in range(40):  # then 40 s at 2 steps/s: the window has forgotten the fast part
        clock.now += 1
        step += 2
        display.add(rows(step), False)
    assert RATE_WINDOW_S < 40
    assert display.rate() == pytest.approx(2.0)
    assert display.eta_s() == pytest.approx((10_000 - step) / 2.0)


def test_a_resumed_runs_old_rows_show_but_do_not_time_the_rate() -> None:
    clock = Clock()
    display = Display(io.StringIO(), 200, line_every=10, tty=False, clock=clock)
    display.add(rows(10, 20, 30), False)  # there before the run started
    clock.now += 30  # the workers start
    display.add(rows(10, 20), True)  # the resume at step 20 rewrote the file
    clock.now += 1
    display.add(rows(30), False)
    assert display.rate() is None  # one read of new steps only
    clock.now += 1
    display.add(rows(40), False)
    assert display.rate() == pytest.approx(10.0)
    assert display.eta_s() == pytest.approx(16.0)


def test_phases_on_a_terminal_then_the_bar() -> None:
    clock = Clock()
    out = Terminal()
    display = Display(out, 100, line_every=10, tty=True, clock=clock)
    display.set_phase("starting Ray")
    clock.now += 3.2
    display.tick()
    assert out.getvalue().split("\r")[-1] == "starting Ray  elapsed 3.2s"
    display.set_phase("starting 2 workers")
    display.add(rows(10), False)  # the first read: rows of an earlier run; still starting
    display.tick()
    assert out.getvalue().split("\r")[-1].startswith("starting 2 workers  elapsed")
    clock.now += 1
    display.add(rows(20), False)  # the first new step ends the phase
    display.tick()
    assert out.getvalue().split("\r")[-1].startswith("step 20/100 [####----")
    assert "\n" not in out.getvalue()  # one line, redrawn in place


def test_phases_elsewhere_are_one_line_each() -> None:
    clock = Clock()
    out = io.StringIO()
    display = Display(out, 100, line_every=0, tty=False, clock=clock)
    display.set_phase("starting Ray")
    display.tick()
    display.set_phase("reading data")
    display.set_phase("starting 1 worker")
    display.add([], False)
    display.tick()
    clock.now += 5
    display.add(rows(10), False)
    display.tick()
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["raymb: starting Ray", "raymb: reading data", "raymb: starting 1 worker"]
    assert len(lines) == 4 and lines[3].startswith("raymb: step 10/100 ")


def test_a_driver_line_on_a_terminal_blanks_the_bar_and_redraws_it(capsys) -> None:
    clock = Clock()
    out = Terminal()
    display = Display(out, 100, line_every=10, tty=True, clock=clock)
    display.set_phase("starting Ray")
    width = len(out.getvalue()) - 1
    display.say("raymb: data.train: 1024 rows")
    assert capsys.readouterr().out == "raymb: data.train: 1024 rows\n"
    drawn = out.getvalue()
    assert drawn.startswith("\rstarting Ray") and "\r" + " " * width + "\r" in drawn
    assert drawn.endswith("starting Ray  elapsed 0.0s")


def test_your_metrics_follow_val_acc_from_metrics_csv(tmp_path) -> None:
    """metrics.csv with metrics.name's columns (val_f1, val_werr): the line shows the last
    validation's, after val_acc; rows without a validation leave them as they were."""
    import csv

    from raymb.driver.report.progress import Watch

    columns = ["step", "train_loss", "val_loss", "val_accuracy", "val_perplexity", "val_f1"]
    columns += ["val_werr", "samples_per_s"]
    metrics_csv = tmp_path / "metrics.csv"
    with open(metrics_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerow(
            {
                "step": 5,
                "train_loss": 0.7,
                "val_loss": 0.6,
                "val_accuracy": 0.75,
                "val_f1": 0.812345,
                "val_werr": 12.5,
                "samples_per_s": 100,
            }
        )
        writer.writerow({"step": 6, "train_loss": 0.5, "samples_per_s": 100})  # no validation
    stream = io.StringIO()
    with Watch(metrics_csv, 10, stream, interval=60) as watch:
        watch.follow_rows()
    line = stream.getvalue().strip().splitlines()[-1]
    assert "step 6/10" in line and "loss 0.5" in line
    assert "val_loss 0.6  val_acc 0.7500  val_f1 0.8123  val_werr 12.5  100 samples/s" in line
    assert "val_perplexity" not in line  # a built-in column, empty: not shown
