"""The `stalwart` command (also `python -m stalwart`).

stalwart train run.yaml [key=value ...] [--address ADDR]   train (embedded Ray without an address)
stalwart validate run.yaml [key=value ...]                 check a config, print it resolved
stalwart resume RUN_DIR [--address ADDR]                   continue from the durable checkpoint
stalwart drill run.yaml --faults N --seed S                randomized fault drill vs a clean run
stalwart demo                                              the fault-tolerance demo
stalwart report RUN_DIR                                    plot the loss curve
stalwart data prepare ...                                  text/JSONL -> token Parquet
stalwart finetune ...                                      HF model + NVMe offload on one machine
stalwart rl run.yaml | rl resume RUN_DIR | rl analyze | rl fit  RL with verifiable rewards
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stalwart.config import ConfigError, load_config


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run configuration (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=50")


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stalwart", description="Fault-tolerant training on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model")
    _add_config_arguments(train)
    _add_address(train)

    validate = commands.add_parser("validate", help="check a config without running anything")
    _add_config_arguments(validate)

    resume = commands.add_parser("resume", help="resume a stopped run from its durable checkpoint")
    resume.add_argument("run_dir")
    resume.add_argument("overrides", nargs="*")
    _add_address(resume)

    drill = commands.add_parser("drill", help="randomized fault drill checked against a clean run")
    _add_config_arguments(drill)
    drill.add_argument("--faults", type=int, default=5)
    drill.add_argument("--seed", type=int, default=0)

    commands.add_parser("demo", help="train the tiny model through a worker kill and a node loss")

    report = commands.add_parser("report", help="draw a run's loss curve to a PNG")
    _lazy(report, "stalwart.trainer.metrics", "add_report_arguments", "run_report")

    data = commands.add_parser("data", help="data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser("prepare", help="text or JSONL -> token Parquet")
    _lazy(prepare, "stalwart.data.prepare", "add_prepare_arguments", "run_prepare")

    finetune = commands.add_parser("finetune", help="fine-tune an HF model with NVMe offload")
    _lazy(finetune, "stalwart.offload.finetune", "add_finetune_arguments", "run_finetune")

    rl = commands.add_parser("rl", help="RL with verifiable rewards")
    rl_commands = rl.add_subparsers(dest="rl_command")
    rl_run = rl_commands.add_parser("run", help="run an RL job")
    _lazy(rl_run, "stalwart.launch.rl_driver", "add_rl_arguments", "run_rl")
    rl_resume = rl_commands.add_parser(
        "resume", help="continue a stopped RL run from its durable checkpoint"
    )
    _lazy(rl_resume, "stalwart.launch.rl_driver", "add_resume_arguments", "resume_rl")
    analyze = rl_commands.add_parser("analyze", help="pass@k, support and entropy of samples")
    _lazy(analyze, "stalwart.trainer.rl.analysis", "add_analyze_arguments", "run_analyze")
    fit = rl_commands.add_parser("fit", help="sigmoid compute-performance fit")
    _lazy(fit, "stalwart.trainer.rl.analysis", "add_fit_arguments", "run_fit")
    return parser


def _lazy(parser: argparse.ArgumentParser, module: str, add: str, run: str) -> None:
    """Wire a subcommand whose arguments and body live in their component's module."""
    import importlib

    try:
        target = importlib.import_module(module)
        getattr(target, add)(parser)
        parser.set_defaults(handler=getattr(target, run))
    except (ImportError, AttributeError) as error:
        message = f"this command is unavailable: {error}"
        parser.set_defaults(handler=lambda args, message=message: _unavailable(message))


def _unavailable(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def cmd_validate(args) -> int:
    config = load_config(args.config, args.overrides)
    print(config.to_yaml(), end="")
    print(f"# {args.config}: valid", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from stalwart.launch.job import run_job

    config = load_config(args.config, args.overrides)
    run_job(config, address=args.address)
    return 0


def cmd_resume(args) -> int:
    from stalwart.launch.job import resume_job

    resume_job(Path(args.run_dir), overrides=args.overrides, address=args.address)
    return 0


def cmd_drill(args) -> int:
    from stalwart.launch.faults import run_drill

    config = load_config(args.config, args.overrides)
    return 0 if run_drill(config, num_faults=args.faults, seed=args.seed) else 1


def cmd_demo(args) -> int:
    from stalwart.launch.demo import run_demo

    return 0 if run_demo() else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {
        "validate": cmd_validate,
        "train": cmd_train,
        "resume": cmd_resume,
        "drill": cmd_drill,
        "demo": cmd_demo,
    }
    handler = handlers.get(args.command) or getattr(args, "handler", None)
    if args.command == "rl" and args.rl_command is None:
        parser.parse_args(["rl", "--help"])
    try:
        return int(handler(args) or 0)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
