"""The live status table of a search: what it shows, from Tune's callback events alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdray.search.progress import SearchProgress


@dataclass
class FakeTrial:
    """What Tune's callbacks hand over about a trial (id, sampled config, last result)."""

    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)
    status: str = "PENDING"


def test_table_follows_trials_from_start_to_stop_and_names_the_best(capsys: Any) -> None:
    progress = SearchProgress("demo", "val/acc", "max", num_samples=3, budget=4, method="kd", every_s=0)
    kd = FakeTrial("run_00001_a1", {"overrides": {"method.name": "kd", "method.temperature": 3.14159}})
    stkd = FakeTrial("run_00002_b2", {"overrides": {"method.name": "stkd", "method.alpha": 0.5}})
    progress.on_trial_start(0, [], kd)
    progress.on_trial_start(0, [], stkd)
    progress.on_trial_result(0, [], kd, {"epoch": 1, "val/acc": 0.5})
    progress.on_trial_result(0, [], stkd, {"epoch": 2, "val/acc": 0.7})
    stkd.last_result = {"epoch": 2, "val/acc": 0.7}
    progress.on_trial_complete(0, [], stkd)  # before its budget of 4 epochs: the scheduler stopped it
    kd.last_result = {"epoch": 4, "val/acc": 0.9}
    progress.on_trial_complete(0, [], kd)
    last = capsys.readouterr().out.strip().split("search demo:")[-1]
    assert last.startswith(" 2/3 trials ended (1 done, 1 stopped early, 0 failed), 0 running")
    assert "best val/acc 0.9000 (a1)" in last and "left <= " in last
    rows = {line.split()[0]: line for line in last.splitlines()[2:]}
    assert rows["a1"].split()[1:5] == ["kd", "4/4", "0.9000", "done"] and "temperature=3.14" in rows["a1"]
    assert "stopped early" in rows["b2"] and "2/4" in rows["b2"] and "alpha=0.5" in rows["b2"]
    assert all(ch == "\n" or ch.isprintable() for ch in last)  # plain text: reads the same in a log file


def test_a_resumed_search_shows_its_restored_trials_and_times_only_its_own_epochs(capsys: Any) -> None:
    """Tune hands a resumed search the callback as pickled when the search first started: no trials, the first
    start's clock. The table comes back from the restored trials, elapsed counts from the resume, and the time
    left is estimated from the epochs trained since (none yet: unknown, not hours off)."""
    import pickle
    import time

    first = SearchProgress("demo", "val/acc", "max", num_samples=3, budget=4, method="kd", every_s=0)
    first.started -= 3 * 3600  # the driver died; the search is resumed three hours later
    progress = pickle.loads(pickle.dumps(first))
    done = FakeTrial("run_00001_a1", {"overrides": {"method.name": "kd"}}, {"epoch": 4, "val/acc": 0.8}, "TERMINATED")
    running = FakeTrial("run_00002_b2", {"overrides": {"method.name": "dkd"}}, {"epoch": 1, "val/acc": 0.3}, "RUNNING")
    progress.setup(num_samples=3)
    progress.on_step_begin(0, [done, running])
    progress.show()
    header, _, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.startswith("search demo: 1/3 trials ended (1 done, 0 stopped early, 0 failed), 0 running")
    assert "best val/acc 0.8000 (a1)" in header and "elapsed 0:00 | left ?" in header
    assert [row.split()[:5] for row in rows] == [
        ["a1", "kd", "4/4", "0.8000", "done"],
        ["b2", "dkd", "1/4", "0.3000", "pending"],
    ]
    progress.on_trial_start(0, [done, running], running)
    progress.started = time.time() - 60  # a minute into the resumed search, b2 trains its second epoch
    progress.on_trial_result(0, [done, running], running, {"epoch": 2, "val/acc": 0.4})
    header = capsys.readouterr().out.strip().split("search demo:")[-1].splitlines()[0]
    assert "1 running" in header and "elapsed 1:00 | left <= 6:00" in header  # 1 epoch a minute, 6 to go
