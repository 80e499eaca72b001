"""Configuration of the Complexity architecture.

Self-contained (imports only transformers), so a saved checkpoint can carry this file for
`trust_remote_code=True` loading where the `complexity` package is not installed.

The variants (see docs/architecture.md §2-3):
  mlp_type      "dense" | "token_routed" | "learned_moe" | "hash_routed"
  routing       "range" | "modulo" | "zipf"   (token_routed: how the token -> expert table is built)
  route_strategy "modulo_cyclic" | "balanced_hash" | "multi_hash" | "hierarchical_hash"
                (hash_routed: how each layer's top-k route table is built)
  mu_mode       "none" | "guidance" (mu after the MLP biases the next layer's q/k/v)
                | "inl" (INL dynamics: velocity/controller, mu highway, mu-router override)
"""

from __future__ import annotations

import copy
import math

from transformers import PretrainedConfig

MLP_TYPES = ("dense", "token_routed", "learned_moe", "hash_routed")
ROUTING_STRATEGIES = ("range", "modulo", "zipf")
# hash_routed route-table builders (`hash_routing.build_route_table` imports these names) and
# multi_hash's channel counts, as the upstream engine allows.
ROUTE_STRATEGIES = ("modulo_cyclic", "balanced_hash", "multi_hash", "hierarchical_hash")
ROUTE_HASH_COUNTS = range(2, 9)
MU_MODES = ("none", "guidance", "inl")

# Size presets (docs/architecture.md §5). Variant flags default to the token-routed design;
# the presets that name a design set it explicitly.
_SIZES = {
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=704,
        num_experts=4,
    ),
    "20m": dict(
        hidden_size=320,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=896,
        num_experts=4,
    ),
    "small": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1408,
        num_experts=4,
    ),
    "base": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        num_experts=4,
    ),
    "tmlr-187m": dict(
        hidden_size=768,
        num_hidden_layers=18,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        num_experts=4,
        shared_expert=True,
        mu_mode="guidance",
        routing="zipf",
    ),
    "350m": dict(
        hidden_size=1280,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=3456,
        num_experts=4,
    ),
    "medium": dict(
        hidden_size=1536,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=4096,
        num_experts=4,
    ),
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=5632,
        num_experts=4,
    ),
    "pacific-prime": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=5632,
        num_experts=4,
        mu_mode="inl",
        routing="modulo",
        shared_expert=False,
        max_position_embeddings=2048,
    ),
    "3b": dict(
        hidden_size=2560,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=6912,
        num_experts=8,
    ),
    "3.8b": dict(
        hidden_size=3072,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        num_experts=8,
    ),
    "7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=11008,
        num_experts=8,
    ),
    # the shape of upstream's public TR-Hash MoE 200M release: top-2 hash routing over 4 narrow
    # experts (4 x 64) beside a wide shared expert, routed branch scaled by 2
    "trhash-200m": dict(
        hidden_size=896,
        num_hidden_layers=16,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=256,
        num_experts=4,
        mlp_type="hash_routed",
        num_experts_per_tok=2,
        route_strategy="multi_hash",
        route_hash_count=2,
        route_primary_weight=0.5,
        shared_expert=True,
        shared_expert_intermediate_size=3072,
        shared_output_scale=1.0,
        routed_output_scale=2.0,
        max_position_embeddings=2048,
    ),
}
_SIZES["150m"] = _SIZES["base"]
PRESETS = tuple(_SIZES)


