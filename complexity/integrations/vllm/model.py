"""Native vLLM implementation of `ComplexityForCausalLM` (loaded by the plugin in `__init__.py`).

Computes exactly what `complexity.modeling_complexity.ComplexityForCausalLM` computes (SPEC 1-3),
on vLLM's flattened batch: every activation is [num_tokens, H], the KV cache is vLLM's paged
cache (`Attention`), and the mu / velocity signals are per token and only flow from one layer to
the next inside a forward (never across decode steps).

Tensor parallelism: q/k/v and their mu projections are two `QKVParallelLinear` (over the normed
residual and over mu), so `mu_to_qkv(mu)` splits by head exactly like `qkv_proj(x)` and the two
add shard by shard. The routed experts split their width I_e across ranks (gate and up halves
each sliced the same way), the shared expert is a Merged/RowParallel SwiGLU, and the MLP's partial
sums are all-reduced once. The small mu / dynamics / router layers are replicated (they read and
write full-width [T, H] tensors that every rank holds). Pipeline parallelism carries mu,
velocity and the INL mu highway sum between stages as intermediate tensors.

Routing: `expert = token_to_expert[input_ids]` is computed inside the forward from the ids of the
step (a buffer loaded from the checkpoint), so it is traced as an indexing op by torch.compile
and replays correctly under CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
import torch.nn.functional as F
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
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
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

from complexity.configuration_complexity import ComplexityConfig
from complexity.modeling_complexity import ComplexityExperts, default_routing_table

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
    """Dense SwiGLU down(silu(gate(x)) * up(x)); column/row parallel. `reduce_results=False`
    leaves the partial sum un-reduced (the routed MLP reduces once for experts + shared)."""

    def __init__(self, hidden_size: int, intermediate_size: int, quant_config: QuantizationConfig | None = None,
                 reduce_results: bool = True, prefix: str = ""):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=False, quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=False, quant_config=quant_config,
            reduce_results=reduce_results, prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


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
        gate, up = loaded[..., : self.expert_size], loaded[..., self.expert_size:]
        param.data.copy_(torch.cat([gate[..., lo:hi], up[..., lo:hi]], dim=-1))

    def _load_down(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        e, _, h = param.shape
        self._check("down_proj", loaded, (e, self.expert_size, h))
        lo, hi = self.tp_rank * self.local_size, (self.tp_rank + 1) * self.local_size
        param.data.copy_(loaded[:, lo:hi, :])


class ComplexityTokenRoutedMLP(nn.Module):
    """Each token through ONE expert chosen from its id (+ optional shared expert).
    mu_mode "inl": e = argmax(bias * one_hot(table[id]) + mu_router(mu_c)) (SPEC 3b)."""

    def __init__(self, config: ComplexityConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.num_experts = config.num_experts
        self.tp_size = get_tensor_model_parallel_world_size()
        self.experts = ComplexityParallelExperts(config.num_experts, config.hidden_size, config.expert_width)
        self.shared_expert = (
            ComplexityMLP(config.hidden_size, config.shared_expert_width, quant_config,
                          reduce_results=False, prefix=f"{prefix}.shared_expert")
            if config.shared_expert else None
        )
        self.mu_router = None
        if config.mu_mode == "inl":
            self.mu_router = ReplicatedLinear(config.hidden_size, config.num_experts, bias=False,
                                              prefix=f"{prefix}.mu_router")
            self.mu_router_bias = config.mu_router_bias

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
        if self.mu_router is not None and mu is not None:
            logits, _ = self.mu_router(mu)
            logits = logits + self.mu_router_bias * F.one_hot(expert_ids, self.num_experts).to(logits.dtype)
            expert_ids = logits.argmax(dim=-1)
        out = self.experts(x, expert_ids)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        if self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out


class ComplexityLearnedMoE(nn.Module):
    """The learned softmax top-k router baseline (inference: no aux loss). Weights are the router
    probabilities of the chosen experts, renormalised over the k when k > 1."""

    def __init__(self, config: ComplexityConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.tp_size = get_tensor_model_parallel_world_size()
        self.router = ReplicatedLinear(config.hidden_size, config.num_experts, bias=False, prefix=f"{prefix}.router")
        self.experts = ComplexityParallelExperts(config.num_experts, config.hidden_size, config.expert_width)
        self.shared_expert = (
            ComplexityMLP(config.hidden_size, config.shared_expert_width, quant_config,
                          reduce_results=False, prefix=f"{prefix}.shared_expert")
            if config.shared_expert else None
        )

    def forward(self, x: torch.Tensor, expert_ids=None, mu=None) -> torch.Tensor:
        logits, _ = self.router(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top_p, top_e = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        n = x.shape[0]
        if self.top_k > 1:
            token_idx = torch.arange(n, device=x.device).repeat_interleave(self.top_k)
            y = self.experts(x[token_idx], top_e.reshape(-1))
        else:
            y = self.experts(x, top_e.reshape(-1))
        out = (y.view(n, self.top_k, -1) * top_p.unsqueeze(-1).to(y.dtype)).sum(1)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        if self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out


# ----------------------------------------------------------------------------- attention and mu


class ComplexityAttention(nn.Module):
    """GQA, optional QK-norm (before RoPE, NeoX style), optional mu guidance:
    q|k|v = qkv_proj(x) + mu_to_qkv(mu_prev)."""

    def __init__(self, config: ComplexityConfig, with_mu: bool, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        if self.total_num_heads % tp_size:
            raise ValueError(f"num_attention_heads={self.total_num_heads} is not divisible by tensor_parallel_size={tp_size}")
        if (self.total_num_kv_heads % tp_size) if self.total_num_kv_heads >= tp_size else (tp_size % self.total_num_kv_heads):
            raise ValueError(f"num_key_value_heads={self.total_num_kv_heads} and tensor_parallel_size={tp_size} "
                             "do not divide one another")
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5

        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, self.total_num_heads, self.total_num_kv_heads,
            bias=False, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        # Same head split as qkv_proj, so the two outputs add shard by shard under TP.
        self.mu_to_qkv = (
            QKVParallelLinear(
                config.hidden_size, self.head_dim, self.total_num_heads, self.total_num_kv_heads,
                bias=False, quant_config=quant_config, prefix=f"{prefix}.mu_to_qkv",
            )
            if with_mu else None
        )
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim, config.hidden_size, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.o_proj",
        )
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            is_neox_style=True,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.scaling, num_kv_heads=self.num_kv_heads,
            cache_config=cache_config, quant_config=quant_config,
            per_layer_sliding_window=config.sliding_window, prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, mu_prev: torch.Tensor | None) -> torch.Tensor:
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


class ComplexityMuGuidance(nn.Module):
    """SPEC 3a: mu = clamp(mu_param, lo, hi) + mu_proj(x'), passed on as clamp(mu, -c, c)."""

    def __init__(self, config: ComplexityConfig, prefix: str):
        super().__init__()
        self.mu = nn.Parameter(torch.ones(config.hidden_size), requires_grad=False)
        self.mu_proj = ReplicatedLinear(config.hidden_size, config.hidden_size, bias=False, prefix=f"{prefix}.mu_proj")
        self.lo, self.hi, self.out_clamp = config.mu_clamp_min, config.mu_clamp_max, config.mu_prev_clamp

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        proj, _ = self.mu_proj(hidden_states)
        return (self.mu.clamp(self.lo, self.hi) + proj).clamp(-self.out_clamp, self.out_clamp)


class ComplexityINLDynamics(nn.Module):
    """SPEC 3b: a controller over [a, v] sets alpha, beta, gate; the velocity pulls a toward mu_c."""

    def __init__(self, config: ComplexityConfig, prefix: str):
        super().__init__()
        h, c = config.hidden_size, config.dynamics_controller_hidden
        self.hidden_size = h
        self.mu = nn.Parameter(torch.zeros(h), requires_grad=False)
        self.mu_proj = ReplicatedLinear(h, h, bias=False, prefix=f"{prefix}.mu_proj")
        self.controller_in = ReplicatedLinear(2 * h, c, bias=True, prefix=f"{prefix}.controller_in")
        self.controller_out = ReplicatedLinear(c, 3 * h, bias=True, prefix=f"{prefix}.controller_out")
        self.dt = config.dynamics_dt
        self.beta_max = config.dynamics_beta_max
        self.v_clamp = config.dynamics_velocity_clamp

    def forward(self, a: torch.Tensor, velocity: torch.Tensor):
        """-> (a', v', mu_c)."""
        hidden, _ = self.controller_in(torch.cat([a, velocity], dim=-1))
        c, _ = self.controller_out(F.silu(hidden))
        alpha, beta, gate = c.split(self.hidden_size, dim=-1)
        alpha = torch.sigmoid(alpha)
        beta = F.softplus(beta).clamp(max=self.beta_max)
        gate = torch.sigmoid(gate)
        proj, _ = self.mu_proj(a)
        mu_c = self.mu + proj
        velocity = (alpha * velocity - beta * (a - mu_c)).clamp(-self.v_clamp, self.v_clamp)
        return a + self.dt * gate * velocity, velocity, mu_c


# ----------------------------------------------------------------------------- decoder


class ComplexityDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, layer_idx: int, prefix: str):
        super().__init__()
        config: ComplexityConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.mu_mode = config.mu_mode
        last = layer_idx == config.num_hidden_layers - 1
        with_mu = config.mu_mode == "guidance" or (config.mu_mode == "inl" and layer_idx > 0)
        self.self_attn = ComplexityAttention(config, with_mu, vllm_config.cache_config, quant_config,
                                             prefix=f"{prefix}.self_attn")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.mlp_type == "dense":
            self.mlp = ComplexityMLP(config.hidden_size, config.intermediate_size, quant_config, prefix=f"{prefix}.mlp")
        elif config.mlp_type == "token_routed":
            self.mlp = ComplexityTokenRoutedMLP(config, quant_config, prefix=f"{prefix}.mlp")
        elif config.mlp_type == "learned_moe":
            self.mlp = ComplexityLearnedMoE(config, quant_config, prefix=f"{prefix}.mlp")
        else:
            raise ValueError(f"unsupported mlp_type {config.mlp_type!r}")
        self.mu_guidance = (
            ComplexityMuGuidance(config, prefix=f"{prefix}.mu_guidance")
            if config.mu_mode == "guidance" and not last else None
        )
        self.dynamics = ComplexityINLDynamics(config, prefix=f"{prefix}.dynamics") if config.mu_mode == "inl" else None

    def forward(self, positions, hidden_states, expert_ids, mu_prev, velocity):
        """-> (hidden_states, mu out (guidance: next layer's mu; inl: mu_c), velocity)."""
        attn = self.self_attn(positions, self.input_layernorm(hidden_states), mu_prev)
        mu_out = None
        if self.dynamics is not None:
            attn, velocity, mu_out = self.dynamics(attn, velocity)
        # Fused residual add + norm: hidden_states <- hidden_states + attn.
        mlp_in, hidden_states = self.post_attention_layernorm(attn, hidden_states)
        if isinstance(self.mlp, ComplexityMLP):
            mlp_out = self.mlp(mlp_in)
        else:
            mlp_out = self.mlp(mlp_in, expert_ids, mu_out)
        hidden_states = hidden_states + mlp_out
        if self.mu_guidance is not None:
            mu_out = self.mu_guidance(hidden_states)
        return hidden_states, mu_out, velocity


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
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                       quant_config=vllm_config.quant_config,
                                                       prefix=f"{prefix}.embed_tokens")
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
            if self.mu_mode == "guidance":
                mu_prev = self.mu_init.to(hidden_states.dtype).expand(hidden_states.shape[0], -1).contiguous()
            elif self.mu_mode == "inl":
                velocity = torch.zeros_like(hidden_states)
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
            if self.mu_mode in ("guidance", "inl"):
                mu_prev = intermediate_tensors["mu"]
            if self.mu_mode == "inl":
                velocity = intermediate_tensors["velocity"]
                mu_sum = intermediate_tensors["mu_sum"]

        expert_ids = None
        if self.token_to_expert is not None:
            if input_ids is None:
                raise ValueError("token-routed Complexity models need input_ids (each token's expert comes "
                                 "from its id); prompt embeddings cannot be routed")
            expert_ids = self.token_to_expert[input_ids]

        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, mu, velocity = layer(positions, hidden_states, expert_ids, mu_prev, velocity)
            if self.mu_mode == "inl":
                # The mu highway: every layer's mu_c accumulates and leaks into the next layer's mu.
                mu_sum = mu if mu_sum is None else mu_sum + mu
                mu_prev = mu + self.config.mu_highway_scale * mu_sum
            else:
                mu_prev = mu

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
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(config.vocab_size)
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
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the embedding is the head
            if name in buffers:  # model.token_to_expert
                if is_pp_missing_parameter(name, self):
                    continue
                buf = buffers[name]
                if tuple(tensor.shape) != tuple(buf.shape):
                    raise ValueError(f"{name}: checkpoint has shape {tuple(tensor.shape)}, expected {tuple(buf.shape)}")
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
                if name.endswith("mu_init") and tensor.numel() == param.numel():
                    tensor = tensor.reshape(param.shape)  # upstream files store [1, 1, H]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        return loaded


__all__ = ["ComplexityForCausalLM"]
