"""The ``cxrgen`` command line: one subcommand per DVC stage, plus parameter tools.

Heavy modules (TensorFlow, DVC) are imported inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import logging
import os
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path

import click
import yaml

# Keep TensorFlow's C++ start-up messages out of stage logs; set before TensorFlow loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline.config import (
    DEFAULT_PARAMS_PATH,
    Params,
    ParamsError,
    describe_yaml_error,
    load_params,
    missing_dvc_params,
    parse_params,
)
from pipeline.errors import PipelineError
from pipeline.logs import log_duration, setup_logging

logger = logging.getLogger("cxrgen")

PARAMS_OPTION = click.option(
    "--params",
    "params_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_PARAMS_PATH,
    show_default=True,
    help="YAML file with the pipeline parameters.",
)


def stage_command(name: str) -> Callable:
    """Wrap a stage function as a click command that loads params and reports errors plainly."""

    def decorator(function: Callable[[Params], None]) -> click.Command:
        @click.command(name=name, help=function.__doc__)
        @PARAMS_OPTION
        @click.option(
            "--log-level",
            type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
            default="INFO",
            show_default=True,
            help="Logging level.",
        )
        @functools.wraps(function)
        def command(params_path: Path, log_level: str) -> None:
            setup_logging(log_level.upper())
            try:
                params = load_params(params_path)
                with log_duration(logger, f"stage {name}"):
                    function(params)
            except PipelineError as error:
                raise click.ClickException(f"{name}: {error}") from None
            except OSError as error:
                # Missing inputs, a full disk or a read-only folder: the user's to fix, not a bug.
                logger.debug("stage %s failed", name, exc_info=True)
                raise click.ClickException(f"{name}: {describe_os_error(error)}") from None
            except sqlite3.Error as error:
                # Only the feature cache's index uses SQLite; a full disk shows up here as "disk I/O error".
                logger.debug("stage %s failed", name, exc_info=True)
                raise click.ClickException(
                    f"{name}: the feature cache index under features/cache failed ({error}); "
                    "free disk space and make the folder writable, or delete features/cache to rebuild it"
                ) from None

        return command

    return decorator


_FULL_DISK_FIX = "; free disk space (or raise the file size limit) and run the stage again"
_PERMISSION_FIX = "; make the output folder writable and run the stage again"
_WRITE_ERROR_FIXES = {
    errno.ENOSPC: _FULL_DISK_FIX,
    errno.EDQUOT: _FULL_DISK_FIX,
    errno.EFBIG: _FULL_DISK_FIX,
    errno.EACCES: _PERMISSION_FIX,
    errno.EPERM: _PERMISSION_FIX,
    errno.EROFS: _PERMISSION_FIX,
}


def describe_os_error(error: OSError, dvc_yaml: Path = Path("dvc.yaml")) -> str:
    """Return a one-line message for a failed file operation, with the stage to run for a missing input.

    pandas raises FileNotFoundError with a bare path as the message, and the standard library
    puts the path in ``filename``. Such a path is looked up among the outputs in ``dvc_yaml``.
    """
    path = _missing_path(error)
    if path is None:
        return f"{error}{_WRITE_ERROR_FIXES.get(error.errno, '')}"
    stage = _stage_writing(path, dvc_yaml)
    if stage is None:
        return f"{path}: not found"
    return f"{path}: not found; the {stage} stage writes it, so run `dvc repro {stage}` first"


def _missing_path(error: OSError) -> str | None:
    if not isinstance(error, FileNotFoundError):
        return None
    if error.filename is not None:
        return str(error.filename)
    if len(error.args) == 1 and isinstance(error.args[0], str) and " " not in error.args[0]:
        return error.args[0]
    return None


def _stage_writing(path: str, dvc_yaml: Path) -> str | None:
    """Return the name of the stage in ``dvc_yaml`` whose outputs contain ``path``, if any."""
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return None
    wanted = Path(path)
    for stage, definition in stages.items():
        for output in definition.get("outs", []) + definition.get("metrics", []):
            output_path = Path(next(iter(output)) if isinstance(output, dict) else output)
            if wanted == output_path or output_path in wanted.parents:
                return stage
    return None


@click.group()
@click.version_option(package_name="cxrgen")
def main() -> None:
    """Learn to write chest X-ray reports from the Open-I collection (run the stages with `dvc repro`)."""


@stage_command("download")
def download(params: Params) -> None:
    """Fetch the Open-I archives (or use download.mirror) and extract them safely to data/raw."""
    from pipeline import download as stage

    stage.run(params.download)


@stage_command("extract")
def extract(params: Params) -> None:
    """Parse the XML reports into Parquet tables and assign train/val/test splits."""
    from pipeline import extract as stage

    stage.run(params.extract, params.split)


@stage_command("featurize")
def featurize(params: Params) -> None:
    """Compute DenseNet-121 features of every study's two views into features/chexnet.h5."""
    from pipeline import featurize as stage

    stage.run(params.featurize)


