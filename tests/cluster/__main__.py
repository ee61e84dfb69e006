"""`python -m tests.cluster up --dir DIR` starts a control plane and prints its kubeconfig's path once every
component is ready; `python -m tests.cluster down --dir DIR` stops every process `up` started."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.cluster.controlplane import STATE_FILE, ControlPlane, ControlPlaneError, stop_pids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--dir", type=Path, required=True, help="the cluster's directory (logs, data, kubeconfig)")
    args = parser.parse_args(argv)
    state_file = args.dir / STATE_FILE
    if args.action == "down":
        if not state_file.exists():
            print(f"no cluster in {args.dir}", file=sys.stderr)
            return 1
        stop_pids(reversed(json.loads(state_file.read_text())["pids"]))  # saved in start order: etcd first
        state_file.unlink()
        return 0
    plane = ControlPlane(args.dir)
    try:
        plane.start(tie_to_parent=False)  # stays up after this command exits, until `down`
    except ControlPlaneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(plane.admin_kubeconfig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
