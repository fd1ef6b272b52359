"""The report's tables after the main one: 3 KB at 1,000 req/s, the 600 KB body, workers, the
model-aware scenario and gRPC ModelInfer."""

from __future__ import annotations

from types import SimpleNamespace

from report import PathResult, _cpu_cell, _num, notes


def _latency_cells(r: PathResult, keys=("p50", "p90", "p99", "max")) -> list[str]:
    lat = r.latency or {}
    return [_num(lat.get(k)) for k in keys]


def _added_cells(r: PathResult) -> list[str]:
    added = r.added or {}
    return [_num(added.get(k)) for k in ("p50", "p99")]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _with_notes(lines: list[str], group: dict[str, PathResult]) -> list[str]:
    extra = notes(group)
    return lines + (["", extra] if extra else [])


def fast(group: dict[str, PathResult], settings: dict) -> list[str]:
    if not group:
        return []
    vus = settings["fast_vus"]
    lines = ["", f"## REST, {settings['body_bytes']:,}-byte body at {settings['fast_rate']:,} "
             f"requests/s", "",
             f"k6 constant-arrival-rate, {vus} VU{'s' if vus > 1 else ''} ({vus} keep-alive "
             f"connection{'s' if vus > 1 else ''}: one k6 VU cannot issue 1,000 requests/s here), "
             f"{settings['extra_latency_duration_s']} s in the rounds of the 100 req/s runs (1 s "
             "warm-up each), proxy pinned as above.",
             ""]
    header = ["path", "status", "p50 us", "p90 us", "p99 us", "max us", "added p50 us",
              "added p99 us", "dropped"]
    rows = [[r.name, r.status, *_latency_cells(r), *_added_cells(r),
             _num((r.latency or {}).get("dropped"))] for r in group.values()]
    return _with_notes(lines + _table(header, rows), group)


def big(group: dict[str, PathResult], settings: dict) -> list[str]:
    if not group:
        return []
    lines = ["", f"## REST, {settings['big_body_bytes']:,}-byte tensor body", "",
             f"Throughput as above with {settings['extra_duration_s']} s runs, median of "
             f"{settings['extra_rounds']} rounds; latency at {settings['rate']} req/s over one "
             f"connection for {settings['extra_latency_duration_s']} s.", ""]
    header = ["path", "status", "req/s", "CPU us/req (min-max)", "RSS MiB", "p50 us", "p90 us",
              "p99 us", "max us", "added p50 us", "added p99 us"]
    rows = []
    for r in group.values():
        rss = r.median("rss_kib")
        rows.append([r.name, r.status, _num(r.median("rps")), _cpu_cell(r),
                     _num(rss and rss / 1024, 1), *_latency_cells(r), *_added_cells(r)])
    return _with_notes(lines + _table(header, rows), group)


def workers(group: dict[str, PathResult], settings: dict) -> list[str]:
    if not group:
        return []
    lines = ["", "## meshproxy --workers 1 vs 2", "",
             f"Throughput, 3 KB body, {settings['extra_duration_s']} s runs, median of "
             f"{settings['extra_rounds']} rounds. The proxy is **not pinned** (both cores), while "
             f"wrk and the upstream stay pinned to cpu {settings['load_cpu']}: the load generator "
             "shares the machine (2 cores here), so the second worker competes with wrk and the "
             "upstream for cpu 0 and req/s cannot double. CPU us/req sums the parent and all "
             "workers.", ""]
    header = ["meshproxy", "status", "req/s", "CPU us/req (min-max)", "RSS MiB"]
    rows = []
    for r in group.values():
        rss = r.median("rss_kib")
        rows.append([r.name, r.status, _num(r.median("rps")), _cpu_cell(r),
                     _num(rss and rss / 1024, 1)])
    bad = [f"- **{r.name} {r.status}**: {r.failed or '; '.join(dict.fromkeys(r.problems))}"
           for r in group.values() if r.status != "ok"]
    return lines + _table(header, rows) + (["", *bad] if bad else [])


