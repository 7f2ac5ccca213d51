"""Stage 5 for many classifiers at once: G trainings of one architecture in one vectorised pass.

``compare`` trains one classifier per (outlier method, seed). :func:`train_many` steps G of them
together so that **each keeps exactly what it gets when trained alone** by
:func:`~ncis_core.stages.train_classifier.train`: its initialisation (``_init_model`` under
``torch.manual_seed(seed)``), its ID data order and augmentation draws, its outlier source and
batches, its generated-looking ID batches, its energy head and optimizer state; the same
learning-rate schedule and the same files (``best.safetensors``, ``history.json``, the per-epoch
``last.safetensors`` + ``last.json``) in its own folder.

Data, the same for both engines: per model the loaders of ``train()`` (same datasets, transforms,
seeded generators, the outlier and generated loaders cycled by ``_cycle``), prepared by the same
``accelerate`` call. The transforms draw from torch's global generator, so each model keeps its own
copy of that generator's state, swapped in around its draws (``torch.set_rng_state``): its stream
of batches is the one it draws alone. One thread (:class:`_Prefetch`) draws the next step's G
batches while the models step, so the per-image transforms overlap the arithmetic.

Two engines make the G optimizer steps of a pass:

* ``grouped`` (the default on CUDA) — :class:`PackedNet` puts the G networks side by side in the
  channel dimension: ``Conv2d(C, C')`` becomes ``Conv2d(G·C, G·C', groups=G)`` (model g owns channels
  ``g·C … (g+1)·C − 1``), ``BatchNorm2d(C)`` becomes ``BatchNorm2d(G·C)`` (statistics and running
  averages are per channel, so per model, with nothing to do — the reason for grouped convolutions
  over ``vmap`` of the network, where BatchNorm's running statistics need special care), ReLU and
  pooling act per channel, the final ``Linear`` becomes a batched product (:class:`PackedLinear`).
  The energy heads are stacked (``torch.func.stack_module_state``) and applied with ``vmap``. The
  loss is the sum of the G losses, so each model's gradient is its own loss's; SGD with momentum,
  Nesterov and weight decay acts element by element, so one optimizer over the packed tensors is G
  optimizers. A small network's step is a string of kernels too small to fill a GPU; packed, G steps
  cost about one.
* ``threaded`` (the default on the CPU) — each model keeps its own modules and SGD and makes
  ``train()``'s very step (:func:`_step_one`); the G steps of a pass are spread over worker threads
  (``torch.get_num_threads()`` of them, one intra-op thread each; kernels release the GIL). Measured
  on the 2-core CPU of this project (torch 2.13, oneDNN): a grouped convolution costs per model what
  a separate one does (NCHW: about twice as much; channels-last: no less than the separate
  channels-last network), so packing buys nothing there, while one small network cannot keep two
  cores busy and G independent steps can. Same kernels (``train()``'s channels-last layout,
  ``stage5.MEMORY_FORMAT``) on the same thread count: the same bits as ``train()`` (any change of
  rounding — another memory layout, another thread count, grouping — moves the weights by ~1e-6 per
  step, and where an activation sits at a ReLU or max-pool kink that grows to ~1e-3 within a few
  steps, for ``train()`` against itself as much).

What can share a pass: one architecture and one classifier config except the per-model fields
(:data:`PER_MODEL`: seed, outlier source) — :func:`shared_key` — and the same composition of the
joint batch: BatchNorm's statistics are over the whole batch, so a model without outliers
(``none``: the ID batch alone) cannot share a pass with outlier models (ID + generated ID +
outliers); :func:`train_many` groups by that and by the epoch a model resumes from, and cuts each
group into passes of ``max_parallel``.

Resumable from per-epoch checkpoints: the files ``train()`` writes, so a killed pass resumes from the
last finished epoch, by this module or by ``train()`` alone. One process only: under ``accelerate
launch`` with several processes ``compare`` trains one at a time. When it pays
(:func:`models_per_pass`): the ``small`` network; the ResNets are compute-bound, one at a time.

Example:
    >>> results = train_many([(cfg_a, run, folder_a), (cfg_b, run, folder_b)])  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..config import ExperimentConfig
from ..data import get_split
from ..device import resolve_device
from ..models.resnet import EnergyHead
from ..progress import bar_options
from ..runs import RunDir, atomic_path, atomic_write_json
from . import train_classifier as stage5

__all__ = ["PER_MODEL", "ENGINES", "PASS_STATS", "PackedLinear", "PackedNet", "NotPackable", "pack_tensors",
           "unpack_tensor",
           "shared_key", "models_per_pass", "train_many"]

log = logging.getLogger(__name__)

# classifier fields that may differ between the models of one pass
PER_MODEL = ("seed", "outliers", "outlier_folder", "num_outliers", "outliers_with_replacement")


class NotPackable(ValueError):
    """The networks (or trainings) cannot share a vectorised pass; train them one at a time."""


# ----------------------------------------------------------------------------- packed tensors
def pack_tensors(tensors: Sequence[torch.Tensor], packed_shape: Sequence[int]) -> torch.Tensor:
    """G same-shaped tensors → one packed tensor: stacked (model first) and reshaped."""
    return torch.stack([t.detach() for t in tensors]).reshape(tuple(packed_shape))


def unpack_tensor(packed: torch.Tensor, g: int, count: int, shape: Sequence[int]) -> torch.Tensor:
    """Model ``g``'s tensor (of ``shape``) out of a packed tensor of ``count`` models."""
    if packed.dim() == 0:  # BatchNorm's num_batches_tracked: the same for every model
        return packed.detach().clone()
    return packed.detach().reshape(count, *shape)[g].clone()


