"""The ``visionr1`` command.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` (cheap: no
heavy imports at module level) and ``main(args) -> int``. Heavy dependencies (torch, kopf,
MLflow) are imported inside ``main`` so that ``visionr1 validate`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("visionr1_operator.validate", "check VisionR1Run manifests"),
    "crd": ("visionr1_operator.crd", "print the VisionR1Run CRD"),
    "render": (
        "visionr1_operator.render",
        "print every object the operator would create for a run",
    ),
    "operator": ("visionr1_operator.main", "run the operator (what the chart's Deployment runs)"),
    "run-local": ("visionr1_operator.local", "run a VisionR1Run on this machine"),
    "ablations": (
        "visionr1_operator.ablations",
        "the paper's ablations at toy scale (recipe, sft_only, long, zero) via run-local",
    ),
    "toy": ("visionr1_jobs.toy.cli", "toy world: `toy data` and `toy model`"),
    "score": ("visionr1_jobs.eval.cli", "re-score saved predictions of a benchmark"),
    "reference": ("visionr1_operator.reference", "print the manifest reference (markdown)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionr1",
        description="Reproduce the Vision-R1 recipe on Kubernetes or on a laptop.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith(("visionr1_operator", "visionr1_jobs")):
                raise
            continue  # not built yet in this checkout
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
