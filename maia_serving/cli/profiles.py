"""`maia-serving profiles`: the device profiles, or one profile's sources."""

from __future__ import annotations

import argparse

from maia_serving.cli.base import Subcommand, table
from maia_serving.emulator.hardware import host_profile_path, profile_names
from maia_serving.serving.profiles import load_profile


class Profiles(Subcommand):
    name = "profiles"
    help = "list the device profiles"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--show", metavar="NAME", help="print one profile's sources")

    def run(self, args: argparse.Namespace) -> int:
        if args.show:
            profile = load_profile(args.show)
            print(f"{profile.name}: {profile.description}")
            for key, source in profile.sources.items():
                mark = " (estimate)" if key in profile.estimates else ""
                print(f"  {key}: {source}{mark}")
            return 0
        names = [n for n in profile_names() if n != "host" or host_profile_path().exists()]
        rows = [
            [
                "profile",
                "HBM GiB",
                "HBM TB/s",
                "BF16 TFLOP/s",
                "scale-up GB/s/dir",
                "chips",
                "topology",
                "scale-out GB/s/dir",
                "estimates",
            ]
        ]
        for name in names:
            p = load_profile(name)
            up, out = p.scale_up, p.scale_out
            topology = up.topology + ("+reduction" if up.in_network_reduction else "")
            rows.append(
                [
                    p.name,
                    f"{p.hbm_capacity_bytes / 2**30:.0f}",
                    f"{p.hbm_bandwidth_bytes_per_s / 1e12:.2f}",
                    f"{p.peak_flops('bf16') / 1e12:.0f}",
                    f"{up.bandwidth_bytes_per_s / 1e9:.0f}",
                    str(up.chips),
                    topology,
                    f"{out.bandwidth_bytes_per_s / 1e9:.0f}" if out else "-",
                    str(len(p.estimates)),
                ]
            )
        print(table(rows))
        if "host" not in names:
            print("\n(host: run `maia-serving calibrate-host` to measure this machine)")
        return 0
