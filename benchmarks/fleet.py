"""Fleet simulation: N nodes x M pods starting one model, by deployment pattern.

What it answers: how many bytes leave the origin (egress money, the Hub's rate limit) and how long until
every pod has the model, for direct syncs, a node cache, an in-cluster mirror (with and without a node
cache) and one sync into a ReadWriteMany volume. It is a fluid model: every transfer runs at the smallest
of the rates that bound it (its own client's CPU, the node's link shared by the pods on it, the origin's
or the mirror's aggregate bandwidth shared by every client at once), so each row also names what bounds it.

The client's cost is measured here, on one node: CPU seconds per GiB verified (S3 and Hub) and the warm
start, read from the newest committed `benchmarks/results/<date>.md` of `benchmarks/run.py`. Everything a
single machine cannot measure (link speeds, the origin's and the mirror's bandwidth, cores per agent) is a
parameter, printed with the table; change them with the flags.

    .venv/bin/python benchmarks/fleet.py                   # the tables of docs/deploy.md
    .venv/bin/python benchmarks/fleet.py --nodes 50 --pods 2 --size-gb 30 --origin-gbps 5
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GIB = 2**30
GBPS = 1e9 / 8 / GIB  # GiB/s in one Gbit/s


@dataclass(frozen=True)
class Measured:
    """What benchmarks/run.py measured for weightsync on one node (medians)."""

    s3_cpu_per_gib: float
    hf_cpu_per_gib: float
    warm_start_s: float
    source: str


def measured(results: Path = RESULTS) -> Measured:
    """The figures of the newest full benchmark report (`YYYY-MM-DD.md`, not the side reports)."""
    reports = sorted(p for p in results.glob("*.md") if re.fullmatch(r"\d{4}-\d{2}-\d{2}\.md", p.name))
    if not reports:
        raise SystemExit(f"no benchmark report in {results}; run `make bench` first")
    text = reports[-1].read_text()

    def cpu(shape: str) -> float:
        row = re.search(rf"^\| weightsync(?: hf://)? \| {shape} \| ([0-9.]+) \|", text, re.MULTILINE)
        if not row:
            raise SystemExit(f"{reports[-1]}: no 'What this means on a big node' row for {shape}")
        return float(row[1])

    warm = re.search(r"^\| weightsync run, s3:// pinned revision \| (\d+) \|", text, re.MULTILINE)
    if not warm:
        raise SystemExit(f"{reports[-1]}: no warm-start row")
    return Measured(cpu("s3 big"), cpu("hf big"), int(warm[1]) / 1000, reports[-1].name)


@dataclass(frozen=True)
class Fleet:
    nodes: int
    pods: int  # per node
    size_gib: float
    node_gbps: float = 25.0  # each node's link
    agent_cores: float = 4.0  # what one weightsync container may use (its CPU limit)
    origin_gbps: float = 10.0  # the origin's bandwidth into the cluster, all clients together (NAT, peering)
    origin_client_gbps: float = 4.0  # one client's stream from the origin (the Hub's CDN, a remote bucket)
    mirror_gbps: float = 100.0  # the in-cluster store's aggregate bandwidth (e.g. 4 servers x 25 Gbps)
    hub_origin: bool = True  # the origin is the Hub (its client CPU cost), else S3


@dataclass(frozen=True)
class Outcome:
    pattern: str
    origin_gib: float
    seconds: float
    bound: str


def _rate(**limits: float) -> tuple[float, str]:
    """The smallest of the named rates (GiB/s), and its name."""
    name = min(limits, key=lambda key: limits[key])
    return limits[name], name


def simulate(fleet: Fleet, cost: Measured) -> list[Outcome]:
    origin_cpu = cost.hf_cpu_per_gib if fleet.hub_origin else cost.s3_cpu_per_gib
    from_origin = fleet.agent_cores / origin_cpu  # GiB/s one agent can verify from the origin
    from_mirror = fleet.agent_cores / cost.s3_cpu_per_gib  # the mirror is an S3 store
    link, origin = fleet.node_gbps * GBPS, fleet.origin_gbps * GBPS
    client, mirror = fleet.origin_client_gbps * GBPS, fleet.mirror_gbps * GBPS
    size, clients, nodes = fleet.size_gib, fleet.nodes * fleet.pods, fleet.nodes
    outcomes = []

    # Every pod syncs from the origin into a volume of its own.
    rate, bound = _rate(**{"agent CPU": from_origin, "origin stream": client, "node link": link / fleet.pods,
                           "origin bandwidth": origin / clients})
    outcomes.append(Outcome("direct: every pod from the origin", clients * size, size / rate, bound))

    # One node-cache agent per node (DaemonSet on a hostPath); the pods start warm on it.
    rate, bound = _rate(**{"agent CPU": from_origin, "origin stream": client, "node link": link,
                           "origin bandwidth": origin / nodes})
    outcomes.append(Outcome("node cache: one sync per node", nodes * size, size / rate + cost.warm_start_s, bound))

    # `weightsync mirror` once into the in-cluster store, then the pods (or node caches) sync from it.
    mirror_rate, mirror_bound = _rate(**{"agent CPU": from_origin, "origin stream": client, "node link": link,
                                         "origin bandwidth": origin})
    mirroring = size / mirror_rate
    rate, bound = _rate(**{"agent CPU": from_mirror, "node link": link / fleet.pods,
                           "mirror bandwidth": mirror / clients})
    outcomes.append(Outcome("mirror, then every pod from it", size, mirroring + size / rate,
                            f"mirror: {mirror_bound}; pods: {bound}"))
    rate, bound = _rate(**{"agent CPU": from_mirror, "node link": link, "mirror bandwidth": mirror / nodes})
    outcomes.append(Outcome("mirror, then a node cache from it", size, mirroring + size / rate + cost.warm_start_s,
                            f"mirror: {mirror_bound}; nodes: {bound}"))

    # P2P (Dragonfly's dfdaemon as HTTPS_PROXY on every node): the origin sends each piece about once, and the
    # nodes trade pieces over their links. Idealised (no piece scheduling, seeding or imbalance): a lower bound.
    rate, bound = _rate(**{"agent CPU": from_origin, "origin stream": client, "node link": link / fleet.pods,
                           "origin bandwidth": origin})
    outcomes.append(Outcome("P2P through a node proxy (idealised)", size, size / rate, bound))

    # One sync into a ReadWriteMany volume (JuiceFS, CephFS, NFS); the other pods wait on its lock, then start
    # warm. The servers then read the weights over the network file system while loading: not counted here.
    outcomes.append(Outcome("RWX volume: one sync, every pod mounts it", size,
                            mirroring + cost.warm_start_s, mirror_bound))
    return outcomes


def table(fleet: Fleet, cost: Measured) -> str:
    lines = [f"**{fleet.nodes} nodes x {fleet.pods} pod{'s' if fleet.pods > 1 else ''}, a {fleet.size_gib:g} GiB "
             f"model from {'the Hub' if fleet.hub_origin else 'S3'}** (origin {fleet.origin_gbps:g} Gbps in all, "
             f"{fleet.origin_client_gbps:g} Gbps a stream; {fleet.node_gbps:g} Gbps nodes; {fleet.agent_cores:g} "
             f"cores an agent; mirror {fleet.mirror_gbps:g} Gbps)", "",
             "| pattern | origin egress | until every pod has the model | bounded by |", "|---|---:|---:|---|"]
    for outcome in simulate(fleet, cost):
        lines.append(f"| {outcome.pattern} | {outcome.origin_gib:,.0f} GiB | {_duration(outcome.seconds)} | "
                     f"{outcome.bound} |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--pods", type=int, help="pods per node")
    parser.add_argument("--size-gb", type=float, help="model size in GiB")
    parser.add_argument("--node-gbps", type=float, default=Fleet.node_gbps)
    parser.add_argument("--agent-cores", type=float, default=Fleet.agent_cores)
    parser.add_argument("--origin-gbps", type=float, default=Fleet.origin_gbps)
    parser.add_argument("--origin-client-gbps", type=float, default=Fleet.origin_client_gbps)
    parser.add_argument("--mirror-gbps", type=float, default=Fleet.mirror_gbps)
    parser.add_argument("--s3-origin", action="store_true", help="the origin is S3, not the Hub")
    args = parser.parse_args()
    cost = measured()
    shapes = [(args.nodes, args.pods, args.size_gb)] if args.nodes else [(100, 1, 140), (20, 4, 16)]
    print(f"Client cost measured on one node ({cost.source}): {cost.s3_cpu_per_gib} CPU s/GiB from S3, "
          f"{cost.hf_cpu_per_gib} from the Hub, warm start {cost.warm_start_s * 1000:.0f} ms.\n")
    for nodes, pods, size in shapes:
        fleet = Fleet(nodes or 100, pods or 1, size or 140, args.node_gbps, args.agent_cores, args.origin_gbps,
                      args.origin_client_gbps, args.mirror_gbps, not args.s3_origin)
        print(table(fleet, cost) + "\n")


if __name__ == "__main__":
    main()