class PackedLinear(nn.Module):
    """G linear layers applied to G feature blocks: ``B × (G·F)`` → ``G × B × K``.

    Example:
        >>> layer = PackedLinear(3, 4, 2)
        >>> layer(torch.zeros(5, 12)).shape
        torch.Size([3, 5, 2])
    """

    def __init__(self, count: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.count, self.in_features, self.out_features = count, in_features, out_features
        self.weight = nn.Parameter(torch.empty(count, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(count, out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.count, self.in_features)
        out = torch.einsum("bgf,gkf->gbk", x, self.weight)
        return out if self.bias is None else out + self.bias[:, None]


_STATELESS = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Flatten)


def _packed_module(module: nn.Module, count: int) -> nn.Module:
    """The packed counterpart of one leaf module (parameters uninitialised; filled by PackedNet)."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise NotPackable(f"Conv2d with padding_mode={module.padding_mode!r}")
        return nn.Conv2d(count * module.in_channels, count * module.out_channels, module.kernel_size,
                         module.stride, module.padding, module.dilation, count * module.groups,
                         module.bias is not None)
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(count * module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
    if isinstance(module, nn.Linear):
        return PackedLinear(count, module.in_features, module.out_features, module.bias is not None)
    if isinstance(module, _STATELESS) or not any(True for _ in module.parameters(recurse=False)) \
            and not any(True for _ in module.buffers(recurse=False)) and not list(module.children()):
        return copy.deepcopy(module)
    raise NotPackable(f"no packed form of {type(module).__name__}")


class PackedNet(nn.Module):
    """G networks of one architecture as one: channels side by side, ``G × B × C × H × W`` → ``G × B × K``.

    Args:
        models: the G networks (same architecture and shapes); their weights and buffers are copied.
        channels_last: run the packed convolutions in NHWC (faster for grouped convolutions on CPU).

    The architecture's own ``forward`` runs on the packed modules (its convolutions, BatchNorms,
    ReLUs, pools and final ``Linear`` are replaced), so any network built from those (the kit's
    ``SmallNet``, ResNets) packs; anything else raises :class:`NotPackable`.

    Example:
        >>> from ncis_core.models.resnet import SmallNet
        >>> nets = [SmallNet(6, 4) for _ in range(3)]
        >>> packed = PackedNet(nets)
        >>> packed(torch.zeros(3, 2, 3, 32, 32)).shape
        torch.Size([3, 2, 6])
    """

    def __init__(self, models: Sequence[nn.Module], channels_last: bool = False):
        super().__init__()
        if not models:
            raise NotPackable("no models")
        self.count, self.channels_last = len(models), channels_last
        template = models[0]
        shapes = {k: tuple(v.shape) for k, v in template.state_dict().items()}
        for m in models[1:]:
            if {k: tuple(v.shape) for k, v in m.state_dict().items()} != shapes:
                raise NotPackable("the networks differ in shape")
        self.shapes = shapes  # name → one model's shape
        self.inner = copy.deepcopy(template)
        for name, module in list(self.inner.named_modules()):
            if name and not list(module.children()):
                parent_name, _, child = name.rpartition(".")
                parent = self.inner.get_submodule(parent_name) if parent_name else self.inner
                setattr(parent, child, _packed_module(module, self.count))
        first = next(template.parameters(), None)
        if first is not None:  # the packed modules in the networks' dtype and on their device
            self.inner.to(device=first.device, dtype=first.dtype)
        states = [m.state_dict() for m in models]
        packed = {}
        for key, value in self.inner.state_dict().items():
            if value.dim() == 0:
                packed[key] = states[0][key].detach().clone()
            else:
                packed[key] = pack_tensors([s[key] for s in states], value.shape)
        self.inner.load_state_dict(packed)
        if channels_last:
            self.inner = self.inner.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, b = x.shape[:2]
        if g != self.count:
            raise ValueError(f"PackedNet of {self.count} models got inputs for {g}")
        x = x.transpose(0, 1).reshape(b, g * x.shape[2], *x.shape[3:])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.inner(x)

    def unpacked_state(self, g: int) -> dict[str, torch.Tensor]:
        """Model ``g``'s state dict (the keys and shapes of the original networks)."""
        return {k: unpack_tensor(v, g, self.count, self.shapes[k]) for k, v in self.inner.state_dict().items()}

    def unpacked_parameter(self, name: str, tensor: torch.Tensor, g: int) -> torch.Tensor:
        """Model ``g``'s slice of ``tensor`` shaped like the packed parameter ``name`` (e.g. its
        momentum buffer)."""
        return unpack_tensor(tensor, g, self.count, self.shapes[name])


# ----------------------------------------------------------------------------- policy
def shared_key(cfg: ExperimentConfig) -> str:
    """What trainings must share to be packed: the classifier config except :data:`PER_MODEL`, the
    data, the device (the composition of the joint batch is checked by :func:`train_many`)."""
    c = asdict(cfg.classifier)
    for name in PER_MODEL:
        c.pop(name)
    return json.dumps({"classifier": c, "data": asdict(cfg.data), "device": cfg.run.device,
                       "diffusion": asdict(cfg.diffusion), "resolution": cfg.embed.resolution},
                      sort_keys=True, default=str)


def _activation_bytes(cfg: ExperimentConfig, num_classes: int) -> int:
    """Bytes of one model's training step (the outputs of every leaf module, kept for backward,
    twice for their gradients), counted on the meta device for the full joint batch."""
    from ..models.resnet import build_classifier

    c = cfg.classifier
    with torch.device("meta"):
        net = build_classifier(c.arch, num_classes, c.width)
        total = [0]

        def hook(_module, _inputs, output):
            total[0] += output.numel() * output.element_size()

        for m in net.modules():
            if not list(m.children()):
                m.register_forward_hook(hook)
        batch = c.batch_size + 2 * c.outlier_batch_size
        net(torch.empty(batch, 3, cfg.data.image_size, cfg.data.image_size))
    return 2 * total[0]


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def models_per_pass(cfg: ExperimentConfig, count: int, num_classes: int = 10) -> int:
    """How many of ``count`` trainings of ``cfg``'s architecture one vectorised pass takes.

    ``compare.max_parallel`` when set (1: one at a time). Otherwise one at a time for the ResNets
    (compute-bound: a pass is no faster) and under several ``accelerate`` processes; for the
    ``small`` network up to 64 per pass, on CUDA (the grouped engine holds every model's activations)
    as many as fit in half the free device memory.
    """
    limit = cfg.compare.max_parallel
    if limit is not None:
        return max(1, min(limit, count))
    from ..device import process_state

    state, _ = process_state(cfg.run.device)
    if cfg.classifier.arch != "small" or state.num_processes > 1:
        return 1
    fit = 64
    device = resolve_device(cfg.run.device)
    if device.type == "cuda":
        fit = _available_bytes(device) // 2 // max(_activation_bytes(cfg, num_classes), 1)
    return int(max(1, min(count, fit, 64)))


# ----------------------------------------------------------------------------- one model's side
class _Member:
    """One training of a pass: its config, folder, datasets, loaders and torch RNG state —
    built exactly as ``train()`` builds them, in the same order from the same seed."""

    def __init__(self, cfg: ExperimentConfig, run_dir: RunDir, folder: Path, split, id_generated,
                 accelerator):
        c = cfg.classifier
        self.cfg, self.run_dir, self.folder = cfg, run_dir, Path(folder)
        self.seed = seed = c.seed if c.seed is not None else cfg.run.seed
        torch.manual_seed(seed)
        self.split = split
        id_tf, out_tf = stage5.train_transforms(cfg)
        self.outliers = stage5.outlier_dataset(cfg, run_dir)
        # the generated-looking ID images are the same for every model of a pass (built once; their
        # cache draws nothing from torch's generator)
        self.id_generated = id_generated if self.outliers is not None else None
        self.model = stage5._init_model(cfg, len(split.classes)).to(memory_format=stage5.MEMORY_FORMAT)
        self.head = EnergyHead(c.energy_head, c.head_hidden)

        def loader(images, transform, batch_size: int, seed_offset: int, drop_last: bool):
            gen = torch.Generator().manual_seed(seed + seed_offset)
            return stage5.training_loader(images, transform, batch_size, gen, c.num_workers, drop_last), gen

        self.id_loader, self.id_gen = loader(split.dataset, id_tf, c.batch_size, 0, c.drop_last)
        self.out_loader, self.out_gen = loader(self.outliers, out_tf, c.outlier_batch_size, 1, True) \
            if self.outliers is not None else (None, None)
        self.gen_loader, self.gen_gen = loader(self.id_generated, id_tf, c.outlier_batch_size, 2, True) \
            if self.id_generated is not None else (None, None)
        for name in ("id_loader", "out_loader", "gen_loader"):
            if getattr(self, name) is not None:
                setattr(self, name, accelerator.prepare(getattr(self, name)))
        self.rng = torch.get_rng_state()
        self.epoch0, self.step0, self.history = 0, 0, []
        if (self.folder / "last.json").exists():
            info = json.loads((self.folder / "last.json").read_text())
            self.epoch0, self.step0, self.history = info["epoch"], info["step"], info["history"]

    def composition(self) -> tuple:
        """The joint batch's make-up: models share a pass only when it is the same."""
        c = self.cfg.classifier
        full = lambda data: data is not None and len(data) >= c.outlier_batch_size  # noqa: E731
        if self.outliers is not None and not full(self.outliers) or \
                self.id_generated is not None and not full(self.id_generated):
            return ("partial", id(self))  # a short cycling loader: batches of their own size
        return (self.outliers is not None, self.id_generated is not None, self.epoch0)

    def start_epoch(self, epoch: int) -> None:
        """``train()``'s per-epoch seeding, into this model's own generator state."""
        torch.manual_seed(self.seed * 1_000_003 + epoch)
        self.id_gen.manual_seed(self.seed * 1_000_033 + epoch)
        self.outlier_iter = stage5._cycle(self.out_loader, self.out_gen, epoch, self.seed) \
            if self.out_loader is not None else None
        self.generated_iter = stage5._cycle(self.gen_loader, self.gen_gen, epoch, self.seed + 17) \
            if self.gen_loader is not None else None
        self.id_iter = iter(self.id_loader)
        self.rng = torch.get_rng_state()

    def next_batch(self):
        """``(x, y_in, n_in, n_id)`` of this model's next step, or None at the end of the epoch,
        drawn in ``train()``'s order under this model's generator state."""
        torch.set_rng_state(self.rng)
        try:
            try:
                x_in, y_in = next(self.id_iter)
            except StopIteration:
                return None
            x, n_id = x_in, len(x_in)
            if self.generated_iter is not None:
                x_gen, _ = next(self.generated_iter)
                x, n_id = torch.cat([x, x_gen]), n_id + len(x_gen)
            if self.outlier_iter is not None:
                x_out, _ = next(self.outlier_iter)
                x = torch.cat([x, x_out])
            return x.contiguous(memory_format=stage5.MEMORY_FORMAT), y_in, len(x_in), n_id
        finally:
            self.rng = torch.get_rng_state()


# ----------------------------------------------------------------------------- engines
# An engine holds the G models of a pass and makes one optimizer step of all of them; both keep
# every model's arithmetic its own. `step` returns per model: ce, energy (or None), correct, s
# (the logsumexp of every image, detached, on the CPU).

def _step_one(model: nn.Module, head: EnergyHead, opt, x, y_in, n_in: int, n_id: int, lr: float,
              with_outliers: bool, energy_weight: float, autocast) -> dict:
    """One optimizer step of one model: ``train()``'s step, line for line."""
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast():
        logits = model(x)
        ce = F.cross_entropy(logits[:n_in], y_in)
        loss = ce
        if with_outliers:
            is_id = torch.zeros(len(x), device=x.device)
            is_id[:n_id] = 1
            e_loss = stage5.energy_loss(logits.float(), is_id, head)
            loss = ce + energy_weight * e_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        s = torch.logsumexp(logits.float(), dim=1)
        return {"ce": ce.item(), "energy": e_loss.item() if with_outliers else None,
                "correct": (logits[:n_in].argmax(1) == y_in).sum().item(), "s": s.cpu()}


class _Threaded:
    """The G models as they are, each with its own SGD (``train()``'s very modules and step), their
    steps spread over worker threads, one intra-op thread each: the CPU engine. A small network's
    kernels cannot keep two cores busy, G independent steps can; grouped convolutions measured no
    faster per model than separate ones on this kind of CPU (module docstring)."""

    def __init__(self, members: list[_Member], accelerator, threads: int):
        c = members[0].cfg.classifier
        self.members, self.accelerator = members, accelerator
        self.opts = []
        for m in members:
            params = list(m.model.parameters()) + list(m.head.parameters())
            self.opts.append(torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                             weight_decay=c.weight_decay))
            if (m.folder / "last.json").exists():
                stage5._load_state(m.folder, m.model, m.head, self.opts[-1], accelerator.device)
        self.workers = max(1, min(threads, len(members)))
        self.intra = max(1, threads // self.workers)
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="train_many") if self.workers > 1 else None

    def train(self):
        for m in self.members:
            m.model.train(), m.head.train()

    def step(self, batches, lr: float) -> list[dict]:
        c = self.members[0].cfg.classifier
        with_outliers = self.members[0].outliers is not None

        def one(g: int) -> dict:
            m, (x, y_in, n_in, n_id) = self.members[g], batches[g]
            return _step_one(m.model, m.head, self.opts[g], x, y_in, n_in, n_id, lr, with_outliers,
                             c.energy_weight, self.accelerator.autocast)

        if self.pool is None:
            return [one(g) for g in range(len(self.members))]
        # worker w takes models w, w + W, …: the same split every step
        def shard(w: int) -> list[tuple[int, dict]]:
            return [(g, one(g)) for g in range(w, len(self.members), self.workers)]

        out: list = [None] * len(self.members)
        for part in self.pool.map(shard, range(self.workers)):
            for g, r in part:
                out[g] = r
        return out

    def lr(self) -> float:
        return self.opts[0].param_groups[0]["lr"]

    def modules(self, g: int):
        return self.members[g].model, self.members[g].head

    def save_state(self, g: int, epoch: int, step: int, history: list) -> None:
        m = self.members[g]
        stage5._save_state(m.folder, m.model, m.head, self.opts[g], epoch, step, history)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