def _fail(field: str, message: str):
    raise ValueError(f"ComplexityConfig.{field}: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return _is_int(value) and value > 0


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_number(value) -> bool:
    return _finite_number(value) and value > 0


class ComplexityConfig(PretrainedConfig):
    r"""Configuration for [`ComplexityForCausalLM`].

    Args:
        vocab_size: vocabulary size V.
        hidden_size: residual width H.
        intermediate_size: MLP width I. Dense: the SwiGLU width. Routed: the total over experts,
            each expert has `expert_intermediate_size` (default `I // num_experts`).
        num_hidden_layers, num_attention_heads, num_key_value_heads: L, heads, GQA kv heads.
        head_dim: per-head width; defaults to `hidden_size // num_attention_heads`.
        max_position_embeddings: longest sequence the model is meant for.
        rms_norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        partial_rotary_factor: f in (0, 1]: RoPE turns only the first
            `rotary_dim = floor(head_dim * f / 2) * 2` dims of each q/k head (rotate-half over those
            dims, inv_freq_i = rope_theta^(-2i / rotary_dim)); the rest pass through unrotated.
        attention_multiplier: the attention softmax scale; None: 1/sqrt(head_dim). (muP: 1/head_dim.)
        logits_scaling: the output logits are divided by it (muP's output multiplier: the width
            over a base width).
        use_qk_norm: RMSNorm over head_dim on q and k, before RoPE.
        sliding_window: if set, a query sees at most this many keys (itself included).
        attention_dropout: dropout on attention probabilities (training only).
        tie_word_embeddings: LM head shares the embedding matrix.
        initializer_range: std of the N(0, std) init of linear and embedding weights.
        mlp_type: "dense", "token_routed", "learned_moe" or "hash_routed".
        num_experts: E for the routed MLPs.
        expert_intermediate_size: width of one expert (default `intermediate_size // num_experts`).
        routing: how `token_to_expert` is built: "range", "modulo" or "zipf" (zipf tables come from
            corpus counts, see `complexity.routing`; the table is a buffer saved with the weights).
        shared_expert: add a dense SwiGLU that every token passes through.
        shared_expert_intermediate_size: its width (default: the expert width).
        num_experts_per_tok: the experts each token visits, k: learned_moe's top-k, hash_routed's
            route slots (token_routed: always 1). Architectural: no generation setting reads it.
        router_aux_loss_coef: weight of the Switch load-balancing loss added to the LM loss.
        route_strategy: hash_routed: how each layer's route table ([k, V] int64 buffer, saved with
            the weights and never rebuilt on load) is built at init: "modulo_cyclic",
            "balanced_hash", "multi_hash" or "hierarchical_hash" (docs/architecture.md §2e).
        route_hash_count: multi_hash's number of hash channels, 2..8.
        route_primary_weight: hash_routed: route slot 0's weight p; the other k-1 slots share 1-p
            equally. None: 1/k (equal weights).
        shared_output_scale, routed_output_scale: hash_routed: fixed multipliers of the shared
            expert's and the routed experts' outputs.
        shared_output_scale_first_layer, shared_output_scale_last_layer,
        routed_output_scale_first_layer, routed_output_scale_last_layer: if either end is set,
            that branch's scale is linear over depth from first (default: the base scale) at
            layer 0 to last (default: first) at layer L-1.
        qk_norm_eps: the QK-norm's epsilon (None: rms_norm_eps).
        mu_mode: "none", "guidance" or "inl".
        mu_clamp_min, mu_clamp_max: guidance clamp of the mu parameter (docs/architecture.md §3a: 0, 2).
        mu_prev_clamp: guidance clamp of mu passed to the next layer (docs/architecture.md §3a: 2).
        dynamics_alpha, dynamics_beta, dynamics_gate: INL controller outputs at init (through
            the controller bias); dynamics_dt: integration step; dynamics_controller_hidden: C.
        dynamics_beta_max: cap on beta; dynamics_velocity_clamp: clamp on the velocity.
        mu_highway_scale: INL mu highway coefficient (mu_prev = mu_c + scale * sum of mu_c).
        mu_router_bias: INL hard override strength (argmax(bias * one_hot(table) + mu_router(mu))).
    """

    model_type = "complexity"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        intermediate_size: int = 2048,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int = 4,
        head_dim: int | None = None,
        max_position_embeddings: int = 4096,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        partial_rotary_factor: float = 1.0,
        attention_multiplier: float | None = None,
        logits_scaling: float = 1.0,
        use_qk_norm: bool = True,
        sliding_window: int | None = None,
        attention_dropout: float = 0.0,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        mlp_type: str = "token_routed",
        num_experts: int = 4,
        expert_intermediate_size: int | None = None,
        routing: str = "modulo",
        shared_expert: bool = False,
        shared_expert_intermediate_size: int | None = None,
        num_experts_per_tok: int = 1,
        router_aux_loss_coef: float = 0.01,
        mu_mode: str = "none",
        mu_clamp_min: float = 0.0,
        mu_clamp_max: float = 2.0,
        mu_prev_clamp: float = 2.0,
        dynamics_alpha: float = 0.9,
        dynamics_beta: float = 0.1,
        dynamics_gate: float = 0.5,
        dynamics_dt: float = 0.1,
        dynamics_controller_hidden: int = 64,
        dynamics_beta_max: float = 2.0,
        dynamics_velocity_clamp: float = 10.0,
        mu_highway_scale: float = 0.1,
        mu_router_bias: float = 10.0,
        route_strategy: str = "multi_hash",
        route_hash_count: int = 2,
        route_primary_weight: float | None = None,
        shared_output_scale: float = 1.0,
        routed_output_scale: float = 1.0,
        shared_output_scale_first_layer: float | None = None,
        shared_output_scale_last_layer: float | None = None,
        routed_output_scale_first_layer: float | None = None,
        routed_output_scale_last_layer: float | None = None,
        qk_norm_eps: float | None = None,
        pad_token_id: int | None = 1,
        bos_token_id: int | None = 2,
        eos_token_id: int | None = 0,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = (
            head_dim if head_dim is not None else (hidden_size // num_attention_heads if num_attention_heads else None)
        )
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.attention_multiplier = attention_multiplier
        self.logits_scaling = logits_scaling
        self.use_qk_norm = use_qk_norm
        self.sliding_window = sliding_window
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.mlp_type = mlp_type
        self.num_experts = num_experts
        self.expert_intermediate_size = expert_intermediate_size
        self.routing = routing
        self.shared_expert = shared_expert
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.num_experts_per_tok = num_experts_per_tok
        self.router_aux_loss_coef = router_aux_loss_coef
        self.mu_mode = mu_mode
        self.mu_clamp_min = mu_clamp_min
        self.mu_clamp_max = mu_clamp_max
        self.mu_prev_clamp = mu_prev_clamp
        self.dynamics_alpha = dynamics_alpha
        self.dynamics_beta = dynamics_beta
        self.dynamics_gate = dynamics_gate
        self.dynamics_dt = dynamics_dt
        self.dynamics_controller_hidden = dynamics_controller_hidden
        self.dynamics_beta_max = dynamics_beta_max
        self.dynamics_velocity_clamp = dynamics_velocity_clamp
        self.mu_highway_scale = mu_highway_scale
        self.mu_router_bias = mu_router_bias
        self.route_strategy = route_strategy
        self.route_hash_count = route_hash_count
        self.route_primary_weight = route_primary_weight
        self.shared_output_scale = shared_output_scale
        self.routed_output_scale = routed_output_scale
        self.shared_output_scale_first_layer = shared_output_scale_first_layer
        self.shared_output_scale_last_layer = shared_output_scale_last_layer
        self.routed_output_scale_first_layer = routed_output_scale_first_layer
        self.routed_output_scale_last_layer = routed_output_scale_last_layer
        self.qk_norm_eps = qk_norm_eps
        self.use_cache = use_cache
        # transformers' own token-id check (run by super().__init__) compares each id with
        # vocab_size and fails with a bare TypeError on a non-integer: check them first, by name.
        self._validate_vocabulary(
            _fail, pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id
        )
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_complexity()

    # The expert and shared widths have defaults derived from other fields; these properties
    # give the effective value without writing the derived number into config.json.
    @property
    def expert_width(self) -> int:
        if self.expert_intermediate_size is not None:
            return self.expert_intermediate_size
        return self.intermediate_size // self.num_experts

    @property
    def shared_expert_width(self) -> int:
        if self.shared_expert_intermediate_size is not None:
            return self.shared_expert_intermediate_size
        return self.expert_width

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each q/k head that RoPE turns: floor(head_dim * f / 2) * 2."""
        return int(self.head_dim * self.partial_rotary_factor // 2) * 2

    @property
    def attention_scale(self) -> float:
        """The softmax scale of the attention scores."""
        return self.head_dim**-0.5 if self.attention_multiplier is None else self.attention_multiplier

    def validate_complexity(self) -> None:
        """Raise ValueError naming the field for the first inconsistent setting. The checks run in
        this order, each relying on those before it (an expert count before the route tables built
        from it), and the first failure is the one reported."""
        fail = _fail
        self._validate_vocabulary(
            fail, pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id
        )
        self._validate_shape(fail)
        self._validate_attention_scales(fail)
        self._validate_choices(fail)
        self._validate_flags(fail)
        self._validate_experts(fail)
        self._validate_hash_routing(fail)
        self._validate_shared_expert(fail)
        self._validate_mu_mode(fail)
        self._validate_numbers(fail)

    def _validate_vocabulary(self, fail, **token_ids) -> None:
        """vocab_size, and the special token ids (None, an id, or for eos a list of ids) inside it:
        an id the model cannot emit would never stop a generation."""
        if not _positive_int(self.vocab_size):
            fail("vocab_size", f"must be a positive integer, got {self.vocab_size!r}")
        for field, value in token_ids.items():
            ids = value if field == "eos_token_id" and isinstance(value, (list, tuple)) else [value]
            for token_id in ids:
                if token_id is None:
                    continue
                if not _is_int(token_id) or token_id < 0:
                    fail(field, f"must be None or a non-negative integer id, got {value!r}")
                if token_id >= self.vocab_size:
                    fail(field, f"{token_id} is outside the vocabulary [0, vocab_size={self.vocab_size})")

    def _validate_shape(self, fail) -> None:
        """The sizes, the head counts that must divide one another, and head_dim."""
        for field in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, field)
            if not _positive_int(value):
                fail(field, f"must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"{self.num_attention_heads} does not divide hidden_size={self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail(
                "num_key_value_heads",
                f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}",
            )
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            fail("head_dim", f"must be a positive even integer (RoPE rotates pairs), got {self.head_dim!r}")

    def _validate_attention_scales(self, fail) -> None:
        """partial_rotary_factor, attention_multiplier and logits_scaling (after head_dim)."""
        f = self.partial_rotary_factor
        if not (_finite_number(f) and 0.0 < f <= 1.0):
            fail("partial_rotary_factor", f"must be a number in (0, 1], got {f!r}")
        if self.rotary_dim < 2:
            fail(
                "partial_rotary_factor",
                f"{f} gives rotary_dim = floor(head_dim * {f} / 2) * 2 = {self.rotary_dim} with "
                f"head_dim={self.head_dim}; RoPE needs at least one pair of dims",
            )
        if self.attention_multiplier is not None and not _positive_number(self.attention_multiplier):
            fail(
                "attention_multiplier",
                f"must be None (1/sqrt(head_dim)) or a positive number, got {self.attention_multiplier!r}",
            )
        if not _positive_number(self.logits_scaling):
            fail(
                "logits_scaling",
                f"must be a positive number (the logits are divided by it), got {self.logits_scaling!r}",
            )

    def _validate_choices(self, fail) -> None:
        """The fields that name a variant, and the optional sliding window."""
        if self.mlp_type not in MLP_TYPES:
            fail("mlp_type", f"unknown value {self.mlp_type!r}; expected one of {MLP_TYPES}")
        if self.mu_mode not in MU_MODES:
            fail("mu_mode", f"unknown value {self.mu_mode!r}; expected one of {MU_MODES}")
        if self.routing not in ROUTING_STRATEGIES:
            fail("routing", f"unknown value {self.routing!r}; expected one of {ROUTING_STRATEGIES}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            fail("sliding_window", f"must be None or a positive integer, got {self.sliding_window!r}")

    def _validate_flags(self, fail) -> None:
        """The on/off fields: true or false, never a truthy string such as "no"."""
        for field in ("use_qk_norm", "shared_expert", "tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, field), bool):
                fail(field, f"must be true or false, got {getattr(self, field)!r}")

    def _validate_experts(self, fail) -> None:
        """A routed MLP's experts: their number and width, and the experts each token visits."""
        if self.mlp_type != "dense":
            if not _positive_int(self.num_experts):
                fail("num_experts", f"must be a positive integer, got {self.num_experts!r}")
            if self.expert_intermediate_size is not None and not _is_int(self.expert_intermediate_size):
                fail("expert_intermediate_size", f"must be None or an integer, got {self.expert_intermediate_size!r}")
            if self.expert_intermediate_size is None and self.intermediate_size % self.num_experts:
                fail(
                    "intermediate_size",
                    f"{self.intermediate_size} is not divisible by num_experts={self.num_experts} "
                    "(or set expert_intermediate_size)",
                )
            if self.expert_width <= 0:
                fail("expert_intermediate_size", f"must be positive, got {self.expert_width}")
        k = self.num_experts_per_tok
        if self.mlp_type in ("learned_moe", "hash_routed") and (
            not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.num_experts
        ):
            fail("num_experts_per_tok", f"must be an integer in [1, num_experts={self.num_experts}], got {k!r}")
        if self.mlp_type == "token_routed" and k != 1:
            fail(
                "num_experts_per_tok",
                f"token_routed sends each token to exactly one expert, so it must be 1, got {k!r} "
                "(hash_routed or learned_moe route to several)",
            )

    def _validate_hash_routing(self, fail) -> None:
        """The hash_routed fields (checked whatever the mlp_type, so a typo is never silent), and
        what each route-table builder can give for these E and k (docs/architecture.md §2e)."""
        if self.route_strategy not in ROUTE_STRATEGIES:
            fail("route_strategy", f"unknown value {self.route_strategy!r}; expected one of {ROUTE_STRATEGIES}")
        if isinstance(self.route_hash_count, bool) or self.route_hash_count not in ROUTE_HASH_COUNTS:
            fail("route_hash_count", f"must be an integer in [2, 8], got {self.route_hash_count!r}")
        p = self.route_primary_weight
        if p is not None and not (_finite_number(p) and 0.0 <= p <= 1.0):
            fail("route_primary_weight", f"must be None (1/num_experts_per_tok) or a number in [0, 1], got {p!r}")
        for branch in ("shared", "routed"):
            for suffix in ("", "_first_layer", "_last_layer"):
                name = f"{branch}_output_scale{suffix}"
                value = getattr(self, name)
                if (suffix == "" or value is not None) and not _finite_number(value):
                    fail(name, f"must be a finite number{'' if suffix == '' else ' or None'}, got {value!r}")
        if self.mlp_type != "hash_routed":
            return
        e, k = self.num_experts, self.num_experts_per_tok
        if self.route_strategy == "hierarchical_hash":
            if e < 4 or e % 2:
                fail("num_experts", f"hierarchical_hash needs an even number of experts >= 4, got {e}")
            if 2 * k > e:
                fail(
                    "num_experts_per_tok",
                    f"hierarchical_hash routes among num_experts/2={e // 2} parent experts, "
                    f"so at most {e // 2} routes per token, got {k}",
                )
        if self.route_strategy in ("balanced_hash", "hierarchical_hash"):
            groups = e if self.route_strategy == "balanced_hash" else e // 2
            # slot j of a token is pi[(p + j * stride) mod E] for an odd stride < E: k distinct
            # experts need k <= E / gcd(stride, E) for every such stride
            worst = min((groups // math.gcd(s, groups) for s in range(1, groups, 2)), default=groups)
            if k > worst:
                fail(
                    "num_experts_per_tok",
                    f"{self.route_strategy} cannot give {k} distinct experts per token "
                    f"with num_experts={e} (at most {worst}; a power of two number of experts allows any k)",
                )

    def _validate_shared_expert(self, fail) -> None:
        """The shared expert: beside a routed MLP only, with a positive width."""
        if self.shared_expert and self.mlp_type == "dense":
            fail(
                "shared_expert",
                "a shared expert needs a routed MLP (mlp_type token_routed, learned_moe or hash_routed)",
            )
        width = self.shared_expert_intermediate_size
        if self.shared_expert and width is not None and not _is_int(width):
            fail("shared_expert_intermediate_size", f"must be None or an integer, got {width!r}")
        if self.shared_expert and self.shared_expert_width <= 0:
            fail("shared_expert_intermediate_size", f"must be positive, got {self.shared_expert_width}")

    def _validate_mu_mode(self, fail) -> None:
        """The MLP that a mu_mode needs."""
        if self.mu_mode == "inl" and self.mlp_type != "token_routed":
            fail(
                "mu_mode",
                "'inl' routes through the token-routed MLP's mu override, which moves a token's one "
                f"expert (top-1); it needs mlp_type='token_routed', got {self.mlp_type!r} (mu_mode='guidance' "
                "composes with every MLP)",
            )

    def _validate_numbers(self, fail) -> None:
        """The scalar settings: RoPE base, epsilons, the mu clamps, the INL controller's values at
        init, the aux-loss weight."""
        for field in ("rope_theta", "rms_norm_eps", "mu_prev_clamp"):
            if not _positive_number(getattr(self, field)):
                fail(field, f"must be a positive number, got {getattr(self, field)!r}")
        if not (
            _finite_number(self.mu_clamp_min)
            and _finite_number(self.mu_clamp_max)
            and self.mu_clamp_min <= self.mu_clamp_max
        ):
            fail(
                "mu_clamp_min",
                f"must be a number <= mu_clamp_max, got {self.mu_clamp_min!r} and {self.mu_clamp_max!r}",
            )
        if self.qk_norm_eps is not None and not _positive_number(self.qk_norm_eps):
            fail("qk_norm_eps", f"must be None (rms_norm_eps) or a positive number, got {self.qk_norm_eps!r}")
        for field in ("dynamics_alpha", "dynamics_gate"):
            if not (_finite_number(getattr(self, field)) and 0.0 < getattr(self, field) < 1.0):
                fail(field, f"is a sigmoid output at init and must lie in (0, 1), got {getattr(self, field)!r}")
        if not _positive_number(self.dynamics_beta_max):
            fail("dynamics_beta_max", f"must be a positive number, got {self.dynamics_beta_max!r}")
        if not (_finite_number(self.dynamics_beta) and 0.0 < self.dynamics_beta < self.dynamics_beta_max):
            fail(
                "dynamics_beta",
                f"must lie in (0, dynamics_beta_max={self.dynamics_beta_max}), got {self.dynamics_beta!r}",
            )
        for field in ("dynamics_dt", "dynamics_velocity_clamp", "initializer_range"):
            if not _positive_number(getattr(self, field)):
                fail(field, f"must be a positive number, got {getattr(self, field)!r}")
        if not _positive_int(self.dynamics_controller_hidden):
            fail("dynamics_controller_hidden", f"must be a positive integer, got {self.dynamics_controller_hidden!r}")
        for field in ("mu_highway_scale", "mu_router_bias"):
            if not _finite_number(getattr(self, field)):
                fail(field, f"must be a finite number, got {getattr(self, field)!r}")
        if not (_finite_number(self.attention_dropout) and 0.0 <= self.attention_dropout < 1.0):
            fail("attention_dropout", f"must be a probability in [0, 1), got {self.attention_dropout!r}")
        if not (_finite_number(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0):
            fail("router_aux_loss_coef", f"must be a number >= 0, got {self.router_aux_loss_coef!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ComplexityConfig:
        """A preset of docs/architecture.md §5, with any field overridden, e.g. `from_preset("tiny", mu_mode="guidance")`."""
        if name not in _SIZES:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
        fields = copy.deepcopy(_SIZES[name])
        fields.update(overrides)
        config = cls(**fields)
        config.preset = name
        return config


__all__ = ["ComplexityConfig", "PRESETS", "MLP_TYPES", "ROUTING_STRATEGIES", "ROUTE_STRATEGIES", "MU_MODES"]
