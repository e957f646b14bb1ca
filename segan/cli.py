"""The ``segan`` command line: parse, delegate to the library, print.

Heavy libraries (torch, monai, mlflow) are imported inside the commands so that
``segan --help`` stays fast. A :class:`~segan.errors.UserError` anywhere below ends in
one ``error:`` line on stderr and its exit status (2 for bad input), never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from data_prep.phantom_spec import DTYPES, MODALITIES, STRUCTURES, VARIANTS, resolve_spec
from segan import __version__
from segan.errors import UserError, did_you_mean

_SET_HELP = "Override a config key, e.g. --set train.epochs=3 (repeatable)."


class Choice(click.Choice):
    """``click.Choice`` whose error also names the closest choice: click suggests mistyped
    options and commands itself, but not mistyped values."""

    def get_invalid_choice_message(self, value, ctx) -> str:
        return super().get_invalid_choice_message(value, ctx).rstrip(".") + did_you_mean(value, self.choices) + "."


def _verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    from segan.progress import configure_logging

    if value or ctx.parent is None:  # the group sets the quiet default; a command's -v can only add
        configure_logging(value)


def _verbose_option() -> click.Option:
    return click.Option(["-v", "--verbose"], is_flag=True, expose_value=False, is_eager=True, callback=_verbose,
                        help="Also show MLflow's INFO lines (database set-up, run URLs) and segan's own.")


class Command(click.Command):
    """Every command takes ``-v/--verbose`` (``segan train -v`` as well as ``segan -v train``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(_verbose_option())


class Group(click.Group):
    """Takes ``-v`` itself, and makes its commands and sub-groups (prepare, cache) take it."""

    command_class = Command
    group_class = type

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(_verbose_option())


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="segan")
def cli() -> None:
    """Adversarial medical-image segmentation: SegAN and classic GAN baselines.

    Logs: progress bars on a terminal, one line per epoch or case in a file or pipe; MLflow's
    INFO lines only with -v (README: Logs).
    """


# ---------------------------------------------------------------- prepare
@cli.group()
def prepare() -> None:
    """Generate phantoms, validate data sets and write data lists."""


@prepare.command("phantoms")
@click.option("--out", "out", type=click.Path(file_okay=False), default="data/phantoms", show_default=True)
@click.option("--cases", type=click.IntRange(2, None), default=24, show_default=True)
@click.option("--size", type=click.IntRange(32, 512), default=96, show_default=True,
              help="Field of view in mm per side (= voxels at 1 mm).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--test-fraction", type=click.FloatRange(0.0, 0.9), default=0.25, show_default=True)
@click.option("--variant", type=Choice(list(VARIANTS)), default="default", show_default=True,
              help="Preset (README: Phantom variants); the options below override it.")
@click.option("--channels", type=Choice(["1", "4"]), default=None,
              help="4: T1, T1ce, T2, FLAIR; 1: a T1-like image (CT always 1).")
@click.option("--spacing", default=None, help="Voxel size in mm: 2 or 1,1,4 (anatomy sampled accordingly).")
@click.option("--orientation", default=None, help="Stored axis code: RAS, LPS, LAS, ...")
@click.option("--modality", type=Choice(MODALITIES), default=None, help="mr, or ct (Hounsfield units).")
@click.option("--dtype", type=Choice(DTYPES), default=None,
              help="int16 with scl_slope/scl_inter, uint8 rescaled, mixed = float32 and int16 cases.")
@click.option("--structures", type=Choice(STRUCTURES), default=None,
              help="tumour (one), large (one large tumour) or small (6-12 small lesions).")
@click.option("--sform-only/--qform", "sform_only", default=None, help="Write qform code 0 (affine in the sform only).")
def prepare_phantoms(out: str, cases: int, size: int, seed: int, test_fraction: float, variant: str,
                     channels: str | None, spacing: str | None, orientation: str | None, modality: str | None,
                     dtype: str | None, structures: str | None, sform_only: bool | None) -> None:
    """Write a synthetic brain phantom data set in MSD layout (BraTS-like by default)."""
    from data_prep.phantoms import generate

    spec = resolve_spec(variant, channels=int(channels) if channels else None, spacing=spacing,
                        orientation=orientation, modality=modality, dtype=dtype, structures=structures,
                        sform_only=sform_only)
    click.echo(generate(Path(out), cases=cases, size=size, seed=seed, test_fraction=test_fraction, spec=spec))


