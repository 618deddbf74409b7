"""Model configuration: a frozen dataclass mirroring transformers' ``OlmoHybridConfig``.

Unlike transformers, ``layer_types`` may be all attention or all Gated DeltaNet, so the
pure-transformer and pure-GDN baselines use the same code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp

GDN = "linear_attention"
ATTENTION = "full_attention"
LAYER_KINDS = (GDN, ATTENTION)
# What follows a layer's token mixer: SwiGLU, or a mixture of SwiGLU experts.
DENSE_MLP = "dense"
MOE = "moe"
MLP_KINDS = (DENSE_MLP, MOE)
# transformers model types of the text models we build (``hf_configs`` reads and writes them).
MODEL_TYPES = ("olmo_hybrid", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
QK_NORMS = ("projection", "head")
MOE_METHODS = ("auto", "megablox", "ragged_dot", "tiled", "dense")

GDN_METHODS = ("auto", "recurrent", "chunk", "assoc_scan", "pallas")  # ops.METHODS
# "full": each block of layer_period layers recomputed in the backward pass from its input;
# "layers": each layer from its input (more saved inputs, a quarter of the block's temporaries).
REMAT_POLICIES = ("none", "full", "layers", "dots", "dots_no_batch")
# ops.attention.causal_attention's implementations; "auto" is "blockwise" when the sequence
# is longer than one block, else "dense" (the same logits, without loops), on every backend.
ATTENTION_METHODS = ("auto", "dense", "blockwise", "blockwise_unrolled", "splash", "cudnn",
                     "splash_stand_in")
LOSS_METHODS = ("auto", "full", "chunked", "chunked_unrolled")

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def dtype_name(dtype: Any) -> str:
    """Canonical name ("float32", "bfloat16", "float16") of a dtype or dtype name."""
    name = jnp.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    return name


# transformers config.json fields, type-checked before any default is derived from them (a zero
# head count would divide by zero), so that the error names the config.json field.
_HF_INT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
    "linear_value_head_dim", "linear_conv_kernel_dim", "max_position_embeddings",
)
_HF_FLOAT_FIELDS = (
    "rms_norm_eps", "initializer_range", "linear_a_log_min", "linear_a_log_max", "linear_dt_min",
    "linear_dt_max", "linear_dt_init_floor", "rope_theta",
)
_HF_BOOL_FIELDS = ("tie_word_embeddings", "linear_allow_neg_eigval", "attention_bias")
# Fields a checkpoint's config.json must have: without them the tensors' shapes would be the
# 7B defaults' guess.
HF_SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_hf_dict(d: Any, required: tuple[str, ...] = ()) -> None:
    """Check the types of a transformers ``config.json`` dict's fields (absent or null fields
    pass, except those in ``required``).

    Raises ValueError naming the field: ``config.json field 'hidden_size': expected a positive
    integer, got '64'``.
    """
    if not isinstance(d, dict):
        raise ValueError(f"config.json: expected a JSON object, got {type(d).__name__}")

    def fail(field: str, msg: str) -> None:
        raise ValueError(f"config.json field {field!r}: {msg}")

    for name in required:
        if d.get(name) is None:
            fail(name, "missing (needed to know the tensor shapes)")
    for names, ok, expected in ((_HF_INT_FIELDS, lambda v: _is_int(v) and v > 0,
                                 "a positive integer"),
                                (_HF_FLOAT_FIELDS, _is_number, "a number"),
                                (_HF_BOOL_FIELDS, lambda v: isinstance(v, bool), "true or false")):
        for name in names:
            v = d.get(name)
            if v is not None and not ok(v):
                fail(name, f"expected {expected}, got {v!r}")
    layer_types = d.get("layer_types")
    if layer_types is not None and not (
            isinstance(layer_types, list) and all(isinstance(t, str) for t in layer_types)):
        fail("layer_types", f"expected a list of strings, got {layer_types!r}")
    rope = d.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict):
            fail("rope_parameters", f"expected an object or null, got {rope!r}")
        theta = rope.get("rope_theta")
        if theta is not None and not _is_number(theta):
            fail("rope_parameters.rope_theta", f"expected a number or null, got {theta!r}")
    for name in ("dtype", "torch_dtype"):
        v = d.get(name)
        if v is not None:
            try:
                dtype_name(str(v).removeprefix("torch."))
            except (TypeError, ValueError):
                fail(name, f"unsupported dtype {v!r}; expected float32, bfloat16 or float16")


def hf_dict_dtype(d: dict[str, Any]) -> str | None:
    """The canonical dtype name of a checked config.json dict's ``dtype`` (or older
    ``torch_dtype``, possibly ``"torch.bfloat16"``), or None when it names none."""
    v = d.get("dtype") or d.get("torch_dtype")
    return None if v is None else dtype_name(str(v).removeprefix("torch."))


def hybrid_layer_types(num_layers: int, period: int = 4) -> tuple[str, ...]:
    """OLMo Hybrid's pattern: (period - 1) GDN layers then one attention layer, repeated."""
    return tuple(ATTENTION if i % period == period - 1 else GDN for i in range(num_layers))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, numerics and execution options of a ``HybridLM``.

    Field names follow transformers' ``OlmoHybridConfig``; ``rope_theta=None`` means NoPE.
    ``dtype`` is the compute dtype, ``param_dtype`` the dtype parameters are stored in.
    The defaults are OLMo Hybrid 7B; the fields from ``model_type`` to ``router_aux_loss_coef``
    describe the other families (Qwen3.5, Qwen3.5-MoE, Qwen3-Next) as options of one model.
    """

    vocab_size: int = 100352
    hidden_size: int = 3840
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 30
    num_key_value_heads: int = 30
    rms_norm_eps: float = 1e-6
    layer_types: tuple[str, ...] = field(default_factory=lambda: hybrid_layer_types(32))
    linear_num_key_heads: int = 30
    linear_num_value_heads: int = 30
    linear_key_head_dim: int = 96
    linear_value_head_dim: int = 192
    linear_conv_kernel_dim: int = 4
    linear_allow_neg_eigval: bool = True
    rope_theta: float | None = 500000.0
    max_position_embeddings: int = 65536
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    initializer_range: float = 0.02
    linear_a_log_min: float = 0.0
    linear_a_log_max: float = 16.0
    linear_dt_min: float = 0.001
    linear_dt_max: float = 0.1
    linear_dt_init_floor: float = 1e-4
    pad_token_id: int | None = 100277
    bos_token_id: int | None = None
    eos_token_id: int | None = 100257
    # The family: which transformers class, tensor names and layouts the converters use.
    model_type: str = "olmo_hybrid"
    attention_head_dim: int | None = None  # transformers' head_dim; None: hidden // heads
    partial_rotary_factor: float = 1.0  # RoPE on the first int(head_dim * factor) dims
    zero_centered_norms: bool = False  # RMSNorm weights applied as (1 + w), stored as w
    qk_norm: str = "projection"  # over all heads' width (OLMo) or per head ("head", Qwen)
    attention_output_gate: bool = False  # o_proj(attn * sigmoid(gate)), gate from q_proj
    attention_post_norm: bool = True  # OLMo: attention layers norm the branch outputs
    linear_norm_eps: float = 1e-5  # the GDN output's gated RMSNorm
    # Per layer, "dense" or "moe"; None (how an all-dense tuple is stored): all dense.
    mlp_layer_types: tuple[str, ...] | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities
    router_aux_loss_coef: float = 0.001
    # Execution options (not part of the transformers config).
    dtype: str = "float32"
    param_dtype: str = "float32"
    gdn_method: str = "auto"  # "pallas" on GPU / TPU, "chunk" on CPU
    gdn_chunk_size: int = 64
    # "splash" (TPU kernel), "cudnn" (GPU), "blockwise" (XLA, memory linear in T), "dense"
    # ([H, T, T] logits); "auto" picks by platform (ops.attention.resolve_attention)
    attention_method: str = "auto"
    attention_block_size: int = 1024  # query and key rows per block of "blockwise"
    loss_method: str = "auto"  # train loss: "chunked" (ops.lm_head_loss) or "full" logits
    loss_chunk_size: int = 1024  # positions per row (per device's piece of one) whose
    # [chunk, V] logits exist at once
    remat: str = "none"
    scan_layers: bool = True
    # Expert products (ops.moe.grouped_matmul): "auto" is megablox on TPU, tiled elsewhere;
    # "dense" runs every token through every expert (a baseline).
    moe_method: str = "auto"

    def __post_init__(self) -> None:
        # Normalise containers and dtypes so that equal configs compare and hash equal.
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        # All dense is stored as None, so that replacing layer_types keeps it all dense.
        mlp = self.mlp_layer_types
        if mlp is not None:
            mlp = tuple(mlp)
            object.__setattr__(self, "mlp_layer_types",
                               None if all(k == DENSE_MLP for k in mlp) else mlp)
        for name in ("dtype", "param_dtype"):
            try:
                object.__setattr__(self, name, dtype_name(getattr(self, name)))
            except (TypeError, ValueError) as e:
                raise ValueError(f"ModelConfig.{name}: {e}") from None
        self._validate()

    # ----------------------------------------------------------------- validation
    def _validate(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ValueError(f"ModelConfig.{name}: {msg}")

        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "linear_num_key_heads",
            "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
            "linear_conv_kernel_dim", "max_position_embeddings", "gdn_chunk_size",
            "attention_block_size", "loss_chunk_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "linear_norm_eps"):
            if not getattr(self, name) > 0:
                fail(name, f"must be positive, got {getattr(self, name)!r}")
        if self.attention_head_dim is None and self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads",
                 f"{self.num_attention_heads} heads do not divide hidden_size {self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads",
                 f"{self.num_key_value_heads} key/value heads do not divide "
                 f"num_attention_heads {self.num_attention_heads}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            fail("linear_num_value_heads",
                 f"{self.linear_num_value_heads} value heads are not a multiple of "
                 f"linear_num_key_heads {self.linear_num_key_heads}")
        if len(self.layer_types) != self.num_hidden_layers:
            fail("layer_types",
                 f"has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_KINDS:
                fail("layer_types", f"entry {i} is {kind!r}; expected one of {LAYER_KINDS}")
        if self.rope_theta is not None and not self.rope_theta > 0:
            fail("rope_theta", f"must be positive or None (NoPE), got {self.rope_theta!r}")
        if self.rope_theta is not None and self.rotary_dim % 2:
            fail("partial_rotary_factor",
                 f"RoPE needs an even number of rotated dims, got {self.rotary_dim}")
        if self.hidden_act != "silu":
            fail("hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.attention_bias:
            fail("attention_bias", "attention biases are not supported (OLMo Hybrid has none)")
        if self.gdn_method not in GDN_METHODS:
            fail("gdn_method", f"{self.gdn_method!r} is not one of {GDN_METHODS}")
        if self.attention_method not in ATTENTION_METHODS:
            fail("attention_method",
                 f"{self.attention_method!r} is not one of {ATTENTION_METHODS}")
        if self.loss_method not in LOSS_METHODS:
            fail("loss_method", f"{self.loss_method!r} is not one of {LOSS_METHODS}")
        if self.remat not in REMAT_POLICIES:
            fail("remat", f"{self.remat!r} is not one of {REMAT_POLICIES}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                fail(name, f"must be an integer or None, got {value!r}")
        self._validate_family()

    def _validate_family(self) -> None:
        """The fields that describe the Qwen families (see the class docstring)."""
        def fail(name: str, msg: str) -> None:
            raise ValueError(f"ModelConfig.{name}: {msg}")

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                fail(name, f"{getattr(self, name)!r} is not one of {allowed}")

        choice("model_type", MODEL_TYPES)
        choice("qk_norm", QK_NORMS)
        choice("moe_method", MOE_METHODS)
        hd = self.attention_head_dim
        if hd is not None and (isinstance(hd, bool) or not isinstance(hd, int) or hd <= 0):
            fail("attention_head_dim", f"must be a positive integer or None, got {hd!r}")
        if not 0 < self.partial_rotary_factor <= 1:
            fail("partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor!r}")
        if len(self.mlp_kinds) != self.num_hidden_layers:
            fail("mlp_layer_types", f"has {len(self.mlp_kinds)} entries but "
                                    f"num_hidden_layers is {self.num_hidden_layers}")
        for i, kind in enumerate(self.mlp_kinds):
            if kind not in MLP_KINDS:
                fail("mlp_layer_types", f"entry {i} is {kind!r}; expected one of {MLP_KINDS}")
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "shared_expert_intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(name, f"must be a non-negative integer, got {value!r}")
        if self.has_moe:
            if self.num_experts < 1 or self.moe_intermediate_size < 1:
                fail("num_experts", "MoE layers need num_experts and moe_intermediate_size >= 1, "
                                    f"got {self.num_experts} and {self.moe_intermediate_size}")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                fail("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}], "
                                            f"got {self.num_experts_per_tok}")

    # ----------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        """Attention head width: ``attention_head_dim``, else hidden_size // heads."""
        return self.attention_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates (transformers' int(head_dim * factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def mlp_kinds(self) -> tuple[str, ...]:
        """Per layer, "dense" or "moe" (``mlp_layer_types``, None meaning all dense)."""
        if self.mlp_layer_types is None:
            return (DENSE_MLP,) * len(self.layer_types)
        return self.mlp_layer_types

    @property
    def has_moe(self) -> bool:
        return MOE in self.mlp_kinds

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(_DTYPES[self.dtype])

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(_DTYPES[self.param_dtype])

    @property
    def layer_period(self) -> int:
        """Smallest p dividing num_hidden_layers with layer_types periodic in p.

        The stack scans over blocks of this many layers; p == num_hidden_layers means no
        repetition, and the stack is unrolled.
        """
        n = self.num_hidden_layers
        kinds = list(zip(self.layer_types, self.mlp_kinds))
        for p in range(1, n + 1):
            if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
                return p
        return n

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def first_layers(self, n: int) -> "ModelConfig":
        """The same model cut to its first ``n`` layers (their mixer and MLP kinds kept)."""
        mlp = None if self.mlp_layer_types is None else self.mlp_layer_types[:n]
        return self.replace(num_hidden_layers=n, layer_types=self.layer_types[:n],
                            mlp_layer_types=mlp)

    # ----------------------------------------------------------------- transformers interop
    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers ``config.json`` dict (model_type ``olmo_hybrid``)."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        return {
            "architectures": ["OlmoHybridForCausalLM"],
            "model_type": "olmo_hybrid",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "use_cache": True,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": rope,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "layer_types": list(self.layer_types),
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_a_log_min": self.linear_a_log_min,
            "linear_a_log_max": self.linear_a_log_max,
            "linear_dt_min": self.linear_dt_min,
            "linear_dt_max": self.linear_dt_max,
            "linear_dt_init_floor": self.linear_dt_init_floor,
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "linear_allow_neg_eigval": self.linear_allow_neg_eigval,
            "dtype": self.param_dtype,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from a transformers ``config.json`` dict, filling defaults the way
        ``OlmoHybridConfig`` does. ``overrides`` replace fields (e.g. ``dtype``).

        Raises ValueError naming the field: ``check_hf_dict``'s type checks, a model type other
        than ``olmo_hybrid``, a RoPE type other than the default, then ``ModelConfig``'s own."""
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a dict, got {type(d).__name__}")
        model_type = d.get("model_type", "olmo_hybrid")
        if model_type != "olmo_hybrid":
            raise ValueError(f"config.model_type: expected 'olmo_hybrid', got {model_type!r}")
        check_hf_dict(d)
        base = cls()
        get = lambda name: d.get(name) if d.get(name) is not None else getattr(base, name)
        n_layers = int(get("num_hidden_layers"))
        n_heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        layer_types = d.get("layer_types")
        if layer_types is None:
            # transformers' default, which also forces at least one attention layer.
            layer_types = list(hybrid_layer_types(n_layers))
            if ATTENTION not in layer_types and layer_types:
                layer_types[-1] = ATTENTION
        lk_heads = d.get("linear_num_key_heads") or n_heads
        lv_heads = d.get("linear_num_value_heads") or n_heads
        lk_dim = d.get("linear_key_head_dim") or int(0.75 * hidden / lk_heads)
        lv_dim = d.get("linear_value_head_dim") or 2 * lk_dim
        # transformers: rope_parameters={"rope_theta": None} is NoPE; a missing or null
        # rope_parameters is standardised to the default theta (or a legacy top-level rope_theta).
        rope = d.get("rope_parameters")
        if isinstance(rope, dict):
            if rope.get("rope_type", "default") != "default":
                raise ValueError(
                    f"config.rope_parameters.rope_type: only 'default' RoPE is supported, "
                    f"got {rope.get('rope_type')!r}")
            rope_theta = rope.get("rope_theta")
        else:
            rope_theta = d.get("rope_theta", 10000.0)
        eos = d.get("eos_token_id", base.eos_token_id)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        dtype = hf_dict_dtype(d) or "float32"
        kwargs: dict[str, Any] = dict(
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            rms_norm_eps=float(get("rms_norm_eps")),
            layer_types=tuple(layer_types),
            linear_num_key_heads=lk_heads,
            linear_num_value_heads=lv_heads,
            linear_key_head_dim=lk_dim,
            linear_value_head_dim=lv_dim,
            linear_conv_kernel_dim=get("linear_conv_kernel_dim"),
            linear_allow_neg_eigval=bool(d.get("linear_allow_neg_eigval", True)),
            rope_theta=None if rope_theta is None else float(rope_theta),
            max_position_embeddings=get("max_position_embeddings"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            hidden_act=get("hidden_act"),
            attention_bias=bool(d.get("attention_bias", False)),
            initializer_range=float(get("initializer_range")),
            linear_a_log_min=float(get("linear_a_log_min")),
            linear_a_log_max=float(get("linear_a_log_max")),
            linear_dt_min=float(get("linear_dt_min")),
            linear_dt_max=float(get("linear_dt_max")),
            linear_dt_init_floor=float(get("linear_dt_init_floor")),
            pad_token_id=d.get("pad_token_id", base.pad_token_id),
            bos_token_id=d.get("bos_token_id", base.bos_token_id),
            eos_token_id=eos,
            dtype=dtype,
            param_dtype=dtype,
        )
        kwargs.update(overrides)
        return cls(**kwargs)


# --------------------------------------------------------------------- presets
def olmo_hybrid_7b(**overrides: Any) -> ModelConfig:
    """allenai/Olmo-Hybrid-7B: 32 layers (3 GDN : 1 attention), 7,430,870,688 parameters."""
    return ModelConfig(**overrides)


def olmo_hybrid_tiny(**overrides: Any) -> ModelConfig:
    """A few-hundred-thousand-parameter model for unit tests (one hybrid block of 4 layers x 2)."""
    kwargs: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, layer_types=hybrid_layer_types(8),
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=32, rope_theta=10000.0, max_position_embeddings=4096,
        pad_token_id=None, eos_token_id=None,
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def olmo_hybrid_small(**overrides: Any) -> ModelConfig:
    """About 20M parameters with OLMo Hybrid's proportions, for CPU experiments."""
    kwargs: dict[str, Any] = dict(
        vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=6, num_key_value_heads=6, layer_types=hybrid_layer_types(8),
        linear_num_key_heads=6, linear_num_value_heads=6, linear_key_head_dim=48,
        linear_value_head_dim=96, rope_theta=500000.0, max_position_embeddings=8192,
        pad_token_id=None, eos_token_id=None,
        # Two blocks compile quickly unrolled, and XLA:CPU runs the unrolled backward faster
        # than its loop (train-step gradient at 4 x 512: 1340 against 1739 ms).
        scan_layers=False,
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def olmo_hybrid_bytes(**overrides: Any) -> ModelConfig:
    """About 3.5M parameters over raw UTF-8 bytes: the tiny preset (vocabulary 256) widened to
    hidden 256 and cut to one hybrid block (3 GDN layers, then attention); the main job trains
    it on a CPU in minutes."""
    return olmo_hybrid_tiny(**{
        "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "layer_types": hybrid_layer_types(4),
        "linear_num_key_heads": 4, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
        "linear_value_head_dim": 64, **overrides})
