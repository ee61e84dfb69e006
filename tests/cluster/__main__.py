"""`python -m tests.cluster up --dir DIR [--node]` starts a control plane (and with `--node` a real node beside its
KWOK nodes) and prints its kubeconfig's path once every component is ready; `python -m tests.cluster down --dir DIR`
stops every process `up` started and removes what the node made (mounts, cgroups, its bridge, its image store)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.cluster.controlplane import STATE_FILE, ControlPlane, ControlPlaneError, stop_pids

NODE_STATE_FILE = "node.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--dir", type=Path, required=True, help="the cluster's directory (logs, data, kubeconfig)")
    parser.add_argument(
        "--node",
        action="store_true",
        help="up: also start a real node (kubelet, containerd, runc, CNI bridge; root; tests/cluster/build.sh built "
        "it and tests/images/build.sh the local base its pause image comes from). It is tainted "
        "kubetune.dev/real-node=true:NoSchedule",
    )
    parser.add_argument(
        "--node-image",
        action="append",
        default=[],
        metavar="IMAGE",
        help="up --node: a local docker image to import into the node's containerd (repeatable), e.g. the trainer's",
    )
    args = parser.parse_args(argv)
    directory = args.dir.resolve()
    if args.action == "down":
        return down(directory)
    plane = ControlPlane(directory)
    try:
        plane.start(tie_to_parent=False)  # stays up after this command exits, until `down`
    except ControlPlaneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.node:
        try:
            start_node(plane, args.node_image)
        except NodeError as error:
            print(f"error: {error}", file=sys.stderr)
            down(directory)
            return 1
    print(plane.admin_kubeconfig)
    return 0


class NodeError(Exception):
    pass


def start_node(plane: ControlPlane, images: list[str]) -> None:
    from tests.cluster.node import RealNode, node_problem

    problem = node_problem()
    if problem is not None:
        raise NodeError(problem)
    node = RealNode(plane, plane.directory / "node", tie_to_parent=False)
    try:
        node.start(images)
    except Exception as error:  # docker, the import or the kubelet: the node's own message, nothing left behind
        node.stop()
        raise NodeError(str(error)) from error
    (plane.directory / NODE_STATE_FILE).write_text(json.dumps(node.state(), indent=2))


def down(directory: Path) -> int:
    state_file = directory / STATE_FILE
    if not state_file.exists():
        print(f"no cluster in {directory}", file=sys.stderr)
        return 1
    node_file = directory / NODE_STATE_FILE
    if node_file.exists():  # first: its pods are deleted through the apiserver
        from tests.cluster.node import RealNode

        RealNode.from_state(ControlPlane(directory), json.loads(node_file.read_text())).stop()
        node_file.unlink()
    stop_pids(reversed(json.loads(state_file.read_text())["pids"]))  # saved in start order: etcd first
    state_file.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
