"""The benchmark harness (``make bench``): its pure parts without wrk, plus one bounded smoke run.

No wall-clock number is asserted anywhere: the machine is shared, only shapes and arithmetic are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    header = f"| target | req/s | {ratios} | p50 ms | p99 ms | p50 added ms | p99 added ms | errors |"
    assert text.count(header) == 2
    assert "| `direct` | 1000 | 1.00 | 2.00 | 1.00 | 3.00 | — | — | 0 |" in text
    assert "| `sidecar-memory` | 250 | 0.25 | 0.50 | 4.00 | 9.00 | +3.00 | +6.00 | 2 (status 2) |" in text
    assert "![Zero-latency upstream: throughput](benchmarks/zero-throughput.png)" in text
    assert "![Zero-latency upstream: latency](benchmarks/zero-latency.png)" in text
    assert "Skipped — `nginx`: nginx is not installed." in text
    assert "`sidecar-memory` 1234" in text


def test_report_summarises_and_counts_python_calls() -> None:
    text = rendered()
    assert "## At a glance (zero-latency upstream)" in text
    assert "| 1 connection, JSON | 1000 | 500 | 250 | 0.50 | +3.00 |" in text
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


def test_floor_help_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "floor.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--upstream" in done.stdout


def test_run_help_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "--update-docs" in done.stdout


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
        *("--duration", "1", "--warmup", "0", "--rounds", "1", "--work-requests", "0"),
        *("--output", str(report)),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=80, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    text = report.read_text()
    assert "### 32 connections, JSON" in text
    assert "### 32 connections, SSE" in text
    for target in ("direct", "floor"):
        assert text.count(f"| `{target}` | ") == 2
    assert "direct, c=32 SSE:" in done.stderr  # progress lines on stderr
