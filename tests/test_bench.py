"""The benchmark harness (``make bench``): its pure parts without wrk, plus one bounded smoke run.

No wall-clock number is asserted anywhere: the machine is shared, only shapes and arithmetic are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench.cpu import cpu_seconds, descendants, parse_stat, spent, ticks_per_second
from bench.fleet import (
    FleetConfig,
    Sample,
    cumulative,
    most_in_window,
    schedule,
    section,
    series,
    sliding_log,
    summarize,
    trailing,
    update_marked,
)
from bench.fleet import plot as plot_fleet
from bench.fleet import run as run_fleet
from bench.report import (
    PROFILE_PLACEHOLDER,
    Cell,
    Context,
    Scenario,
    ScenarioResult,
    X,
    cell_table,
    compare,
    kept_sections,
    merge_kept,
    render,
)
from bench.wrk import MARKER, WrkResult, lua_script, parse_output, wrk_command

ROOT = Path(__file__).resolve().parent.parent

WRK_STDOUT = """Running 5s test @ http://127.0.0.1:40000/v1/chat/completions
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    46.62ms    8.99ms  78.24ms   74.93%
  Latency Distribution
     50%   46.12ms
     99%   75.94ms
  1360 requests in 2.01s, 6.14MB read
Requests/sec:    678.09
WRK_JSON {"requests":1360,"duration_us":2000000,"bytes":6433066,"errors":{"connect":0,"read":2,"write":0,\
"status":3,"timeout":1},"latency_us":{"mean":46621.4,"max":78240.0,"p50":46121.0,"p90":57426.0,\
"p99":75943.0,"p99.9":77837.0}}
"""


def result(rps: float, p50: float, p99: float, status_errors: int = 0) -> WrkResult:
    return WrkResult(
        requests=int(rps * 5),
        seconds=5.0,
        status_errors=status_errors,
        socket_errors={"connect": 0, "read": 0, "write": 0, "timeout": 0},
        latency_ms={
            "mean": p50,
            "max": p99 * 2,
            "p50": p50,
            "p90": p99 * 0.8,
            "p99": p99,
            "p99.9": p99 * 1.5,
        },
    )


# -- wrk: the script and its output -------------------------------------------------------------------


def test_lua_script_posts_the_body_and_prints_json_when_done() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": 'it\'s "quoted"'}], "stream": True}
    script = lua_script(body, headers={"Authorization": "Bearer sk-x"})
    assert 'wrk.method = "POST"' in script
    quoted = script.split("wrk.body = [==[", 1)[1].split("]==]", 1)[0]
    assert json.loads(quoted) == body
    assert 'wrk.headers["Content-Type"] = "application/json"' in script
    assert 'wrk.headers["Authorization"] = "Bearer sk-x"' in script
    assert "function done(summary, latency, requests)" in script
    assert f'MARKER = "{MARKER}"' in script
    for percentile in ("percentile(50)", "percentile(90)", "percentile(99)", "percentile(99.9)"):
        assert percentile in script


def test_lua_script_refuses_a_body_it_cannot_quote() -> None:
    with pytest.raises(ValueError):
        lua_script({"content": "]==]"})


def test_wrk_output_is_read_from_the_done_hooks_json_line() -> None:
    parsed = parse_output(WRK_STDOUT)
    assert parsed.requests == 1360
    assert parsed.seconds == pytest.approx(2.0)
    assert parsed.rps == pytest.approx(680.0)
    assert parsed.status_errors == 3
    assert parsed.socket_errors == {"connect": 0, "read": 2, "write": 0, "timeout": 1}
    assert parsed.errors == 6
    assert parsed.latency_ms["p50"] == pytest.approx(46.121)
    assert parsed.latency_ms["p99.9"] == pytest.approx(77.837)
    assert parsed.latency_ms["mean"] == pytest.approx(46.6214)


def test_wrk_output_without_the_json_line_is_an_error() -> None:
    with pytest.raises(ValueError, match="WRK_JSON"):
        parse_output("Running 5s test @ http://x\n  0 requests in 5.00s\n")


def test_wrk_command_uses_one_thread_and_the_script() -> None:
    argv = wrk_command("/usr/bin/wrk", "http://h/v1/chat/completions", Path("/s.lua"), 32, 5)
    assert argv[0] == "/usr/bin/wrk"
    assert argv[argv.index("--threads") + 1] == "1"
    assert argv[argv.index("--connections") + 1] == "32"
    assert argv[argv.index("--duration") + 1] == "5s"
    assert argv[argv.index("--script") + 1] == "/s.lua"
    assert "--latency" in argv
    assert argv[-1] == "http://h/v1/chat/completions"


# -- ratios and added latency -------------------------------------------------------------------------


def test_ratios_and_added_latency_are_against_direct_and_floor() -> None:
    rows = compare(
        {
            "sidecar-redis": result(250, 4.0, 9.0),
            "direct": result(1000, 1.0, 3.0),
            "floor": result(500, 2.0, 5.0),
        }
    )
    assert [r.target for r in rows] == ["direct", "floor", "sidecar-redis"]
    by = {r.target: r for r in rows}
    assert by["direct"].vs_direct == pytest.approx(1.0)
    assert by["direct"].vs_floor == pytest.approx(2.0)
    assert by["sidecar-redis"].vs_direct == pytest.approx(0.25)
    assert by["sidecar-redis"].vs_floor == pytest.approx(0.5)
    assert by["sidecar-redis"].added_p50 == pytest.approx(3.0)
    assert by["sidecar-redis"].added_p99 == pytest.approx(6.0)
    assert by["floor"].added_p50 == pytest.approx(1.0)
    assert by["direct"].added_p50 == pytest.approx(0.0)


def test_without_a_baseline_the_ratios_are_absent() -> None:
    rows = compare({"sidecar-memory": result(100, 1.0, 2.0)})
    assert rows[0].vs_direct is None
    assert rows[0].vs_floor is None
    assert rows[0].added_p50 is None


def test_the_fastest_round_is_kept_and_every_rounds_errors_counted() -> None:
    cell = Cell(32, False)
    done = ScenarioResult(Scenario("zero", "Zero", "", (), (cell,), 3, rounds=3))
    assert done.add(cell, "floor", result(400, 2.0, 5.0, status_errors=1))
    assert done.add(cell, "floor", result(500, 1.5, 4.0))
    assert not done.add(cell, "floor", result(450, 1.8, 4.5, status_errors=2))
    assert done.results[cell]["floor"].rps == pytest.approx(500)
    assert done.errors_seen[(cell, "floor")] == 3
    table_text = "\n".join(cell_table(done.results[cell], {"floor": 3}))
    assert "| 0; 3 in all rounds |" in table_text


# -- the Markdown report ------------------------------------------------------------------------------


def outcome() -> ScenarioResult:
    cells = (Cell(1, False), Cell(32, True))
    scenario = Scenario("zero", "Zero-latency upstream", "The mock answers at once.", (), cells, 5)
    done = ScenarioResult(scenario)
    for cell in cells:
        done.add(cell, "direct", result(1000, 1.0, 3.0))
        done.add(cell, "floor", result(500, 2.0, 5.0))
        done.add(cell, "sidecar-memory", result(250, 4.0, 9.0, status_errors=2))
    done.skipped["nginx"] = "nginx is not installed"
    done.access_lines["sidecar-memory"] = 1234
    return done


def rendered(profile_slot: bool = True) -> str:
    context = Context("`make bench` (ran `python bench/run.py`)", "Linux x86_64, 2 cores", "5 s per run")
    images = {
        "zero": {"throughput": "benchmarks/zero-throughput.png", "latency": "benchmarks/zero-latency.png"}
    }
    calls = {("memory", False): 1500.4, ("memory", True): 3415.0, ("redis", False): 1800.0}
    return render(context, [outcome()], calls, images, profile_slot=profile_slot)


def test_report_has_a_table_per_cell_with_ratios_and_added_latency() -> None:
    text = rendered()
    assert text.startswith("# Benchmarks\n")
    assert "Command: `make bench` (ran `python bench/run.py`)" in text
    assert "Linux x86_64, 2 cores" in text
    assert "share these cores over loopback" in text
    assert "### 1 connection, JSON" in text
    assert "### 32 connections, SSE" in text
    ratios = f"{X} direct | {X} floor"
    cpu = f"CPU µs/req | CPU {X} floor"
    header = f"| target | req/s | {ratios} | p50 ms | p99 ms | p50 added ms | p99 added ms | {cpu} | errors |"
    assert text.count(header) == 2
    assert "| `direct` | 1000 | 1.00 | 2.00 | 1.00 | 3.00 | — | — | — | — | 0 |" in text
    row = "| `sidecar-memory` | 250 | 0.25 | 0.50 | 4.00 | 9.00 | +3.00 | +6.00 | — | — | 2 (status 2) |"
    assert row in text
    assert "![Zero-latency upstream: throughput](benchmarks/zero-throughput.png)" in text
    assert "![Zero-latency upstream: latency](benchmarks/zero-latency.png)" in text
    assert "Skipped — `nginx`: nginx is not installed." in text
    assert "`sidecar-memory` 1234" in text


def test_report_summarises_and_counts_python_calls() -> None:
    text = rendered()
    assert "## At a glance (zero-latency upstream)" in text
    assert "| 1 connection, JSON | 1000 | 500 | — | 250 | 0.50 | — | — | +3.00 |" in text
    assert "## Python calls per request" in text
    assert "| memory store | 1500 | 3415 |" in text
    assert "| redis store | 1800 | — |" in text


def test_the_results_report_has_no_profile_slot_the_docs_one_does() -> None:
    assert "<!-- profile -->" not in rendered(profile_slot=False)
    assert kept_sections(rendered())["profile"] == PROFILE_PLACEHOLDER


# -- docs/benchmarks.md: hand-written sections survive ------------------------------------------------


def test_a_hand_written_profile_survives_regeneration() -> None:
    previous = (
        "# Benchmarks\n\nold numbers\n\n<!-- profile -->\n## Profile\n\npy-spy says: JSON parsing.\n"
        "<!-- /profile -->\n\n<!-- notes -->\nA note with no slot.\n<!-- /notes -->\n"
    )
    merged = merge_kept(rendered(), previous)
    assert "py-spy says: JSON parsing." in merged
    assert "None yet." not in merged
    assert "old numbers" not in merged
    assert merged.rstrip().endswith("<!-- notes -->\nA note with no slot.\n<!-- /notes -->")
    assert merged.count("<!-- profile -->") == 1
    assert merge_kept(merged, merged) == merged  # regenerating again changes nothing


def test_without_a_previous_file_or_markers_the_placeholder_is_written() -> None:
    generated = rendered()
    assert merge_kept(generated, None) == generated
    assert merge_kept(generated, "# Benchmarks\n\nno markers\n") == generated


def test_the_committed_docs_keep_a_profile_section() -> None:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert "profile" in kept_sections(text)
    for link in [line.split("](", 1)[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]:
        assert (ROOT / "docs" / link).is_file(), link


# -- plots, floor.py --help, and the whole harness ----------------------------------------------------


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is the bench extra (`make bench` installs it)")
    from bench.plots import plot_scenario

    written = plot_scenario(outcome(), tmp_path)
    assert set(written) == {"throughput", "latency"}
    for path in written.values():
        assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("script", "flag"),
    [
        ("floor.py", "--upstream"),
        ("run.py", "--update-docs"),
        ("work.py", "--redis-url"),
        ("streams.py", "--ramp"),
        ("estimate_error.py", "--encoding"),
    ],
)
def test_bench_scripts_help_runs(script: str, flag: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert flag in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_the_harness_measures_direct_and_floor_with_wrk(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (`make bench` installs it with apt-get)")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (`make system-deps`): the floor needs it")
    report = tmp_path / "report.md"
    argv = [
        sys.executable,
        str(ROOT / "bench" / "run.py"),
        *("--targets", "direct,floor", "--scenarios", "zero", "--connections", "32"),
        *("--duration", "1", "--warmup", "0", "--rounds", "1", "--work-requests", "0", "--no-fleet"),
        *("--output", str(report)),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=80, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    text = report.read_text()
    assert "### 32 connections, JSON" in text
    assert "### 32 connections, SSE" in text
    for target in ("direct", "floor"):
        rows = [line.split(" | ") for line in text.splitlines() if line.startswith(f"| `{target}` | ")]
        assert len(rows) == 2
        if Path("/proc/self/stat").exists():  # CPU µs/req was read for the target (mock for direct)
            assert all(float(row[-3]) > 0 for row in rows), rows
    assert "direct, c=32 SSE:" in done.stderr  # progress lines on stderr
    assert "CPU µs/req" in done.stderr
    assert "[fleet]" not in done.stderr


# -- CPU per request (bench/cpu.py) -------------------------------------------------------------------

STAT = "4242 (python3 (x) y) S 4200 4242 4242 0 -1 4194560 9 0 0 0 250 40 7 3 20 0 2 0 100 1 2 3\n"


def test_proc_stat_is_read_past_a_command_name_with_spaces_and_parentheses() -> None:
    assert parse_stat(STAT) == (4200, 290)  # ppid; utime 250 + stime 40, children's 7 + 3 excluded
    with pytest.raises(ValueError):
        parse_stat("garbage")


def test_a_process_tree_is_walked_from_the_root() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 20: 1, 13: 11}
    assert sorted(descendants(10, parents)) == [10, 11, 12, 13]
    assert descendants(99, parents) == [99]


def test_cpu_of_a_process_includes_its_live_children(tmp_path: Path) -> None:
    def fake(pid: int, ppid: int, utime: int, stime: int) -> None:
        (tmp_path / str(pid)).mkdir()
        line = f"{pid} (nginx: w) S {ppid} 1 1 0 -1 0 0 0 0 0 {utime} {stime} 500 500 20 0 1 0 1 1 1\n"
        (tmp_path / str(pid) / "stat").write_text(line)

    fake(100, 1, 10, 5)  # master
    fake(101, 100, 300, 100)  # worker
    fake(200, 1, 9999, 9999)  # unrelated
    (tmp_path / "self").mkdir()
    assert cpu_seconds(100, tmp_path) == pytest.approx(415 / ticks_per_second())
    assert cpu_seconds(101, tmp_path) == pytest.approx(400 / ticks_per_second())
    assert cpu_seconds(300, tmp_path) is None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc only")
def test_this_process_cpu_time_is_read_from_proc() -> None:
    import os

    first = cpu_seconds(os.getpid())
    sum(i * i for i in range(300_000))
    assert first is not None and (cpu_seconds(os.getpid()) or 0) >= first


def test_cpu_per_request_and_its_ratio_to_the_floor() -> None:
    assert spent(1.0, 3.5) == pytest.approx(2.5)
    assert spent(None, 3.5) is None
    with_cpu = {
        "direct": replace(result(1000, 1.0, 3.0), cpu_seconds=1.0),  # 5000 requests: 200 µs each
        "floor": replace(result(500, 2.0, 5.0), cpu_seconds=2.5),  # 2500: 1000 µs
        "sidecar-redis": replace(result(250, 4.0, 9.0), cpu_seconds=3.125),  # 1250: 2500 µs
        "nginx": result(900, 1.1, 3.1),  # CPU not read
    }
    by = {row.target: row for row in compare(with_cpu)}
    assert by["direct"].cpu_us == pytest.approx(200)
    assert by["sidecar-redis"].cpu_us == pytest.approx(2500)
    assert by["sidecar-redis"].cpu_vs_floor == pytest.approx(2.5)
    assert by["floor"].cpu_vs_floor == pytest.approx(1.0)
    assert by["nginx"].cpu_us is None and by["nginx"].cpu_vs_floor is None
    text = "\n".join(cell_table(with_cpu))
    assert f"| CPU µs/req | CPU {X} floor | errors |" in text
    assert "| `sidecar-redis` | 250 | 0.25 | 0.50 | 4.00 | 9.00 | +3.00 | +6.00 | 2500 | 2.50 | 0 |" in text
    assert "| `nginx` | 900 | 0.90 | 1.80 | 1.10 | 3.10 | +0.10 | +0.10 | — | — | 0 |" in text


def test_the_glance_table_and_the_reading_text_carry_cpu_per_request() -> None:
    done = outcome()
    for cell in done.scenario.cells:
        for target, cpu in (("direct", 1.0), ("floor", 2.5), ("sidecar-memory", 2.5)):
            kept = done.results[cell][target]
            done.results[cell][target] = replace(kept, cpu_seconds=cpu)
    context = Context("`make bench`", "Linux x86_64, 2 cores", "5 s per run")
    text = render(context, [done], {}, {})
    header = "| load | direct req/s | floor req/s | floor CPU µs/req | `sidecar-memory` req/s |"
    assert header in text
    # 1250 requests in 5 s at 250 req/s: 2000 µs each, 2 x the floor's 1000.
    assert "| 1 connection, JSON | 1000 | 500 | 1000 | 250 | 0.50 | 2000 | 2.00 | +3.00 |" in text
    assert "CPU per request is the steadier number" in text
    assert "`/proc/<pid>/stat`" in text


# -- the fleet plot (bench/fleet.py) ------------------------------------------------------------------


def test_a_sliding_log_admits_the_limit_per_window_and_resumes_as_entries_leave() -> None:
    times = [i * 0.5 for i in range(200)]  # 2 per second for 100 s
    admitted = sliding_log(times, 10, 60.0)
    kept = [t for t, ok in zip(times, admitted, strict=True) if ok]
    assert kept[:10] == [i * 0.5 for i in range(10)]
    assert kept[10:12] == [60.0, 60.5]  # the first entries leave the window at 60 s
    assert len(kept) == 20
    assert most_in_window(kept, 60.0) == 10


def test_cumulative_trailing_and_most_in_a_window() -> None:
    times = [0.5, 1.0, 1.0, 2.5, 61.5]
    assert cumulative(times, [0.0, 1.0, 3.0, 62.0]) == [0, 3, 4, 5]
    assert trailing(times, [1.0, 61.0, 61.5, 62.0], 60.0) == [3, 1, 2, 2]  # (t - 60, t]
    assert most_in_window(times, 60.0) == 4
    assert most_in_window([], 60.0) == 0


def fleet_samples() -> tuple[FleetConfig, list[Sample]]:
    """3 pods, limit 4/min, 12 requests 1 s apart for 12 s, then one at 61 s: exact fleet admission."""
    config = FleetConfig(pods=3, limit=4, rate=1.0, seconds=12.0)
    samples = []
    for index, (offset, pod) in enumerate(schedule(config)):
        status = 200 if index < 4 else 429
        samples.append(Sample(offset, offset + 0.01, pod, status))
    samples.append(Sample(61.0, 61.02, 0, 200))
    samples.append(Sample(61.5, 61.52, 1, 0))  # no HTTP answer
    return config, samples


def test_the_schedule_is_even_and_round_robin() -> None:
    plan = schedule(FleetConfig(pods=3, limit=1, rate=4.0, seconds=1.5))
    assert plan == [(0.0, 0), (0.25, 1), (0.5, 2), (0.75, 0), (1.0, 1), (1.25, 2)]


def test_fleet_samples_are_summarised_against_exact_and_per_pod_limiting() -> None:
    config, samples = fleet_samples()
    summary = summarize(samples, config)
    assert summary.offered == 14
    assert summary.admitted == 5 and summary.rejected == 8
    assert summary.other == {0: 1}
    assert summary.per_pod == [3, 1, 1]  # pods 0, 1, 2, 0 then the one at 61 s on pod 0
    assert summary.per_pod_rejected == [2, 3, 3]
    assert summary.most_in_window == 4
    assert summary.exact == 6  # a sliding log admits 4 in the first minute, then both at 61 s
    assert summary.per_pod_limits == 14  # no pod alone is sent more than 4 within 60 s
    assert summary.first_rejected == pytest.approx(4.01)


def test_fleet_series_share_one_grid() -> None:
    config, samples = fleet_samples()
    data = series(samples, config, step=0.5)
    assert data.grid[0] == 0.0 and data.grid[-1] >= 61.52
    n = len(data.grid)
    lists = [data.offered, data.admitted, data.rejected, data.per_pod_limits, data.window_admitted]
    assert all(len(values) == n for values in [*lists, *data.per_pod, data.window_per_pod_limits])
    at = data.grid.index(20.0)
    assert (data.offered[at], data.admitted[at], data.rejected[at]) == (12, 4, 8)
    assert [counts[at] for counts in data.per_pod] == [2, 1, 1]
    assert data.admitted[-1] == 5 and data.window_admitted[-1] == 3  # answered at 2.01, 3.01, 61.02
    assert max(data.window_admitted) == 4


def test_the_fleet_section_states_what_was_measured_and_how() -> None:
    config, samples = fleet_samples()
    block = section(
        summarize(samples, config), config, "quotas/fleet-admitted.png", "`make bench`", "2 cores"
    )
    assert block.startswith("<!-- fleet-plot -->\n### Measured: 3 sidecars, one limit\n")
    assert block.endswith("<!-- /fleet-plot -->")
    assert (
        "![Admitted vs the limit over time: 3 sidecars sharing one Redis](quotas/fleet-admitted.png)" in block
    )
    assert "`requestsPerMinute: 4`" in block
    assert "| admitted by the fleet (200) | **5** (pod 1 3, pod 2 1, pod 3 1) |" in block
    assert "| rejected (429) | 8, the first after 4.0 s |" in block
    assert f"| other answers | 1 {X} no answer |" in block
    assert "| most admitted in any 60 s (by answer time) | **4** (limit 4) |" in block
    assert "answered 429 on every pod" in block
    assert "first admissions leave the sliding window" in block  # the run went past 60 s
    assert "Regenerated by `make bench`; machine: 2 cores." in block


def test_only_the_marked_section_of_the_doc_is_rewritten() -> None:
    doc = "# Quotas\n\nbefore\n\n<!-- fleet-plot -->\nold plot\n<!-- /fleet-plot -->\n\nafter\n"
    block = "<!-- fleet-plot -->\nnew plot \\1 $x\n<!-- /fleet-plot -->"
    updated = update_marked(doc, block)
    assert updated == "# Quotas\n\nbefore\n\n" + block + "\n\nafter\n"
    assert update_marked(updated, block) == updated
    assert update_marked("# Quotas\n", block) == "# Quotas\n\n" + block + "\n"


def test_the_fleet_plot_is_written_as_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is the bench extra (`make bench` installs it)")
    config, samples = fleet_samples()
    path = plot_fleet(series(samples, config), summarize(samples, config), config, tmp_path / "f.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_the_committed_quotas_doc_has_the_fleet_section_and_its_image() -> None:
    text = (ROOT / "docs" / "quotas.md").read_text()
    assert text.count("<!-- fleet-plot -->") == 1 and text.count("<!-- /fleet-plot -->") == 1
    for line in text.splitlines():
        if line.startswith("![") and "fleet" in line:
            assert (ROOT / "docs" / line.split("](", 1)[1].rstrip(")")).is_file()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_three_real_sidecars_on_one_redis_admit_the_limit_and_no_more(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (`make system-deps`)")
    from tests.support.redis_procs import RedisServer

    config = FleetConfig(pods=3, limit=5, rate=6.0, seconds=3.0)
    with RedisServer() as redis:
        samples = run_fleet(config, tmp_path, redis.url)
    summary = summarize(samples, config)
    assert summary.offered == 18
    assert (summary.admitted, summary.rejected, summary.other) == (5, 13, {})
    assert summary.exact == 5 and summary.per_pod_limits == 15
    assert sorted({s.pod for s in samples}) == [0, 1, 2]
