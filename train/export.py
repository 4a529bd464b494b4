"""`export`: a checkpoint's model written for deployment (ONNX or TorchScript), with the metadata
a deployer needs to feed it and read its output, in the file and beside it (OUT.json).

The exported graph is the eval-mode model (one output whatever the recipe: deep supervision's
extra outputs exist only in train mode):

  input  "image"  (N, M * (2k+1), size, size) float32: channel (o+k)*M + m holds modality m of
                  the set's M (T1, T1Gd, T2, FLAIR; MEN-RT: T1Gd alone) of the slice (of the
                  plane the model was trained on: "preprocess.plane", axial when absent) at
                  offset o in -k..k, preprocessed as the checkpoint records ("preprocess", "context");
  output "logits" (N, K, size, size) float32: sigmoid(logits) > 0.5 gives the K channels named in
                  metadata "output.channels" (WT/TC/ET or NCR/NET/ED/ET, gli-2024 adds RC, ...).

N is dynamic. H and W are fixed to the training size: the decoder pads odd sizes by amounts that
tracing turns into constants, so another size is not guaranteed to be right; resize to `size`.
ONNX goes through the TorchScript-based exporter (`dynamo=False`): still in torch 2.13, exact
opset, about 20x faster than the torch.export-based one, and no onnxscript needed. The metadata
JSON is stored in ONNX `metadata_props["brats_shards"]` / TorchScript extra file
`brats_shards.json`. Every file is written atomically (`shards.atomic.atomic_path`).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Literal, get_args

import torch

from shards import atomic
from shards.domain import MODALITIES, MODALITY_NAMES, RELEASES, label_rule
from shards.errors import BratsShardsError
from shards.manifest import set_channels
from train import checkpoint as ckpt
from train.metrics import THRESHOLD

Format = Literal["onnx", "torchscript"]
FORMATS = get_args(Format)
FORMAT_VERSION = 1
META_KEY = "brats_shards"  # ONNX metadata_props key; TorchScript extra file META_KEY + ".json"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
OPSETS = range(11, 21)  # what torch 2.13's TorchScript-based ONNX exporter implements (max 20)
CONTEXT_RULE = ("channel (o+k)*{m} + m holds modality m of the set's {m} of the {plane} slice z+o (z: the index "
                "along {axis}), o in -k..k; a neighbour that is not a brain slice is replaced by the nearest brain "
                "slice between it and z")
# the canonical (RAS) axis slices of each plane are cut along (preprocess.geometry: the view's last axis)
PLANE_AXIS = {"axial": "canonical RAS z", "coronal": "canonical RAS y", "sagittal": "canonical RAS x"}


class ExportError(BratsShardsError, ValueError):
    """A refused export: the one-line message names the file or option at fault."""


def export(checkpoint: str | Path, out: str | Path, fmt: Format, opset: int = 17) -> dict:
    """Write the checkpoint's model for deployment, with the metadata a deployer needs; returns the metadata.

    OUT gets the model (ONNX or TorchScript), OUT.json the same metadata as canonical JSON."""
    checkpoint, out = ckpt.in_run(checkpoint), Path(out)  # a run folder: its best.pt
    sidecar = out.with_name(out.name + ".json")
    check_request(checkpoint, out, sidecar, fmt, opset)
    model, meta = load_for_export(checkpoint)
    exporter = {"name": "torch.onnx.export", "dynamo": False, "opset": opset} if fmt == "onnx" else \
        {"name": "torch.jit.trace"}
    meta = {**meta, "format": fmt, "exporter": exporter}
    size = meta["preprocess"]["size"]
    example = torch.zeros(2, meta["input"]["shape"][1], size, size)  # (N, C, H, W); N=2: nothing batch-1 special
    with torch.no_grad():
        y = model(example)
    k = meta["output"]["shape"][1]
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (2, k, size, size):  # deep supervision must be off
        raise ExportError(f"{checkpoint}: the eval-mode model does not return one (N, {k}, {size}, {size}) tensor")
    text = atomic.dumps(meta).decode()
    sidecar.unlink(missing_ok=True)  # an old sidecar must never sit beside a new model
    if fmt == "onnx":
        write_onnx(model, example, out, text, opset)
    else:
        write_torchscript(model, example, out, text)
    atomic.write_bytes(sidecar, text.encode())  # last: a sidecar describes the model beside it
    return meta


def check_request(checkpoint: Path, out: Path, sidecar: Path, fmt: str, opset: int) -> None:
    """Refuse, before anything is read or written, what cannot give a usable export."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} for {out}; choose {' or '.join(FORMATS)}")
    if fmt == "onnx" and opset not in OPSETS:
        raise ExportError(f"ONNX opset {opset} for {out} is not supported; choose {OPSETS[0]}..{OPSETS[-1]}")
    if not checkpoint.exists():
        raise ExportError(f"not a brats-shards checkpoint: no checkpoint at {checkpoint}")
    if not checkpoint.is_file():  # a run folder given for its checkpoint, a FIFO, a device
        raise ExportError(f"not a brats-shards checkpoint: {checkpoint} is not a checkpoint file"
                          + (" (a folder holding no checkpoints/best.pt or last.pt)" if checkpoint.is_dir() else ""))
    for path in (out, sidecar):
        if path.is_dir():
            raise ExportError(f"{path} is an existing folder: give a file name to export to")


