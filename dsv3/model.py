"""DeepSeek-V3 (and models of its architecture) on dsv3_kernels, with Hugging Face's parameter
names: Transformer.state_dict() keys are the checkpoint's, except the routed experts, which the
loader fuses into mlp.experts.w13 / w2 (see dsv3/load.py).

Each step runs N tokens of B requests laid out flat (cache.Batch): prefill (new requests,
materialized attention) or decode (absorbed attention over the paged latent cache).

Multi-token prediction (DeepSeek-V3's MTP module, `Transformer.mtp`, checkpoint
`model.layers.{num_hidden_layers + k}`): at position i it combines the main model's final
(normalized) hidden state h_i with the embedding of the next token t_{i+1},
eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]), runs one decoder layer over its own latent cache layer
(RoPE position i) and predicts t_{i+2} through shared_head.norm and shared_head.head. The embedding
is the main model's. dsv3.generator drafts with it (speculative decoding).
"""

import torch
from torch import nn

from .attention import MLA
from .cache import Batch, LatentCache
from .config import ModelArgs
from .cpu_decode import DecodeStep
from .layers import MLP, Linear, LMHead, Module, RMSNorm, VocabEmbedding
from .moe import MoE
from .parallel import Parallel
from .rope import Rope


class DecoderLayer(Module):
    def __init__(self, args: ModelArgs, layer_id: int, dtype, fp8, device, *, parallel: Parallel):
        super().__init__()
        self.parallel = parallel  # the all-reduces of the attention's and the MLP's partial sums
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype, device)
        self.self_attn = MLA(args, dtype, fp8, device, parallel=parallel)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype, device)
        self.mlp = (MoE(args, dtype, fp8, device, layer_id, parallel=parallel) if args.is_moe_layer(layer_id)
                    else MLP(args.hidden_size, args.intermediate_size, dtype, fp8, device, parallel=parallel))

    def forward(self, x, residual, batch, kv_cache, rope):
        """The residual stream is x + residual (residual None: x alone), [N, hidden] -> the layer's
        (mlp output, residual stream before it): their sum is the layer's output, which the next
        norm adds as it normalizes (dsv3_kernels.rms_norm's fused add). With batch.query_rows, the
        outputs cover those rows only."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        attn = self.parallel.all_reduce(self.self_attn(h, batch, kv_cache, rope))
        if batch.query_rows is not None:
            residual = residual[batch.query_rows]
        h, residual = self.post_attention_layernorm(attn, residual)
        return self.parallel.all_reduce(self.mlp(h)), residual


class SharedHead(Module):
    """An MTP layer's output head: norm, then head (column-parallel like lm_head)."""

    def __init__(self, args, dtype, device, *, parallel: Parallel):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype, device)
        self.head = LMHead(args.hidden_size, args.vocab_size, dtype, device, parallel=parallel)

    def forward(self, x):
        return self.head(self.norm(x))


class MTPLayer(DecoderLayer):
    """A multi-token-prediction module: enorm, hnorm, eh_proj (replicated; bf16 as in DeepSeek's
    release, which does not quantize it), a decoder layer (a MoE layer for DeepSeek-V3), shared_head."""

    def __init__(self, args: ModelArgs, layer_id: int, dtype, fp8, device, *, parallel: Parallel):
        super().__init__(args, layer_id, dtype, fp8, device, parallel=parallel)
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype, device)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype, device)
        self.eh_proj = Linear(2 * args.hidden_size, args.hidden_size, dtype, False, device)
        self.shared_head = SharedHead(args, dtype, device, parallel=parallel)


class Body(Module):
    """Hugging Face's `model.` prefix: embed_tokens, layers, norm."""

    def __init__(self, args, dtype, fp8, device, *, parallel: Parallel):
        super().__init__()
        self.embed_tokens = VocabEmbedding(args.vocab_size, args.hidden_size, dtype, device, parallel=parallel)
        self.layers = nn.ModuleList(DecoderLayer(args, i, dtype, fp8, device, parallel=parallel)
                                    for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype, device)


