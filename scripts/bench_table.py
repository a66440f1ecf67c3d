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
        f"`{run_path.split('/')[-1]}`). Ratios are against the baseline named in each suite, "
        "measured in the same run.",
        "",
        "| suite | benchmark | rate /s | p50 ms | p99 ms | × baseline | baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    goals = {}
    for r in rows:
        rate = r.get("rps", r.get("rate"))
        ratio = r.get("ratio", r.get("ratio_to_raw_get"))
        baseline = r.get("baseline") or ("raw Redis GET" if "ratio_to_raw_get" in r else "")
        out.append(
            f"| {r.get('suite', '')} | {r.get('benchmark', '')} | {fmt(rate, 1)} | "
            f"{fmt(r.get('p50_ms'), 3)} | {fmt(r.get('p99_ms'), 3)} | {fmt(ratio)} | {baseline} |"
        )
        for g in r.get("goals") or []:
            goals[(r.get("suite", ""), g["goal"])] = g["status"]
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