@stage_command("tokenize")
def tokenize(params: Params) -> None:
    """Clean report text, fit the tokenizer and build the GloVe embedding matrix."""
    from pipeline import tokenize as stage

    stage.run(params.tokenize)


@stage_command("train")
def train(params: Params) -> None:
    """Train the model named by the 'model' parameter on cached features."""
    from pipeline import trainer as stage

    stage.run(params)


@stage_command("score")
def score(params: Params) -> None:
    """Generate reports for the held-out split (greedy and beam search) and score them next to two baselines."""
    from pipeline import score as stage

    stage.run(params)


for _command in (download, extract, featurize, tokenize, train, score):
    main.add_command(_command)


def artifact_options(function: Callable) -> Callable:
    """Add the options that choose which trained artifacts a command loads."""
    options = [
        click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
                     help="DVC project whose models/ and data/text/ artifacts to use."),
        click.option("--experiment", default=None, metavar="NAME",
                     help="Use the artifacts of this DVC experiment (or Git revision) instead of the workspace's."),
        click.option("--weights", default=None, metavar="PATH",
                     help="CheXNet weights file, when the path recorded in models/model.json is not valid here."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@main.command("predict")
@click.argument("frontal", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("lateral", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON with the report, each word's id and log-probability.")
@click.option("--attention", "attention_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write one attention-map PNG per word into this folder (attention models only).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=50_000_000, show_default=True,
              help="Largest decoded image accepted, in pixels.")
@click.option("--log-level", default="WARNING", show_default=True, help="Logging level: DEBUG, INFO, WARNING.")
@artifact_options
def predict(frontal: Path, lateral: Path | None, as_json: bool, attention_dir: Path | None, max_pixels: int,
            repo: Path, experiment: str | None, weights: str | None, log_level: str) -> None:
    """Write the report for a FRONTAL radiograph and an optional LATERAL one with the trained model.

    With one image, it is used for both views, as the pipeline does for single-view studies.
    """
    from pipeline.attention_maps import VIEW_SIZE, load_views, write_word_maps
    from pipeline.predict import load_predictor

    setup_logging(log_level.upper())
    try:
        predictor = load_predictor(repo, experiment, weights, max_pixels, require_attention=attention_dir is not None)
        prediction = predictor.predict(frontal, lateral)
        maps = []
        if attention_dir is not None:
            views = load_views([frontal, lateral or frontal], VIEW_SIZE, max_pixels)
            maps = write_word_maps(attention_dir, views, prediction.words, prediction.attention)
    except (PipelineError, FileNotFoundError) as error:
        raise click.ClickException(f"predict: {error}") from None

    for warning in prediction.warnings:
        click.secho(f"WARNING: {warning}", err=True, fg="yellow", bold=True)
    if attention_dir is not None:
        click.echo(f"wrote {len(maps)} attention maps to {attention_dir}", err=True)
    if as_json:
        click.echo(json.dumps({**prediction.as_dict(), "attention_maps": [str(path) for path in maps]}, indent=2))
    else:
        click.echo(prediction.report)


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The page has no authentication; keep 127.0.0.1 unless a proxy guards it.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="TCP port to listen on.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0.001), default=20.0, show_default=True,
              help="Largest uploaded file accepted per view, in MiB.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=25_000_000, show_default=True,
              help="Largest uploaded image accepted per view, in pixels (width x height).")
@click.option("--log-level", default="INFO", show_default=True, help="Logging level: DEBUG, INFO, WARNING.")
@artifact_options
def serve(host: str, port: int, max_upload_mb: float, max_pixels: int,
          repo: Path, experiment: str | None, weights: str | None, log_level: str) -> None:
    """Serve a web page that writes reports for uploaded radiographs, with attention maps."""
    import uvicorn

    from pipeline.predict import load_predictor
    from pipeline.webapp import UploadLimits, create_app

    setup_logging(log_level.upper())
    try:
        predictor = load_predictor(repo, experiment, weights, max_pixels)
    except (PipelineError, FileNotFoundError) as error:
        raise click.ClickException(f"serve: {error}") from None
    for warning in predictor.settings.warnings():
        click.secho(f"WARNING: {warning}", err=True, fg="yellow", bold=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serve: listening on %s; anyone who reaches this address can use the page", host)

    app = create_app(predictor, UploadLimits(max_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels))
    _require_free_port(host, port)
    logger.info("serve: open http://%s:%d/ in a browser", host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)


def _require_free_port(host: str, port: int) -> None:
    """Raise ClickException when ``host``:``port`` cannot be bound, before the page's address is printed."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        reason = error.strerror or str(error)
        raise click.ClickException(f"serve: cannot listen on {host}:{port} ({reason}); choose another --port") from None


@main.group("params")
def params_group() -> None:
    """Check, show and change params.yaml."""


@params_group.command("check")
@PARAMS_OPTION
def params_check(params_path: Path) -> None:
    """Validate the parameters file and exit non-zero with the problems if it is invalid."""
    try:
        load_params(params_path)
    except ParamsError as error:
        raise click.ClickException(str(error)) from None
    dvc_yaml = params_path.parent / "dvc.yaml"
    missing = missing_dvc_params(params_path, dvc_yaml) if dvc_yaml.is_file() else []
    if missing:
        raise click.ClickException(
            f"{params_path}: missing {', '.join(missing)}, which {dvc_yaml} declares, so dvc repro stops; "
            "restore the file with `git checkout params.yaml` or copy the values from `cxrgen params show`"
        )
    click.echo(f"{params_path}: valid")


@params_group.command("show")
@PARAMS_OPTION
def params_show(params_path: Path) -> None:
    """Print every parameter with defaults filled in."""
    try:
        params = load_params(params_path)
    except ParamsError as error:
        raise click.ClickException(str(error)) from None
    click.echo(yaml.safe_dump(params.model_dump(), sort_keys=False), nl=False)


@params_group.command("set")
@PARAMS_OPTION
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
def params_set(params_path: Path, assignments: tuple[str, ...]) -> None:
    """Set dotted keys (e.g. featurize.weights=random), keeping comments; rejects unknown keys."""
    from ruamel.yaml import YAML

    editor = YAML()
    editor.preserve_quotes = True
    # Write None as "null", as params.yaml does, instead of ruamel's empty value.
    editor.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    document = _load_for_editing(editor, params_path)
    for assignment in assignments:
        key, separator, value = assignment.partition("=")
        if not separator or not key:
            raise click.BadParameter(f"{assignment!r}: expected KEY=VALUE", param_hint="assignments")
        _set_dotted(document, key.split("."), _parse_value(assignment, value))
    try:
        parse_params(yaml.safe_load(_dump(editor, document)) or {}, source=str(params_path))
    except ParamsError as error:
        raise click.ClickException(f"{error}\n{params_path} was not changed") from None

    from pipeline.atomic import write_text

    write_text(params_path, _dump(editor, document))
    click.echo(f"{params_path}: set {', '.join(assignments)}")


def _load_for_editing(editor, params_path: Path):
    """Return the parameters file as a ruamel mapping that keeps comments; {} if it is missing or empty."""
    from ruamel.yaml import YAMLError

    if not params_path.exists():
        return {}
    try:
        document = editor.load(params_path.read_text(encoding="utf-8"))
    except YAMLError as error:
        raise click.ClickException(f"{params_path}: invalid YAML: {describe_yaml_error(error)}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise click.ClickException(f"{params_path}: expected a mapping of sections, got {type(document).__name__}")
    return document


def _parse_value(assignment: str, value: str):
    if not value:
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise click.BadParameter(
            f"{assignment!r}: the value is not valid YAML ({describe_yaml_error(error)})", param_hint="assignments"
        ) from None


def _set_dotted(document, keys: list[str], value) -> None:
    node = document
    for depth, key in enumerate(keys[:-1], start=1):
        if key not in node or node[key] is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            section = ".".join(keys[:depth])
            raise click.BadParameter(f"{'.'.join(keys)}: {section} is a value, not a section", param_hint="assignments")
    node[keys[-1]] = value


def _dump(editor, document) -> str:
    buffer = io.StringIO()
    editor.dump(document, buffer)
    return buffer.getvalue()


if __name__ == "__main__":
    main()
