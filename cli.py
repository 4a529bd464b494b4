"""brats-shards command line. Thin: each command parses options and calls one library function;
heavy imports (torch, dask, zarr) happen inside commands so `--help` is instant."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Turn BraTS releases into verified 2D slice shards and train segmentation models on them.")


def _fail(msg: str, code: int = 2) -> None:
    from shards.errors import one_line  # capped, and a DataLoader worker's traceback cut to its message
    from shards.redact import redact  # a URL's password or token never reaches a terminal or a log

    typer.echo(f"error: {one_line(redact(msg))}", err=True)
    raise typer.Exit(code)


@contextmanager
def _refusals(interrupted: str | None = None):
    """Every deliberate refusal of the library (a BratsShardsError, whose message names the patient,
    file or URL) and every OS error on a named file becomes one line on stderr and an exit code:
    0 ok, 1 some patients failed, 2 bad usage or refused input (see shards/errors.py). Ctrl-C
    in a long command says how to continue (`interrupted`), exit 130."""
    from shards.errors import BratsShardsError

    try:
        yield
    except BratsShardsError as e:
        _fail(str(e), e.exit_code)
    except OSError as e:  # read-only or full disk, a folder where a file should be, ...
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        typer.echo(f"interrupted: {interrupted}", err=True)
        raise typer.Exit(130) from None


INTERRUPTED_BUILD = "re-run the same command to finish the build: the patients already written are kept"
INTERRUPTED_DEMO = "run the same command again: the data is kept, the build completes and training resumes"


def _report_failed(failed: dict[str, str]) -> None:
    """Name each failed patient with its reason; exit 1 when there is any (the rest was done)."""
    for pid, reason in sorted(failed.items()):
        typer.echo(f"  FAILED {pid}: {reason}")
    if failed:
        raise typer.Exit(1)


# config fields whose option is not named after them
_OPTIONS = {"fmt": "--format", "split_seed": "--seed", "formats": "--format"}


def _config(cls, **kw):
    """A config dataclass, its validation error (bad option values) as a usage error naming the
    option (`fmt must be ...` -> `--format must be ...`)."""
    try:
        return cls(**kw)
    except ValueError as e:
        field, _, rest = str(e).partition(" ")
        if field.isidentifier() and field.islower() and rest.startswith("must"):
            field = _OPTIONS.get(field, "--" + field.replace("_", "-"))
        _fail(f"{field} {rest}".strip())


def _shape(text: str) -> tuple[int, int, int]:
    try:
        s = tuple(int(v) for v in text.split(","))
        assert len(s) == 3 and min(s) >= 8
        return s
    except (ValueError, AssertionError):
        _fail(f"--shape must be three integers >= 8 like 240,240,155, not {text!r}")


@app.command("make-demo-data")
def make_demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write the synthetic release into.")],
    patients: Annotated[int, typer.Option(help="Number of cases.")] = 8,
    shape: Annotated[str, typer.Option(help="Volume shape X,Y,Z (BraTS: 240,240,155).")] = "240,240,155",
    release: Annotated[str, typer.Option(help="File layout, modalities and labels of a release of the table: 2020 (also 2018, 2019, 2021), 2023, gli-2024 (with resection cavities), men, met (with resection cavities), ssa, ped-2023, ped-2024 (with cysts), men-rt (T1Gd and GTV), msd (4-D files).")] = "2020",
    orientation: Annotated[str, typer.Option(help="Stored orientation: lps (as BraTS ships) or ras.")] = "lps",
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same cases.")] = 0,
    start: Annotated[int, typer.Option(help="Index of the first case.")] = 1,
    kind: Annotated[str, typer.Option(help="realistic (MNI152 anatomy, glioma-like tumours, cavities and cysts where the release has them, confounders, thick slices, rater noise: hard enough to rank recipes) or toy (an ellipsoid brain with a concentric tumour: fast, for tiny test shapes).")] = "realistic",
):
    """Write synthetic BraTS-format cases (brain, tumour sub-regions, four modalities)."""
    from preprocess.synthetic.demo import write_demo_data

    try:
        ids = write_demo_data(out, patients, _shape(shape), release=release, kind=kind, seed=seed,
                              orientation=orientation, start=start, progress=True)
    except ValueError as e:  # a kind, release or orientation that does not fit
        _fail(str(e))
    typer.echo(f"wrote {len(ids)} {kind} cases ({release} layout) to {out}")


@app.command("build-shards")
def build_shards(
    input: Annotated[Path, typer.Argument(help="BraTS release folder (one sub-folder per patient).")],
    output: Annotated[Path, typer.Argument(help="Shard set folder to create or complete.")],
    size: Annotated[int, typer.Option(help="In-plane size of every slice.")] = 128,
    normalize: Annotated[str, typer.Option(help="volume: z-score over the brain of the whole volume; slice: per-slice z-score.")] = "volume",
    crop: Annotated[bool, typer.Option("--crop/--no-crop", help="Crop to the brain's square bounding box before resizing.")] = False,
    mask: Annotated[str, typer.Option(help="subregions: [NCR/NET, ED, ET]; regions: [WT, TC, ET].")] = "subregions",
    tumour_free_fraction: Annotated[float, typer.Option(help="Fraction of tumour-free brain slices to keep.")] = 1.0,
    val_fraction: Annotated[float, typer.Option(help="Fraction of patients in the validation split.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the patient split and slice subsampling.")] = 0,
    format: Annotated[str, typer.Option(help="zarr, wds or both.")] = "both",
    codec: Annotated[str, typer.Option(help="Zarr compressor: blosc-zstd, blosc-lz4, zstd or none, with optional :LEVEL.")] = "blosc-lz4:5",
    workers: Annotated[Optional[int], typer.Option(help="Local Dask worker processes (default: CPU count; 0: no Dask, in-process).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Address of an existing Dask scheduler, e.g. tcp://host:8786.")] = None,
    release: Annotated[Optional[str], typer.Option(help="Read the input as this release of the table (README, Releases); default: told by the file names. Needed for BraTS-PED (ped-2023 or ped-2024).")] = None,
    planes: Annotated[str, typer.Option(help="Slicing planes, comma-separated: axial first, then coronal and/or sagittal (e.g. axial,coronal,sagittal), cut from the same preprocessed volume; train --plane picks one.")] = "axial",
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
):
    """Build Zarr and/or WebDataset slice shards with a manifest (resumable, deterministic)."""
    from preprocess.config import PreprocessConfig
    from preprocess.build import BuildConfig, build
    from shards.domain import RELEASES

    formats = {"both": ("zarr", "wds"), "zarr": ("zarr",), "wds": ("wds",)}.get(format)
    if formats is None:
        _fail(f"--format must be zarr, wds or both, not {format!r}")
    pre = _config(PreprocessConfig, size=size, normalize=normalize, crop=crop, mask=mask,
                  tumour_free_fraction=tumour_free_fraction, seed=seed)
    cfg = _config(BuildConfig, preprocess=pre, val_fraction=val_fraction, split_seed=seed, formats=formats,
                  codec=codec, planes=tuple(p.strip() for p in planes.split(",")))
    with _refusals(INTERRUPTED_BUILD):
        r = build(input, output, cfg, workers=workers, scheduler=scheduler, progress=not quiet, release=release)
    m = r.manifest
    n = {s: len(p) for s, p in m["splits"].items()}
    typer.echo(f"{output}: {n['train']} train + {n['val']} val patients "
               f"({r.built} built, {r.reused} already done), {len(m['failed'])} failed")
    if r.changed:  # a rebuilt patient is never silent: its input is not what the set held
        typer.echo(f"rebuilt, their source files changed since the last build: {', '.join(r.changed)}")
    typer.echo(f"release: {m['config']['convention']} ({RELEASES[m['config']['convention']].description.split(' (')[0]})")
    _report_failed({f["patient"]: f["reason"] for f in m["failed"]})


@app.command()
def verify(
    shards: Annotated[Path, typer.Argument(help="Shard set folder.")],
    sources: Annotated[Optional[Path], typer.Option("--sources", help="Also re-hash the source files the manifest names, relative to this input folder, and name each that no longer matches.")] = None,
):
    """Re-hash every file against the manifest and check slice counts."""
    from shards.verify import verify as run, verify_sources

    if sources is not None and not sources.is_dir():
        _fail(f"--sources {sources} is not a folder (the input folder the set was built from)")
    with _refusals():
        problems = run(shards)
        if sources is not None:
            problems += verify_sources(shards, sources)
    for p in problems:
        typer.echo(f"BAD {p}")
    if problems:
        typer.echo(f"{shards}: {len(problems)} problem(s)")
        raise typer.Exit(1)
    typer.echo(f"{shards}: OK, every file matches the manifest"
               + (f", and every source file under {sources} matches it" if sources is not None else ""))


@app.command()
def info(
    shards: Annotated[Path, typer.Argument(help="Shard set folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Patients and slices per split, class balance, bytes on disk, build config."""
    from shards.manifest import format_summary, load_manifest, summary

    with _refusals():
        s = summary(load_manifest(shards))
    typer.echo(json.dumps(s, indent=1, sort_keys=True) if as_json else format_summary(s))


