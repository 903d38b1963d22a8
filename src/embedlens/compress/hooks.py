"""Decoder-layer hooks that carry out an intervention plan inside one forward pass.

* **forward hooks on the ``self_attn`` / ``mlp`` submodules** (``skip``): the sublayer
  output of the chosen tokens is zeroed, so their residual update is zero, while their keys
  and values are still computed and attended to;
* **forward pre-hooks + forward hooks on whole decoder layers** (``inject``, ``exit``): the
  pre-hook hands the layer only the tokens that take part (hidden states, the layer's 4-D
  attention mask, rotary ``position_embeddings`` and ``position_ids`` gathered to that
  subset), and the forward hook scatters the layer's output back into the full sequence,
  leaving the absent tokens' hidden states untouched;
* **forward pre-hooks restricting a layer's attention mask**: for packed sequences on
  every layer (answers see the shared prompt and themselves only), and for attention
  knockouts on the knockout's layers (``knock_*`` of the plan).

With ``allow_cache`` (generation, :mod:`.generate`), the prefill may fill a KV cache: a
layer that sees a token subset then caches the present tokens only, which the decode
masks of :mod:`.generate` account for.

The layers and sublayers come from `embedlens.models.parts`; masks are bool for sdpa and
additive float for eager attention (the implementation the model reports).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from embedlens.models.parts import attention_of, attn_implementation, decoder_layers, mlp_of

if TYPE_CHECKING:  # the runner assembles the batch; only its fields are read here
    from .plan import AssembledBatch


# --------------------------------------------------------------------------- inject / exit
class _Subset:
    """The present tokens of a batch at the layers that leave some tokens out."""

    def __init__(self, present: torch.Tensor, impl: str, allow_cache: bool = False):
        self.present = present  # (B, T) bool
        self.allow_cache = allow_cache
        B, T = present.shape
        counts = present.sum(1)
        self.U = int(counts.max()) if B else 0
        # left-aligned positions of present tokens, in sequence order; padded slots -> 0
        order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)
        self.idx = order[:, : self.U]
        self.valid = torch.arange(self.U, device=present.device)[None] < counts[:, None]
        self.impl = impl
        self._masks: dict[int, object] = {}
        self.full: torch.Tensor | None = None

    def gather_seq(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Gather the present tokens along `dim` (the sequence axis) of a tensor whose
        batch axis is ``dim - 1`` (size B or 1)."""
        dim = dim % t.ndim
        B = self.idx.shape[0]
        shape = list(t.shape)
        shape[dim - 1] = B
        t = t.expand(*shape)
        view = [1] * t.ndim
        view[dim - 1], view[dim] = B, self.U
        index = self.idx.view(view).expand(*shape[:dim], self.U, *shape[dim + 1:])
        return torch.gather(t, dim, index)

    def mask(self, m):
        key = id(m)
        if key not in self._masks:
            self._masks[key] = self._sub_mask(m)
        return self._masks[key]

    def _sub_mask(self, m):
        B, U = self.idx.shape
        dev = self.idx.device
        if m is None:
            # sdpa was allowed to drop the mask: the full sequence was plainly causal
            q = self.idx[:, :, None]
            k = self.idx[:, None, :]
            allowed = k <= q
            float_mask, dtype = self.impl == "eager", torch.float32
        elif isinstance(m, torch.Tensor) and m.ndim == 4:
            mm = m[:, 0] if m.shape[1] == 1 else None
            if mm is None:
                raise NotImplementedError("per-head attention masks are not supported")
            mm = mm.expand(B, -1, -1)
            rows = torch.gather(mm, 1, self.idx[:, :, None].expand(B, U, mm.shape[-1]))
            sub = torch.gather(rows, 2, self.idx[:, None, :].expand(B, U, U))
            float_mask, dtype = m.dtype != torch.bool, m.dtype
            allowed = sub if not float_mask else sub == 0
        else:
            raise NotImplementedError(
                f"attention mask of type {type(m).__name__} cannot be restricted to a token "
                "subset (use attn_implementation 'sdpa' or 'eager')"
            )
        v = self.valid
        allowed = allowed & v[:, None, :] & v[:, :, None]
        # every row needs one visible key (padding slots see themselves), or sdpa returns
        # NaN rows whose 0 * NaN products would leak into real rows of the next layer
        eye = torch.eye(U, dtype=torch.bool, device=dev)[None]
        empty = ~allowed.any(-1, keepdim=True)
        allowed = allowed | (eye & empty)
        allowed = allowed[:, None]
        if not float_mask:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    # hooks ------------------------------------------------------------------
    def pre_hook(self, module, args, kwargs):
        # A cache filled here holds only the present tokens of this layer; only the
        # generation path, whose decode masks know that layout, may allow it. (transformers
        # 5 names the kwarg ``cache``; older versions ``past_key_values``.)
        has_cache = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if has_cache and kwargs.get("use_cache") and not self.allow_cache:
            raise NotImplementedError("interventions act on the prefill only (no KV cache); "
                                      "use embedlens.compress.generate for cached decoding")
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")
        self.full = hidden
        sub = self.gather_seq(hidden, 1) * self.valid[..., None].to(hidden.dtype)
        kwargs = dict(kwargs)
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = self.mask(kwargs["attention_mask"])
        else:
            kwargs["attention_mask"] = self.mask(None)
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            kwargs["position_embeddings"] = tuple(self.gather_seq(t, -2) for t in pe)
        pid = kwargs.get("position_ids")
        if isinstance(pid, torch.Tensor):
            kwargs["position_ids"] = self.gather_seq(pid if pid.ndim >= 2 else pid[None], -1)
        return (sub, *args), kwargs

    def post_hook(self, module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        full = self.full.clone()
        full[self.present] = out[self.valid].to(full.dtype)
        self.full = None
        return (full, *output[1:]) if isinstance(output, tuple) else full


# --------------------------------------------------------------------------- skip
def _zero_rows_hook(mask: torch.Tensor):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0].masked_fill(mask[..., None], 0), *output[1:])
        return output.masked_fill(mask[..., None], 0)

    return hook


