"""Two builds of the service side by side: this checkout against an earlier commit, both servers
up at once, the same load scenarios in alternating rounds (the first build of each round
alternating), so whatever else loads the machine weighs on both alike.

    python bench/ab_bench.py --base REV [--rounds 3] [--duration 3] [--journal] SCENARIO:CLIENTS ...
    python bench/ab_bench.py --base HEAD~1 step_many:64 step_many:256 websocket:64

SCENARIO is one of ``bench/load_bench.py``'s: http_step, websocket, step_many, ping, predict
(a 256-step history). The base build runs from a git worktree of REV made in a temporary
directory (removed at the end), with this checkout's virtual environment. It prints each round
and, per case, the median of each build and of the per-round ratios (this build / base) with
their spread, and writes the rows to ``runs/bench/ab_bench.json`` (``--out``).

What it answers: whether a change made a scenario faster, measured as its effect and not as
absolute figures, which on a shared machine move by up to 2x within an hour.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import load_bench as lb  # noqa: E402

from tests.servers import serve_command  # noqa: E402

SCENARIOS = ("http_step", "websocket", "step_many", "ping", "predict")


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A detached git worktree of ``rev``, removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="ab-bench-base-"))
    where = parent / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False
        )
        shutil.rmtree(parent, ignore_errors=True)


def serve_from(tree: Path) -> Any:
    bentoml = Path(sys.executable).with_name("bentoml")

    def command(port: int) -> list[str]:
        serve = f"exec {bentoml} serve service.service:LSTMSessions --host 127.0.0.1 --port {port}"
        return ["bash", "-c", f"cd {tree} && {serve}"]

    return command


async def run_case(bench: lb.Bench, scenario: str, clients: int) -> lb.Row:
    if scenario == "http_step":
        return await bench.http_step("http_batched", clients)
    if scenario == "predict":
        return await bench.predict(256, clients)
    return await getattr(bench, scenario)(clients)


def summary(rows: list[dict[str, Any]], cases: list[tuple[str, int]], rounds: int) -> str:
    """Per case: each build's median rate (min-max) and the median per-round ratio (spread)."""
    lines = [
        "| scenario | clients | this (median; min-max) | base | this / base (spread) |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for scenario, clients in cases:
        rate: dict[tuple[str, int], float] = {
            (x["build"], x["round"]): x["timesteps_s"] or x["req_s"] or 0.0
            for x in rows
            if (x["scenario"], x["clients"]) == (scenario, clients)
        }
        this = [rate["this", r] for r in range(rounds)]
        base = [rate["base", r] for r in range(rounds)]
        ratios = [a / b for a, b in zip(this, base, strict=True) if b]
        if not ratios:  # the base answered nothing in every round
            lines.append(f"| {scenario} | {clients} | {statistics.median(this):,.0f} | 0 | - |")
            continue
        lines.append(
            f"| {scenario} | {clients} | {statistics.median(this):,.0f} ({min(this):,.0f}-"
            f"{max(this):,.0f}) | {statistics.median(base):,.0f} ({min(base):,.0f}-"
            f"{max(base):,.0f}) | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare this checkout with")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--duration", type=float, default=3.0, help="seconds per case, after 1 s warm-up"
    )
    p.add_argument("--out", type=Path, default=lb.RUNS / "ab_bench.json")
    p.add_argument(
        "--journal",
        action="store_true",
        help="each server with a snapshot and the default journal (LSTM_JOURNAL=write) in a "
        "directory of its own, as a default start has; without it, none (as load_bench.py)",
    )
    p.add_argument("cases", nargs="+", metavar="SCENARIO:CLIENTS")
    args = p.parse_args()
    cases = []
    for case in args.cases:
        scenario, _, clients = case.partition(":")
        if scenario not in SCENARIOS or not clients.isdigit():
            p.error(f"{case!r}: give SCENARIO:CLIENTS, SCENARIO one of {', '.join(SCENARIOS)}")
        cases.append((scenario, int(clients)))
    os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="ab-bench-bentoml-"))
    log_dir = Path(tempfile.mkdtemp(prefix="ab-bench-logs-"))
    rows: list[dict[str, Any]] = []
    with (
        worktree(args.base) as base,
        asyncio.Runner(loop_factory=lb.new_loop) as runner,
        contextlib.ExitStack() as stack,
    ):
        benches = {}
        for build, command in (("this", serve_command), ("base", serve_from(base))):
            env = dict(lb.SERVER_ENV)
            if args.journal:
                env["LSTM_SNAPSHOT_PATH"] = str(log_dir / build / "sessions.snapshot")
            url, cpu = stack.enter_context(lb.server(build, env, log_dir, command))
            benches[build] = lb.Bench(url, cpu, 1.0, args.duration)
        for r in range(args.rounds):
            for scenario, clients in cases:
                for build in ("this", "base") if r % 2 == 0 else ("base", "this"):
                    row = runner.run(run_case(benches[build], scenario, clients))
                    rows.append(
                        {"round": r, "build": build, "scenario": scenario, "clients": clients}
                        | {k: getattr(row, k) for k in ("timesteps_s", "req_s", "p50_ms", "p99_ms")}
                        | {"errors": row.errors, "server_cpu_pct": row.server_cpu_pct}
                    )
                    rate = row.timesteps_s or row.req_s or 0.0
                    print(
                        f"round {r} {build:4s} {scenario} {clients}: {rate:,.0f}/s, "
                        f"p50 {row.p50_ms or 0:.2f} ms, errors {row.errors}",
                        flush=True,
                    )
    print(
        f"\nthis checkout vs {args.base}, {args.rounds} alternating rounds of {args.duration:g} s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)  # the rows first: nothing measured is lost
    recorded = {"base": args.base, "journal": args.journal, "machine": lb.machine(), "rows": rows}
    args.out.write_text(json.dumps(recorded, indent=1))
    print("with the journal (write)" if args.journal else "no snapshot, no journal")
    print(summary(rows, cases, args.rounds))
    print(f"rows in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
