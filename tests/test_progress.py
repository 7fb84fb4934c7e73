"""The progress display: its ETA counts only the steps this process ran, so it stays right
after a resume (the time spent before the resume and on loading is not in it)."""

from __future__ import annotations

from training.utils import metrics
from training.utils.metrics import Progress


def test_eta_after_resume_counts_only_steps_run_here(monkeypatch, capsys):
    now = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    progress = Progress(total_steps=10, start_step=6, desc="sft_loop", plain_interval_s=0.0)
    assert progress.eta() == "?"  # nothing run yet in this process: no guess
    now[0] += 2.0
    progress.update(7, {"loss": "1.5"})
    # 1 step in 2 s, 3 steps left: 6 s, whatever the 6 steps before the resume took.
    assert "sft_loop step 7/10 loss=1.5 eta 00:00:06" in capsys.readouterr().err
    now[0] += 2.0
    progress.update(8, {"loss": "1.4"})
    assert "step 8/10 loss=1.4 eta 00:00:04" in capsys.readouterr().err
    progress.close()