class _Grouped:
    """The G models packed into one :class:`PackedNet` (grouped convolutions), the G energy heads
    stacked and applied with ``vmap``, one SGD over the packed tensors: the GPU engine, where a small
    network's step is a string of kernels too small to fill the device."""

    def __init__(self, members: list[_Member], accelerator, channels_last: bool):
        from torch.func import stack_module_state

        c = members[0].cfg.classifier
        self.members, self.accelerator, self.count = members, accelerator, len(members)
        device = accelerator.device
        resume = [load_file(str(m.folder / "last.safetensors")) if (m.folder / "last.json").exists() else None
                  for m in members]
        for m, tensors in zip(members, resume):
            if tensors is not None:
                m.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
                m.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        self.packed = PackedNet([m.model for m in members], channels_last=channels_last).to(device)
        head_params, head_buffers = stack_module_state([m.head for m in members])
        self.head_params = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v.detach())
                                             for k, v in head_params.items()}).to(device)
        self.head_buffers = {k: v.to(device) for k, v in head_buffers.items()}
        self.head_template = copy.deepcopy(members[0].head).to("meta")
        self.model_names = [n for n, _ in members[0].model.named_parameters()]
        self.head_names = [n for n, _ in members[0].head.named_parameters()]
        inner = dict(self.packed.inner.named_parameters())
        self.params = [inner[n] for n in self.model_names] + \
                      [self.head_params[n.replace(".", "__")] for n in self.head_names]
        self.opt = torch.optim.SGD(self.params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                   weight_decay=c.weight_decay)
        if all(r is not None for r in resume):
            for i, p in enumerate(self.params):  # train()'s index: model.parameters() + head.parameters()
                if all(f"momentum.{i}" in r for r in resume):
                    self.opt.state[p]["momentum_buffer"] = pack_tensors(
                        [r[f"momentum.{i}"] for r in resume], p.shape).to(device)

    def train(self):
        self.packed.train()

    def _head(self, params, buffers, s):
        from torch.func import functional_call

        return functional_call(self.head_template, ({k.replace("__", "."): v for k, v in params.items()},
                                                    buffers), (s,))

    def step(self, batches, lr: float) -> list[dict]:
        from torch.func import vmap

        c = self.members[0].cfg.classifier
        count = self.count
        with_outliers = self.members[0].outliers is not None
        for group in self.opt.param_groups:
            group["lr"] = lr
        x = torch.stack([b[0] for b in batches])
        y_in = torch.stack([b[1] for b in batches])
        n_in, n_id = batches[0][2], batches[0][3]
        with self.accelerator.autocast():
            logits = self.packed(x)  # G × N × K
            ce = F.cross_entropy(logits[:, :n_in].reshape(count * n_in, -1), y_in.reshape(-1),
                                 reduction="none").reshape(count, n_in).mean(1)
            loss = ce
            if with_outliers:
                s = torch.logsumexp(logits.float(), dim=2)  # G × N
                is_id = torch.zeros(s.shape[1], device=s.device, dtype=torch.long)
                is_id[:n_id] = 1
                out2 = vmap(self._head)(dict(self.head_params), self.head_buffers, s)  # G × N × 2
                e_loss = F.cross_entropy(out2.reshape(-1, 2), is_id.repeat(count),
                                         reduction="none").reshape(count, -1).mean(1)
                loss = ce + c.energy_weight * e_loss
        self.opt.zero_grad(set_to_none=True)
        self.accelerator.backward(loss.sum())  # the sum: every model's gradient is its own loss's
        self.opt.step()
        with torch.no_grad():
            s_all = torch.logsumexp(logits.float(), dim=2).cpu()
            ce_list = ce.tolist()
            e_list = e_loss.tolist() if with_outliers else [None] * count
            correct = (logits[:, :n_in].argmax(2) == y_in).sum(1).tolist()
        return [{"ce": ce_list[g], "energy": e_list[g], "correct": correct[g], "s": s_all[g]}
                for g in range(count)]

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def modules(self, g: int):
        m = self.members[g]
        model = copy.deepcopy(m.model)
        model.load_state_dict(self.packed.unpacked_state(g))
        head = copy.deepcopy(m.head)
        head.load_state_dict({**{k.replace("__", "."): v[g].detach().clone() for k, v in self.head_params.items()},
                              **{k: v[g].detach().clone() for k, v in self.head_buffers.items()}})
        return model.cpu(), head.cpu()

    def save_state(self, g: int, epoch: int, step: int, history: list) -> None:
        model, head = self.modules(g)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        tensors.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
        for i, (name, p) in enumerate(zip(self.model_names + self.head_names, self.params)):
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                part = self.packed.unpacked_parameter(name, buf, g) if i < len(self.model_names) \
                    else buf[g].detach().clone()
                tensors[f"momentum.{i}"] = part.cpu().contiguous()
        folder = self.members[g].folder
        with atomic_path(folder / "last.safetensors") as tmp:
            save_file(tensors, str(tmp))
        atomic_write_json(folder / "last.json", {"epoch": epoch, "step": step, "history": history})

    def close(self):
        pass


