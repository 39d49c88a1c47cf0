"""The `lmi-operator` command: run the operator, render manifests, generate the CRD and docs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lmi-operator` console script."""
    parser = argparse.ArgumentParser(prog="lmi-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    crd = sub.add_parser("crd", help="write the CRD YAML generated from the API models")
    crd.add_argument("--out", default="crds", help="folder to write into (default: crds)")
    docs = sub.add_parser("docs", help="write the API reference generated from the API models")
    docs.add_argument("--out", default="docs/api.md", help="file to write (default: docs/api.md)")
    run = sub.add_parser("run", help="run the operator (settings from LMI_OPERATOR_* variables)")
    run.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)"
    )
    render = sub.add_parser("render", help="print the manifests of the LMIModels in FILE, without a cluster")
    render.add_argument("file", help="YAML file with one or more LMIModels ('-' for stdin)")
    render.add_argument("--namespace", default="default", help="namespace of models that name none")
    args = parser.parse_args(argv)

    if args.command == "crd":
        from lmi_operator import crd as crd_module

        for path in crd_module.write(args.out):
            print(path)
    elif args.command == "run":
        from lmi_operator import main as operator_main

        return operator_main.main(args.kubeconfig)
    elif args.command == "render":
        from lmi_operator import render_file

        try:
            sys.stdout.write(render_file.render_yaml(args.file, args.namespace))
        except render_file.RenderError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    elif args.command == "docs":
        from lmi_operator import apidocs

        apidocs.write(args.out)
        print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
