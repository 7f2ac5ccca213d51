"""The kit's own checkpoints, safetensors + JSON, no pickle: one resumable training state for every
training (:func:`save_training_state`), the cVPN (stage 2) and the classifier with its energy head
(stage 5; stage 6 and ``compare`` read it). Third-party classifier files are read with
``torch.load(weights_only=True)``."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .models.cvpn import CVPN
from .models.resnet import EnergyHead, build_classifier, remap_ood_checkpoint
from .runs import atomic_write_safetensors, atomic_write_text

__all__ = ["TRAINING_STATE_FORMAT", "save_training_state", "load_training_state", "delete_training_state",
           "CVPN_FORMAT", "save_cvpn", "load_cvpn", "ClassifierBundle", "save_classifier", "load_classifier"]

TRAINING_STATE_FORMAT = "ncis-training-state/1"
CVPN_FORMAT = "ncis-cvpn/1"


# ----------------------------------------------------------------------------- resumable training state
def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` (a state dict) as JSON, its tensors moved to ``tensors`` under path-like names."""
    if torch.is_tensor(value):
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, f"{name}/{k}", tensors) for k, v in value.items()}
        return {"__items__": [[k, _encode(v, f"{name}/{k}", tensors)] for k, v in value.items()]}
    return value


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {k: _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _files(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    return Path(folder) / f"{name}.json", Path(folder) / f"{name}.safetensors"


def save_training_state(folder: str | os.PathLike, name: str, objects: dict[str, Any], state: dict) -> None:
    """Write a resumable training state: ``<name>.safetensors`` (every tensor of the ``objects``'
    ``state_dict()``: modules, optimizer, EMA …) and ``<name>.json`` (``state``, e.g. step and
    history, at its top level, plus the rest of the objects' state: param groups, scheduler …).

    Both are written atomically, the JSON last; the safetensors header holds the JSON's SHA-256, so
    a kill between the two is detected on load.
    """
    if "checkpoint" in state:
        raise ValueError("state must not use the key 'checkpoint' (the objects' state goes there)")
    tensors: dict[str, torch.Tensor] = {}
    objects_json = {key: _encode(obj.state_dict(), key, tensors) for key, obj in objects.items()}
    text = json.dumps({**state, "checkpoint": {"format": TRAINING_STATE_FORMAT, "objects": objects_json}},
                      indent=2) + "\n"
    meta_path, tensor_path = _files(folder, name)
    atomic_write_safetensors(tensor_path, tensors, {"format": TRAINING_STATE_FORMAT,
                                                    "json_sha256": hashlib.sha256(text.encode()).hexdigest()})
    atomic_write_text(meta_path, text)


def load_training_state(folder: str | os.PathLike, name: str, objects: dict[str, Any],
                        check: Callable[[dict], None] | None = None) -> dict | None:
    """Load what :func:`save_training_state` wrote into ``objects`` (built as for a fresh run, the
    scheduler included, so that the saved learning rates are the ones left in place) and return
    ``state``; None when there is no ``<name>.json``. ``check(state)`` runs before anything is
    loaded (to refuse a checkpoint of another configuration).

    Raises:
        ValueError: an older layout, an interrupted save or other objects; the message says which
            files to delete.
    """
    meta_path, tensor_path = _files(folder, name)
    if not meta_path.exists():
        return None
    delete = f"delete {meta_path} and {tensor_path.name} beside it to start this training afresh"
    text = meta_path.read_text()
    state = json.loads(text)
    saved = state.pop("checkpoint", None)
    if not isinstance(saved, dict) or saved.get("format") != TRAINING_STATE_FORMAT:
        raise ValueError(f"{meta_path} is a checkpoint of an older layout: {delete}")
    if check is not None:
        check(state)
    digest = None
    if tensor_path.exists():
        with safe_open(str(tensor_path), framework="pt") as f:
            digest = (f.metadata() or {}).get("json_sha256")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    if digest != hashlib.sha256(text.encode()).hexdigest():
        raise ValueError(f"{tensor_path} does not belong to {meta_path.name} (a save was interrupted): {delete}")
    if set(saved["objects"]) != set(objects):
        raise ValueError(f"{meta_path} holds {sorted(saved['objects'])}, not {sorted(objects)}: {delete}")
    for key, obj in objects.items():
        obj.load_state_dict(_decode(saved["objects"][key], tensors))
    return state


def delete_training_state(folder: str | os.PathLike, name: str) -> None:
    """Remove ``<name>.json`` and ``<name>.safetensors`` (the JSON first: no half state remains)."""
    for path in _files(folder, name):
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the cVPN (stage 2)
def save_cvpn(path: str | os.PathLike, model: CVPN, meta: dict, mean: torch.Tensor | None = None) -> Path:
    """Write ``model`` (+ input mean) and ``meta`` as safetensors, atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors["input_mean"] = (mean if mean is not None else torch.zeros(model.dim)).detach().cpu().float()
    metadata = {"format": CVPN_FORMAT, "architecture": json.dumps(model.architecture()),
                "meta": json.dumps(meta)}
    return atomic_write_safetensors(path, tensors, metadata)


def load_cvpn(path: str | os.PathLike, device: torch.device | str = "cpu", expm: str = "auto"
              ) -> tuple[CVPN, dict, torch.Tensor]:
    """Read a checkpoint written by :func:`save_cvpn`; returns ``(model in eval mode, meta, input mean)``."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != CVPN_FORMAT:
            raise ValueError(f"{path} is not a cVPN checkpoint (format {metadata.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    arch, meta = json.loads(metadata["architecture"]), json.loads(metadata["meta"])
    model = CVPN(**arch, expm=expm)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    model.to(device).eval()
    return model, {**meta, **arch}, tensors["input_mean"].to(device)


# ----------------------------------------------------------------------------- the classifier (stage 5)
@dataclass
class ClassifierBundle:
    """A trained classifier: the network, the energy head, and what stage 6 needs to know."""

    model: nn.Module
    head: EnergyHead
    meta: dict

    @property
    def slope(self) -> float | None:
        """The saved energy head's slope a = w₁ − w₀ (None when the checkpoint had no head)."""
        slope = self.meta.get("slope")
        return None if slope is None else float(slope)


def save_classifier(path: Path, model: nn.Module, head: EnergyHead, meta: dict) -> None:
    """Model + head weights as safetensors, ``meta`` (arch, classes, head kind, slope …) in its header."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    atomic_write_safetensors(path, tensors, {"ncis": json.dumps(meta)})


def load_classifier(path: str | Path, arch: str | None = None, num_classes: int | None = None,
                    head_kind: str = "linear", head_hidden: int = 0, width: int = 32) -> ClassifierBundle:
    """Load a classifier: one of the kit's (``save_classifier``), a torchvision-layout state dict, or
    the OOD literature's CIFAR checkpoints (``encoder.*``, ``shortcut.*``, ``module.`` prefixes;
    third-party ``.pt``/``.pth`` files are read with ``weights_only=True``).

    ``arch``/``num_classes`` are needed for third-party files (the kit's own carry them).

    Raises:
        ValueError: the file's weights do not fit the architecture (names the architecture and the
            first mismatching keys).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"classifier checkpoint {path} does not exist")
    meta: dict = {}
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("ncis", "{}"))
        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    arch = meta.get("arch", arch)
    num_classes = meta.get("num_classes", num_classes)
    if arch is None or num_classes is None:
        raise ValueError(f"{path} carries no architecture: pass arch and num_classes")
    model_state = {k[6:]: v for k, v in state.items() if k.startswith("model.")} if meta else \
        remap_ood_checkpoint(state)
    head_state = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    model = build_classifier(arch, num_classes, meta.get("width", width))
    try:
        result = model.load_state_dict(model_state, strict=False)
    except RuntimeError as err:  # same names, other shapes
        first = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err)
        raise ValueError(f"{path} does not fit classifier.arch={arch} with {num_classes} classes: "
                         f"{first.strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path} does not fit classifier.arch={arch} with {num_classes} classes: "
                         f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    head = EnergyHead(meta.get("head", head_kind), meta.get("head_hidden", head_hidden))
    if head_state:
        head.load_state_dict(head_state)
        meta = {"arch": arch, "num_classes": num_classes, "slope": float(head.slope()), **meta}
    else:
        # No head in the file (the original never saves one): the head here is freshly
        # initialised and its slope is noise, so no slope is recorded (stage 6 then scores +logsumexp).
        meta = {"arch": arch, "num_classes": num_classes, **meta}
        meta.pop("slope", None)
    meta["head_saved"] = bool(head_state)
    return ClassifierBundle(model.eval(), head.eval(), meta)