# --------------------------------------------------------------------------- mask restriction
class _Restrict:
    """Restricts a layer's attention mask to ``allowed`` (B, T_q, T_k) bool (AND)."""

    def __init__(self, allowed: torch.Tensor, impl: str):
        self.allowed = allowed
        self.impl = impl
        self._masks: dict[int, object] = {}

    def mask(self, m):
        key = id(m)
        if key not in self._masks:
            self._masks[key] = self._restrict(m)
        return self._masks[key]

    def _restrict(self, m):
        tree = self.allowed[:, None]
        if m is None:  # sdpa dropped a plainly causal mask
            T = tree.shape[-1]
            causal = torch.ones(T, T, dtype=torch.bool, device=tree.device).tril()
            allowed = tree & causal
            if self.impl != "eager":
                return allowed
            return torch.zeros(allowed.shape, device=tree.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
        if not (isinstance(m, torch.Tensor) and m.ndim == 4):
            raise NotImplementedError(f"attention mask of type {type(m).__name__} cannot be restricted")
        if m.dtype == torch.bool:
            return m & tree
        # torch.where broadcasts a batch-1 mask against the per-row restriction
        return torch.where(tree, m, torch.finfo(m.dtype).min)

    def pre_hook(self, module, args, kwargs):
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = self.mask(kwargs.get("attention_mask"))
        return args, kwargs


class _Tree(_Restrict):
    """Packed answers see the shared prompt and their own tokens only (keys of other
    answers are hidden)."""

    def __init__(self, branch: torch.Tensor, impl: str):
        kq = branch[:, None, :]
        super().__init__((kq < 0) | (kq == branch[:, :, None]), impl)


def knockout_allowed(keys: torch.Tensor, text: torch.Tensor, edges) -> torch.Tensor:
    """(B, T_q, T_k) bool: the attention a knockout leaves, from ``keys`` (B, T) (the
    knocked visual tokens) and ``text`` (B, T) (text queries after the first visual token);
    `edges` as in :func:`.spec.knockout`."""
    T = keys.shape[1]
    cut = torch.zeros(keys.shape[0], T, T, dtype=torch.bool, device=keys.device)
    if "visual->visual" in edges:
        eye = torch.eye(T, dtype=torch.bool, device=keys.device)[None]
        cut |= keys[:, :, None] & keys[:, None, :] & ~eye
    if "text->visual" in edges:
        cut |= text[:, :, None] & keys[:, None, :]
    return ~cut


@contextmanager
def intervention_hooks(model, batch: AssembledBatch, *, allow_cache: bool = False):
    """Hooks carrying out `batch`'s plan on `model`'s decoder layers for one forward pass
    (removed on exit): packed-answer masks (``branch``), knockout masks (``knock_*`` at
    ``knock_layers``), zeroed sublayer outputs (``skip`` at ``sublayers``), token subsets at
    ``absent_layers`` (``inject``/``exit``/``prune_inject``). `allow_cache`: let a KV cache
    be filled (the prefill of :func:`.generate.generate`); refused otherwise.

    Raises:
        UnsupportedModelError: no decoder layer list, or a skipped sublayer cannot be found.
    """
    layers = decoder_layers(model)
    impl = attn_implementation(model)
    handles = []
    try:
        if batch.branch is not None and (batch.branch >= 0).any():
            tree = _Tree(batch.branch, impl)
            # registered before the subset hooks: those slice the already restricted mask
            for layer in layers:
                handles.append(layer.register_forward_pre_hook(tree.pre_hook, with_kwargs=True))
        if batch.knock_edges and batch.knock_layers and batch.knock_keys.any():
            knock = _Restrict(knockout_allowed(batch.knock_keys, batch.knock_text, batch.knock_edges), impl)
            # before the subset hooks too, for the same reason
            for n in sorted(batch.knock_layers):
                handles.append(layers[n].register_forward_pre_hook(knock.pre_hook, with_kwargs=True))
        if batch.sublayers and batch.skip.any():
            for s in batch.sublayers:
                n = int(math.floor(s))
                mod = mlp_of(layers[n]) if s - n else attention_of(layers[n])
                # prepend: run before transformers' own output-recording hooks
                handles.append(mod.register_forward_hook(_zero_rows_hook(batch.skip), prepend=True))
        if batch.absent_layers and batch.absent.any():
            sub = _Subset(~batch.absent, impl, allow_cache=allow_cache)
            for n in sorted(batch.absent_layers):
                handles.append(layers[n].register_forward_pre_hook(sub.pre_hook, with_kwargs=True))
                handles.append(layers[n].register_forward_hook(sub.post_hook, with_kwargs=True, prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()