def load_for_export(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    """(eval-mode float32 CPU model, metadata) of a checkpoint (weights_only loads)."""
    try:
        rec = ckpt.read(checkpoint)  # the one read of the file: checked, then hashed and loaded from the same bytes
    except ckpt.CheckpointError as e:  # export's refusals are ExportErrors; the message names file and field
        raise ExportError(str(e)) from None
    model = ckpt.build(rec).float().eval()
    raw, cfg = rec["raw"], rec["config"]
    mods = set_channels({"config": rec["set"]})[0]
    in_ch, k, size = model.inc.net[0].in_channels, rec["context"], rec["preprocess"].size
    if in_ch != len(mods) * (2 * k + 1):
        raise ExportError(f"{checkpoint}: the model reads {in_ch} channels, {len(mods)} modalities and context "
                          f"{k} give {len(mods) * (2 * k + 1)}")
    rel = rec["release"]
    mode = rec["output_mode"]
    meta = {
        "format_version": FORMAT_VERSION,
        "input": {"name": INPUT_NAME, "shape": ["N", in_ch, size, size], "dtype": "float32",
                  "channels": input_channel_names(k, mods)},
        "output": {"name": OUTPUT_NAME, "shape": ["N", model.head.out_channels, size, size], "dtype": "float32",
                   "kind": "logits",
                   "channels": list(rec["channels"]), "mask_mode": mode,
                   "activation": "sigmoid", "threshold": THRESHOLD},
        "preprocess": rec["preprocess"].to_dict(),  # as predict applies it: every brain slice kept
        "context": {"slices_each_side": k, "rule": CONTEXT_RULE.format(m=len(mods), plane=rec["preprocess"].plane,
                                                                         axis=PLANE_AXIS[rec["preprocess"].plane])},
        "postprocess": {**rec["postprocess"].to_dict(),
                        "rule": "train/postprocess.py, on the 3D prediction mapped back to the source grid"},
        "labels": {"rule": label_rule(rel, mode),
                   "releases": {n: {s: r.label_of(s) for s in r.subregions} for n, r in RELEASES.items()
                                if r.subregions == rel.subregions}},
        "train_config": cfg.to_dict(),
        "source": {"checkpoint": checkpoint.name, "checkpoint_sha256": rec["sha256"],
                   "manifest_sha256": raw.get("manifest_sha256"), "epoch": raw.get("epoch")},
        "torch_version": torch.__version__,
    }
    return model, meta


def input_channel_names(k: int, modalities=MODALITIES) -> list[str]:
    """["T1@-1", "T1Gd@-1", ..., "FLAIR@0", ..., "FLAIR@+1"] for k=1: offset-major, as `with_context`."""
    return [f"{MODALITY_NAMES[mod]}@{o:+d}" if o else f"{MODALITY_NAMES[mod]}@0"
            for o in range(-k, k + 1) for mod in modalities]


# tracing warns that the decoder's odd-size check becomes a constant (H, W are fixed, so it is
# right), instance norm has no running statistics to switch off, and these tracing APIs are
# deprecated (they are what torch 2.13 offers for an exact opset): all expected, none actionable
_EXPECTED_WARNINGS = (r".*Converting a tensor to a Python .*", r".*legacy TorchScript-based ONNX export.*",
                      r".*The feature will be removed.*", r".*`torch\.jit\.\w+` is deprecated.*",
                      r".*instance_norm' is set to train=True.*")


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        for message in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


def write_onnx(model, example, out: Path, meta_json: str, opset: int) -> None:
    try:
        import onnx
    except ImportError:
        raise ExportError(f"exporting {out} as ONNX needs the onnx package: pip install 'brats-shards[export]'") \
            from None
    buf = io.BytesIO()
    with _quiet(), torch.no_grad():
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}})
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, meta_json
    proto.doc_string = (f"brats-shards 2D U-Net: {INPUT_NAME} -> {OUTPUT_NAME}; sigmoid > 0.5 per channel; "
                        f"metadata JSON in metadata_props['{META_KEY}']")
    onnx.checker.check_model(proto)
    atomic.write_bytes(out, proto.SerializeToString())


def write_torchscript(model, example, out: Path, meta_json: str) -> None:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, example)
    with atomic.atomic_path(out) as tmp, _quiet():
        torch.jit.save(traced, str(tmp), _extra_files={META_KEY + ".json": meta_json})


def read_metadata(path: str | Path) -> dict:
    """The metadata stored inside an exported file: TorchScript (a zip archive) or ONNX."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        files = {META_KEY + ".json": ""}
        with _quiet():
            torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        return json.loads(files[META_KEY + ".json"])
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if META_KEY not in props:
        raise ExportError(f"{path} holds no {META_KEY} metadata: not exported by brats-shards")
    return json.loads(props[META_KEY])
