"""The fleet benchmark: its capacity figure holds for the serving model, arrivals are Poisson
and reproducible, cut-off requests make a percentile a lower bound, a policy this tree
refuses is skipped, and the command runs end to end.

``.ci/run`` runs the documented ``python -m benchmarks.fleet --quick``; the end-to-end
test here runs a smaller fleet so that it stays in the default tier."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import fleet
from benchmarks.fleet_workload import Workload, arrivals, percentile, replica_capacity
from router.fake_engine.serving import ServingModel, ServingParams, token_ids

ROOT = Path(__file__).resolve().parents[2]


def test_capacity_is_what_a_saturated_replica_completes_with_cached_prompts() -> None:
    params = fleet.replica_params([], 1.0)
    workload = Workload(tenants=4, seed=3)
    prompts = [token_ids(p) for p in workload.system_prompts()]
    model = ServingModel(params)
    for p in prompts:
        model.submit(p, 1)
    while (step := model.schedule()) is not None:
        model.complete(step)
    plan = arrivals(workload, 1000.0, 2.0, seed=1)  # far more than one replica can take
    for a in plan:
        model.submit([*prompts[a.tenant], *token_ids(f"<|user|>{a.user}"), 0], a.max_tokens)
    elapsed = 0.0
    start_done = model.counters.finished
    while elapsed < 20.0 and model.waiting:
        step = model.schedule()
        assert step is not None
        elapsed += step.duration_s
        model.complete(step)
    measured = (model.counters.finished - start_done) / elapsed
    assert measured == pytest.approx(replica_capacity(params, workload), rel=0.15)


def test_arrivals_are_a_reproducible_poisson_stream_over_the_tenants() -> None:
    workload = Workload(tenants=7)
    plan = arrivals(workload, 200.0, 10.0, seed=5)
    assert plan == arrivals(workload, 200.0, 10.0, seed=5)
    assert plan != arrivals(workload, 200.0, 10.0, seed=6)
    assert abs(len(plan) - 2000) < 4 * 2000 ** 0.5
    assert {a.tenant for a in plan} == set(range(7))
    assert all(64 <= a.max_tokens <= 192 and 50 <= len(a.user.split()) <= 150 for a in plan)
    assert [a.at_s for a in plan] == sorted(a.at_s for a in plan) and plan[-1].at_s < 10
    lengths = [len(p.split()) for p in workload.system_prompts()]
    assert all(2000 <= n <= 6000 for n in lengths)
    assert len({p[:256] for p in workload.system_prompts()}) == 7  # distinct prefixes


def test_a_skewed_workload_sends_the_first_tenants_the_most() -> None:
    plan = arrivals(Workload(tenants=10, skew=1.0), 500.0, 10.0, seed=2)
    counts = [sum(1 for a in plan if a.tenant == k) for k in range(10)]
    # Zipf, exponent 1: tenant 0 gets 1 / H(10) = 34 % of requests, tenant 9 3.4 %.
    assert counts[0] / len(plan) == pytest.approx(0.341, abs=0.03)
    assert counts[0] > 5 * counts[9]


def test_a_percentile_over_cut_off_requests_is_a_lower_bound() -> None:
    done = [(float(v), False) for v in range(1, 11)]
    assert percentile(done, 0.5) == (5.0, False)
    assert percentile(done, 0.9) == (9.0, False)
    assert percentile([*done[:9], (3.0, True)], 0.9) == (8.0, True)
    assert percentile([*done[:9], (30.0, True)], 0.5) == (5.0, False)
    assert percentile([], 0.9)[0] != percentile([], 0.9)[0]  # nan


def test_a_policy_the_routes_file_refuses_is_named_with_the_reason() -> None:
    assert fleet.refusal("round_robin", [8001, 8002]) is None
    why = fleet.refusal("no_such_policy", [8001])
    assert why is not None and "policy" in why


def test_replica_settings_reach_the_engine_command_line() -> None:
    params = fleet.replica_params(["num_blocks=500"], 0.5)
    argv = fleet.engine_argv(9000, params)
    assert "--simulate" in argv
    assert "num_blocks=500" in argv and "time_scale=0.5" in argv and "max_num_seqs=32" in argv
    with pytest.raises(ValueError, match="NAME=VALUE"):
        fleet.replica_params(["nope=1"], 1.0)


def test_the_performance_doc_states_the_serving_models_defaults() -> None:
    text = (ROOT / "docs" / "performance.md").read_text()
    section = text[text.index("## Fleet simulation"):]
    rows = dict(re.findall(r"^\| `(\w+)` \| `([\d./]+)`", section, re.M))
    defaults = ServingParams()
    assert set(rows) == set(ServingParams.__dataclass_fields__)
    for name, written in rows.items():
        top, _, bottom = written.partition("/")
        value = float(top) / float(bottom or 1)
        assert value == pytest.approx(getattr(defaults, name)), name


def test_the_command_runs_end_to_end_for_every_policy_this_tree_has(tmp_path: Path) -> None:
    out = tmp_path / "fleet.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.fleet", "--quick", "--replicas", "4",
         "--tenants", "8", "--warm", "0.5", "--measure", "1.5", "--drain", "4",
         "--time-scale", "1", "--out", str(out), "--logs", str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    for policy in fleet.POLICIES:
        why = fleet.refusal(policy, [8001])
        if why is None:
            row = re.search(rf"^\| `{policy}` \|(.+)\|$", report, re.M)
            assert row is not None, report
            cells = [c.strip() for c in row.group(1).split("|")]
            assert re.fullmatch(r"(≥ )?\d+\.\d\d", cells[1])  # TTFT p90
            answered, sent = map(int, cells[-2].split("/"))
            assert sent > 0 and answered > 0 and int(cells[-1]) >= 0  # shed (429)
        else:
            assert f"**{policy}**: not available in this tree" in report
    assert "## 80% of capacity" in report and "serving model" in report
