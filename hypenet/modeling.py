"""HypeNet models for transformers: `HypeNetModel` and `HypeNetForCausalLM` (SPEC 1).

A decoder-only LM with the Qwen3 skeleton: every layer is `H = X + Mixer(RMSNorm(X)); X' = H + MLP(RMSNorm(H))`,
the mixer of layer l being a `LightningAttention` or a `HypeAttention` as `config.mixer_types[l]` says. The
parameter names are those of the published checkpoints, which load with `from_pretrained`.

Importing this module registers the classes with AutoConfig, AutoModel and AutoModelForCausalLM.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from hypenet.cache import HypeNetCache, SequenceLayout
from hypenet.config import HypeNetConfig
from hypenet.layers.hype_attention import HypeAttention
from hypenet.layers.lightning import LightningAttention
from hypenet.layers.norm import HypeNetRMSNorm
from hypenet.layers.rotary import identity_rope_tables, rope_tables

logger = logging.get_logger(__name__)

# transformers renamed the cache argument and output field from `past_key_values` to `cache` (after 5.17);
# the models accept both and fill the field of the installed version.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class HypeNetMLP(nn.Module):
    """SwiGLU without biases: down(act(gate(x)) * up(x))."""

    def __init__(self, config: HypeNetConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class HypeNetDecoderLayer(nn.Module):
    """Pre-norm block: mixer (`self_attn`, Lightning or HyPE attention) then SwiGLU MLP, each with a residual."""

    def __init__(self, config: HypeNetConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        if self.mixer_type == "lightning-attn":
            self.self_attn = LightningAttention(config, layer_idx)
        else:
            self.self_attn = HypeAttention(config, layer_idx)
        self.mlp = HypeNetMLP(config)
        self.input_layernorm = HypeNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = HypeNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: Tensor, *, position_embeddings: Optional[tuple[Tensor, Tensor]] = None,
                past_key_values: Optional[HypeNetCache] = None,
                layout: Optional[SequenceLayout] = None) -> Tensor:
        """hidden_states [B, T, d] (or [1, N, d] packed) -> same shape."""
        mixed = self.self_attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                               past_key_values=past_key_values, layout=layout)
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class HypeNetPreTrainedModel(PreTrainedModel):
    config_class = HypeNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HypeNetDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # Lightning states cannot be rolled back, so assisted (speculative) generation is refused.
    _is_stateful = True


class HypeNetModel(HypeNetPreTrainedModel):
    """Embeddings, decoder layers and final norm. Padding is removed before the first layer (see
    hypenet.cache.SequenceLayout) and put back, as zeros, after the final norm."""

    def __init__(self, config: HypeNetConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(HypeNetDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = HypeNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[HypeNetCache] = None,
                inputs_embeds: Optional[Tensor] = None, use_cache: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                cache: Optional[HypeNetCache] = None, **kwargs) -> BaseModelOutputWithPast:
        """
        Args:
            input_ids: [B, T] token ids (or inputs_embeds [B, T, d]).
            attention_mask: [B, S] padding mask, S >= T, 1 = token, 0 = padding; its last T columns describe the
                new tokens. Any padding pattern is exact (padded tokens are removed before the mixers). None means
                no padding and costs no host synchronisation (the path torch.compile(fullgraph=True) traces).
            position_ids: [B or 1, T] RoPE positions; default: real tokens counted from each row's start.
            past_key_values (or cache): a HypeNetCache, read and advanced by this call.
            use_cache: create and return a HypeNetCache when none is given (default: config.use_cache in eval
                mode, False in training mode).
            output_hidden_states: also return the input of every layer and the final normed output.
        Returns:
            BaseModelOutputWithPast: last_hidden_state [B, T, d] (zeros at padding), the cache, hidden_states.
        """
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions=True is not supported: the HypeNet kernels never form attention "
                             "probabilities")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        past_key_values = _one_cache(past_key_values, cache)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if checkpointing and (use_cache or past_key_values is not None):
            logger.warning_once("gradient checkpointing is on: the cache is not used (use_cache=False)")
            use_cache, past_key_values = False, None
        if use_cache and past_key_values is None:
            past_key_values = HypeNetCache(self.config)
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)

        if past_key_values is not None:
            layout = past_key_values.plan(B, T, inputs_embeds.dtype, device, attention_mask)
        else:
            layout = SequenceLayout.plan(B, T, device, attention_mask)
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[-1] != T or position_ids.shape[0] not in (1, B):
                raise ValueError(f"position_ids must have shape [B or 1, T] = [{B} or 1, {T}], "
                                 f"got {tuple(position_ids.shape)}")
            positions = layout.pack(position_ids.to(device).expand(B, T))
        else:
            positions = layout.position_ids

        hidden_states = layout.pack(inputs_embeds)
        tables = self._rotary_tables(positions, hidden_states.dtype)
        all_hidden_states = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(layout.unpack(hidden_states))
            position_embeddings = tables[layer.mixer_type]
            if checkpointing:
                run = functools.partial(layer, position_embeddings=position_embeddings, layout=layout)
                hidden_states = self._gradient_checkpointing_func(run, hidden_states)
            else:
                hidden_states = layer(hidden_states, position_embeddings=position_embeddings,
                                      past_key_values=past_key_values, layout=layout)
        hidden_states = layout.unpack(self.norm(hidden_states))
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        if past_key_values is not None:
            past_key_values.finish(layout)

        outputs = BaseModelOutputWithPast(last_hidden_state=hidden_states,
                                          hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
                                          **{CACHE_FIELD: past_key_values})
        return outputs if return_dict is not False else outputs.to_tuple()

    def _rotary_tables(self, positions: Tensor, dtype: torch.dtype) -> dict[str, tuple[Tensor, Tensor]]:
        """The (cos, sin) tables of each mixer type for this call, computed once for all layers: RoPE at
        `positions` for Lightning; for attention RoPE with attn_use_rope, else identity tables (NoPE)."""
        config = self.config
        tables = {}
        if "lightning-attn" in config.mixer_types:
            tables["lightning-attn"] = rope_tables(positions, config.lightning_head_dim, config.rope_theta, dtype)
        if "attn" in config.mixer_types:
            if config.attn_use_rope:
                tables["attn"] = rope_tables(positions, config.head_dim, config.rope_theta, dtype)
            else:
                tables["attn"] = identity_rope_tables(positions.shape[-1], config.head_dim, dtype, positions.device)
        return tables


class HypeNetForCausalLM(HypeNetPreTrainedModel, GenerationMixin):
    """HypeNetModel + lm_head (tied to embed_tokens when config.tie_word_embeddings). Works with `generate()`
    (greedy, sampling, beam search; batches with left padding; `prefill_chunk_size`), creating a HypeNetCache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HypeNetConfig):
        super().__init__(config)
        self.model = HypeNetModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[HypeNetCache] = None,
                inputs_embeds: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                use_cache: Optional[bool] = None, logits_to_keep: int | Tensor = 0,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                cache: Optional[HypeNetCache] = None, **kwargs) -> CausalLMOutputWithPast:
        """HypeNetModel.forward's arguments, plus:
            labels: [B, T] next-token targets (shifted inside, -100 ignored) for the mean cross-entropy `loss`.
            logits_to_keep: an int k > 0 keeps the logits of the last k positions only (0 keeps all); a 1D tensor
                of sequence indices keeps those positions.
        Returns CausalLMOutputWithPast: loss, logits [B, T or k, vocab] (model dtype), the cache, hidden_states.
        """
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=_one_cache(past_key_values, cache), inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_hidden_states=output_hidden_states,
                             output_attentions=kwargs.get("output_attentions"), return_dict=True)
        hidden_states = outputs.last_hidden_state
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, kept, :])
        loss = None
        if labels is not None:
            loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      **loss_kwargs)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})
        return result if return_dict is not False else result.to_tuple()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """generate() gets a HypeNetCache (its DynamicCache / static caches do not fit Lightning states)."""
        if model_kwargs.get(CACHE_FIELD) is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.cache_implementation is not None:
            raise ValueError(f"HypeNet generates with its own HypeNetCache; cache_implementation="
                             f"{generation_config.cache_implementation!r} is not supported")
        model_kwargs[CACHE_FIELD] = HypeNetCache(self.config)


def _one_cache(past_key_values: Optional[HypeNetCache], cache: Optional[HypeNetCache]) -> Optional[HypeNetCache]:
    """The cache passed under either name (transformers renamed `past_key_values` to `cache`)."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the cache once, as past_key_values or as cache, not two different objects")
    found = past_key_values if past_key_values is not None else cache
    if found is not None and not isinstance(found, HypeNetCache):
        raise TypeError(f"HypeNet models need a HypeNetCache, got {type(found).__name__}")
    return found


AutoConfig.register("hypenet", HypeNetConfig, exist_ok=True)
AutoModel.register(HypeNetConfig, HypeNetModel, exist_ok=True)
AutoModelForCausalLM.register(HypeNetConfig, HypeNetForCausalLM, exist_ok=True)
