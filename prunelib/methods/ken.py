"""KEN (Mastromattei & Zanzotto, arXiv 2402.03142): kernel-density selection of fine-tuned values.

Given a *pretrained* and a *fine-tuned* model of the same architecture, KEN keeps, in every row
of every selected tensor, ``k`` fine-tuned values picked by a kernel-density procedure and
resets every other entry to its pretrained value. Nothing is zeroed: FLOPs and the dense model
size are unchanged; what shrinks is the task-specific *delta* (see :mod:`prunelib.ken_storage`).

Selection of one row ``r`` (``n`` fine-tuned values), as in the authors' code
(``reference/algorithms.md`` section 3.1):

1. bandwidth ``h = |1.06 * std(r) * n^(-1/5)|`` (Silverman-style rule, ``std`` with ddof 0);
2. ``k`` grid points equally spaced over ``[min r, max r]`` (``numpy.linspace``);
3. the Gaussian kernel density of ``r`` at each grid point, rounded to an integer;
4. grid points ordered by rounded density, descending (ties keep grid order);
5. greedily, in that order, each grid point takes the nearest fine-tuned value not taken yet
   (ties: the entry with the smaller index, like ``numpy.argmin``);
6. the ``k`` taken entries keep their fine-tuned value; the rest revert to pretrained.

Decisions where the reference is silent or wrong (each a setting of :class:`KEN`):

* entries are kept *by position* (exactly ``k`` per row); the reference matches the chosen
  *values* with ``np.isin`` and the ``!= 0`` sentinel, which keeps duplicates and drops a
  chosen exact zero (pitfall 3.5 #3);
* the classification head is excluded by default (``layers="no_head"``): its non-kept entries
  would otherwise revert to the pretrained checkpoint's head, which for a new task is random
  or trained on other classes (pitfall 3.5 #1);
* only floating-point *parameters* are processed; buffers (BatchNorm statistics,
  ``position_ids``) are taken from the fine-tuned model (pitfall 3.5 #2);
* a constant row (``std = 0``) has no density information: its grid points all tie and the
  first ``k`` entries are kept;
* ``k`` is per row (``k_mode="per_row_count"``, faithful) or a fraction of each row's length
  (``"per_row_fraction"``, ``k = ceil(keep_fraction * n)``), for a budget that does not depend
  on the matrix shape (pitfall 3.5 #4).

Rows of the same length from every selected tensor are batched. Two implementations of the
same steps give the same positions:

* on CPU (float64 densities), a small C extension (``prunelib/_ken_native.c``, built at
  install time) does one row at a time in cache, spread over ``torch.get_num_threads()``
  threads: a radix sort, the densities by a uniform-grid recurrence, then the greedy matching
  with union-find "next free position" pointers over the sorted row;
* elsewhere (a GPU, float32 densities, or the extension not built), torch ops on the tensors'
  device: the densities as broadcast sums per chunk of rows, and the greedy matching as ``k``
  batched steps over all rows at once, with the same pointers (path halving).

Without the extension the CPU uses the torch path and says so once (a warning); reinstall
with a C compiler (``pip install -e .``) to get it back.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prunelib.masks import MaskSet
from prunelib.methods.base import MethodSettings, Phase, PruningMethod, set_field

try:  # the compiled selection (setup.py); optional, the torch path below does the same
    from prunelib import _ken_native
except ImportError:  # pragma: no cover - depends on the install
    _ken_native = None

log = logging.getLogger(__name__)

__all__ = ["KEN", "KENError", "PairPlan", "LAYER_CHOICES", "HF_HEAD_MODULES", "apply_ken",
           "head_parameter_names", "ken_masks", "kde_select_rows", "ken_report", "selected_parameter_names"]

LAYER_CHOICES = ("no_head", "all", "attention", "blocks")
K_MODES = ("per_row_count", "per_row_fraction")
VECTOR_MODES = ("row", "finetuned", "pretrained")
KDE_DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: Top-level module names of Hugging Face task heads: randomly initialised when a base checkpoint
#: is loaded into a task model, so never reverted to "pretrained" by default.
HF_HEAD_MODULES = ("classifier", "pre_classifier", "score", "qa_outputs", "lm_head", "cls")
_ATTENTION = re.compile(r"attention|attn", re.IGNORECASE)
_DIGIT = re.compile(r"\d")


class KENError(ValueError):
    """Bad input to KEN: mismatched models, ``k`` larger than a row, nothing selected..."""


@dataclass(frozen=True)
class PairPlan:
    """The outer loop KEN declares: where its (pretrained, fine-tuned) pair comes from.

    The orchestrator (``search/pair.py``) runs it; KEN itself never trains.

    Attributes:
        pretrained / finetuned: paths of two local checkpoints (a state-dict file or a Hugging
            Face model directory), or both None to let the orchestrator make the pair.
        pretrain_classes: fraction (0, 1) of the data set's classes the made-up pretraining
            task uses (the first ``ceil(fraction * classes)`` labels).
        pretrain_epochs / finetune_epochs: epochs of the two runs (None = the trial's epochs).
        finetune_lr: peak learning rate of the fine-tune run (None = the trial's lr).
        cache_dir: where made pairs are cached, keyed by their config (None = the
            orchestrator's default).
    """

    pretrained: str | None = None
    finetuned: str | None = None
    pretrain_classes: float = 0.5
    pretrain_epochs: int | None = None
    finetune_epochs: int | None = None
    finetune_lr: float | None = None
    cache_dir: str | None = None


# ----------------------------------------------------------------------------------------------
# Which tensors
# ----------------------------------------------------------------------------------------------
def head_parameter_names(model: nn.Module, head: Iterable[str] | None = None) -> set[str]:
    """Parameter names of the task head (fractions do not apply: a set of names).

    ``head`` lists module-name prefixes explicitly. Otherwise (auto): the parameters of the
    last Linear/Conv module registered (the output layer), plus, for a Hugging Face model (one
    with a ``config.model_type``), every parameter under a top-level module named like a Hugging
    Face head (:data:`HF_HEAD_MODULES`). Other models keep such names for their own layers
    (LeNet-5's and VGG's whole dense stack is ``classifier``), which are not a head.
    """
    names = [n for n, _ in model.named_parameters()]
    if head is not None:
        prefixes = [h.rstrip(".") for h in head]
        return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}
    out: set[str] = set()
    last = None
    for mod_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            last = mod_name
    if last is not None:
        out |= {f"{last}.{p}" if last else p for p, _ in model.get_submodule(last).named_parameters(recurse=False)}
    if getattr(getattr(model, "config", None), "model_type", None) is not None:
        out |= {n for n in names if n.split(".")[0] in HF_HEAD_MODULES}
    return out


def selected_parameter_names(model: nn.Module, layers: str = "no_head",
                             head: Iterable[str] | None = None) -> list[str]:
    """Floating-point parameters KEN processes under ``layers``, in registration order.

    * ``no_head``: every parameter except the task head (:func:`head_parameter_names`);
    * ``all``: every parameter, head included (the reference skips only the last state-dict
      entry, so its head *weight* reverts to the pretrained head);
    * ``attention``: parameters of attention modules only (a path component containing
      ``attention`` or ``attn``: BERT ``attention.self.query``, GPT-2 ``attn.c_attn``);
    * ``blocks``: the reference's "attention" variant: every parameter whose name holds a
      digit (the transformer blocks, FFN and LayerNorm included), head excluded.
    """
    if layers not in LAYER_CHOICES:
        raise KENError(f"layers must be one of {list(LAYER_CHOICES)}, got {layers!r}")
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    heads = head_parameter_names(model, head) if layers != "all" else set()
    if layers == "attention":
        return [n for n, _ in params if any(_ATTENTION.search(c) for c in n.split(".")[:-1])]
    if layers == "blocks":
        return [n for n, _ in params if _DIGIT.search(n) and n not in heads]
    return [n for n, _ in params if n not in heads]


# ----------------------------------------------------------------------------------------------
# The vectorised selection
# ----------------------------------------------------------------------------------------------
def _find(parent: Tensor, q: Tensor) -> Tensor:
    """Roots of flat positions ``q`` in the union-find ``parent`` (path halving, batched).

    Only the walks that have not reached a root yet are carried into later hops. Uses
    ``gather``/``scatter_``: on CPU, advanced indexing of a large tensor is far slower.
    """
    out = parent.gather(0, q)
    active = (parent.gather(0, out) != out).nonzero().squeeze(1)
    while active.numel():
        cur = out.gather(0, active)
        p = parent.gather(0, cur)
        gp = parent.gather(0, p)
        parent.scatter_(0, cur, gp)  # path halving: cur now points two steps further
        out.scatter_(0, active, gp)
        active = active.masked_select(parent.gather(0, gp) != gp)
    return out


def _refresh_pointers(free: Tensor, right: Tensor, left: Tensor) -> None:
    """Point every position straight at its nearest free position (full path compression).

    ``free`` is ``[R, W]``; ``right``/``left`` are the flat ``[R * W]`` parent arrays.
    """
    rows, width = free.shape
    cols = torch.arange(width, device=free.device).expand(rows, width)
    base = torch.arange(rows, device=free.device)[:, None] * width
    nxt = torch.where(free, cols, torch.full_like(cols, width))
    nxt = torch.flip(torch.cummin(torch.flip(nxt, [1]), dim=1).values, [1])
    prv = torch.cummax(torch.where(free, cols, torch.full_like(cols, -1)), dim=1).values
    right.copy_((nxt + base).reshape(-1))
    left.copy_((prv + base).reshape(-1))


def _grid(lo: Tensor, hi: Tensor, k: int) -> Tensor:
    """``numpy.linspace(lo, hi, k)`` per row, in float64: ``[R, k]``."""
    if k == 1:
        return lo[:, None].clone()
    step = (hi - lo) / (k - 1)
    grid = torch.arange(k, dtype=torch.float64, device=lo.device)[None, :] * step[:, None] + lo[:, None]
    grid[:, -1] = hi  # numpy sets the endpoint exactly
    return grid


def _densities(x: Tensor, grid: Tensor, kde_dtype: torch.dtype, max_elements: int) -> Tensor:
    """Rounded Gaussian KDE of each row of ``x`` [R, n] at its ``grid`` [R, k]: ``[R, k]``.

    Bandwidth ``|1.06 * std * n^(-1/5)|`` (ddof 0); a zero bandwidth (constant row) gives
    all-zero densities, so every grid point ties.

    In float64 the sums use the uniform grid (``g_j = g_0 + j * step``): with values scaled by
    ``1 / (h sqrt 2)`` and centred on the grid's midpoint,
    ``exp(-(g_j - x)^2) = exp(-g_j^2) * exp(2 g_0 x - x^2) * exp(2 step x)^j``, so each grid
    point costs one multiply and one sum per value instead of an ``exp`` and four more passes.
    Every factor is a product of exponentials (no cancellation): the relative error grows as
    ``j * 1e-16``. Rows whose scaled half-range would overflow ``exp`` take the direct path.
    """
    rows, n = x.shape
    k = grid.shape[1]
    xd = x.to(kde_dtype)
    h = (1.06 * xd.std(dim=1, correction=0) * n ** (-0.2)).abs()
    out = torch.zeros(rows, k, dtype=kde_dtype, device=x.device)
    ok = h > 0
    if not bool(ok.any()):
        return out
    norm = 1.0 / (n * h * math.sqrt(2.0 * math.pi))
    scale = 1.0 / (torch.where(ok, h, torch.ones_like(h)) * math.sqrt(2.0))
    centre = (grid[:, :1] + grid[:, -1:]) / 2
    gs = ((grid - centre) * scale[:, None]).to(kde_dtype)
    xs = (x.to(torch.float64) - centre).to(kde_dtype) * scale[:, None]
    half = gs.abs().amax(dim=1)
    # The j = 0 factor of a value at the far end of the grid is exp(-3 half^2): beyond
    # half^2 = 230 it would underflow (exp(-708)) and the recurrence would lose that value.
    fast = ok & (half * half < 230.0) & (k > 1) if kde_dtype == torch.float64 else torch.zeros_like(ok)
    fast_rows = fast.nonzero().squeeze(1)
    slow_rows = (ok & ~fast).nonzero().squeeze(1)
    if fast_rows.numel():
        g0, step_j = gs[fast_rows, :1], gs[fast_rows, 1:2] - gs[fast_rows, :1]
        xf = xs[fast_rows]
        term = torch.exp(2.0 * g0 * xf - xf * xf)  # exp(g_0^2 - (g_0 - x)^2)
        ratio = torch.exp(2.0 * step_j * xf)
        sums = torch.empty(fast_rows.numel(), k, dtype=kde_dtype, device=x.device)
        chunk = max(1, (1 << 17) // n)  # rows per pass, sized to stay in cache
        for s in range(0, fast_rows.numel(), chunk):
            t_, r_ = term[s:s + chunk], ratio[s:s + chunk]
            for j in range(k):
                sums[s:s + chunk, j] = t_.sum(dim=1)
                t_.mul_(r_)
        out[fast_rows] = sums * torch.exp(-gs[fast_rows] ** 2)
    # Direct path: exp(-(g' - x')^2) per (grid point, value) pair, in cache-sized chunks.
    step = max(1, min(max_elements, 1 << 18) // max(1, k * n))
    for s in range(0, slow_rows.numel(), step):
        idx = slow_rows[s:s + step]
        d = gs[idx, :, None] - xs[idx, None, :]
        # Clamped before exp: float32 exp underflows into slow denormals beyond -87.
        d.square_().clamp_(max=80.0).neg_().exp_()
        out[idx] = d.sum(dim=2)
    out *= norm[:, None]
    out[~ok] = 0
    return torch.round(out)  # half to even, like Python's round()


def _greedy_match(x: Tensor, grid_in_priority: Tensor, refresh_every: int = 64) -> Tensor:
    """Each grid point, in priority order, takes the nearest untaken entry of its row.

    Args:
        x: ``[R, n]`` values (any float dtype; compared in float64).
        grid_in_priority: ``[R, k]`` float64 grid points in the order they choose.

    Returns:
        ``[R, n]`` bool, exactly ``k`` True per row.
    """
    rows, n = x.shape
    k = grid_in_priority.shape[1]
    dev = x.device
    sorted_vals, perm = torch.sort(x.to(torch.float64), dim=1, stable=True)
    width = n + 2  # a -inf sentinel before and a +inf sentinel after each sorted row
    inf = torch.full((rows, 1), math.inf, dtype=torch.float64, device=dev)
    vals = torch.cat([-inf, sorted_vals, inf], dim=1)
    big = torch.full((rows, 1), n, dtype=torch.long, device=dev)  # sentinels lose index ties
    origin = torch.cat([big, perm, big], dim=1).reshape(-1)
    cols = torch.arange(width, device=dev)
    is_start = torch.ones(rows, width, dtype=torch.bool, device=dev)
    is_start[:, 1:] = vals[:, 1:] != vals[:, :-1]
    # First position of each run of equal values: among equal values the reference's argmin
    # takes the smallest original index, which is the run's first free position (stable sort).
    run_start = torch.cummax(torch.where(is_start, cols, torch.zeros_like(cols)), dim=1).values
    base = torch.arange(rows, device=dev)[:, None] * width
    run_start = (run_start + base).reshape(-1)
    vals_flat = vals.reshape(-1)
    right = torch.arange(rows * width, device=dev)  # root = nearest free position at or right of i
    left = right.clone()                              # root = nearest free position at or left of i
    taken = torch.zeros(rows * width, dtype=torch.bool, device=dev)
    base = base[:, 0]
    # All grid points' insertion positions in one call (first sorted value >= g), step-major.
    positions = (torch.searchsorted(vals, grid_in_priority) + base[:, None]).t().contiguous()
    grid_steps = grid_in_priority.t().contiguous()
    for t in range(k):
        if t and t % refresh_every == 0:
            # Long chains build up where many grid points compete (the tails); rebuilding the
            # pointers now and then keeps every walk a few hops long.
            _refresh_pointers(~taken.view(rows, width), right, left)
        g = grid_steps[t]
        rc = _find(right, positions[t])
        lc = _find(left, positions[t] - 1)
        lc = _find(right, run_start.gather(0, lc))  # the smallest index among equal values on the left
        dr = vals_flat.gather(0, rc) - g
        dl = g - vals_flat.gather(0, lc)
        take_right = (dr < dl) | ((dr == dl) & (origin.gather(0, rc) < origin.gather(0, lc)))
        pick = torch.where(take_right, rc, lc)
        taken.index_fill_(0, pick, True)
        right.scatter_(0, pick, pick + 1)
        left.scatter_(0, pick, pick - 1)
    kept_sorted = taken.view(rows, width)[:, 1:-1]
    return torch.zeros(rows, n, dtype=torch.bool, device=dev).scatter_(1, perm, kept_sorted)


#: Backends of :func:`kde_select_rows`: "auto" (the C extension on CPU when it applies, else
#: torch), "native" (the C extension, an error when it does not apply), "torch".
BACKENDS = ("auto", "native", "torch")
_warned_no_native = False


def native_available() -> bool:
    """Whether the compiled selection (``prunelib._ken_native``) was built and imports."""
    return _ken_native is not None


def _native_applies(rows: Tensor, kde_dtype: torch.dtype) -> str | None:
    """None when the C extension can select ``rows``, else why not (one phrase)."""
    if _ken_native is None:
        return "the extension prunelib._ken_native is not built (reinstall with a C compiler: pip install -e .)"
    if rows.device.type != "cpu":
        return f"the rows are on {rows.device} (the extension runs on CPU)"
    if kde_dtype != torch.float64:
        return "kde_dtype is float32 (the extension evaluates densities in float64)"
    if rows.shape[1] > 2**31 - 3:
        return f"rows of {rows.shape[1]} values are longer than the extension's int32 positions"
    return None


def _select_native(rows: Tensor, k: int, threads: int) -> Tensor:
    """The C extension over ``rows`` [R, n] on CPU, split over ``threads`` Python threads
    (the extension releases the GIL)."""
    src = rows.detach()
    if src.dtype not in (torch.float32, torch.float64):
        src = src.to(torch.float32)  # float16 / bfloat16 widen exactly
    src = src.contiguous()
    n_rows, n = src.shape
    out = torch.empty(n_rows, n, dtype=torch.bool)
    is_double = int(src.dtype == torch.float64)
    elem = src.element_size()

    def run(a: int, b: int) -> None:
        _ken_native.select(src.data_ptr() + a * n * elem, is_double, b - a, n, k, out.data_ptr() + a * n, 0)

    parts = max(1, min(n_rows, 4 * threads))  # a few parts per thread even out row costs
    bounds = [n_rows * i // parts for i in range(parts + 1)]
    if threads <= 1 or parts == 1:
        for a, b in zip(bounds[:-1], bounds[1:]):
            run(a, b)
        return out
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ken") as pool:
        for f in [pool.submit(run, a, b) for a, b in zip(bounds[:-1], bounds[1:])]:
            f.result()
    return out


@torch.no_grad()
def kde_select_rows(rows: Tensor, k: int, *, kde_dtype: torch.dtype = torch.float64,
                    max_elements: int = 1 << 24, backend: str = "auto") -> Tensor:
    """KEN's selection on each row of ``rows`` ``[R, n]``: a bool mask with ``k`` True per row.

    Args:
        rows: fine-tuned values, one row per line (any float dtype, any device).
        k: entries kept per row, ``1 <= k <= n``.
        kde_dtype: precision of the density evaluation. float64 (default) matches the
            reference's scikit-learn KDE and uses the uniform-grid recurrence (one multiply per
            grid point and value, no ``exp``); float32 evaluates every ``exp`` directly (slower
            on CPU, for devices where float64 is slow) and may flip a density that sits on a
            .5 rounding boundary.
        max_elements: torch path only: bound on the ``[rows, k, n]`` temporary per chunk
            (elements), and on the rows matched at once (``rows * n``; on CPU at most
            ``2**19``, where the pointer arrays stay in cache).
        backend: ``"auto"`` (the C extension for CPU rows with float64 densities, else torch),
            ``"native"`` (the extension; KENError where it does not apply) or ``"torch"``.

    Raises:
        KENError: ``k`` out of range, non-finite values, or an unusable backend.
    """
    if backend not in BACKENDS:
        raise KENError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if rows.dim() != 2:
        raise KENError(f"rows must be 2-D [rows, n], got shape {tuple(rows.shape)}")
    n_rows, n = rows.shape
    if not 1 <= k <= n:
        raise KENError(f"k={k} entries per row is out of range for rows of {n} values (need 1 <= k <= {n})")
    if n_rows == 0:
        return torch.zeros_like(rows, dtype=torch.bool)
    if not bool(torch.isfinite(rows).all()):
        raise KENError("the fine-tuned values hold NaN or inf; KEN needs finite weights")
    if backend != "torch":
        why_not = _native_applies(rows, kde_dtype)
        if why_not is None:
            return _select_native(rows, k, torch.get_num_threads())
        if backend == "native":
            raise KENError(f"backend='native' cannot run: {why_not}")
        global _warned_no_native
        if _ken_native is None and rows.device.type == "cpu" and not _warned_no_native:
            _warned_no_native = True
            log.warning("KEN selection uses the slower torch path on CPU: %s", why_not)
    out = torch.empty(n_rows, n, dtype=torch.bool, device=rows.device)
    # Rows matched together: bounds the int64 pointer arrays. On CPU they must stay in cache
    # (2**24 elements made 134 MB arrays, 1.4-1.7x slower than 2**19); a GPU wants big batches.
    bound = max_elements if rows.device.type != "cpu" else min(max_elements, 1 << 19)
    chunk = max(1, bound // n)
    for s in range(0, n_rows, chunk):
        x = rows[s:s + chunk]
        x64 = x.to(torch.float64)
        grid = _grid(x64.min(dim=1).values, x64.max(dim=1).values, k)
        dens = _densities(x, grid, kde_dtype, max_elements)
        order = torch.sort(dens, dim=1, descending=True, stable=True).indices
        out[s:s + chunk] = _greedy_match(x, grid.gather(1, order))
    return out


# ----------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------
def _as_state(model_or_state: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(model_or_state, nn.Module):
        return {n: p.detach() for n, p in model_or_state.named_parameters()}
    return {n: t.detach() for n, t in model_or_state.items()}


def _k_for(n: int, k_mode: str, k: int, keep_fraction: float, name: str) -> int:
    if k_mode == "per_row_fraction":
        return max(1, min(n, math.ceil(keep_fraction * n)))
    if k > n:
        raise KENError(f"k={k} is larger than the rows of {name!r} ({n} values); use a smaller k, "
                       f"or k_mode='per_row_fraction'")
    return k


def ken_masks(pretrained: nn.Module | Mapping[str, Tensor], finetuned: nn.Module | Mapping[str, Tensor],
              names: Iterable[str], *, k_mode: str = "per_row_fraction", k: int = 64,
              keep_fraction: float = 0.5, vectors: str = "row", kde_dtype: str = "float64",
              max_elements: int = 1 << 24) -> dict[str, Tensor]:
    """KEN's keep masks (True = keep the fine-tuned value) for the tensors ``names``.

    A tensor's rows are its first axis (a Linear weight ``[out, in]``: one output neuron's
    fan-in; a Conv filter ``[in, kh, kw]`` flattened); 1-D tensors follow ``vectors``:
    ``"row"`` (one row, the reference), ``"finetuned"`` (kept whole) or ``"pretrained"``
    (reverted whole). Rows of equal length from all tensors are selected in one batch.

    Raises:
        KENError: a name is missing from either model, shapes or dtypes differ, or ``k`` does
            not fit a row.
    """
    pre, ft = _as_state(pretrained), _as_state(finetuned)
    if k_mode not in K_MODES:
        raise KENError(f"k_mode must be one of {list(K_MODES)}, got {k_mode!r}")
    if vectors not in VECTOR_MODES:
        raise KENError(f"vectors must be one of {list(VECTOR_MODES)}, got {vectors!r}")
    if kde_dtype not in KDE_DTYPES:
        raise KENError(f"kde_dtype must be one of {list(KDE_DTYPES)}, got {kde_dtype!r}")
    if k_mode == "per_row_count" and (isinstance(k, bool) or int(k) != k or k < 1):
        raise KENError(f"k must be an integer >= 1, got {k!r}")
    if k_mode == "per_row_fraction" and not 0.0 < float(keep_fraction) <= 1.0:
        raise KENError(f"keep_fraction must be a fraction in (0, 1], got {keep_fraction!r}")
    masks: dict[str, Tensor] = {}
    groups: dict[int, list[tuple[str, Tensor]]] = {}
    for name in names:
        if name not in ft:
            raise KENError(f"{name!r} is not a parameter of the fine-tuned model")
        if name not in pre:
            raise KENError(f"the pretrained model has no parameter {name!r}: the two models must "
                           f"share one architecture")
        if pre[name].shape != ft[name].shape:
            raise KENError(f"{name!r} has shape {tuple(pre[name].shape)} in the pretrained model but "
                           f"{tuple(ft[name].shape)} in the fine-tuned one: the architectures differ")
        t = ft[name]
        if t.dim() == 0 or t.numel() == 0:
            continue
        if t.dim() == 1 and vectors != "row":
            masks[name] = torch.full(t.shape, vectors == "finetuned", dtype=torch.bool, device=t.device)
            continue
        rows = t.reshape(1, -1) if t.dim() == 1 else t.reshape(t.shape[0], -1)
        groups.setdefault(rows.shape[1], []).append((name, rows))
    for n, members in groups.items():
        kk = _k_for(n, k_mode, int(k), float(keep_fraction), members[0][0])
        stacked = torch.cat([r for _, r in members], dim=0)
        selected = kde_select_rows(stacked, kk, kde_dtype=KDE_DTYPES[kde_dtype], max_elements=max_elements)
        start = 0
        for name, r in members:
            masks[name] = selected[start:start + r.shape[0]].reshape(ft[name].shape)
            start += r.shape[0]
    return {n: masks[n] for n in names if n in masks}  # registration order


def check_same_architecture(pretrained: nn.Module | Mapping[str, Tensor],
                            finetuned: nn.Module | Mapping[str, Tensor]) -> None:
    """Raise :class:`KENError` naming the first parameter whose name or shape differs."""
    pre, ft = _as_state(pretrained), _as_state(finetuned)
    missing = [n for n in ft if n not in pre]
    extra = [n for n in pre if n not in ft]
    if missing or extra:
        raise KENError(f"the pretrained and fine-tuned models differ in architecture: parameters only in "
                       f"the fine-tuned model {missing[:3]}, only in the pretrained one {extra[:3]}")
    for n, t in ft.items():
        if pre[n].shape != t.shape:
            raise KENError(f"{n!r} has shape {tuple(pre[n].shape)} in the pretrained model but "
                           f"{tuple(t.shape)} in the fine-tuned one: the architectures differ")


@torch.no_grad()
def apply_ken(model: nn.Module, pretrained: nn.Module | Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Write the pretrained value into every entry of ``model`` whose mask is False (in place)."""
    pre = _as_state(pretrained)
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        p = params[name]
        p.copy_(torch.where(keep.to(p.device), p, pre[name].to(device=p.device, dtype=p.dtype)))


def ken_report(masks: Mapping[str, Tensor], model: nn.Module) -> dict[str, Any]:
    """Counts of a KEN result, as fractions of parameter entries.

    Returns ``{"reverted_fraction"``: reverted entries / all parameters of the model,
    ``"reverted_fraction_selected"``: reverted / entries of the selected tensors,
    ``"kept_finetuned_params"``: parameters holding fine-tuned values (kept entries plus
    unselected tensors), ``"params_total"``, ``"layers"``: name -> kept fraction}``.
    """
    total = sum(p.numel() for p in model.parameters())
    selected = sum(int(m.numel()) for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    reverted = selected - kept
    return {"reverted_fraction": reverted / total if total else 0.0,
            "reverted_fraction_selected": reverted / selected if selected else 0.0,
            "kept_finetuned_params": total - reverted, "params_total": total,
            "layers": {n: float(m.float().mean()) for n, m in masks.items()}}


@dataclass(frozen=True)
class KENSettings(MethodSettings):
    """KEN's settings (see :class:`KEN` for each one)."""

    k_mode: str = "per_row_fraction"
    k: int = 64
    keep_fraction: float = 0.5
    layers: str = "no_head"
    head: tuple[str, ...] | None = None
    vectors: str = "row"
    kde_dtype: str = "float64"
    max_elements: int = 1 << 24
    pretrained: str | None = None
    finetuned: str | None = None
    pair_pretrain_classes: float = 0.5
    pair_pretrain_epochs: int | None = None
    pair_finetune_epochs: int | None = None
    pair_finetune_lr: float | None = None
    pair_cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.k_mode not in K_MODES:
            raise ValueError(f"k_mode must be one of {list(K_MODES)}, got {self.k_mode!r}")
        if isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        if not 0.0 < float(self.keep_fraction) <= 1.0:
            raise ValueError(f"keep_fraction must be a fraction in (0, 1], got {self.keep_fraction!r}")
        if self.layers not in LAYER_CHOICES:
            raise ValueError(f"layers must be one of {list(LAYER_CHOICES)}, got {self.layers!r}")
        if self.vectors not in VECTOR_MODES:
            raise ValueError(f"vectors must be one of {list(VECTOR_MODES)}, got {self.vectors!r}")
        if self.kde_dtype not in KDE_DTYPES:
            raise ValueError(f"kde_dtype must be one of {list(KDE_DTYPES)}, got {self.kde_dtype!r}")
        if (self.pretrained is None) != (self.finetuned is None):
            raise ValueError("give both pretrained and finetuned checkpoints, or neither (the pair is then made)")
        if not 0.0 < float(self.pair_pretrain_classes) < 1.0:
            raise ValueError(f"pair_pretrain_classes must be a fraction in (0, 1), got {self.pair_pretrain_classes!r}")
        set_field(self, "k", int(self.k))
        set_field(self, "keep_fraction", float(self.keep_fraction))
        set_field(self, "head", tuple(self.head) if self.head is not None else None)
        set_field(self, "max_elements", int(self.max_elements))
        set_field(self, "pair_pretrain_classes", float(self.pair_pretrain_classes))


class KEN(PruningMethod):
    """KEN as a data-free method: ``finalize`` turns the fine-tuned model into the KEN model.

    Use: ``ken = KEN(keep_fraction=0.5); ken.set_pretrained(pre); ken.setup(ft);
    masks = ken.finalize(ft)``. ``finalize`` writes the pretrained value into every reverted
    entry of ``ft`` (in place) and returns a :class:`MaskSet` whose masks mean **True = the
    fine-tuned value is kept, False = reverted to the pretrained value** (not zeroed, unlike
    every other method: never ``apply`` it). Its metadata says so (``"semantics"``) and holds
    ``reverted_fraction``.

    The pair is an outer loop KEN declares (:meth:`pair_plan`, ``needs_pair``) and
    ``search/pair.py`` runs; :meth:`plan` has no training phase.

    Args:
        k_mode: ``"per_row_count"`` (``k`` values per row, the paper) or ``"per_row_fraction"``
            (``ceil(keep_fraction * n)`` per row of ``n`` values).
        k: fine-tuned values kept per row in ``per_row_count`` mode.
        keep_fraction: fraction of each row kept in ``per_row_fraction`` mode, in (0, 1].
        layers: which parameters are processed (see :func:`selected_parameter_names`); the
            others keep their fine-tuned values whole.
        head: module-name prefixes of the task head (None = auto, :func:`head_parameter_names`).
        vectors: 1-D tensors (biases, norms): ``"row"`` (one row), ``"finetuned"``, ``"pretrained"``.
        kde_dtype: ``"float64"`` (as the reference; on CPU the compiled path) or ``"float32"``
            (the torch path: for GPUs where float64 is slow).
        max_elements: memory bound of one batched chunk of the torch path (elements).
        pretrained, finetuned, pair_*: the pair plan (see :class:`PairPlan`).
    """

    name: ClassVar[str] = "ken"
    needs_data: ClassVar[bool] = False
    needs_pair: ClassVar[bool] = True

    Settings = KENSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pretrained_state: dict[str, Tensor] | None = None
        self.report: dict[str, Any] = {}
        self._untrained: set[str] = set()

    def pair_plan(self) -> PairPlan:
        """Where the (pretrained, fine-tuned) pair comes from (run by the orchestrator)."""
        return PairPlan(self.pretrained, self.finetuned, self.pair_pretrain_classes, self.pair_pretrain_epochs,
                        self.pair_finetune_epochs, self.pair_finetune_lr, self.pair_cache_dir)

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        """No training phase: KEN works on a finished pair."""
        return []

    def set_untrained(self, names: Iterable[str]) -> None:
        """Parameters the pretrained checkpoint does not hold (a Hugging Face base checkpoint
        loaded into a task class initialises them randomly, e.g. BERT's pooler after masked-LM
        pretraining): they keep their fine-tuned values whole, like the head."""
        self._untrained = set(names)

    def set_pretrained(self, pretrained: nn.Module | Mapping[str, Tensor]) -> None:
        """Give KEN the pretrained weights (a model or a parameter state dict); copied."""
        self._pretrained_state = {n: t.detach().clone() for n, t in _as_state(pretrained).items()}

    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        """Check that the pretrained weights are set and match ``model`` (the fine-tuned one)."""
        if self._pretrained_state is None:
            raise KENError("KEN needs the pretrained weights: call set_pretrained(model) first")
        check_same_architecture(self._pretrained_state, model)

    def finalize(self, model: nn.Module) -> MaskSet:
        """Select, revert the non-kept entries of ``model`` to pretrained, return the keep masks."""
        self.setup(model)
        assert self._pretrained_state is not None
        names = [n for n in selected_parameter_names(model, self.layers, self.head) if n not in self._untrained]
        if not names:
            raise KENError(f"layers={self.layers!r} selects no parameter of {type(model).__name__}"
                           + (" (it has no attention modules)" if self.layers == "attention" else ""))
        masks = ken_masks(self._pretrained_state, model, names, k_mode=self.k_mode, k=self.k,
                          keep_fraction=self.keep_fraction, vectors=self.vectors,
                          kde_dtype=self.kde_dtype, max_elements=self.max_elements)
        apply_ken(model, self._pretrained_state, masks)
        self.report = ken_report(masks, model)
        out = MaskSet()
        for name, m in masks.items():
            out.set(name, m, "weight")
        out.metadata.update({
            "method": self.name, "config": self.config(),
            "semantics": "ken: True = fine-tuned value kept, False = reverted to the pretrained value (not zero)",
            "reverted_fraction": self.report["reverted_fraction"],
            "kept_finetuned_params": self.report["kept_finetuned_params"]})
        self.masks = out
        return out

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Nothing to enforce: KEN masks do not mean zeros."""
