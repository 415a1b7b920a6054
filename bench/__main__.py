"""`python -m bench`: run the benchmarks and print one table. See docs/performance.md."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench import loadgen


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny numbers: checks it all runs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only",
                        default="web,instructions,slack,discord,streaming,scale,fairness",
                        help="comma-separated parts: web, instructions, slack, discord, "
                        "streaming, scale, fairness; and cluster, takeover (need the local "
                        "PostgreSQL, so not by default)")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto",
                        help="load generator: wrk (C, needs `apt-get install wrk`) or an aiohttp "
                        "client in its own process; auto picks wrk when installed")
    args = parser.parse_args()
    loadgen.CHOICE = args.loadgen
    parts = set(args.only.split(","))
    rounds, seconds = (1, 1.0) if args.smoke else (args.rounds, args.seconds)
    print(f"load generator: {loadgen.which()}; rounds: {rounds}; seconds per run: {seconds}")
    with tempfile.TemporaryDirectory(prefix="chatgateway-bench-") as tmp:
        workdir = Path(tmp)
        if "web" in parts:
            from bench import web

            rows = web.run(workdir / "web", [1, 16, 64], rounds, seconds)
            print()
            print(table(rows, ["path", "target", "req/s", "p50 ms", "p99 ms", "cpu us/req",
                               "errors", "ratio (median of rounds)"]))
        if "instructions" in parts:
            from bench import instructions

            print()
            rows = instructions.run(workdir / "instructions", 100 if args.smoke else 400)
            print(table(rows, ["path", "target", "instructions/request", "vs forwarder"]))
        if "slack" in parts:
            from bench import slack

            print()
            rows = slack.run_sync(workdir / "slack", 200, 200 if args.smoke else 4000)
            print(table(rows, ["path", "acks", "ack latency", "replies", "reply latency"]))
        if "discord" in parts:
            from bench import discord

            print()
            rows = discord.run_sync(workdir / "discord", 200, 200 if args.smoke else 4000)
            print(table(rows, ["path", "answered", "throughput", "latency p50", "latency p99",
                               "dropped"]))
        if "streaming" in parts:
            from bench import streaming

            print()
            rows = streaming.run(workdir / "streaming", 3 if args.smoke else 20,
                                 3.0 if args.smoke else streaming.DURATION)
            print(table(rows, streaming.HEADER))
        if "scale" in parts:
            from bench import scale

            print()
            print(table(scale.run(workdir / "scale", smoke=args.smoke),
                        ["scale", "measure", "value", "target"]))
        if "fairness" in parts:
            from bench import fairness

            print()
            # B's 20 requests/s need a longer window than the web runs for a meaningful p99.
            window = 2.0 if args.smoke else max(10.0, args.seconds)
            print(table(fairness.run(workdir / "fairness", rounds, window), fairness.HEADER))
        if "cluster" in parts:
            from bench import cluster

            print()
            print(table(cluster.run(workdir / "cluster", rounds, seconds),
                        ["cluster (PostgreSQL)", "req/s", "cpu us/req (all instances)",
                         "errors"]))
        if "takeover" in parts:
            from bench import takeover

            print()
            rows = takeover.run_sync(workdir / "takeover", 2 if args.smoke else 20)
            print(table(rows, takeover.HEADER))


if __name__ == "__main__":
    main()
