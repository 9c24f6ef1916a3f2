"""Who holds the stop signals (llm/signals.py): the entry point installs them once and restores them
as it ends; training holds them at step boundaries. The stops themselves (a checkpoint at the end of
the step, the printed resume command, SLURM's requeue) are tested in test_faults.py and test_cluster.py."""

from __future__ import annotations

import json
import signal

from support import callbacks, llm_here

OURS = "StopSignals._handle"


def test_a_stop_signal_during_training_is_ours_and_the_entry_point_restores_what_was_there(runs, tmp_path):
    """Lightning (2.6) wraps SIGTERM in a handler of its own as fit starts, which would raise its
    SIGTERMException before the step's checkpoint: training puts the run's handler back. This fails
    if Lightning's handler (or any other) is the one in place while the run trains."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    out = tmp_path / "handlers.json"
    probe = json.dumps({"class_path": "tests.helpers.SignalHandlers", "init_args": {"out": str(out)}})
    result = llm_here(*runs.args(tmp_path / "run", "--trainer.max_steps=2", callbacks(probe), probes=()))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text()) == {"SIGTERM": OURS, "SIGUSR1": OURS, "SIGINT": OURS}
    assert {s: signal.getsignal(s) for s in before} == before