class Transformer(Module):
    """The causal LM. dtype: activations and unquantized weights (bfloat16; float32 is the
    reference precision); fp8: linears and experts hold e4m3 + weight_scale_inv (128x128 blocks).
    backend: the dsv3_kernels backend of every op (None: dispatch's rule; "torch": the reference).
    parallel: how the model is split over processes (dsv3.parallel.Parallel; None: one process):
    it decides which part of each weight this rank holds."""

    def __init__(self, args: ModelArgs, dtype=torch.bfloat16, fp8=None, device=None, backend=None,
                 parallel: Parallel = None):
        super().__init__()
        self.args, self.dtype = args, dtype
        self.fp8 = args.fp8 if fp8 is None else fp8
        self.parallel = parallel = parallel or Parallel()
        self.model = Body(args, dtype, self.fp8, device, parallel=parallel)
        self.lm_head = LMHead(args.hidden_size, args.vocab_size, dtype, device, parallel=parallel)
        # checkpoint model.layers.{num_hidden_layers + k} (checkpoint_name maps the names)
        self.mtp = nn.ModuleList(MTPLayer(args, args.num_hidden_layers + k, dtype, self.fp8, device, parallel=parallel)
                                 for k in range(args.num_nextn_predict_layers))
        self.rope = Rope(args, device)
        self.set_backend(backend)
        # CPU decode steps in one C++ call (dsv3/cpu_decode.py) where the model and batch allow;
        # False: always the Python forward below (the reference the tests compare it with)
        self.cpu_decode_step = True
        self._decode_step = None  # built on first use; False: this model cannot use it

    def checkpoint_name(self, name: str) -> str:
        """A parameter or module name -> the checkpoint's (mtp.K.X -> model.layers.{N + K}.X)."""
        if name.startswith("mtp."):
            _, k, *rest = name.split(".", 2)
            return ".".join([f"model.layers.{self.args.num_hidden_layers + int(k)}", *rest])
        return name

    @property
    def device(self):
        return self.model.norm.weight.device

    def set_backend(self, backend):
        for m in self.modules():
            if isinstance(m, Module):
                m.backend = backend
        return self

    def new_cache(self, num_blocks: int, block_size: int = 64, dtype=None, mtp=False) -> LatentCache:
        """A paged latent cache for this model. dtype: a torch float dtype (default: the
        activations'), or "fp8" for FlashMLA's FP8 token (dsv3.cache). mtp: also one layer
        per MTP module (after the decoder layers' ones), for mtp_forward."""
        layers = len(self.model.layers) + (len(self.mtp) if mtp else 0)
        return LatentCache(layers, num_blocks, block_size, dtype or self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, batch: Batch, cache: LatentCache, hidden=False):
        """input_ids int64 [N] -> logits float32 [len(batch.logits_index) or N, vocab_size]; with
        hidden, also the final normalized hidden states of all N tokens [N, hidden_size] (the
        activations' dtype: what mtp_forward takes)."""
        step = self._cpu_decode(batch, cache)
        if step is not None:
            logits, h = step(input_ids, batch, cache)
            return (logits, h) if hidden else logits
        x, residual = self.model.embed_tokens(input_ids), None
        rope = self.rope(batch.positions)  # once per step: every layer rotates the same positions
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, batch, cache.kv[i], rope)
        if hidden:
            h = self.model.norm(x, residual)[0]
            return self.lm_head(h if batch.logits_index is None else h[batch.logits_index]).float(), h
        if batch.logits_index is not None:
            x, residual = x[batch.logits_index], residual[batch.logits_index]
        return self.lm_head(self.model.norm(x, residual)[0]).float()

    @torch.inference_mode()
    def idle(self):
        """A step with no tokens: expert parallelism's rank whose requests have finished (or that
        has none) while others still run takes part in every MoE layer's all-to-all."""
        x = torch.empty(0, self.args.hidden_size, dtype=self.dtype, device=self.device)
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp(x)

    @torch.inference_mode()
    def mtp_forward(self, h: torch.Tensor, next_ids: torch.Tensor, batch: Batch, cache: LatentCache, k: int = 0):
        """MTP module k over N tokens: at the position of row j, h [N, hidden_size] (the main model's
        hidden state there, or module k-1's output) and next_ids int64 [N] (the token after it) ->
        (logits float32 [len(batch.logits_index) or N, vocab_size] of the token after next_ids,
        the layer's output [N, hidden_size] before shared_head.norm; with batch.query_rows, N is
        their number: those rows only, the others just write their keys). Writes cache layer
        num_hidden_layers + k (a cache from new_cache(..., mtp=True))."""
        if not 0 <= k < len(self.mtp):
            raise ValueError(f"MTP module {k} does not exist (the model has {len(self.mtp)})")
        layer = self.mtp[k]
        e = layer.enorm(self.model.embed_tokens(next_ids))
        x = layer.eh_proj(torch.cat([e, layer.hnorm(h)], dim=-1))
        x, residual = layer(x, None, batch, cache.kv[len(self.model.layers) + k], self.rope(batch.positions))
        x = x + residual
        out = x if batch.logits_index is None else x[batch.logits_index]
        return layer.shared_head(out).float(), x

    def _cpu_decode(self, batch: Batch, cache: LatentCache):
        """The C++ decode step for this batch, or None (the Python forward runs it)."""
        return self.cpu_decoder(cache) if not batch.prefill and batch.query_rows is None else None

    def decodes_in_cpp(self) -> bool:
        """Whether this model's decode steps (no query_rows) run in the C++ CPU step now, over a
        cache of the activations' dtype or FP8."""
        return self.cpu_decode_step and DecodeStep.dispatches(self, self.device) and self._built_step() is not None

    def cpu_decoder(self, cache: LatentCache):
        """The C++ decode step (dsv3.cpu_decode.DecodeStep) that runs this model's decode batches
        (no query_rows) over `cache` now, or None: the Python forward runs them."""
        return self._built_step() if self.cpu_decode_step and DecodeStep.runs(self, cache) else None

    def _built_step(self):
        """This model's DecodeStep, built on first use; None where it cannot run the model."""
        if self._decode_step is None:
            self._decode_step = DecodeStep.of(self) or False
        return self._decode_step or None

    def reset_absorbed(self):
        """Drop the attention's absorbed-weight copies and the C++ decode step that holds them
        (after loading new kv_b_proj weights, or replacing weights)."""
        self._decode_step = None
        for layer in [*self.model.layers, *self.mtp]:
            layer.self_attn.reset_absorbed()
