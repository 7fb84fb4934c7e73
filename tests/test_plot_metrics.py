"""scripts/plot_metrics.py: PNG curves from metrics.jsonl (needs the optional matplotlib)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_metrics.py"
_spec = importlib.util.spec_from_file_location("plot_metrics", SCRIPT)
plot_metrics = importlib.util.module_from_spec(_spec)
sys.modules["plot_metrics"] = plot_metrics
_spec.loader.exec_module(plot_metrics)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(log: Path) -> None:
    log.mkdir()
    rows = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-3 * (1 - s / 10),
             "tokens_per_s": 1000.0 + s, "rewards/chosen": 0.1 * s, "accuracy": s / 10,
             "epoch": s / 5} for s in range(1, 6)]
    (log / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                       + '{"step": 6, "lo')  # torn by a crash


def test_writes_one_png_per_curve(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional 'plot' extra")
    log = tmp_path / "run"
    _write_metrics(log)
    assert plot_metrics.main([str(log)]) == 0
    names = sorted(p.name for p in (log / "plots").iterdir())
    assert names == ["accuracy.png", "learning_rate.png", "loss.png", "reward.png",
                     "tokens_per_s.png"]
    for name in names:
        data = (log / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert f"wrote {log / 'plots' / 'loss.png'}" in capsys.readouterr().out


def test_series_skip_torn_lines_and_non_numbers(tmp_path):
    log = tmp_path / "run"
    _write_metrics(log)
    data = plot_metrics.series(plot_metrics.read_rows(log))
    assert data["loss"][0] == [1, 2, 3, 4, 5]
    assert data["loss"][1][0] == 2.0


def test_missing_metrics_and_missing_matplotlib(tmp_path, capsys, monkeypatch):
    assert plot_metrics.main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'metrics.jsonl'} does not exist" in capsys.readouterr().err
    log = tmp_path / "run"
    _write_metrics(log)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert plot_metrics.main([str(log)]) == 2
    assert "needs matplotlib: pip install 'homefire[plot]'" in capsys.readouterr().err


def test_the_loss_figure_holds_losses_only():
    wanted = dict((stem, pred) for stem, _, pred in plot_metrics.FIGURES)["loss"]
    assert [k for k in ("loss", "eval_loss", "loss:sum", "loss_scale", "grad_norm")
            if wanted(k)] == ["loss", "eval_loss", "loss:sum"]