# ----------------------------------------------------------------------------- the pass
class _Prefetch:
    """The batches of the pass drawn one step ahead in a thread of their own, so that drawing them
    (per-image transforms in Python) overlaps the models' steps. The thread is the only one that
    touches torch's global generator during the pass (it swaps each model's state in and out)."""

    _END, _DONE = object(), object()

    def __init__(self, members: list[_Member], epochs: range, depth: int = 2):
        import queue
        import threading

        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.wait_s = 0.0
        self.thread = threading.Thread(target=self._run, args=(members, epochs), daemon=True,
                                       name="train_many-data")
        self.thread.start()

    def _put(self, item) -> bool:
        import queue

        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, members, epochs):
        try:
            for epoch in epochs:
                for m in members:
                    m.start_epoch(epoch)
                while True:
                    batches = [m.next_batch() for m in members]
                    if any(b is None for b in batches):
                        if not all(b is None for b in batches):
                            raise RuntimeError("the models of a vectorised pass ran out of ID batches at "
                                               "different steps")
                        if not self._put(self._END):
                            return
                        break
                    if not self._put(batches):
                        return
            self._put(self._DONE)
        except BaseException as exc:  # handed to the training thread
            self._put(exc)

    def next(self):
        """The next step's batches, ``_END`` at the end of an epoch."""
        import time

        t0 = time.perf_counter()
        item = self.queue.get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.stop.set()
        self.thread.join()


