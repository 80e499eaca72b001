"""Native vLLM implementation of `ComplexityForCausalLM` (loaded by the plugin in `__init__.py`).

Computes exactly what `complexity.modeling_complexity.ComplexityForCausalLM` computes
(docs/architecture.md §1-3), on vLLM's flattened batch: every activation is [num_tokens, H], the
KV cache is vLLM's paged cache (`Attention`), and the mu / velocity signals are per token and only
flow from one layer to the next inside a forward (never across decode steps).

Only what vLLM needs differently is defined here: attention over the paged cache, the
tensor-parallel linear layers and experts, pipeline stages and weight loading. The equations are
the functions of `complexity.complexity_math`, and the replicated blocks (mu guidance, the INL
dynamics) are the Hugging Face model's own modules.

Tensor parallelism: q/k/v and their mu projections are two `QKVParallelLinear` (over the normed
residual and over mu), so `mu_to_qkv(mu)` splits by head exactly like `qkv_proj(x)` and the two
add shard by shard. The routed experts split their width I_e across ranks (gate and up halves
each sliced the same way), the shared expert is a Merged/RowParallel SwiGLU, and the MLP's partial
sums are all-reduced once. The small mu / dynamics / router layers are replicated plain linear
layers (they read and write full-width [T, H] tensors that every rank holds). Pipeline parallelism carries mu,
velocity and the INL mu highway sum between stages as intermediate tensors.

Routing: `expert = token_to_expert[input_ids]` is computed inside the forward from the ids of the
step (a buffer loaded from the checkpoint), so it is traced as an indexing op by torch.compile
and replays correctly under CUDA graphs; the tokens are grouped by expert once per forward, for
every layer (`Routing.for_tokens`). The hash-routed MLP (docs/architecture.md §2e) reads its
layer's [k, V] route table the same way, and runs `hash_routed_mlp` (the HF model's function) on
its rank's slice of every expert's width, the shared expert beside it, one all-reduce for both.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.model_executor.utils import set_weight_attrs
from vllm.sequence import IntermediateTensors

from complexity.complexity_math import (
    initial_mu_state,
    layer_gives_mu,
    layer_takes_mu,
    learned_topk,
    mix_topk_experts,
    mu_router_override,
    next_layer_mu,
)
from complexity.configuration_complexity import ComplexityConfig
from complexity.hash_routing import check_route_table, hash_routed_mlp, layer_scales, slot_weights, token_routes
from complexity.modeling_complexity import (
    ComplexityExperts,
    ComplexityINLDynamics,
    ComplexityMuGuidance,
    Routing,
    default_routing_table,
)

# HF checkpoint name -> (vLLM fused parameter name, shard id).
_STACKED_PARAMS = (
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".mu_to_qkv", ".mu_to_q", "q"),
    (".mu_to_qkv", ".mu_to_k", "k"),
    (".mu_to_qkv", ".mu_to_v", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
)


# ----------------------------------------------------------------------------- MLPs


class ComplexityMLP(nn.Module):
    """SwiGLU down(silu(gate(x)) * up(x)); column/row parallel. `reduce_results=False` leaves the
    partial sum un-reduced (the routed MLPs reduce once for experts + shared)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        quant_config: QuantizationConfig | None = None,
        reduce_results: bool = True,
        prefix: str = "",
    ):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size,
            [intermediate_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            intermediate_size,
            hidden_size,
            bias=False,
            quant_config=quant_config,
            reduce_results=reduce_results,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class ComplexityDenseMLP(ComplexityMLP):
    """mlp_type "dense": one SwiGLU of width I; the MLP interface `(x, routing) -> (out, None)`."""

    def __init__(self, config: ComplexityConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__(config.hidden_size, config.intermediate_size, quant_config, prefix=prefix)

    def forward(self, x: torch.Tensor, routing: Routing | None = None):
        return super().forward(x), None


class ComplexityParallelExperts(ComplexityExperts):
    """The HF file's stacked experts (same sort + grouped-GEMM dispatch, one definition), with
    each expert's width I_e split across tensor-parallel ranks. Checkpoint layout:
    gate_up_proj [E, H, 2 I_e] (gate = first half), down_proj [E, I_e, H]; rank r keeps columns
    [r l, (r+1) l) of gate and of up, and the same rows of down (l = I_e / tp). Its output is a
    partial sum over the width: the caller all-reduces."""

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int):
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        if expert_size % self.tp_size:
            raise ValueError(f"expert width {expert_size} is not divisible by tensor_parallel_size={self.tp_size}")
        self.expert_size = expert_size
        self.local_size = expert_size // self.tp_size
        super().__init__(num_experts, hidden_size, self.local_size)
        self.gate_up_proj.requires_grad_(False)
        self.down_proj.requires_grad_(False)
        set_weight_attrs(self.gate_up_proj, {"weight_loader": self._load_gate_up})
        set_weight_attrs(self.down_proj, {"weight_loader": self._load_down})

    def _check(self, name: str, loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
        if tuple(loaded.shape) != expected:
            raise ValueError(f"experts.{name}: checkpoint has shape {tuple(loaded.shape)}, expected {expected}")

    def _load_gate_up(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        e, h, _ = param.shape
        self._check("gate_up_proj", loaded, (e, h, 2 * self.expert_size))
        lo, hi = self.tp_rank * self.local_size, (self.tp_rank + 1) * self.local_size
        gate, up = loaded[..., : self.expert_size], loaded[..., self.expert_size :]
        param.data.copy_(torch.cat([gate[..., lo:hi], up[..., lo:hi]], dim=-1))

    def _load_down(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        e, _, h = param.shape
        self._check("down_proj", loaded, (e, self.expert_size, h))
        lo, hi = self.tp_rank * self.local_size, (self.tp_rank + 1) * self.local_size
        param.data.copy_(loaded[:, lo:hi, :])


class _RoutedMLP(nn.Module):
    """What the routed MLPs share: the experts (each rank holds a slice of every expert's width),
    the optional shared expert (a Merged/RowParallel SwiGLU), and one all-reduce of the two
    partial sums."""

    def __init__(self, config: ComplexityConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.num_experts = config.num_experts
        self.tp_size = get_tensor_model_parallel_world_size()
        self.experts = ComplexityParallelExperts(config.num_experts, config.hidden_size, config.expert_width)
        self.shared_expert = (
            ComplexityMLP(
                config.hidden_size,
                config.shared_expert_width,
                quant_config,
                reduce_results=False,
                prefix=f"{prefix}.shared_expert",
            )
            if config.shared_expert
            else None
        )

    def _with_shared(self, out: torch.Tensor, x: torch.Tensor, shared_scale: float = 1.0) -> tuple[torch.Tensor, None]:
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            out = out + (shared if shared_scale == 1.0 else shared_scale * shared)
        if self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out, None


class ComplexityTokenRoutedMLP(_RoutedMLP):
    """Each token through ONE expert chosen from its id (+ optional shared expert); mu_mode "inl"
    re-routes by mu_c (`mu_router_override`, docs/architecture.md §3b)."""

    def __init__(self, config: ComplexityConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__(config, quant_config, prefix)
        self.mu_router = (
            nn.Linear(config.hidden_size, config.num_experts, bias=False) if config.mu_mode == "inl" else None
        )
        self.mu_router_bias = config.mu_router_bias

    def forward(self, x: torch.Tensor, routing: Routing):
        expert_ids, dispatch = routing.expert_ids, routing.dispatch
        if self.mu_router is not None:  # mu moved tokens: group them again
            expert_ids, dispatch = mu_router_override(expert_ids, self.mu_router(routing.mu), self.mu_router_bias), None
        return self._with_shared(self.experts(x, expert_ids, dispatch), x)


class ComplexityLearnedMoE(_RoutedMLP):
    """The learned softmax top-k router baseline (`learned_topk`; inference: no aux loss)."""

    def __init__(self, config: ComplexityConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__(config, quant_config, prefix)
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def forward(self, x: torch.Tensor, routing: Routing | None = None):
        _, weights, experts = learned_topk(self.router(x), self.top_k)
        return self._with_shared(mix_topk_experts(self.experts, x, experts, weights), x)


class ComplexityHashRoutedMLP(_RoutedMLP):
    """Top-k hash routing (docs/architecture.md §2e): each token through the k experts its id
    reads from this layer's route table, with fixed slot weights, plus the shared expert; both
    branches scaled by the layer's fixed scales. Tensor parallel like the token-routed MLP: each
    rank holds a slice of every expert's width (a SwiGLU is separable over its width, so the
    slices' outputs sum to the whole), the shared expert is a Merged/RowParallel SwiGLU, and the
    two partial sums are all-reduced once."""

    def __init__(self, config: ComplexityConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__(config, quant_config, prefix)
        layer_idx = int(prefix.split(".")[-2])  # "...layers.{i}.mlp"
        # Always overwritten by the checkpoint's table (`load_weights` requires it).
        self.register_buffer(
            "route_table", torch.zeros(config.num_experts_per_tok, config.vocab_size, dtype=torch.long)
        )
        self.slot_weights = slot_weights(config.num_experts_per_tok, config.route_primary_weight)
        self.shared_scale, self.routed_scale = layer_scales(config, layer_idx)

    def forward(self, x: torch.Tensor, routing: Routing):
        routes = token_routes(self.route_table, routing.token_ids)
        out = hash_routed_mlp(
            x,
            routes,
            self.slot_weights,
            self.experts.gate_up_proj,
            self.experts.down_proj,
            routed_scale=self.routed_scale,
        )
        return self._with_shared(out, x, self.shared_scale)


# config.mlp_type -> the MLP class; each is built from (config, quant_config, prefix).
MLP_KINDS: dict[str, type[nn.Module]] = {
    "dense": ComplexityDenseMLP,
    "token_routed": ComplexityTokenRoutedMLP,
    "learned_moe": ComplexityLearnedMoE,
    "hash_routed": ComplexityHashRoutedMLP,
}


# ----------------------------------------------------------------------------- attention


class ComplexityAttention(nn.Module):
    """GQA, optional QK-norm (before RoPE, NeoX style), optional mu guidance:
    q|k|v = qkv_proj(x) + mu_to_qkv(mu_prev)."""

    def __init__(
        self,
        config: ComplexityConfig,
        with_mu: bool,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        if self.total_num_heads % tp_size:
            raise ValueError(
                f"num_attention_heads={self.total_num_heads} is not divisible by tensor_parallel_size={tp_size}"
            )
        if (
            (self.total_num_kv_heads % tp_size)
            if self.total_num_kv_heads >= tp_size
            else (tp_size % self.total_num_kv_heads)
        ):
            raise ValueError(
                f"num_key_value_heads={self.total_num_kv_heads} and tensor_parallel_size={tp_size} "
                "do not divide one another"
            )
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = config.attention_scale

        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            self.total_num_heads,
            self.total_num_kv_heads,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        # Same head split as qkv_proj, so the two outputs add shard by shard under TP.
        self.mu_to_qkv = (
            QKVParallelLinear(
                config.hidden_size,
                self.head_dim,
                self.total_num_heads,
                self.total_num_kv_heads,
                bias=False,
                quant_config=quant_config,
                prefix=f"{prefix}.mu_to_qkv",
            )
            if with_mu
            else None
        )
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            eps = config.qk_norm_eps if config.qk_norm_eps is not None else config.rms_norm_eps
            self.q_norm = RMSNorm(self.head_dim, eps=eps)
            self.k_norm = RMSNorm(self.head_dim, eps=eps)
        # The rotary width is given as `rope_dim`, not as vLLM's partial_rotary_factor: that one
        # rounds int(head_dim * f), which may be odd, where the config's rotary_dim is floored to
        # whole pairs.
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            is_neox_style=True,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, "rope_dim": config.rotary_dim},
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.scaling,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=config.sliding_window,
            prefix=f"{prefix}.attn",
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, mu_prev: torch.Tensor | None
    ) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        if self.mu_to_qkv is not None and mu_prev is not None:
            mu_qkv, _ = self.mu_to_qkv(mu_prev)
            qkv = qkv + mu_qkv
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.use_qk_norm:
            q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim)).reshape(q.shape)
            k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim)).reshape(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


# ----------------------------------------------------------------------------- decoder


class ComplexityDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, layer_idx: int, prefix: str):
        super().__init__()
        config: ComplexityConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.self_attn = ComplexityAttention(
            config,
            layer_takes_mu(config, layer_idx),
            vllm_config.cache_config,
            quant_config,
            prefix=f"{prefix}.self_attn",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.mlp_type not in MLP_KINDS:
            raise ValueError(f"unsupported mlp_type {config.mlp_type!r}")
        self.mlp = MLP_KINDS[config.mlp_type](config, quant_config, prefix=f"{prefix}.mlp")
        # Replicated and unchanged from the Hugging Face model.
        self.mu_guidance = ComplexityMuGuidance(config) if layer_gives_mu(config, layer_idx) else None
        self.dynamics = ComplexityINLDynamics(config) if config.mu_mode == "inl" else None

    def forward(self, positions, hidden_states, mu_prev, velocity, routing: Routing):
        """-> (hidden_states, the mu this layer gives (guidance mu or INL mu_c), velocity)."""
        attn = self.self_attn(positions, self.input_layernorm(hidden_states), mu_prev)
        mu = None
        if self.dynamics is not None:
            attn, velocity, mu = self.dynamics(attn, velocity)
            routing = routing._replace(mu=mu)
        # Fused residual add + norm: hidden_states <- hidden_states + attn.
        mlp_in, hidden_states = self.post_attention_layernorm(attn, hidden_states)
        mlp_out, _ = self.mlp(mlp_in, routing)
        hidden_states = hidden_states + mlp_out
        if self.mu_guidance is not None:
            mu = self.mu_guidance(hidden_states)
        return hidden_states, mu, velocity


def _intermediate_keys(config: ComplexityConfig) -> list[str]:
    if config.mu_mode == "guidance":
        return ["hidden_states", "mu"]
    if config.mu_mode == "inl":
        return ["hidden_states", "mu", "velocity", "mu_sum"]
    return ["hidden_states"]


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": 0,
        "positions": 0,
        "intermediate_tensors": 0,
        "inputs_embeds": 0,
    }
)
class ComplexityModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: ComplexityConfig = vllm_config.model_config.hf_config
        self.config = config
        self.mu_mode = config.mu_mode
        self.hidden_size = config.hidden_size
        pp = get_pp_group()
        if pp.is_first_rank or (config.tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=f"{prefix}.embed_tokens",
            )
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: ComplexityDecoderLayer(vllm_config, int(prefix.split(".")[-1]), prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if pp.is_last_rank else PPMissingLayer()
        # One token -> expert table for every layer, loaded from the checkpoint (default: the
        # config's strategy, as the HF model builds it before loading).
        if config.mlp_type == "token_routed":
            self.register_buffer(
                "token_to_expert", default_routing_table(config.vocab_size, config.num_experts, config.routing)
            )
        else:
            self.token_to_expert = None
        self.mu_init = (
            nn.Parameter(torch.zeros(config.hidden_size), requires_grad=False) if config.mu_mode == "guidance" else None
        )
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            _intermediate_keys(config), config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        mu_prev = velocity = mu_sum = None
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            mu_prev, velocity = initial_mu_state(self.config, self.mu_init, hidden_states)
            if mu_prev is not None:
                mu_prev = mu_prev.contiguous()  # one row per token, as the parallel linear layers take it
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
            if self.mu_mode in ("guidance", "inl"):
                mu_prev = intermediate_tensors["mu"]
            if self.mu_mode == "inl":
                velocity = intermediate_tensors["velocity"]
                mu_sum = intermediate_tensors["mu_sum"]

        if self.config.mlp_type in ("token_routed", "hash_routed") and input_ids is None:
            raise ValueError(
                f"{self.config.mlp_type.replace('_', '-')} Complexity models need input_ids (each "
                "token's experts come from its id); prompt embeddings cannot be routed"
            )
        routing = Routing.for_tokens(input_ids, self.token_to_expert, self.config.num_experts)

        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, mu, velocity = layer(positions, hidden_states, mu_prev, velocity, routing)
            mu_prev, mu_sum = next_layer_mu(self.config, mu, mu_sum)

        if not get_pp_group().is_last_rank:
            tensors = {"hidden_states": hidden_states}
            if self.mu_mode in ("guidance", "inl"):
                tensors["mu"] = mu_prev
            if self.mu_mode == "inl":
                tensors["velocity"] = velocity
                tensors["mu_sum"] = mu_sum
            return IntermediateTensors(tensors)
        return self.norm(hidden_states)


class ComplexityForCausalLM(nn.Module, SupportsPP):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "mu_to_qkv": ["mu_to_q", "mu_to_k", "mu_to_v"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: ComplexityConfig = vllm_config.model_config.hf_config
        self.config = config
        self.model = ComplexityModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(config.vocab_size, scale=1.0 / config.logits_scaling)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        loaded: set[str] = set()
        # The routing tables (token_routed's one, hash_routed's per layer) must come from the
        # checkpoint, never rebuilt, and hold valid expert ids.
        tables = {
            n
            for n in buffers
            if (n == "model.token_to_expert" or n.endswith(".mlp.route_table")) and not is_pp_missing_parameter(n, self)
        }
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the embedding is the head
            if name in buffers:  # model.token_to_expert, model.layers.{i}.mlp.route_table
                if is_pp_missing_parameter(name, self):
                    continue
                buf = buffers[name]
                if tuple(tensor.shape) != tuple(buf.shape):
                    raise ValueError(f"{name}: checkpoint has shape {tuple(tensor.shape)}, expected {tuple(buf.shape)}")
                self._check_table(name, tensor)
                buf.copy_(tensor.to(buf.dtype))
                loaded.add(name)
                continue
            for fused, part, shard in _STACKED_PARAMS:
                if part not in name:
                    continue
                target = name.replace(part, fused)
                if is_pp_missing_parameter(target, self):
                    break
                if target not in params:
                    raise ValueError(f"unexpected checkpoint tensor {name!r} (no parameter {target!r})")
                param = params[target]
                param.weight_loader(param, tensor, shard)
                loaded.add(target)
                break
            else:
                if is_pp_missing_parameter(name, self):
                    continue
                if name not in params:
                    raise ValueError(f"unexpected checkpoint tensor {name!r} for this configuration")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        if tables - loaded:
            raise ValueError(f"route table(s) missing from the checkpoint: {', '.join(sorted(tables - loaded))}")
        return loaded

    def _check_table(self, name: str, table: torch.Tensor) -> None:
        """ValueError naming the tensor for expert ids a routed MLP would gather out of range."""
        c = self.config
        if name.endswith(".mlp.route_table"):
            check_route_table(table, c.num_experts, c.vocab_size, c.num_experts_per_tok, name=name)
        elif table.dtype.is_floating_point or (
            table.numel() and not 0 <= int(table.min()) <= int(table.max()) < c.num_experts
        ):
            raise ValueError(f"{name}: must hold integer expert ids in [0, {c.num_experts}) (num_experts)")


__all__ = ["ComplexityForCausalLM"]
