"""Writes the table of one `make bench` run into BENCHMARKS.md.

Usage: bench_table.py <run.jsonl> <BENCHMARKS.md>

Reads the JSON lines every `clientele-bench` suite appended during the run (one object per
measured row: suite, benchmark, rps or rate, latency percentiles, the ratio to the baseline
measured in the same run, goals with PASS/MISS) and replaces the text between the markers
`<!-- bench-table:start -->` and `<!-- bench-table:end -->` with one table, so the file always
shows the latest run beside the hand-written analysis of earlier ones."""
import json
import sys
import time

START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"


def fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, (int, float)):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def baseline_of(r):
    """The name of the baseline a row's ratio is taken against."""
    suite, name = r.get("suite", ""), r.get("benchmark", "")
    if r.get("baseline_name"):
        return r["baseline_name"]
    if suite == "profiles":
        return "raw Redis GET 1 KB, 50 connections"
    if suite == "experiments":
        return "gRPC health Check, same server"
    if suite == "offers":
        if name.startswith("ledger accrual"):
            return "single-row INSERT txn"
        if name.startswith("raw PG INSERT"):
            return "(the accrual baseline)"
        if name.startswith("Decide"):
            return "p99 ÷ health Check p99"
        return "health Check p99 (mean)"
    return ""


def ingest_cpu_rows(r):
    """The ingest run's CPU per event by process, beside PostgreSQL's CPU per COPY row."""
    parts = [r.get(f"cpu_us_per_event_{p}") for p in ("ingest", "profiles", "postgres")]
    copy = r.get("copy_postgres_cpu_us_per_row")
    if any(p is None for p in parts) or not copy:
        return []
    total = sum(parts)
    return [["ingest", f"CPU per event: ingest {parts[0]:.1f} + profiles {parts[1]:.1f} + "
             f"PostgreSQL {parts[2]:.1f} µs", f"{total:.1f} µs", "–", "–", fmt(total / copy),
             f"PostgreSQL CPU per COPY row ({copy:.1f} µs)"]]


def describe(r):
    """Table lines (lists of cells) for one JSON row of any suite."""
    suite, name = r.get("suite", ""), r.get("benchmark", "")
    if suite == "ingest" and "events_per_sec" in r:
        lag = f"aggregates applied {r.get('aggregates_lag_secs', 0):.1f} s after the last ack"
        # A run beside the main one (another customer base) gets its own name and no RSS.
        label = (f"IngestStream, {r['scenario']} ({r.get('events', 0):,} events; {lag})"
                 if r.get("scenario") else
                 f"IngestStream end to end ({r.get('events', 0):,} events, peak RSS "
                 f"{r.get('peak_rss_mb', 0):.0f} MB; {lag})")
        stream = [suite, label, f"{fmt(r['events_per_sec'], 1)} events/s",
                  fmt(r.get("ack_p50_ms"), 1), fmt(r.get("ack_p99_ms"), 1),
                  fmt(r.get("ratio_to_copy")), "raw PostgreSQL COPY of the same events"]
        if r.get("scenario"):
            return [stream]
        return [
            stream,
            [suite, "raw PostgreSQL COPY, same events", f"{fmt(r.get('copy_rows_per_sec'), 1)} rows/s",
             "–", "–", "1.00", ""],
        ] + ingest_cpu_rows(r)
    if "value" in r:
        unit = r.get("unit", "")
        base = r.get("baseline")
        return [[suite, name.strip(), f"{fmt(r['value'], 3)} {unit}".strip(), "–", "–",
                 fmt(r.get("ratio_to_baseline")),
                 f"{fmt(base, 3)} {unit}".strip() if isinstance(base, (int, float)) else (base or "")]]
    rate = r.get("rps", r.get("rate"))
    ratio = r.get("ratio", r.get("ratio_to_raw_get"))
    return [[suite, name, f"{fmt(rate, 1)}/s", fmt(r.get("p50_ms"), 3), fmt(r.get("p99_ms"), 3),
             fmt(ratio), baseline_of(r)]]


def main() -> int:
    run_path, doc_path = sys.argv[1], sys.argv[2]
    rows = []
    with open(run_path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    if not rows:
        print(f"bench_table: no results in {run_path}", file=sys.stderr)
        return 1
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(max(r.get("unix_time", 0) for r in rows)))
    out = [
        START,
        f"Latest `make bench` run ({when}; written by `scripts/bench_table.py` from "
        f"`{run_path.split('/')[-1]}`). Ratios are against the baseline named on each row, "
        "measured in the same run; the sections below explain each suite.",
        "",
        "| suite | benchmark | figure | p50 ms | p99 ms | × baseline | baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    goals = {}
    for r in rows:
        for line in describe(r):
            out.append("| " + " | ".join(line) + " |")
        for g in r.get("goals") or []:
            goals[(r.get("suite", ""), g["goal"])] = g["status"]
        if r.get("suite") == "ingest" and "ratio_to_copy" in r and not r.get("scenario"):
            goals[("ingest", "events/s ≥ 0.6 × raw COPY (measured %.2f)" % r["ratio_to_copy"])] = (
                "PASS" if r["ratio_to_copy"] >= 0.6 else "MISS")
            goals[("ingest", "p99 acknowledgement < 50 ms (measured %.1f ms)" % r["ack_p99_ms"])] = (
                "PASS" if r["ack_p99_ms"] < 50 else "MISS")
            goals[("ingest", "peak RSS < 200 MB (measured %.0f MB)" % r["peak_rss_mb"])] = (
                "PASS" if r["peak_rss_mb"] < 200 else "MISS")
    if goals:
        out += ["", "| suite | goal | this run |", "|---|---|---|"]
        out += [f"| {s} | {g} | **{st}** |" for (s, g), st in goals.items()]
    out.append(END)
    with open(doc_path) as f:
        doc = f.read()
    table = "\n".join(out)
    if START in doc and END in doc:
        head, rest = doc.split(START, 1)
        _, tail = rest.split(END, 1)
        doc = head + table + tail
    else:
        marker = "\n## "
        i = doc.find(marker)
        doc = (doc[:i] + "\n" + table + "\n" + doc[i:]) if i >= 0 else doc + "\n" + table + "\n"
    with open(doc_path, "w") as f:
        f.write(doc)
    print(f"bench_table: {len(rows)} rows written to {doc_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
