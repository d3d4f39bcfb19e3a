"""Run by tests/e2e/test_errors.py with an engine's own Python: build that engine's server configuration
from a server's command line, as the server would, but start nothing, and report how each build fails.

Usage: startup_probe.py vllm|sglang, with a JSON list of ``{"id", "args", "env"}`` on stdin: ``args`` is the
server's argv after the launcher (vLLM: ``serve MODEL ...``; SGLang: ``--model-path MODEL ...``), ``env`` the
variables the case sets (null unsets one). The platform comes from MAIA_SERVING_DEVICE=maia in the probe's
own environment. Prints ``PLATFORM {"name", "stats_addr"}``, then ``CASE {"id", "type", "message", "raised",
"where"}`` per case, all null when the build succeeds (``raised``: the error inside vLLM's pydantic wrapper;
``where``: where it entered and left maia_serving). The engines log as they do.
"""

import json
import os
import sys
import tempfile
import traceback


def build_vllm(argv: list[str]) -> None:
    """What `vllm serve` does up to its VllmConfig (vllm/entrypoints/cli/main.py, then the API server's
    build_async_engine_client), without binding a port or starting the engine."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import propagate_flash_late_interaction
    from vllm.logger import configure_logging_from_args
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    serve = ServeSubcommand()
    serve.subparser_init(subparsers).set_defaults(dispatch_function=serve.cmd)
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    serve.validate(args)
    if args.model_tag is not None:
        args.model = args.model_tag
    engine_args = AsyncEngineArgs.from_cli_args(args)
    propagate_flash_late_interaction(args, engine_args)
    engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)


def build_sglang(argv: list[str]) -> None:
    """What `python -m sglang.launch_server` does up to its resolved ServerArgs: prepare_server_args only
    parses; resolution (and with it the platform's apply_server_args_defaults) runs in resolve_once."""
    from sglang.srt.server_args import prepare_server_args

    prepare_server_args(argv).resolve_once()


def platform(engine: str) -> dict:
    """The platform the engine chose, before any case (choosing maia makes vLLM's stats folder)."""
    if engine == "vllm":
        from vllm.platforms import current_platform
    else:
        from sglang.srt.plugins import load_plugins

        load_plugins()  # as launch_server does first
        from sglang.srt.platforms import current_platform
    return {"name": current_platform.device_name, "stats_addr": os.environ.get("MAIA_SERVING_STATS_ADDR")}


def raised(exc: BaseException) -> BaseException:
    """The error itself: vLLM builds VllmConfig as a pydantic dataclass, whose ValidationError keeps the
    platform's error (and its traceback) in ``ctx``."""
    try:
        inner = exc.errors()[0]["ctx"]["error"]  # type: ignore[attr-defined]
    except (AttributeError, LookupError, TypeError):
        return exc
    return inner if isinstance(inner, BaseException) else exc


def where(exc: BaseException) -> str:
    """Where the error entered maia_serving and where it was raised there (else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/maia_serving/" in f.filename] or frames[-1:]
    return " -> ".join(
        f"{f.filename.rpartition('/maia_serving/')[2] or f.filename}:{f.lineno} in {f.name}"
        for f in (ours[0], ours[-1])
    )


def run_case(build, case: dict) -> dict:
    saved = dict(os.environ)
    for name, value in case["env"].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    tempfile.tempdir = None  # a case's TMPDIR counts, as in a fresh process
    try:
        build(case["args"])
    except BaseException as exc:  # argparse exits with SystemExit
        cause = raised(exc)
        return {
            "id": case["id"],
            "type": type(exc).__name__,
            "message": str(exc),
            "raised": type(cause).__name__,
            "where": where(cause),
        }
    finally:
        os.environ.clear()
        os.environ.update(saved)
        tempfile.tempdir = None
    return {"id": case["id"], "type": None, "message": None, "raised": None, "where": None}


def main() -> None:
    engine = sys.argv[1]
    cases = json.load(sys.stdin)
    build = {"vllm": build_vllm, "sglang": build_sglang}[engine]
    if engine == "vllm":
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

        cli_env_setup()
    print("PLATFORM " + json.dumps(platform(engine)), flush=True)
    for case in cases:
        print("CASE " + json.dumps(run_case(build, case)), flush=True)


if __name__ == "__main__":
    main()
