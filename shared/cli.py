"""The command line shared by every pipeline: ``python -m pipelines.<name> <command> [flags]``.

Commands are ``train``, ``evaluate``, ``predict``, ``tune`` and ``export``. Results
(metrics JSON, predictions) go to standard output; logs go to standard error. Exit
codes: 0 success, 1 failure, 2 bad usage (unknown flag, invalid config value).

The config is resolved as preset, then ``--config`` files, then ``--set`` overrides.
``train`` saves it as ``config.yaml`` in the run directory. The other commands start
from that saved config when it exists, so they describe the model that was trained.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import yaml

from shared.config import (
    SEARCH_STAGES,
    TFLITE_VARIANTS,
    TUNERS,
    config_to_dict,
    load_config,
    resolve_config,
    save_config,
    select_preset,
)
from shared.datafiles import resolve_data_dir
from shared.distributed import STRATEGIES, TUNING_ROLES, read_tf_config, resolve_worker_run_dir
from shared.errors import ConfigError, DataError, ExportError
from shared.runs import default_run_dir, write_text_atomic

logger = logging.getLogger(__name__)

COMMANDS = ("train", "evaluate", "predict", "tune", "export")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class CommandContext:
    """Paths, parsed flags and output stream passed to a command together with its config."""

    pipeline: str
    command: str
    run_dir: Path
    data_dir: Path
    preset: str
    args: argparse.Namespace
    stdout: TextIO


CommandFn = Callable[[Any, CommandContext], "Mapping[str, Any] | None"]


def build_parser(pipeline: str, presets: Mapping[str, Any], description: str | None) -> argparse.ArgumentParser:
    """Build the argument parser with one subcommand per pipeline command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--preset", default="default", help=f"named config preset: {', '.join(sorted(presets))}")
    common.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                        help="YAML config file applied over the preset; repeatable, later files win")
    common.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.FIELD=VALUE",
                        help="override one config value, e.g. --set train.epochs=5; repeatable, applied last")
    common.add_argument("--data-dir", help="dataset root (default: $PIPELINES_DATA_DIR, else the cache folder)")
    common.add_argument("--run-dir", help=f"run directory (default: saved_models/{pipeline}/<preset>)")
    common.add_argument("--seed", type=int, help="random seed; overrides train.seed")
    common.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log verbosity on standard error")

    parser = argparse.ArgumentParser(prog=f"python -m pipelines.{pipeline}", description=description)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", parents=[common], help="train a model and save it in the run directory")
    train.add_argument("--strategy", choices=STRATEGIES, default="default",
                       help="tf.distribute strategy: default (one device), mirrored (all local GPUs) or "
                            "multi-worker (the machines listed in $TF_CONFIG); train.batch_size is global")

    evaluate = commands.add_parser("evaluate", parents=[common], help="score the trained model on a split")
    evaluate.add_argument("--split", help="split to evaluate (default: the dataset's standard test split)")
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N examples")

    predict = commands.add_parser("predict", parents=[common], help="run the trained model on new input")
    predict.add_argument("--input", default="-", help="input file (default: standard input)")
    predict.add_argument("--output", default="-", help="output file (default: standard output)")

    tune = commands.add_parser("tune", parents=[common], help="run a KerasTuner hyperparameter search")
    tune.add_argument("--tuner", choices=TUNERS, help="search algorithm (default: tune.tuner)")
    tune.add_argument("--max-trials", type=int, help="trials per stage (default: tune.max_trials)")
    tune.add_argument("--executions-per-trial", type=int, help="models trained per trial")
    tune.add_argument("--time-budget", type=float, metavar="MINUTES", help="stop starting trials after this")
    tune.add_argument("--stage", choices=("all", *SEARCH_STAGES), default="all",
                      help="run one search stage alone, or all in order")
    tune.add_argument("--max-size-kb", type=float, metavar="KB",
                      help="edge objective: penalize trials whose float32 TFLite model exceeds this size")
    tune.add_argument("--max-latency-ms", type=float, metavar="MS",
                      help="edge objective: penalize trials whose TFLite call takes longer than this")
    tune.add_argument("--keep-checkpoints", type=int, metavar="N",
                      help="keep the model checkpoints of the best N trials only (default 3)")
    tune.add_argument("--trials-per-process", type=int, metavar="N",
                      help="run the trials in child processes of N trials each, so that memory stays flat "
                           "(TensorFlow keeps about 10 MiB per trained model); default: all in this process")
    tune.add_argument("--role", choices=TUNING_ROLES,
                      help="distributed search: the chief serves the oracle, workers run trials (default: "
                           "from $KERASTUNER_TUNER_ID and $KERASTUNER_ORACLE_IP when set, else standalone)")
    tune.add_argument("--oracle", metavar="HOST:PORT",
                      help="address of the chief's oracle (required with --role chief or worker)")
    tune.add_argument("--worker-id", metavar="NAME",
                      help="name of this worker, unique in the search and required with --role worker (default: "
                           "$KERASTUNER_TUNER_ID); a restarted worker reusing its name resumes its unfinished trial")

    export = commands.add_parser("export", parents=[common], help="export SavedModel and TFLite models")
    export.add_argument("--variants", help=f"comma-separated TFLite variants from {','.join(TFLITE_VARIANTS)}")
    return parser