# train's options that go into TrainConfig as they are (the recipe's are RECIPE_FIELDS; --format is `fmt`)
TRAIN_OPTIONS = ("model", "base_channels", "depth", "loss", "warmup_epochs", "folds", "fold", "epochs", "batch_size",
                 "num_workers", "seed", "device", "compile", "log_samples", "max_batches", "checkpoint_every",
                 "grad_clip", "plane")


@app.command()
def train(
    ctx: typer.Context,
    shards: Annotated[str, typer.Argument(help="Shard set: local folder or URL (http(s)://, s3://, gs://).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints/, metrics.csv, plots/.")],
    model: Annotated[str, typer.Option(help="unet or attention-unet.")] = "unet",
    base_channels: Annotated[int, typer.Option(help="Channels of the first level (doubling per level).")] = 32,
    depth: Annotated[int, typer.Option(help="Number of downsamplings.")] = 4,
    recipe: Annotated[str, typer.Option(help="Starting point for the options below: 'default' (the nnU-Net-style 2D recipe) or 'seed' (the seed notebook's: batch norm, Adam + plateau, no augmentation); options given explicitly override it.")] = "default",
    norm: Annotated[Optional[str], typer.Option(help="instance (nnU-Net) or batch (seed).  [default: instance]")] = None,
    act: Annotated[Optional[str], typer.Option(help="leaky (leaky ReLU, nnU-Net) or relu (seed).  [default: leaky]")] = None,
    deep_supervision: Annotated[Optional[bool], typer.Option("--deep-supervision/--no-deep-supervision", help="Losses on the decoder's lower levels too (weights 1, 1/2, 1/4...), as nnU-Net.  [default: off]")] = None,
    targets: Annotated[Optional[str], typer.Option(help="regions: train sigmoid outputs on WT/TC/ET derived at train time (nnU-Net for BraTS); channels: the set's own mask channels.  [default: regions]")] = None,
    loss: Annotated[str, typer.Option(help="dice or dice-bce.")] = "dice-bce",
    optimizer: Annotated[Optional[str], typer.Option(help="sgd (Nesterov momentum 0.99), adam or adamw.  [default: sgd]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Base learning rate.  [default: 0.01 for sgd, 0.001 for the seed recipe]")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay.  [default: 3e-5]")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="poly ((1 - progress)^0.9 per step, nnU-Net), cosine (with --warmup-epochs) or plateau (halve the LR after 3 epochs without a better val Dice).  [default: poly]")] = None,
    warmup_epochs: Annotated[float, typer.Option(help="cosine: linear warm-up over this many epochs.")] = 0.0,
    augment: Annotated[Optional[str], typer.Option(help="nnunet (rotation, scaling, mirroring, noise, blur, brightness, contrast, low resolution, gamma on the training device), light (the seed's flips and small rotations in the loader) or off.  [default: nnunet]")] = None,
    fg_fraction: Annotated[Optional[float], typer.Option(help="Share of each batch that holds tumour (foreground oversampling).  [default: 0.33]")] = None,
    fg_balance: Annotated[Optional[bool], typer.Option("--fg-balance/--no-fg-balance", help="Foreground sampling as nnU-Net's: the --fg-fraction share of every batch drawn for a mask channel chosen evenly (rare ET as often as oedema), a slice weighted by that channel's pixels; off: only a batch short of tumour slices gets some.  [default: off]")] = None,
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm at this value (nnU-Net: 12); 0: off.")] = 0.0,
    context: Annotated[Optional[int], typer.Option(help="2.5D: neighbouring slices on each side given as extra channels.  [default: 0]")] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation: split the training patients into this many folds by the hash of the patient id alone (not --seed: the folds of one --folds K partition the patients whatever the seed; 0: off, use the set's val split).")] = 0,
    fold: Annotated[int, typer.Option(help="With --folds: the fold held out for validation.")] = 0,
    postprocess: Annotated[Optional[bool], typer.Option("--postprocess/--no-postprocess", help="Choose ET->NCR and small-component thresholds on validation; predict applies them.  [default: on]")] = None,
    epochs: Annotated[int, typer.Option(help="Total epochs (with --resume: the new total).")] = 10,
    batch_size: Annotated[int, typer.Option(help="Slices per batch (per process).")] = 32,
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes per rank.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, data order and augmentation.")] = 0,
    format: Annotated[str, typer.Option(help="zarr or wds (default: what the set holds, zarr first).")] = "",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (CUDA: mixed precision, channels_last).")] = "auto",
    compile: Annotated[bool, typer.Option(help="torch.compile the model.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/last.pt up to --epochs. Options left out are the checkpoint's; an option given that differs from it is refused, except --epochs, --num-workers (at an epoch's end only), --device, --compile, --log-samples and --checkpoint-every.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run already in OUT (without it, an existing run is refused).")] = False,
    cache_dir: Annotated[Optional[str], typer.Option(help="Cache for remote shards (default ~/.cache/brats-shards).")] = None,
    cache_size_gb: Annotated[float, typer.Option(help="Remote-shard cache bound; least recently used files go first.")] = 20.0,
    remote_timeout: Annotated[float, typer.Option(help="Seconds a remote request may wait to connect or for more data; transient failures are retried 3 times with backoff.")] = 60.0,
    storage_options: Annotated[Optional[str], typer.Option(help="fsspec options as JSON, e.g. '{\"endpoint_url\": \"http://...\"}'.")] = None,
    log_samples: Annotated[bool, typer.Option(help="Record the sample keys each rank trained on (OUT/samples_rank*.jsonl).")] = False,
    max_batches: Annotated[int, typer.Option(help="Cap batches per epoch (0: no cap).")] = 0,
    log: Annotated[Optional[list[str]], typer.Option("--log", help="Experiment tracking besides metrics.csv and the plots: tensorboard (OUT/tensorboard/) or mlflow (MLFLOW_TRACKING_URI, default a local store in OUT). Repeatable.")] = None,
    run_name: Annotated[Optional[str], typer.Option(help="MLflow run name.")] = None,
    plane: Annotated[str, typer.Option(help="Slices to train on: axial, or coronal or sagittal of a set built with --planes (predict --ensemble averages models of different planes in 3D).")] = "axial",
    checkpoint_every: Annotated[int, typer.Option(help="Steps between mid-epoch checkpoints (last.pt with the loader's position, so --resume continues mid-epoch); 0: at epoch ends only.")] = 500,
    quiet: Annotated[bool, typer.Option(help="No progress bar or per-epoch lines.")] = False,
):
    """Train a 2D U-Net / Attention U-Net on a shard set (local or remote), with checkpoints and plots."""
    from train.config import RECIPE_FIELDS, from_options
    from train.loop import train as run

    options = dict(locals())  # the recipe options by name, as RECIPE_FIELDS names them; the others as they are
    cfg = _config(from_options, recipe_name=recipe, recipe_options={k: options[k] for k in RECIPE_FIELDS},
                  fmt=format, **{k: options[k] for k in TRAIN_OPTIONS})
    with _refusals(f"continue with the same command plus --resume (from {out / 'checkpoints' / 'last.pt'})"):
        history = run(shards, out, cfg, resume=resume, overwrite=overwrite, progress=not quiet, cache_dir=cache_dir,
                      storage_options=_json_object(storage_options, "--storage-options"), cache_bytes=int(cache_size_gb * 2**30), remote_timeout=remote_timeout,
                      log=tuple(log or ()), run_name=run_name, given=_given(ctx, recipe))
    if history and not quiet:
        typer.echo(f"metrics: {out / 'metrics.csv'}  plots: {out / 'plots'}  checkpoints: {out / 'checkpoints'}")


def _given(ctx: typer.Context, recipe: str) -> dict[str, str]:
    """The TrainConfig fields given on the command line, field -> option: --resume takes the others
    from the checkpoint. A --recipe given gives every recipe field it sets."""
    import dataclasses

    from train.config import RECIPE_FIELDS, TrainConfig
    from train.resume import option_name

    def typed_in(param):  # by the source's name: typer may bring its own click, with its own enum
        return getattr(ctx.get_parameter_source(param), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")

    typed = {f.name: "format" if f.name == "fmt" else f.name for f in dataclasses.fields(TrainConfig)}
    given = {field: option_name(field) for field, param in typed.items() if param in ctx.params and typed_in(param)}
    if typed_in("recipe"):
        given.update({k: f"--recipe {recipe}" for k in RECIPE_FIELDS if k not in given})
    return given


def _json_object(text: str | None, option: str) -> dict | None:
    """A JSON object option (None when not given); anything else is a usage error."""
    try:
        value = json.loads(text) if text else None
    except ValueError as e:
        _fail(f"{option} is not JSON: {e}")
    if value is not None and not isinstance(value, dict):
        _fail(f"{option} must be a JSON object")
    return value


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint from `train` (best.pt or last.pt), or its run folder (its best.pt).")],
    input: Annotated[Path, typer.Argument(help="BraTS-layout folder; segmentations not needed.")],
    output: Annotated[Path, typer.Argument(help="Folder for <patient>.nii.gz label maps.")],
    ensemble: Annotated[Optional[list[Path]], typer.Option("--ensemble", help="More checkpoints (e.g. the other folds, or models of the other planes: train --plane): probabilities of all are averaged on the source grid. Repeat the option.")] = None,
    tta: Annotated[bool, typer.Option(help="Average predictions over in-plane flips.")] = False,
    postprocess: Annotated[bool, typer.Option("--postprocess/--no-postprocess", help="Apply the post-processing thresholds stored in the (first) checkpoint.")] = True,
    batch_size: Annotated[int, typer.Option(help="Slices per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    release: Annotated[Optional[str], typer.Option(help="Read the input as this release of the table (README, Releases); default: told by the file names. Needed for BraTS-PED (ped-2023 or ped-2024).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
):
    """Segment every patient and write label maps in the input's geometry and label convention."""
    from train.predict import predict as run

    with _refusals():
        r = run([checkpoint, *(ensemble or [])], input, output, device=device, batch_size=batch_size, tta=tta,
                progress=not quiet, postprocess=postprocess, release=release)
    typer.echo(f"{output}: {len(r['written'])} prediction(s) written, {len(r['failed'])} failed")
    _report_failed(r["failed"])


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint from `train` (best.pt or last.pt), or its run folder (its best.pt).")],
    out: Annotated[Path, typer.Argument(help="File to write (OUT.json beside it holds the metadata).")],
    format: Annotated[str, typer.Option(help="onnx (needs the export extra) or torchscript.")] = "onnx",
    opset: Annotated[int, typer.Option(help="ONNX opset (11-20).")] = 17,
):
    """Write the model for deployment, with its preprocessing, channel names and thresholds as metadata."""
    from train.export import export as run

    with _refusals():
        meta = run(checkpoint, out, format, opset)
    typer.echo(f"{out}: {format}, input {meta['input']['name']} {meta['input']['shape']}, "
               f"output {meta['output']['name']} {meta['output']['channels']}; metadata also in {out}.json")


@app.command()
def evaluate(
    pred_dir: Annotated[Path, typer.Argument(help="Folder of <patient>.nii.gz predictions.")],
    ref_dir: Annotated[Path, typer.Argument(help="BraTS-layout folder with segmentations, or flat <patient>.nii.gz files.")],
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Per-patient CSV (default PRED_DIR/metrics.csv).")] = None,
    release: Annotated[Optional[str], typer.Option(help="Read the input as this release of the table (README, Releases); default: told by the file names. Needed for BraTS-PED (ped-2023 or ped-2024).")] = None,
    split_from: Annotated[Optional[str], typer.Option(help="A shard set (folder or URL) or a training run: mark each patient train or val (the run's held-out fold with --folds) and summarise the validation patients apart.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
):
    """Dice, HD95 and NSD of the BraTS regions WT/TC/ET (global and lesion-wise, BraTS 2023 rules) and sub-region Dice, per patient and summarised."""
    from train.evaluate import evaluate as run, format_summary, patient_splits

    csv_path = csv_path or pred_dir / "metrics.csv"
    with _refusals():
        splits = patient_splits(split_from) if split_from else None
        r = run(pred_dir, ref_dir, csv_path, progress=not quiet, release=release, splits=splits)
    for split, summary in (r["by_split"] or {"all": r["summary"]}).items() if r["rows"] else ():
        n = sum(row.get("split", "all") == split for row in r["rows"])
        typer.echo({"val": "validation patients:", "train": "training patients (the model has seen them):",
                    "other": "patients the set does not hold:", "all": ""}[split])
        typer.echo(format_summary(summary, n))
    if r["rows"]:
        typer.echo(f"per-patient metrics: {csv_path}")
        if splits is None:
            typer.echo("every patient of REF_DIR is scored, training ones too: --split-from SHARDS_OR_RUN "
                       "summarises the validation patients apart")
    if r["missing"]:
        typer.echo(f"no prediction for {len(r['missing'])} patient(s), scored as empty: {', '.join(r['missing'])}")
    if r["assumed"]:  # a flat reference folder without --release: say which labels were read
        from shards.domain import RELEASES

        counts = {name: sum(v == name for v in r["assumed"].values()) for name in sorted(set(r["assumed"].values()))}
        read = "; ".join(f"{n} patient(s) as {name} ({', '.join(map(str, RELEASES[name].label_values))})"
                         for name, n in counts.items())
        typer.echo(f"no --release for the flat reference folder: labels read by their values, {read}; "
                   f"the conventions are 2020 (ET 4) and 2023 (ET 3); name another with --release")
    _report_failed(r["failed"])


@app.command()
def show(
    source: Annotated[Optional[Path], typer.Argument(help="A raw BraTS folder or a shard set.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the PNG files.")] = Path("figures"),
    patient: Annotated[Optional[str], typer.Option(help="Patient to draw (default: the first).")] = None,
    run: Annotated[Optional[Path], typer.Option(help="A training run folder: truth vs prediction per validation patient.")] = None,
    release: Annotated[Optional[str], typer.Option(help="Read a raw SOURCE as this release of the table (README, Releases); default: told by the file names. Needed for BraTS-PED (ped-2023 or ped-2024).")] = None,
):
    """Figures: modalities, three planes, mask overlay, histograms, class imbalance; run predictions."""
    from train.show import figures, run_figures

    if source is None and run is None:
        _fail("give a SOURCE folder, --run RUN_DIR, or both")
    paths = []
    with _refusals():
        if source is not None:
            paths += figures(source, out, patient, release)
        if run is not None:
            paths += run_figures(run, out)
    for p in paths:
        typer.echo(str(p))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data, shards and run.")] = Path("demo"),
    patients: Annotated[int, typer.Option(help="Synthetic patients.")] = 16,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 12,
    workers: Annotated[int, typer.Option(help="Dask workers for the build.")] = 2,
):
    """The whole pipeline on realistic synthetic data, on CPU in a few minutes: data, shards, the default recipe, Dice."""
    from train.demo import run_demo

    with _refusals(INTERRUPTED_DEMO):
        run_demo(out, patients, epochs, workers, typer.echo)


if __name__ == "__main__":
    sys.exit(app())