def models(results: dict, settings: dict) -> list[str]:
    if not results:
        return []
    rounds = settings.get("model_rounds", 1)
    lines = ["", "## Model-aware routing: 4 runtimes, 2 models each", "",
             "Each request names one of 8 models at random. `service`: sent to a runtime drawn at "
             "random, which forwards it once to the holder when it lacks the model (a real "
             "nginx proxy hop to another process); `nginx-front`, `envoy-front`: the same behind "
             "a model-unaware ingress that spreads requests at random; `nginx-routed`: nginx "
             "routing by model to the holder (meshproxy's job done in C: the reference for any "
             "model-aware gateway); `meshproxy`: sent to "
             "meshproxy, which routes it to the holder; `modelmesh` (the shape of ModelMesh "
             "itself, beside the issue's `service` baseline, not instead of it): every request "
             "enters the receiving pod's mesh container (one more nginx per pod), which hands "
             "it to its own runtime or forwards it to the holder pod's mesh container, so each "
             "request takes one hop more than in `service`. Each runtime is its own nginx process "
             f"(like a pod). k6 alone on cpu {settings['load_cpu']}; the 4 runtimes and the front "
             f"under test all on cpu {settings['proxy_cpu']}, so every path crosses cores the "
             "same way (client -> serving side -> client) and every hop behind it stays on one "
             "core. Front CPU is the front's own process only, over every request it served (warm-up "
             "included). "
             f"{settings['model_duration_s']} s at {settings['rate']} req/s (1 VU), "
             f"{settings['extra_latency_duration_s']} s at {settings['fast_rate']:,} req/s "
             f"({settings['fast_vus']} VUs), each split into {rounds} rounds that run every path "
             "in turn (each front started afresh), so a slow stretch of the machine falls on "
             "all paths; percentiles are the medians over the rounds (max: the largest), and "
             "`p50 / p99 by round` lists each round's. See bench/model_aware.py.", ""]
    header = ["path", "req/s", "p50 us", "p90 us", "p99 us", "max us", "extra hop", "dropped",
              "front CPU us/req", "p50 / p99 by round"]
    rows, bad = [], []
    for name, by_rate in results.items():
        if "failed" in by_rate:
            bad.append(f"- **{name} failed**: {by_rate['failed'].splitlines()[0]}")
            continue
        for rate, run in by_rate.items():
            served = run.get("total") or run["count"]  # the CPU time covers the warm-up too
            cpu = run["proxy_cpu_s"] / served * 1e6 if served and run["proxy_cpu_s"] else None
            share = run["forwarded_share"]
            rows.append([name, f"{int(rate):,}", *(_num(run.get(k)) for k in ("p50", "p90", "p99", "max")),
                         "-" if share is None else f"{share:.0%}", _num(run["dropped"]),
                         _num(cpu, 1), ", ".join(f"{_num(x['p50'])} / {_num(x['p99'])}"
                                                 for x in run.get("rounds", []))])
            bad += [f"- **{name} at {rate}/s invalid**: {p}" for p in run["problems"]]
    return lines + _table(header, rows) + (["", *bad] if bad else [])


def grpc(results: dict, settings: dict) -> list[str]:
    if not results:
        return []
    import grpc_bench
    lines = ["", "## gRPC ModelInfer, 3 KB request and response", "",
             "inference.GRPCInferenceService/ModelInfer with one 3 KB FP32 tensor, against a "
             "grpc.aio upstream answering a 3 KB ModelInferResponse without decoding. "
             + grpc_bench.settings_line(SimpleNamespace(**settings["grpc"]))
             + " h2load counts HTTP 200 as success whatever grpc-status says, so each run is "
             "checked against the upstream's own count of the calls it answered. See "
             "bench/grpc_bench.py.", ""]
    if "failed" in results:
        return lines + [f"- **gRPC failed**: {results['failed'].splitlines()[0]}"]
    bad = [f"- **{r['path']} invalid**: the upstream answered {r['upstream_served']} calls, "
           f"h2load counted {r['requests']} successes" for r in results["paths"]
           if not r["status_checked"]]
    return lines + grpc_bench.table(results["paths"]) + (["", *bad] if bad else [])