def _train_pass(members: list[_Member], accelerator, device, progress: bool, stop_after: int | None,
                stop_after_steps: int | None, engine_name: str, threads: int):
    cfg = members[0].cfg
    c = cfg.classifier
    count = len(members)
    engine = _Grouped(members, accelerator, channels_last=device.type == "cuda") if engine_name == "grouped" \
        else _Threaded(members, accelerator, threads)
    steps_per_epoch = len(members[0].id_loader)
    total = steps_per_epoch * c.epochs
    epoch0, step = members[0].epoch0, members[0].step0
    if epoch0:
        log.info("vectorised stage 5: %d models resume from epoch %d of %d", count, epoch0, c.epochs)
    with_outliers = members[0].outliers is not None
    last = c.epochs if stop_after is None else min(c.epochs, epoch0 + stop_after)
    data = _Prefetch(members, range(epoch0, last))
    started, steps_done = time.perf_counter(), 0
    previous_threads = torch.get_num_threads()
    if engine_name == "threaded":
        torch.set_num_threads(engine.intra)  # process-wide: every worker's kernels on one thread
    try:
        for epoch in range(epoch0, last):
            engine.train()
            sums = [{"ce": 0.0, "energy": 0.0, "correct": 0, "seen": 0} for _ in members]
            scores_id, scores_out = [[] for _ in members], [[] for _ in members]
            bar = tqdm(total=steps_per_epoch, desc=f"{count} classifiers, epoch {epoch + 1}/{c.epochs}",
                       leave=False, **bar_options(progress))
            while True:
                batches = data.next()
                if batches is _Prefetch._END:
                    break
                n_in, n_id = batches[0][2], batches[0][3]
                stats = engine.step(batches, stage5.cosine_lr(step, total, c.lr, c.final_lr))
                step += 1
                steps_done += 1
                if stop_after_steps is not None and step >= stop_after_steps:
                    bar.close()
                    return [engine.modules(g) for g in range(count)]
                for g, r in enumerate(stats):
                    sums[g]["ce"] += r["ce"] * n_in
                    sums[g]["correct"] += r["correct"]
                    sums[g]["seen"] += n_in
                    scores_id[g].append(r["s"][:n_in])
                    if with_outliers:
                        sums[g]["energy"] += r["energy"] * n_in
                        scores_out[g].append(r["s"][n_id:])
                bar.update(1)
            bar.close()
            for g, m in enumerate(members):
                _, head = engine.modules(g)
                quantiles_id = stage5._quantiles(scores_id[g])
                slope = stage5.head_slope(head, quantiles_id)
                n = max(sums[g]["seen"], 1)
                m.history.append({
                    "epoch": epoch + 1, "lr": engine.lr(), "ce": sums[g]["ce"] / n,
                    "energy_loss": sums[g]["energy"] / n if with_outliers else None,
                    "train_acc": sums[g]["correct"] / n, "slope": slope,
                    "score_quantiles_id": quantiles_id,
                    "score_quantiles_outlier": stage5._quantiles(scores_out[g]) if scores_out[g] else None,
                })
                if with_outliers and slope < 0:
                    log.warning("%s epoch %d: the energy head's slope is negative (%.3g): outliers get the "
                                "higher logsumexp; stage 6 scores with sign(slope)·logsumexp", m.folder,
                                epoch + 1, slope)
                engine.save_state(g, epoch + 1, step, m.history)
            log.info("vectorised stage 5, epoch %d of %d: %d models (ce %s), %.1f s waiting for data",
                     epoch + 1, c.epochs, count, " ".join(f"{m.history[-1]['ce']:.3f}" for m in members),
                     data.wait_s)
    finally:
        torch.set_num_threads(previous_threads)
        data.close()
        engine.close()
        wall = time.perf_counter() - started
        PASS_STATS.append({"models": count, "engine": engine_name, "steps": steps_done, "wall_s": wall,
                           "data_wait_s": data.wait_s,
                           "workers": getattr(engine, "workers", 1),
                           "intra_threads": getattr(engine, "intra", None)})
        log.info("vectorised stage 5: %d models, %d steps in %.1f s, %.1f %% of it waiting for data", count,
                 steps_done, wall, 100 * data.wait_s / max(wall, 1e-9))

    if last < c.epochs:
        return None
    results = []
    for g, m in enumerate(members):
        model, head = engine.modules(g)
        model, head = model.cpu(), head.cpu()
        slope = stage5.head_slope(head, m.history[-1]["score_quantiles_id"])
        mc = m.cfg.classifier
        result = {"epochs": m.history, "slope": slope, "slope_negative": slope < 0,
                  "outliers": mc.outliers, "num_outliers": len(m.outliers) if m.outliers is not None else 0,
                  "id_generated": mc.id_generated if m.id_generated is not None else "none",
                  "energy_head": mc.energy_head, "seed": m.seed}
        meta = {"arch": mc.arch, "width": mc.width, "num_classes": len(m.split.classes),
                "classes": list(m.split.classes), "head": mc.energy_head, "head_hidden": mc.head_hidden,
                "slope": slope, "outliers": mc.outliers, "seed": m.seed}
        stage5.save_classifier(m.folder / "best.safetensors", model, head, meta)
        atomic_write_json(m.folder / "history.json", result)
        results.append(result)
    return results


