"""A pruned point as a directory: the trained, pruned weights it was measured on, what rebuilds
the network, its masks; :func:`load_pruned` returns the model ready to evaluate.

The one place for this layout. A sweep's trial folder (``trials/<trial id>/``) and an export
directory (``prunesearch-export ... out=DIR``) are both such directories::

    pruned_model.json     the manifest (below); written last, so its presence means complete
    weights.safetensors   masked artifact: the whole state dict, pruned entries zero in place
    surgered/             surgered artifact: model.safetensors + structure.json
                          (:meth:`prunelib.surgery.SurgeryResult.save`), the smaller model
    hf/                   a Hugging Face model (its ``save_pretrained`` with the tokenizer):
                          ``transformers`` loads it as any checkpoint
    masks.safetensors     the masks (:mod:`prunelib.masks`)
    model.onnx            optional (an export asked for it)

The manifest (JSON) holds ``format``/``version``, ``artifact`` (``"masked"`` or
``"surgered"``, :data:`prunelib.flops.ARTIFACT_KINDS`), ``spec`` (a :class:`ModelSpec`: how to
build the original, unpruned network the weights fit), ``weights`` (the files holding them),
``files`` (everything the directory holds) and,
when the weights were removed later (a sweep keeping front points only), ``weights_removed``
with the reason. An export adds the trial's ``settings`` and ``metrics``.

Loading needs no prunesearch state, no Ray, MLflow or Hydra: the spec names the model class
(``prunelib.models`` by name, or a user's own ``_target_`` with its arguments, which must be
importable where it is loaded) and the loader builds it, cuts it to the saved structure
(surgered) and loads the weights strictly, so a file that does not fit is an error, never a
silently different model.

Disk: a masked artifact is the model's full state dict (4 bytes per parameter in float32, the
zeros stored as zeros); a surgered one is the smaller model's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunelib.atomic import atomic_save
from torch import nn

from prunelib.flops import ARTIFACT_KINDS

__all__ = ["ARTIFACT_FORMAT", "ARTIFACT_VERSION", "HF_DIR", "MANIFEST_FILE", "MASKS_FILE", "ONNX_FILE",
           "SPEC_KINDS", "SURGERED_DIR", "WEIGHTS_FILE", "ArtifactError", "ModelSpec",
           "check_safetensors", "load_pruned",
           "mark_removed", "read_manifest", "remove_weights", "save_pruned", "weight_files", "write_manifest"]

ARTIFACT_FORMAT = "prunesearch-pruned-model"
ARTIFACT_VERSION = 1
MANIFEST_FILE = "pruned_model.json"
WEIGHTS_FILE = "weights.safetensors"
SURGERED_DIR = "surgered"
HF_DIR = "hf"
MASKS_FILE = "masks.safetensors"
ONNX_FILE = "model.onnx"
#: How a :class:`ModelSpec` builds the original network.
SPEC_KINDS = ("model", "module", "hf")


class ArtifactError(ValueError):
    """A pruned-model directory is missing, incomplete, foreign, or its weights were removed."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build the original (unpruned) network a pruned point's weights belong to.

    Attributes:
        kind: one of :data:`SPEC_KINDS`:

            * ``"model"``: ``config`` is a ``model`` config section, ``{"name": "lenet5",
              "width": 0.5}`` or a user's ``{"_target_": "mycode.Net", "width": 16}``, built
              with :func:`prunelib.models.model_from_config` (the factory gets the keys it names
              among ``input_shape``, ``in_channels``, ``num_classes``, plus the section's own);
            * ``"module"``: ``config`` is ``{"_target_": "mycode.Classifier", **kwargs}``, a
              LightningModule that builds its own network, called with exactly those keyword
              arguments; the network is :func:`prunelib.training.network_of` of it;
            * ``"hf"``: ``config`` is ``{"path": "hf", "hf_class": "GPT2LMHeadModel"}``, a
              Hugging Face model saved in the directory (relative ``path``): config, weights
              and tokenizer together; ``"trust_remote_code": true`` (with an Auto class as
              ``hf_class``) for a structured export whose per-layer shapes its loader file states.
        config: see ``kind``; JSON-serialisable.
        input_shape: one sample's shape, e.g. ``(1, 28, 28)`` (None for text models).
        num_classes: output classes (None for text models).
    """

    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SPEC_KINDS:
            raise ArtifactError(f"model spec kind must be one of {list(SPEC_KINDS)}, got {self.kind!r}")
        if self.kind in ("model", "module") and (self.input_shape is None or self.num_classes is None):
            raise ArtifactError(f"a {self.kind!r} spec needs input_shape and num_classes")
        if self.kind == "module" and not self.config.get("_target_"):
            raise ArtifactError("a 'module' spec needs the LightningModule's _target_")

    def as_dict(self) -> dict[str, Any]:
        """The JSON form stored in the manifest."""
        return {"kind": self.kind, "config": json.loads(json.dumps(self.config)),
                "input_shape": list(self.input_shape) if self.input_shape is not None else None,
                "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """The spec a manifest holds (:meth:`as_dict`)."""
        shape = data.get("input_shape")
        return cls(kind=str(data.get("kind")), config=dict(data.get("config") or {}),
                   input_shape=tuple(int(s) for s in shape) if shape is not None else None,
                   num_classes=int(data["num_classes"]) if data.get("num_classes") is not None else None)

    def build(self, root: str | os.PathLike | None = None) -> nn.Module:
        """A freshly initialised original network (``"hf"``: the saved model, weights included,
        read from ``root / config["path"]``).

        Raises:
            prunelib.targets.TargetError: a user's class does not import or rejects its arguments.
            ArtifactError: an ``"hf"`` spec without the directory it lives in.
        """
        if self.kind == "hf":
            from prunelib.models.hf import load_hf_model

            if root is None:
                raise ArtifactError("an 'hf' model spec is read from its directory: pass root")
            # trust_remote_code: a structured export whose shapes only its own loader file states.
            return load_hf_model(Path(root) / str(self.config.get("path", HF_DIR)),
                                 hf_class=self.config.get("hf_class"), key="hf",
                                 trust_remote_code=bool(self.config.get("trust_remote_code", False)))
        if self.kind == "module":
            from prunelib.targets import call_target
            from prunelib.training import network_of

            own = {k: v for k, v in self.config.items() if k != "_target_"}
            return network_of(call_target(self.config["_target_"], {}, own, "module._target_"))
        from prunelib.models import model_from_config

        assert self.input_shape is not None and self.num_classes is not None  # __post_init__
        return model_from_config(self.config, self.input_shape, self.num_classes)


def check_safetensors(path: str | os.PathLike) -> None:
    """Open a safetensors file's header and tensor table: a truncated or corrupt file raises
    (safetensors checks that the data covers every tensor's offsets)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        list(f.keys())


def _structure_spec(spec: ModelSpec | None) -> dict[str, Any] | None:
    """The model spec a surgery structure file carries for a reference model (so
    :func:`prunelib.surgery.load_surgered` rebuilds it without this manifest); None otherwise."""
    if spec is None or spec.kind != "model" or spec.config.get("_target_"):
        return None
    own = {k: v for k, v in spec.config.items() if k != "name"}
    return {"name": spec.config.get("name"), "input_shape": list(spec.input_shape or ()),
            "num_classes": spec.num_classes, "width": own.pop("width", 1.0), "kwargs": own}


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write a directory's manifest atomically (after its files; see :func:`save_pruned`); an
    export adds the trial's facts to a copied one with it."""
    text = json.dumps(manifest, indent=1, default=str)
    # A reader sees the old manifest or the new one, never half of one.
    return atomic_save(Path(directory) / MANIFEST_FILE, lambda tmp: tmp.write_text(text),
                       lambda tmp: json.loads(tmp.read_text()))


def save_pruned(directory: str | os.PathLike, model: nn.Module, spec: ModelSpec | None, artifact: str,
                *, surgery: Any = None, tokenizer: Any = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the pruned model ``model`` into ``directory`` and its manifest last; returns the manifest.

    Args:
        directory: created if missing; other files in it (the masks) are left alone.
        model: the network as measured: the masked model (zeros in place) for ``"masked"``,
            the surgered model for ``"surgered"``.
        spec: how to build the original network (None: :func:`load_pruned` then needs
            ``base_model``).
        artifact: ``"masked"`` or ``"surgered"``.
        surgery: the :class:`~prunelib.surgery.SurgeryResult` of a surgered artifact (its
            structure file is what rebuilds the smaller shapes).
        tokenizer: a Hugging Face tokenizer saved beside an ``"hf"`` model.
        extra: more JSON facts for the manifest (an export's ``settings`` and ``metrics``).

    Raises:
        ArtifactError: an unknown artifact kind, or a surgered one without its surgery.
    """
    if artifact not in ARTIFACT_KINDS:
        raise ArtifactError(f"artifact must be one of {list(ARTIFACT_KINDS)}, got {artifact!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if spec is not None and spec.kind == "hf":
        from prunelib.models.hf import save_hf_model

        save_hf_model(model, tokenizer, directory / str(spec.config.get("path", HF_DIR)))
    elif artifact == "surgered":
        if surgery is None:
            raise ArtifactError("a surgered artifact is saved with its SurgeryResult (surgery=)")
        surgery.save(directory / SURGERED_DIR, model_spec=_structure_spec(spec))
    else:
        from safetensors.torch import save_model

        # save_model keeps one copy of tied tensors (an embedding shared with a head), which
        # save_file refuses; the state dict includes buffers (BatchNorm statistics).
        atomic_save(directory / WEIGHTS_FILE, lambda tmp: save_model(model, str(tmp)), check_safetensors)
    manifest = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "artifact": artifact,
                "spec": spec.as_dict() if spec is not None else None,
                "weights": _weights_in(directory, spec, artifact), **(extra or {})}
    manifest["files"] = _present(directory, manifest)
    return write_manifest(directory, manifest)


def weight_files(manifest: dict[str, Any]) -> list[str]:
    """The files (relative paths) that hold a directory's weights, as its manifest lists them:
    what ``keep_weights`` removes and what must exist for :func:`load_pruned`."""
    return [str(p) for p in manifest.get("weights") or []]


def _weights_in(directory: Path, spec: ModelSpec | None, artifact: str) -> list[str]:
    if spec is not None and spec.kind == "hf":
        root = directory / str(spec.config.get("path", HF_DIR))
        return sorted(str(p.relative_to(directory)) for p in root.iterdir()
                      if p.is_file() and p.suffix in (".safetensors", ".bin"))
    return [f"{SURGERED_DIR}/model.safetensors"] if artifact == "surgered" else [WEIGHTS_FILE]


def mark_removed(manifest: dict[str, Any], reason: str) -> dict[str, Any]:
    """The manifest of a directory whose weight files are being removed (``reason`` in words)."""
    return {**manifest, "weights_removed": str(reason)}


def _present(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Every file of the directory the manifest describes (relative paths), for copying it."""
    out = list(weight_files(manifest))
    spec = manifest.get("spec") or {}
    if spec.get("kind") == "hf":
        root = directory / str((spec.get("config") or {}).get("path", HF_DIR))
        out += [str(p.relative_to(directory)) for p in sorted(root.iterdir()) if p.is_file()]
    elif manifest.get("artifact") == "surgered":
        out += [f"{SURGERED_DIR}/{name}" for name in ("structure.json", ONNX_FILE)
                if (directory / SURGERED_DIR / name).is_file()]
    for name in (MASKS_FILE, ONNX_FILE):
        if (directory / name).is_file():
            out.append(name)
    return sorted(dict.fromkeys(out))


def read_manifest(directory: str | os.PathLike, check_weights: bool = True) -> dict[str, Any]:
    """The manifest of a pruned-model directory.

    Raises:
        ArtifactError: no manifest, not ours, too new, or (``check_weights``) its weights were
            removed or are missing.
    """
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{str(directory)!r} holds no {MANIFEST_FILE}: not a pruned-model directory (a "
                            "trial folder of a sweep with trial.keep_weights=none keeps masks only)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{str(path)!r} is not a prunesearch pruned-model manifest")
    if int(manifest.get("version", 0)) > ARTIFACT_VERSION:
        raise ArtifactError(f"{str(path)!r} has version {manifest['version']}, newer than this prunelib "
                            f"({ARTIFACT_VERSION}); upgrade prunesearch")
    if check_weights:
        if manifest.get("weights_removed"):
            raise ArtifactError(f"{str(directory)!r}: its weights were removed ({manifest['weights_removed']}); "
                                "the masks are still there")
        missing = [p for p in weight_files(manifest) if not (directory / p).is_file()]
        if missing or not weight_files(manifest):
            raise ArtifactError(f"{str(directory)!r}: weight file(s) {missing or ['(none)']} are missing")
    return manifest


def remove_weights(directory: str | os.PathLike, reason: str) -> list[str]:
    """Delete a directory's weight files and record why in its manifest (masks and the rest stay);
    returns the files removed. A directory without a manifest, or already emptied, is left alone."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory, check_weights=False)
    except ArtifactError:
        return []
    if manifest.get("weights_removed"):
        return []
    manifest = mark_removed(manifest, reason)
    write_manifest(directory, manifest)  # first: a reader never finds a manifest naming absent weights
    removed = []
    for rel in weight_files(manifest):
        try:
            (directory / rel).unlink()
            removed.append(rel)
        except FileNotFoundError:
            continue
    return removed


def load_pruned(directory: str | os.PathLike, device: str | torch.device = "cpu",
                base_model: nn.Module | None = None) -> nn.Module:
    """The pruned model of a directory, ready to evaluate (eval mode, on ``device``).

    The original network is built from the manifest's spec (or ``base_model``, a freshly built
    original, when there is no spec), cut to the saved structure for a surgered artifact, and
    the saved weights are loaded strictly: they are exactly the ones the trial measured.

    Args:
        directory: a trial folder or an export directory (holds ``pruned_model.json``).
        device: where the model goes.
        base_model: the original (unpruned) network; needed only when the spec is missing.

    Raises:
        ArtifactError: not such a directory, its weights were removed, or no spec and no base model.
        prunelib.targets.TargetError: the spec's class does not import (a user's own code must
            be importable where the model is loaded).
        RuntimeError: the weights do not fit the built network (other code or settings).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    spec = ModelSpec.from_dict(manifest["spec"]) if manifest.get("spec") else None
    if spec is not None and spec.kind == "hf":
        model = spec.build(directory)
    else:
        if base_model is None and spec is None:
            raise ArtifactError(f"{str(directory)!r} has no model spec: pass the original model as base_model")
        base = base_model if base_model is not None else spec.build(directory)  # type: ignore[union-attr]
        if manifest["artifact"] == "surgered":
            from prunelib.surgery import load_surgered

            model = load_surgered(directory / SURGERED_DIR, base_model=base)
        else:
            from safetensors.torch import load_model

            load_model(base, str(directory / WEIGHTS_FILE), strict=True)
            model = base
    return model.to(device).eval()
