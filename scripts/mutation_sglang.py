"""Mutation testing of maia_serving/sglang/stepping.py (`make mutation`), whose tests need SGLang.

mutmut runs each mutant inside the Python it runs in, and .venv-vllm (where mutmut is installed)
cannot import SGLang. So this script makes the mutants with mutmut's own operators and names, in
.venv-vllm, then runs itself in .venv-sglang as a worker: it imports the tests' heavy dependencies
once and forks one child per mutant, which puts the mutated module in ``sys.modules`` and runs
tests/unit/sglang/test_stepping.py. Verdicts go to mutants/sglang/verdicts.json (read by
scripts/mutation_report.py).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = "maia_serving/sglang/stepping.py"
MODULE = "maia_serving.sglang.stepping"
TESTS = "tests/unit/sglang/test_stepping.py"
OUT = ROOT / "mutants" / "sglang"
SGLANG_PY = ROOT / ".venv-sglang" / "bin" / "python"


def make_mutants() -> list[dict]:
    """One entry per mutant: mutmut's name, the whole mutated module and its diff."""
    import libcst as cst
    from mutmut.mutation.file_mutation import create_mutations, deep_replace
    from mutmut.mutation.trampoline_templates import mangle_function_name

    source = (ROOT / TARGET).read_text()
    module, mutations, ignored_classes, ignored_functions = create_mutations(TARGET, source)
    # mutmut mutates top-level functions and the methods of top-level classes only.
    owners: dict[cst.FunctionDef, str] = {}
    for stmt in module.body:
        if isinstance(stmt, cst.FunctionDef) and stmt.name.value not in ignored_functions:
            owners[stmt] = mangle_function_name(name=stmt.name.value, class_name=None)
        elif isinstance(stmt, cst.ClassDef) and isinstance(stmt.body, cst.IndentedBlock):
            if stmt.name.value in ignored_classes:
                continue
            for method in stmt.body.body:
                if isinstance(method, cst.FunctionDef):
                    owners[method] = mangle_function_name(name=method.name.value, class_name=stmt.name.value)
    counts: dict[str, int] = {}
    mutants = []
    for mutation in mutations:
        owner = owners.get(mutation.contained_by_top_level_function)
        if owner is None:
            continue
        counts[owner] = counts.get(owner, 0) + 1
        code = deep_replace(module, mutation.original_node, mutation.mutated_node).code
        diff = difflib.unified_diff(source.splitlines(), code.splitlines(), TARGET, TARGET, n=0, lineterm="")
        mutants.append(
            {"name": f"{MODULE}.{owner}__mutmut_{counts[owner]}", "code": code, "diff": "\n".join(list(diff)[2:])}
        )
    return mutants


def run_one(code: str, timeout_s: float) -> tuple[str, float]:
    """Fork a child that runs the tests against ``code``; 'killed', 'survived' or 'timeout'."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        import pytest

        import maia_serving.sglang as package

        mutant = type(sys)(MODULE)
        mutant.__file__ = str(ROOT / TARGET)
        sys.modules[MODULE] = mutant
        package.stepping = mutant
        exec(compile(code, mutant.__file__, "exec"), mutant.__dict__)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os._exit(int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", TESTS])))
    deadline = start + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            verdict = "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
            return verdict, time.monotonic() - start
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - start
        time.sleep(0.02)


def worker(manifest: Path) -> None:
    """In .venv-sglang: check the clean module passes and a broken one fails, then run every mutant."""
    import pytest  # noqa: F401  (imported once here, inherited by every child)
    import torch  # noqa: F401
    from prometheus_client import CollectorRegistry  # noqa: F401
    from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: F401

    import maia_serving.serving.metrics  # noqa: F401
    from maia_serving.emulator.device.session import EmulatedDevice  # noqa: F401

    mutants = json.loads(manifest.read_text())
    source = (ROOT / TARGET).read_text()
    clean, clean_s = run_one(source, timeout_s=300)
    if clean != "survived":
        sys.exit(f"{TESTS} fails on the unmutated module ({clean})")
    # The tests must see the module this worker hands them, not the installed one.
    if run_one(source + "\nMaiaStepper = None\n", timeout_s=300)[0] != "killed":
        sys.exit(f"{TESTS} did not run against the injected module")
    timeout_s = 10 * clean_s + 5
    results = {}
    for i, mutant in enumerate(mutants, 1):
        verdict, seconds = run_one(mutant["code"], timeout_s)
        results[mutant["name"]] = verdict
        print(f"{i}/{len(mutants)} {verdict:8} {seconds:5.1f}s {mutant['name']}", flush=True)
    (manifest.parent / "verdicts.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.worker:
        worker(args.worker)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    mutants = make_mutants()
    manifest = OUT / "mutants.json"
    manifest.write_text(json.dumps(mutants))
    subprocess.run([str(SGLANG_PY), __file__, "--worker", str(manifest)], check=True)
    verdicts = json.loads((OUT / "verdicts.json").read_text())
    for mutant in mutants:
        if verdicts[mutant["name"]] == "survived":
            print(f"\nsurvived: {mutant['name']}\n{mutant['diff']}")


if __name__ == "__main__":
    main()
