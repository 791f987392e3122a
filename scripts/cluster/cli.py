"""``python scripts/cluster/cli.py up|down|status|build``: the local cluster's command line.

Run it with the project's virtual environment (the Makefile's cluster-* targets do), as root (the
node is a kubelet with containerd). Every failure prints one line (``cluster-up: ...``) and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from controlplane import build, cluster  # noqa: E402
from controlplane.build import ClusterError  # noqa: E402
from controlplane.config import Layout  # noqa: E402
from controlplane.handle import ControlPlane  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster", description=__doc__)
    parser.add_argument("--repo", type=Path, default=HERE.parents[1], help="the repository root")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build once, then start the control plane and the node")
    up.add_argument("--keep-data", action="store_true", help="keep etcd's data from the last run")
    sub.add_parser("down", help="stop everything up started")
    sub.add_parser("status", help="what runs and its health")
    sub.add_parser(
        "env",
        help='shell exports for kubectl and helm: eval "$(python scripts/cluster/cli.py env)"',
    )
    pvc = sub.add_parser(
        "pvc", help="a folder under .visionr1/cluster/pv/, its PV and a PVC bound to it"
    )
    pvc.add_argument("namespace")
    pvc.add_argument("name")
    pvc.add_argument("--size", default="10Gi")
    b = sub.add_parser("build", help="build the pinned binaries into the cache (up does it too)")
    b.add_argument("--rebuild", action="store_true", help="rebuild even if the cache has them")
    b.add_argument("--kwok", action="store_true", help="also KWOK (fake nodes: the load benchmark)")
    args = parser.parse_args(argv)

    def echo(line: str) -> None:
        print(line, flush=True)

    try:
        layout = Layout.for_repo(args.repo)
        if args.command == "up":
            cluster.up(layout, echo, keep_data=args.keep_data)
        elif args.command == "down":
            cluster.down(layout, echo)
        elif args.command == "status":
            return cluster.status(layout, echo)
        elif args.command == "pvc":
            state = cluster.running(layout)
            if state is None:
                raise ClusterError("nothing running: make cluster-up first")
            cp = ControlPlane(layout=layout, state=state, owned=False)
            cp.kubectl("create", "namespace", args.namespace, check=False)
            folder = cp.make_pvc(args.namespace, args.name, args.size)
            echo(f"PVC {args.namespace}/{args.name} bound; its folder: {folder}")
        elif args.command == "env":
            echo(f"export KUBECONFIG={layout.kubeconfig}")
            echo(f'export PATH="{layout.bin_dir}:$PATH"')
        else:
            times = build.ensure_built(layout, echo, rebuild=args.rebuild, optional=args.kwok)
            build.verify(layout)
            echo(f"binaries in {layout.bin_dir}" + ("" if times else " (already built)"))
    except ClusterError as err:
        print(f"cluster-{args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"cluster-{args.command}: interrupted (whatever had started was stopped)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