def write_predictions(context: CommandContext, text: str, count: int, kind: str) -> dict[str, Any] | None:
    """Write a predict command's ``text`` to ``--output``, or to standard output for "-".

    Returns:
        None after writing to standard output (the text is the result), else a summary
        ``{kind: count, "output": path}`` for the CLI to print.
    """
    output = context.args.output
    if output == "-":
        context.stdout.write(text)
        context.stdout.flush()
        return None
    write_text_atomic(output, text)
    logger.info("Wrote %d %s to %s", count, kind, output)
    return {kind: count, "output": output}


def configure_logging(level: str) -> None:
    """Send logs to standard error at ``level``; standard output is kept for results."""
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def resolve_command_config(args: argparse.Namespace, presets: Mapping[str, Any], run_dir: Path) -> Any:
    """Resolve the config for a command: preset or the run's saved config, then files, then --set."""
    base = select_preset(presets, args.preset)
    saved = run_dir / "config.yaml"
    if args.command != "train" and saved.is_file():
        logger.info("Using the config saved with the trained model: %s", saved)
        base = load_config(type(base), saved)
        if args.command != "tune":
            ignored = [o for o in args.overrides if o.split("=", 1)[0].startswith("model.")]
            if ignored:
                logger.warning("%s: the trained model fixes the architecture, so %s changes nothing here. "
                               "Retrain with these settings to use them.", args.command, ignored)
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    return resolve_config(base, args.config, overrides)


def check_resume_config(config: Any, run_dir: Path) -> None:
    """Reject a rerun with a different config where it would reuse what the old one trained.

    That is an interrupted run (``backup/``) or ensemble members (``members/``, whose
    finished members a rerun keeps).
    """
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    previous = load_config(type(config), saved)
    if config_to_dict(previous) == config_to_dict(config):
        return
    if (run_dir / "backup").exists():
        raise ConfigError(
            f"{run_dir} contains an interrupted run trained with another config ({saved}). "
            "Rerun with the same preset, --config and --set to resume it, or pass a new --run-dir."
        )
    if (run_dir / "members").exists():
        raise ConfigError(
            f"{run_dir}/members contains ensemble members trained with another config ({saved}), "
            "and a rerun would reuse the finished ones. Rerun with the same preset, --config and "
            f"--set, pass a new --run-dir, or delete {run_dir}/members to train every member again."
        )


def run_cli(
    pipeline: str,
    presets: Mapping[str, Any],
    commands: Mapping[str, CommandFn],
    argv: list[str] | None = None,
    description: str | None = None,
    stdout: TextIO | None = None,
) -> int:
    """Parse ``argv``, resolve the config, run the command and return the exit code."""
    parser = build_parser(pipeline, presets, description)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # argparse exits 2 on bad usage and 0 on --help.
        return int(exit_request.code or 0)
    configure_logging(args.log_level)
    stdout = stdout or sys.stdout
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(pipeline, args.preset)
    try:
        run_dir = resolve_strategy_run_dir(args, run_dir)
        config = resolve_command_config(args, presets, run_dir)
        if args.command == "train":
            check_resume_config(config, run_dir)
    except (ConfigError, DataError) as error:
        logger.error("%s", error)
        return EXIT_USAGE
    # One line at INFO keeps a later error in view. The whole config goes to DEBUG.
    saved = run_dir / "config.yaml"
    source = f"preset {args.preset}" if args.command == "train" or not saved.is_file() else f"saved {saved}"
    logger.info("Config for %s %s: %s, files %s, overrides %s", pipeline, args.command, source,
                args.config or "none", args.overrides or "none")
    logger.debug("Resolved config:\n%s", yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip())
    if args.command == "train":
        logger.info("Saved config to %s", save_config(config, run_dir / "config.yaml"))
    context = CommandContext(pipeline, args.command, run_dir, resolve_data_dir(args.data_dir), args.preset, args,
                             stdout)
    return dispatch(commands, config, context)


def resolve_strategy_run_dir(args: argparse.Namespace, run_dir: Path) -> Path:
    """Return the run directory of this process: a worker's own folder when it is not the chief.

    Raises:
        ConfigError: ``--strategy multi-worker`` with an invalid ``TF_CONFIG``.
    """
    if getattr(args, "strategy", "default") != "multi-worker":
        return run_dir
    worker_dir = resolve_worker_run_dir(run_dir, read_tf_config())
    if worker_dir != run_dir:
        logger.info("This worker is not the chief; it writes into %s", worker_dir)
    return worker_dir


def dispatch(commands: Mapping[str, CommandFn], config: Any, context: CommandContext) -> int:
    """Run the command and print its result as JSON; map errors to exit codes.

    With ``--strategy``, the strategy is created first (before any TensorFlow op, as
    MultiWorkerMirroredStrategy requires) and the command runs inside its scope.
    """
    from shared.distributed import build_strategy  # Imported late: they load TensorFlow.
    from shared.training import set_seeds

    try:
        strategy = build_strategy(getattr(context.args, "strategy", "default"))
    except ConfigError as error:
        logger.error("%s", error)
        return EXIT_USAGE
    set_seeds(config.train.seed)
    try:
        # Keras progress bars print to sys.stdout; send them to stderr so that standard
        # output carries only results. Commands write results to context.stdout.
        with strategy.scope(), contextlib.redirect_stdout(sys.stderr):
            result = commands[context.command](config, context)
    except ConfigError as error:
        logger.error("%s", error)
        return EXIT_USAGE
    except (DataError, ExportError) as error:
        logger.error("%s", error)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        logger.error("Interrupted; files already written in %s are kept.", context.run_dir)
        return 130
    if result is not None:
        context.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        context.stdout.flush()
    return EXIT_OK