ENGINES = ("auto", "threaded", "grouped")

# diagnostics of the passes of the last train_many call (models, steps, wall time, time the training
# loop waited for its batches): benchmarks/bench_compare.py reports them
PASS_STATS: list[dict] = []


def train_many(jobs: Sequence[tuple[ExperimentConfig, RunDir, Path]], progress: bool = True,
               max_parallel: int | None = None, stop_after: int | None = None,
               stop_after_steps: int | None = None, engine: str = "auto", threads: int | None = None):
    """Train (or resume) the classifiers of ``jobs`` — ``(cfg, run_dir, folder)`` each, as
    ``train(cfg, run_dir, folder=folder)`` would — in vectorised passes of at most ``max_parallel``.

    Args:
        jobs: trainings with one :func:`shared_key` (one architecture and classifier config except
            :data:`PER_MODEL`); grouped here by batch composition (outliers or not) and resume epoch.
        max_parallel: models per pass (None: all of a group).
        stop_after: train at most this many epochs, then return None (the next call resumes).
        stop_after_steps: stop after this many optimizer steps, write nothing, and return the
            ``(model, head)`` of every job (a test hook: the weights a step reaches).
        engine: ``grouped`` (:class:`PackedNet`, one packed step; the default on CUDA), ``threaded``
            (each model its own modules, steps spread over threads; the default on the CPU), ``auto``.
        threads: CPU threads of the threaded engine (default ``torch.get_num_threads()``): that many
            models step at once, each on ``threads // workers`` intra-op threads.

    Returns:
        The history dicts in the order of ``jobs`` (each also written as ``history.json``), or
        None when stopped early.

    Raises:
        NotPackable: ``jobs`` differ in what they must share, or the network has no packed form.
    """
    from accelerate import Accelerator

    if not jobs:
        return []
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    keys = {shared_key(cfg) for cfg, _, _ in jobs}
    if len(keys) > 1:
        raise NotPackable("the trainings differ beyond the per-model fields " + ", ".join(PER_MODEL))
    cfg0, run0, _ = jobs[0]
    c = cfg0.classifier
    device = resolve_device(cfg0.run.device)
    if engine == "auto":
        engine = "grouped" if device.type == "cuda" else "threaded"
    accelerator = Accelerator(cpu=device.type == "cpu", split_batches=True,
                              mixed_precision=stage5.mixed_precision(c.precision, device))
    if accelerator.num_processes > 1:
        raise NotPackable("vectorised stage 5 runs in one process; train one at a time under accelerate launch")
    rng = torch.get_rng_state()
    PASS_STATS.clear()
    try:
        split = get_split(cfg0.data, "id-train")
        id_generated = stage5.id_generated_dataset(cfg0, run0, progress) \
            if any(stage5._outlier_folder(cfg, run_dir) is not None for cfg, run_dir, _ in jobs) else None
        members = [_Member(cfg, run_dir, folder, split, id_generated, accelerator)
                   for cfg, run_dir, folder in jobs]
        groups: dict[tuple, list[int]] = {}
        for i, m in enumerate(members):
            groups.setdefault(m.composition(), []).append(i)
        size = max_parallel or len(members)
        out: list = [None] * len(members)
        stopped = False
        for indices in groups.values():
            for start in range(0, len(indices), size):
                chunk = indices[start:start + size]
                log.info("vectorised stage 5 (%s): %d classifiers in one pass (%s)", engine, len(chunk),
                         ", ".join(str(members[i].folder) for i in chunk))
                for i in chunk:
                    members[i].folder.mkdir(parents=True, exist_ok=True)
                result = _train_pass([members[i] for i in chunk], accelerator, device, progress, stop_after,
                                     stop_after_steps, engine, threads or torch.get_num_threads())
                if result is None:
                    stopped = True
                    continue
                for i, r in zip(chunk, result):
                    out[i] = r
        return None if stopped else out
    finally:
        torch.set_rng_state(rng)
