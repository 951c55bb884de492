"""bench/run.py's round order, the medians it takes of each round's figures, and its rounds over tunnelbench."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

RUN = Path(__file__).resolve().parents[2] / "bench" / "run.py"
_spec = importlib.util.spec_from_file_location("bench_run", RUN)
assert _spec is not None and _spec.loader is not None
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

NAMES = [f"t{i}" for i in range(14)]


def test_every_round_runs_every_tunnel_once() -> None:
    for rnd in range(5):
        assert sorted(run.round_order(NAMES, rnd, 5)) == sorted(NAMES)


def test_no_tunnel_keeps_its_slot_or_its_predecessor() -> None:
    orders = [run.round_order(NAMES, rnd, 5) for rnd in range(5)]
    for name in NAMES:
        slots = {order.index(name) for order in orders}
        before = {order[order.index(name) - 1] if order.index(name) else None for order in orders}
        assert len(slots) >= 3, (name, slots)
        assert min(slots) < len(NAMES) // 2 <= max(slots), (name, slots)  # early in some rounds, late in others
        assert len(before) >= 2, (name, before)
    # the first slot (right after tunnelbench's direct) goes to a different tunnel each round
    assert len({order[0] for order in orders}) == 5


def test_one_round_is_the_given_order() -> None:
    assert run.round_order(NAMES, 0, 1) == NAMES


def test_medians() -> None:
    figures = {
        "direct": {"up_MBps": [10.0, 30.0, 20.0]},
        "a": {"setup_s": [0.11111, 0.2, 0.3], "up_MBps": [1.0, 4.0, 2.0], "halfclose_ok": [True, False, True]},
        "b": {"up_MBps": [1.0, 4.0]},
    }
    merged = run.medians(figures, {"b": "round 2: tunnel exited with 255"})
    assert list(merged) == ["direct", "a", "b"]
    assert merged["direct"] == {"up_MBps": 20.0}
    assert merged["a"] == {"setup_s": 0.2, "up_MBps": 2.0, "halfclose_ok": False}
    assert merged["b"] == {"up_MBps": 2.5, "error": "round 2: tunnel exited with 255"}
    assert run.medians({"a": {"setup_s": [0.11111, 0.2]}}, {})["a"]["setup_s"] == 0.1556  # a round's digits


def test_a_failing_tunnel_keeps_its_rounds_and_the_others_go_on(monkeypatch) -> None:
    """run_rounds over stand-ins for tunnelbench's tunnels and workloads (no network)."""

    class Tunnel:
        def __init__(self, name: str, template: str | None, dport: int) -> None:
            self.name, self.template, self.port, self.setup_s = name, template, dport, None

        def start(self) -> None:
            if self.template == "breaks in round 1" and len(started.get(self.name, [])) == 1:
                started[self.name].append("failed")
                raise RuntimeError("tunnel exited with 255")
            started.setdefault(self.name, []).append("ok")
            self.setup_s = 0.1 if self.template else None

        def stop(self) -> None:
            stopped.append(self.name)

    def figure(port: int, *sizes: int) -> float:
        return float(port)

    bench = SimpleNamespace(
        Tunnel=Tunnel, w_up=figure, w_down=figure, w_rr=figure, w_conc=figure, w_halfclose=lambda port: True
    )
    started: dict[str, list[str]] = {}
    stopped: list[str] = []
    monkeypatch.setattr(run, "load_tunnelbench", lambda: bench)
    monkeypatch.setattr(run, "start_destination", lambda stack: 7)
    results = run.run_rounds({"good": "fine", "bad": "breaks in round 1"}, 3, 1, None)  # type: ignore[arg-type]
    assert started == {"direct": ["ok"] * 3, "good": ["ok"] * 3, "bad": ["ok", "failed"]}
    assert sorted(stopped) == ["bad"] * 2 + ["direct"] * 3 + ["good"] * 3  # the failed start too
    assert results["good"] == {
        "setup_s": 0.1, "up_MBps": 7.0, "down_MBps": 7.0, "rr_conn_per_s": 7.0, "conc_MBps": 7.0, "halfclose_ok": True
    }  # fmt: skip
    assert results["bad"]["error"] == "round 1: tunnel exited with 255"
    assert results["bad"]["up_MBps"] == 7.0  # round 0's figures stay
    assert "setup_s" not in results["direct"]
