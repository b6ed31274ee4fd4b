"""Prefix directory at scale, on CPU: memory under a cap with 1M block entries, and query latency.

Workload: ``--tenants`` tenants (default 100, ``--small-tenants`` of them with a smaller quota),
``--workers`` workers holding leases. Each tenant has a few 64-block system prompts; every prompt is
a system prompt plus a unique tail, 256 blocks of 16 tokens (4k tokens), stored by one worker (10 %
also by a second). More blocks are published than fit (``--publish`` > ``--max-entries``) so quotas
and the global cap both evict. Then ``--queries`` ``longest_prefix`` calls with 4k-token prompts:
full hits, partial hits (shared system prompt, new tail) and misses, timed in-process (wall clock
and on-CPU time: on a loaded machine the wall-clock tail is the OS scheduler, not the index), then
``--ray-queries`` round trips through the detached actor (serialization + one Ray RPC). RSS is read
from /proc before any heavy import and compared with ``--rss-cap-mib``; the run exits 1 when RSS is
over the cap or the in-process wall-clock p99 is over 1 ms.

    python bench/prefix_directory.py [--publish 1600000] [--max-entries 1000000] [--rss-cap-mib 256]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baton.cluster.prefix_index import DirectoryConfig, ModelIdentity, PrefixIndex  # noqa: E402
from baton.workers.block_hash import block_hashes  # noqa: E402
from baton.workers.cache_events import CacheEvent  # noqa: E402

BLOCK = 16
BLOCKS_PER_PROMPT = 256
SYSTEM_BLOCKS = 64
IDENTITY = ModelIdentity("tokenizer-sha256", "model-sha256", "bfloat16")


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    fields: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def prompt_tokens(tenant: int, system: int, prompt: int) -> list[int]:
    """4k tokens: a tenant system prompt (64 blocks) then a tail made unique by its first token."""
    head = [(tenant * 7919 + system * 104729 + i) % 50000 for i in range(SYSTEM_BLOCKS * BLOCK)]
    tail_len = (BLOCKS_PER_PROMPT - SYSTEM_BLOCKS) * BLOCK
    tail = [50000 + prompt] + [(prompt * 31 + i) % 50000 for i in range(tail_len - 1)]
    return head + tail


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_actor(args: argparse.Namespace, namespaces: list[str]) -> dict[str, object]:
    """The same queries through the detached actor: adds serialization + one Ray RPC per query."""
    import ray
    from baton.cluster.prefix_directory import get_or_create_directory

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        config = DirectoryConfig(name="baton-prefix-directory-bench", lease_s=3600.0)
        actor = get_or_create_directory(config)
        ray.get(actor.heartbeat.remote("w0", IDENTITY), timeout=120)
        prompts = [(t % len(namespaces), t) for t in range(args.ray_entries // BLOCKS_PER_PROMPT)]
        for tenant, prompt in prompts:
            ns = namespaces[tenant]
            hashes = block_hashes(
                IDENTITY.cache_identity(ns), prompt_tokens(tenant, 0, prompt), BLOCK
            )
            ray.get(
                actor.publish.remote("w0", [CacheEvent("stored", h, ns) for h in hashes]),
                timeout=60,
            )
        rng = random.Random(args.seed)
        lat: list[float] = []
        for _ in range(args.ray_queries):
            tenant, prompt = prompts[rng.randrange(len(prompts))]
            ns = namespaces[tenant]
            hashes = block_hashes(
                IDENTITY.cache_identity(ns), prompt_tokens(tenant, 0, prompt), BLOCK
            )
            root = IDENTITY.root(ns)
            t0 = time.perf_counter_ns()
            answer = ray.get(actor.longest_prefix.remote(root, hashes), timeout=60)
            lat.append((time.perf_counter_ns() - t0) / 1000)
            assert answer == {"w0": BLOCKS_PER_PROMPT}, answer
        entries = ray.get(actor.stats.remote(), timeout=60)["entries"]
        ray.kill(actor)
    finally:
        ray.shutdown()
    return {
        "entries": entries,
        "queries": len(lat),
        "p50_us": round(percentile(lat, 0.5), 1),
        "p99_us": round(percentile(lat, 0.99), 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tenants", type=int, default=100)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--publish", type=int, default=1_600_000, help="stored-block events to publish")
    p.add_argument("--max-entries", type=int, default=1_000_000)
    p.add_argument("--quota", type=int, default=11_000, help="per-tenant entry quota")
    p.add_argument("--small-tenants", type=int, default=10, help="tenants with --small-quota")
    p.add_argument("--small-quota", type=int, default=2_000)
    p.add_argument("--key-bytes", type=int, default=16)
    p.add_argument("--queries", type=int, default=3000)
    p.add_argument("--rss-cap-mib", type=float, default=256.0)
    p.add_argument("--batch", type=int, default=512, help="events per publish call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ray-queries", type=int, default=500, help="also query through the actor (0: skip)"
    )
    p.add_argument(
        "--ray-entries", type=int, default=100_000, help="entries published to the actor"
    )
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args()

    rng = random.Random(args.seed)
    rss0, _ = rss_mib()
    namespaces = [f"tenant-{t:03d}" for t in range(args.tenants)]
    config = DirectoryConfig(
        max_entries=args.max_entries,
        default_tenant_quota=args.quota,
        key_bytes=args.key_bytes,
        tenant_quotas={ns: args.small_quota for ns in namespaces[: args.small_tenants]},
        lease_s=3600.0,
    )
    index = PrefixIndex(config)
    workers = [f"worker-{i}" for i in range(args.workers)]
    for w in workers:
        index.heartbeat(w, IDENTITY)

    # -- fill ------------------------------------------------------------------------------------
    published = prompts = 0
    recent: list[tuple[int, int, int]] = []  # (tenant, system, prompt) of recently stored prompts
    t_fill = time.perf_counter()
    while published < args.publish:
        tenant = prompts % args.tenants
        system = rng.randrange(4)
        ns = namespaces[tenant]
        hashes = block_hashes(
            IDENTITY.cache_identity(ns), prompt_tokens(tenant, system, prompts), BLOCK
        )
        owners = [workers[prompts % args.workers]]
        if rng.random() < 0.1:
            owners.append(workers[(prompts + 1 + rng.randrange(args.workers - 1)) % args.workers])
        for owner in owners:
            events = [CacheEvent("stored", h, ns) for h in hashes]
            for i in range(0, len(events), args.batch):
                index.publish(owner, events[i : i + args.batch])
            published += len(events)
        recent.append((tenant, system, prompts))
        recent = recent[-2 * args.tenants :]
        prompts += 1
    fill_s = time.perf_counter() - t_fill
    rss1, peak1 = rss_mib()
    stats = index.stats()
    index.check_integrity()

    # -- queries ---------------------------------------------------------------------------------
    latencies: dict[str, list[float]] = {"full_hit": [], "partial_hit": [], "miss": []}
    cpu_us: dict[str, list[float]] = {k: [] for k in latencies}  # on-CPU time: no preemption
    hash_us: list[float] = []
    gc_pauses_us: list[float] = []
    gc_start = [0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter_ns()
        else:
            gc_pauses_us.append((time.perf_counter_ns() - gc_start[0]) / 1000)

    gc.callbacks.append(on_gc)
    matched: dict[str, list[int]] = {k: [] for k in latencies}
    for q in range(args.queries):
        kind = ("full_hit", "partial_hit", "miss")[q % 3]
        tenant, system, prompt = recent[rng.randrange(len(recent))]
        if kind == "partial_hit":
            prompt = 10_000_000 + q  # same tenant system prompt, a new tail
        elif kind == "miss":
            system = 99
        ns = namespaces[tenant]
        tokens = prompt_tokens(tenant, system, prompt)
        t0 = time.perf_counter_ns()
        hashes = block_hashes(IDENTITY.cache_identity(ns), tokens, BLOCK)
        root = IDENTITY.root(ns)
        t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        answer = index.longest_prefix(root, hashes)
        t2, c2 = time.perf_counter_ns(), time.thread_time_ns()
        hash_us.append((t1 - t0) / 1000)
        latencies[kind].append((t2 - t1) / 1000)
        cpu_us[kind].append((c2 - c1) / 1000)
        matched[kind].append(max(answer.values(), default=0))
    gc.callbacks.remove(on_gc)
    everything = [v for vs in latencies.values() for v in vs]
    rss2, peak2 = rss_mib()

    tenants: dict[str, int] = stats["tenants"]  # type: ignore[assignment]
    entries: int = stats["entries"]  # type: ignore[assignment]
    approx: int = stats["approx_bytes"]  # type: ignore[assignment]
    mem = {
        "rss_before": round(rss0, 1),
        "rss_after_fill": round(rss1, 1),
        "rss_after_queries": round(rss2, 1),
        "peak_rss": round(max(peak1, peak2), 1),
        "index_delta": round(rss1 - rss0, 1),
        "approx_bytes_estimate": round(approx / 2**20, 1),
        "bytes_per_entry_measured": round((rss1 - rss0) * 2**20 / max(1, entries)),
    }
    query_us = {
        kind: {
            "p50": round(percentile(v, 0.5), 1),
            "p99": round(percentile(v, 0.99), 1),
            "max": round(max(v), 1),
            "mean": round(statistics.fmean(v), 1),
            "mean_blocks_matched": round(statistics.fmean(matched[kind]), 1),
        }
        for kind, v in latencies.items()
    }
    query_cpu_us = {
        kind: {"p50": round(percentile(v, 0.5), 1), "p99": round(percentile(v, 0.99), 1)}
        for kind, v in cpu_us.items()
    }
    all_p99 = round(percentile(everything, 0.99), 1)
    hashing = {
        "p50": round(percentile(hash_us, 0.5), 1),
        "p99": round(percentile(hash_us, 0.99), 1),
    }
    gc_info = {
        "collections": len(gc_pauses_us),
        "max_pause_us": round(max(gc_pauses_us, default=0), 1),
    }
    result: dict[str, object] = {
        "config": {
            "tenants": args.tenants,
            "workers": args.workers,
            "published_events": published,
            "prompts": prompts,
            "max_entries": args.max_entries,
            "tenant_quota": args.quota,
            "small_tenants": args.small_tenants,
            "small_quota": args.small_quota,
            "key_bytes": args.key_bytes,
            "blocks_per_query": BLOCKS_PER_PROMPT,
            "block_size": BLOCK,
            "rss_cap_mib": args.rss_cap_mib,
        },
        "fill_seconds": round(fill_s, 2),
        "publish_events_per_s": round(published / fill_s),
        "entries": entries,
        "holder_records": stats["holder_records"],
        "tenants_at_quota": sum(1 for ns, n in tenants.items() if n >= config.quota(ns)),
        "counters": stats["counters"],
        "memory_mib": mem,
        "query_us": query_us,
        "query_cpu_us": query_cpu_us,
        "query_us_all": {"p50": round(percentile(everything, 0.5), 1), "p99": all_p99},
        "gc_during_queries": gc_info,
        "load_average_1m": os.getloadavg()[0],
        "router_hashing_us_per_4k_prompt": hashing,
        "rss_under_cap": mem["peak_rss"] <= args.rss_cap_mib,
        "query_p99_under_1ms": all_p99 < 1000,
    }

    verdict = "OK" if result["rss_under_cap"] else "OVER"
    print(
        f"entries {entries:,} (published {published:,} events, {prompts:,} prompts) "
        f"in {fill_s:.1f} s = {result['publish_events_per_s']:,} events/s"
    )
    print(
        f"RSS before {mem['rss_before']} MiB, after fill {mem['rss_after_fill']} MiB, "
        f"peak {mem['peak_rss']} MiB (cap {args.rss_cap_mib}): {verdict}; "
        f"~{mem['bytes_per_entry_measured']} B/entry, estimate {mem['approx_bytes_estimate']} MiB"
    )
    for kind, s in query_us.items():
        print(
            f"longest_prefix {kind:<12} p50 {s['p50']:7.1f} us  p99 {s['p99']:7.1f} us  "
            f"max {s['max']:8.1f} us  blocks matched {s['mean_blocks_matched']}"
        )
    for kind, s in query_cpu_us.items():
        print(f"  on-CPU time {kind:<12} p50 {s['p50']:7.1f} us  p99 {s['p99']:7.1f} us")
    print(
        f"GC during queries: {gc_info}; "
        f"load average {result['load_average_1m']:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"router-side hashing of a 4k prompt: p50 {hashing['p50']} us")
    print(f"counters {stats['counters']}")

    if args.ray_queries:
        ray_result = bench_actor(args, namespaces)
        result["ray_actor"] = ray_result
        print(
            f"through the Ray actor ({ray_result['entries']:,} entries): longest_prefix round "
            f"trip p50 {ray_result['p50_us']} us  p99 {ray_result['p99_us']} us"
        )

    # common.write_result imports torch & co. for the environment record: only after measuring.
    from common import write_result

    write_result("prefix_directory", result, args.out)
    return 0 if result["rss_under_cap"] and result["query_p99_under_1ms"] else 1


if __name__ == "__main__":
    sys.exit(main())