@prepare.command("check")
@click.argument("root", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--datalist", type=click.Path(dir_okay=False), help="Write the data list (JSON) here.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/validation split.")
@click.option("--val-fraction", type=click.FloatRange(0.0, 0.9), default=0.2, show_default=True)
@click.option("--folds", type=click.IntRange(2, None), default=None, help="k-fold cross-validation splits.")
@click.option("--fold", type=click.IntRange(0, None), default=None,
              help="With --folds: the fold that validates (0..K-1)  [default: 0]")
@click.option("--unlabeled", default=None, help="Also check a folder or glob of unlabelled scans (data.unlabeled).")
def prepare_check(root: str, as_json: bool, datalist: str | None, seed: int, val_fraction: float,
                  folds: int | None, fold: int | None, unlabeled: str | None) -> None:
    """Validate every case of an MSD or BraTS folder; exit 2 listing all problems."""
    from data_prep.check import run_check

    code = run_check(Path(root), as_json=as_json, datalist=Path(datalist) if datalist else None,
                     seed=seed, val_fraction=val_fraction, folds=folds, fold=fold, unlabeled=unlabeled)
    sys.exit(code)


@prepare.command("fingerprint")
@click.argument("source", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the whole fingerprint as JSON.")
@click.option("--refresh", is_flag=True, help="Recompute even if the cache is current.")
def prepare_fingerprint(source: str, as_json: bool, refresh: bool) -> None:
    """Shapes, spacings, intensities and label sizes of a data set's training cases (cached)."""
    import json

    from data_prep.fingerprint import format_fingerprint, load_fingerprint

    fp, cache, from_cache = load_fingerprint(Path(source), refresh=refresh)
    click.echo(json.dumps(fp, indent=2) if as_json else format_fingerprint(fp, cache, from_cache))


# ---------------------------------------------------------------- train
@cli.command()
@click.argument("data", type=click.Path())
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help="CONFIG.yaml to write.")
@click.option("--method", default="segan", show_default=True, help="Method family (segan describe lists them).")
@click.option("--dims", type=Choice(["2", "3", "auto"]), default="auto", show_default=True)
@click.option("--device", type=Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--memory-gb", type=click.FloatRange(0.1, None), default=None,
              help="Memory budget for a training step (default: 4 on CPU, 8 on CUDA).")
@click.option("--minutes", type=click.FloatRange(0.1, None), default=None, help="Wall-clock budget of the run.")
@click.option("--trial/--no-trial", default=True, show_default=True,
              help="Measure one forward/backward of the planned segmentor (else estimate the step time).")
@click.option("--threads", type=click.IntRange(1, None), default=None,
              help="CPU threads the run will use: the trial is timed with them and train.threads is written.")
def plan(data: str, out: str, method: str, dims: str, device: str, memory_gb: float | None,
         minutes: float | None, trial: bool, threads: int | None) -> None:
    """Plan a training config from the fingerprint of DATA (folder or data list); README: Planning."""
    from segan.plan import format_plan, run_plan

    result = run_plan(data, out, method=method, dims=dims, device=device, memory_gb=memory_gb,
                      minutes=minutes, trial=trial, threads=threads)
    click.echo(format_plan(result))
    click.echo(f"wrote {out}; train with: segan train -c {out}  (or plan and train at once: segan train --data {data})")


@cli.command()
@click.option("-c", "--config", "config", type=click.Path(), default=None,
              help="YAML config (else --data: plan one from the data).")
@click.option("--data", type=click.Path(), default=None,
              help="Data-set folder or data list: without -c, plan the config from it (as `segan plan`); "
                   "with -c, only where the data is (data.root / data.datalist).")
@click.option("--method", default=None, help="Method to train (planned, or replacing the file's) [segan].")
@click.option("--minutes", type=click.FloatRange(0.1, None), default=None,
              help="Wall-clock budget (planned for, or train.max_minutes with -c).")
@click.option("--dims", type=Choice(["2", "3", "auto"]), default=None, help="Planning: 2D or 3D  [default: auto]")
@click.option("--device", type=Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Device planned for (or train.device with -c).")
@click.option("--memory-gb", type=click.FloatRange(0.1, None), default=None, help="Planning: memory budget of a step.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [outputs/<experiment>/<run>].")
@click.option("--resume", type=click.Path(), help="Checkpoint (last.pt) or run folder to continue.")
@click.option("--tracking-uri", help="MLflow tracking URI [$MLFLOW_TRACKING_URI or ./mlflow_runs].")
@click.option("--register", metavar="NAME", help="Register the best segmentor in the MLflow model registry.")
@click.option("--folds", type=click.IntRange(2, None), default=None,
              help="K-fold cross-validation of -c CONFIG: K fold models as child runs of one parent run; "
                   "OUT is an ensemble.")
def train(config: str | None, data: str | None, method: str | None, minutes: float | None, dims: str | None,
          device: str, memory_gb: float | None, overrides: tuple[str, ...], out: str | None, resume: str | None,
          tracking_uri: str | None, register: str | None, folds: int | None) -> None:
    """Train a segmentor with SegAN, a GAN baseline or plain supervision (README: Your own data)."""
    from segan.train_setup import resolve_train_setup
    from segan.train_run import run_training

    if folds is not None:
        from segan.cv import run_cv

        if resume or register or not config or method or dims or memory_gb:
            raise UserError("--folds trains K new models of -c CONFIG (plan one with `segan plan DATA -o "
                            "CONFIG.yaml`); it takes --data, --minutes, --set and --out, not --resume, --register, "
                            "--method, --dims or --memory-gb")
        extra = ([f"data.root={data}", "data.datalist=null"] if data else []) + \
            ([f"train.max_minutes={minutes}"] if minutes else [])
        sys.exit(run_cv(config, folds, [*extra, *overrides], out, tracking_uri))

    setup = resolve_train_setup(config, data, overrides, method=method, minutes=minutes, dims=dims, device=device,
                                memory_gb=memory_gb)
    if setup.planned:
        click.echo(f"{setup.summary}\nplanned from {data}; plan.yaml and fingerprint.json go to the run folder "
                   "and MLflow", err=True)
    result = run_training(setup.config, out_dir=out, resume=resume, tracking_uri=tracking_uri, register=register,
                          extra_inputs=setup.inputs)
    if result.is_main:  # under torchrun only rank 0 reports
        click.echo(result.summary(), err=result.exit_code != 0)
    sys.exit(result.exit_code)


@cli.command()
@click.option("-c", "--config", "config", type=click.Path(), required=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--in-channels", type=int, default=None, help="Override channels (else from the data set).")
def describe(config: str, overrides: tuple[str, ...], in_channels: int | None) -> None:
    """Print the resolved config (with the source of each value), then layer output shapes,
    parameter counts and the critic's receptive fields."""
    from segan.config_layers import format_resolved, resolve_config
    from segan.nets.describe import describe_models

    resolved = resolve_config(config, overrides)
    click.echo("# resolved config; '# method', '# file', '# --set' mark values that are not the defaults")
    click.echo(format_resolved(resolved) + "\n")
    click.echo(describe_models(resolved.config, in_channels=in_channels))


# ---------------------------------------------------------------- inference
@cli.command()
@click.option("-m", "--model", "models", required=True, multiple=True,
              help="Checkpoint, training folder, cv folder (cv.json), runs:/<id>/... or models:/<name>/<version>; "
                   "repeat to average an ensemble.")
@click.option("-i", "--input", "inputs", required=True, multiple=True, help="File, folder or glob.")
@click.option("-o", "--out", "out", type=click.Path(file_okay=False), required=True)
@click.option("--tta", is_flag=True, help="Average predictions over flips.")
@click.option("--probabilities", is_flag=True, help="Also write float32 probability maps.")
@click.option("--uncertainty", is_flag=True,
              help="Also write <case>_unc maps (member variance, or entropy for one member) and unc_* CSV columns.")
@click.option("--device", default="auto", show_default=True)
@click.option("--sw-batch", type=click.IntRange(1, None), default=None, help="Sliding-window batch size.")
@click.option("--overlap", type=click.FloatRange(0.0, 0.95), default=None, help="Sliding-window overlap.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--continue", "resume", is_flag=True, help="Skip inputs whose output exists.")
@click.option("--tracking-uri", help="MLflow tracking URI for runs:/ and models:/ URIs.")
@click.option("--report", is_flag=True, help="Also write OUT/report.html (QC page; README: QC report).")
def predict(models: tuple[str, ...], inputs: tuple[str, ...], out: str, tta: bool, probabilities: bool,
            uncertainty: bool, device: str, sw_batch: int | None, overlap: float | None, overwrite: bool,
            resume: bool, tracking_uri: str | None, report: bool) -> None:
    """Segment scans; masks keep each input's exact shape and affine."""
    from segan.inference import PredictOptions, run_predict

    opts = PredictOptions(tta=tta, probabilities=probabilities, device=device, sw_batch=sw_batch,
                          overlap=overlap, overwrite=overwrite, resume=resume, uncertainty=uncertainty,
                          report=report)
    sys.exit(run_predict(list(models), list(inputs), Path(out), opts, tracking_uri=tracking_uri))


@cli.command()
@click.option("-p", "--pred", "pred", type=click.Path(), required=True, help="Folder of predicted masks.")
@click.option("-g", "--gt", "gt", type=click.Path(), required=True, help="Folder of ground-truth masks.")
@click.option("--regions", default=None,
              help="name=1,2,3;name2=2,3 (default: from the predictions' model or dataset.json).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write per-case metrics CSV.")
@click.option("--run", "run_id", default=None, help="Log the mean metrics to this MLflow run.")
@click.option("--tracking-uri", default=None)
def evaluate(pred: str, gt: str, regions: str | None, out: str | None, run_id: str | None,
             tracking_uri: str | None) -> None:
    """Dice, IoU, HD95, precision and sensitivity per case and region."""
    from segan.metrics import run_evaluate

    sys.exit(run_evaluate(Path(pred), Path(gt), regions=regions, out=Path(out) if out else None,
                          run_id=run_id, tracking_uri=tracking_uri))


# ---------------------------------------------------------------- tracking
@cli.command()
@click.option("-e", "--experiment", "experiments", multiple=True, help="Experiment name (repeatable).")
@click.option("--metric", default="val_dice_mean", show_default=True)
@click.option("--group-by", default="method", show_default=True)
@click.option("--format", "fmt", type=Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write curves and bars (PNG).")
@click.option("--filter", "filter_string", default=None, metavar="EXPR",
              help="Only runs matching this MLflow search filter, e.g. \"params.seed = '0'\".")
@click.option("--tracking-uri", default=None)
def compare(experiments: tuple[str, ...], metric: str, group_by: str, fmt: str, plot: str | None,
            filter_string: str | None, tracking_uri: str | None) -> None:
    """Compare MLflow runs: one row per run, then mean ± std per group."""
    from segan.tracking import run_compare

    click.echo(run_compare(list(experiments), metric=metric, group_by=group_by, fmt=fmt,
                           plot=Path(plot) if plot else None, tracking_uri=tracking_uri,
                           filter_string=filter_string))


@cli.command()
@click.option("-c", "--config", "config", type=click.Path(), required=True)
@click.option("--methods", default="segan,bce,lsgan,supervised", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--set-grid", "grid", multiple=True, metavar="KEY=V1,V2",
              help="Also sweep a config key over these values, e.g. --set-grid data.labeled_cases=2,4,8 "
                   "(repeatable: the cartesian product); a numeric key ends with a Dice-vs-value plot.")
@click.option("--tracking-uri", default=None)
def sweep(config: str, methods: str, seeds: str, overrides: tuple[str, ...], grid: tuple[str, ...],
          tracking_uri: str | None) -> None:
    """Train every method x seed (x grid cell) as child runs of one parent run, then compare."""
    from segan.sweep import run_sweep

    sys.exit(run_sweep(config, methods=methods, seeds=seeds, overrides=list(overrides),
                       tracking_uri=tracking_uri, grid=list(grid)))


# ---------------------------------------------------------------- cache
@cli.group()
def cache() -> None:
    """Inspect or empty the preprocessing cache (bounded by $SEGAN_CACHE_MAX_GB, default 2 GB)."""


_CACHE_DIR = click.option("--dir", "cache_dir", type=click.Path(file_okay=False), default=None,
                          help="Cache folder [$SEGAN_CACHE or ~/.cache/segan; a config's preprocess.cache_dir].")


@cache.command("info")
@_CACHE_DIR
def cache_info_command(cache_dir: str | None) -> None:
    """Size, number of cached cases, stale entries and the limit."""
    from data_prep.cache import cache_info, default_cache_dir

    click.echo(cache_info(Path(cache_dir) if cache_dir else default_cache_dir()))


@cache.command("clear")
@_CACHE_DIR
def cache_clear_command(cache_dir: str | None) -> None:
    """Remove every cached case and the remembered file checks."""
    from data_prep.cache import clear_cache, default_cache_dir

    click.echo(clear_cache(Path(cache_dir) if cache_dir else default_cache_dir()))


# ---------------------------------------------------------------- bench
@cli.command()
@click.option("-c", "--config", "config", type=click.Path(), default="configs/segan_2d.yaml", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--device", type=Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--steps", type=click.IntRange(2, None), default=20, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def bench(config: str, overrides: tuple[str, ...], device: str, steps: int, json_out: str | None) -> None:
    """Measure eager vs fast training throughput, loader rate, MFU and inference time."""
    from segan.bench import run_bench

    click.echo(run_bench(config, overrides=list(overrides), device=device, steps=steps,
                         json_out=Path(json_out) if json_out else None))


from segan.report.command import report_command  # noqa: E402 - after the group it joins

cli.add_command(report_command)


def main() -> None:
    """Console-script entry point: user errors become one line and an exit status."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
