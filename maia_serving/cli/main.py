"""The `maia-serving` command: profiles, fit, simulate, plan, profile, calibrate-host, demo-model, train-model,
calibrate-kv, route-stats, qat-kv, reshard, merge."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from maia_serving.cli.base import Subcommand
from maia_serving.cli.calibrate_host import CalibrateHost
from maia_serving.cli.calibrate_kv import CalibrateKv
from maia_serving.cli.demo_model import DemoModel
from maia_serving.cli.fit import Fit
from maia_serving.cli.merge import Merge
from maia_serving.cli.plan import Plan
from maia_serving.cli.profile_model import ProfileModel
from maia_serving.cli.profiles import Profiles
from maia_serving.cli.qat_kv import QatKv
from maia_serving.cli.reshard import Reshard
from maia_serving.cli.route_stats import RouteStats
from maia_serving.cli.simulate import Simulate
from maia_serving.cli.train_model import TrainModel

# In the order `maia-serving --help` lists them.
SUBCOMMANDS: tuple[Subcommand, ...] = (
    Profiles(),
    Fit(),
    Simulate(),
    Plan(),
    ProfileModel(),
    CalibrateHost(),
    DemoModel(),
    TrainModel(),
    CalibrateKv(),
    RouteStats(),
    QatKv(),
    Reshard(),
    Merge(),
)


def package_version() -> str:
    """The installed distribution's version: pyproject.toml is its one source."""
    try:
        return version("maia-serving")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maia-serving", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as exc:
        print(f"maia-serving {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
