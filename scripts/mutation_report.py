"""The `make mutation` summary: mutants, killed, survived, timeouts and kill rate per module.

Reads mutmut's results (mutants/**/*.py.meta) and scripts/mutation_sglang.py's
(mutants/sglang/verdicts.json). A mutant without a test that covers it counts as not killed.
Run in .venv-vllm from the repository root; ``--survivors`` lists the survivors' names too.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("killed", "timeout", "survived", "no tests", "other")


def verdicts() -> dict[str, dict[str, str]]:
    """Per module file, each mutant's status as mutmut names them."""
    out: dict[str, dict[str, str]] = {}
    for meta in sorted((ROOT / "mutants").glob("maia_serving/**/*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        out[str(meta.relative_to(ROOT / "mutants"))[: -len(".meta")]] = {
            name: status_by_exit_code[code] for name, code in codes.items()
        }
    sglang = ROOT / "mutants" / "sglang" / "verdicts.json"
    if sglang.exists():
        out["maia_serving/sglang/stepping.py"] = json.loads(sglang.read_text())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="list the mutants not killed")
    args = parser.parse_args()
    rows, total = [], Counter()
    for path, statuses in verdicts().items():
        counts = Counter(s if s in COLUMNS else "other" for s in statuses.values())
        total.update(counts)
        rows.append((path, len(statuses), counts))
    rows.append(("all", sum(total.values()), total))
    print("| module | mutants | " + " | ".join(COLUMNS) + " | kill rate |")
    print("|---|" + "---:|" * (len(COLUMNS) + 2))
    for path, n, counts in rows:
        rate = 100 * (counts["killed"] + counts["timeout"]) / n if n else 0.0
        print(f"| {path} | {n} | " + " | ".join(str(counts[c]) for c in COLUMNS) + f" | {rate:.1f}% |")
    if args.survivors:
        for statuses in verdicts().values():
            for name, status in statuses.items():
                if status not in ("killed", "timeout"):
                    print(f"{status}: {name}")


if __name__ == "__main__":
    main()
