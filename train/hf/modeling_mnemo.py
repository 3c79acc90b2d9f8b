"""MnemoForCausalLM: mnemo's MemoryTransformer as a transformers causal LM, memory carried across segments.

Copied into every ``mnemo export --format hf`` folder beside the model's own
code (every module of model/; ``from mnemo.model.X import`` becomes ``from
.X import``): one implementation of the network, wrapped, not rewritten.
Imports only torch, transformers and those files.

Reading: tokens reach the model as a training document does, in segments
of T = ``config.segment_len`` tokens from the document start (every row of
``input_ids`` is one document from its start), each segment read with the
memory left by the previous one. ``forward`` over any length gives the
logits mnemo's own segment-by-segment read gives.

Generation matches ``mnemo generate`` (segment decoding): the cache
(``MnemoMemoryCache``, returned as ``past_key_values``) holds the memory
after the last complete segment and the tokens of the segment in progress.
Each forward reads the new tokens after those pending ones; every segment
that fills up is committed to the memory, and the partial rest is read from
the committed memory without committing it (re-read with the next token).
So a long prompt streams through memory once, and each new token sees its
segment so far plus the memory, as in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mnemo.model.memory import MemoryState
from mnemo.model.transformer import MemoryTransformer

from .configuration_mnemo import MnemoConfig


class MnemoMemoryCache:
    """What generate() carries from one forward to the next (immutable: each forward returns a new one).

    state: the MemoryState after every complete segment read so far (B rows).
    pending: [B, p] token ids of the segment in progress (0 <= p < T), read again with the next tokens.
    """

    def __init__(self, state: MemoryState, pending: torch.Tensor):
        self.state, self.pending = state, pending

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens read so far (committed + pending): where generate() starts the next input."""
        return int(self.state.pos[0]) + int(self.pending.shape[1])

    def index_select(self, rows: torch.Tensor) -> "MnemoMemoryCache":
        """The cache of rows ``rows`` [B'] (beam search reorders and copies rows)."""
        sd = self.state.state_dict()
        picked = {k: v.index_select(0, rows.to(v.device)) for k, v in sd.items()}
        return MnemoMemoryCache(MemoryState.from_state_dict(picked, len(self.state.layers)), self.pending[rows])


class MnemoPreTrainedModel(PreTrainedModel):
    config_class = MnemoConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _is_stateful = True  # no DynamicCache: the memory is this model's own cache

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: every MemoryTransformer module initializes its own weights when built."""


class MnemoForCausalLM(MnemoPreTrainedModel, GenerationMixin):
    _tied_weights_keys = ["model.lm_head.weight"]

    def __init__(self, config: MnemoConfig):
        super().__init__(config)
        self.model = MemoryTransformer(config.model_args())
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_emb

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: MnemoMemoryCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ):
        """input_ids [B, L] (the tokens after those ``past_key_values`` holds) -> logits [B, L, V].

        logits_to_keep: n > 0 returns only the last n positions' logits
        (generate() asks for 1); segments before them skip the LM head.
        labels [B, L]: the next-token loss over these positions (transformers'
        convention: shifted inside, -100 ignored).
        """
        if input_ids is None:
            raise ValueError("MnemoForCausalLM needs input_ids (inputs_embeds is not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(
                "MnemoForCausalLM reads every row as one document from its start: padding "
                "(zeros in attention_mask) is not supported; batch prompts of equal length"
            )
        B, n = input_ids.shape
        T = int(self.config.segment_len)
        if past_key_values is None:
            state = self.model.init_state(B, device=input_ids.device)
            buf = input_ids  # [B, n]
        else:
            state = past_key_values.state
            buf = torch.cat((past_key_values.pending.to(input_ids.device), input_ids), dim=1)  # [B, p + n]
        keep = n if not logits_to_keep else min(int(logits_to_keep), n)
        first = buf.shape[1] - keep  # logits are returned for buf positions first .. end
        chunks = []
        s0 = 0
        while buf.shape[1] - s0 >= T:  # a complete segment: read and commit it
            want = s0 + T > first
            logits, state = self.model(buf[:, s0 : s0 + T], state, logits=want)  # [B, T, V] or None
            if want:
                chunks.append(logits[:, max(first - s0, 0) :])
            s0 += T
        rest = buf[:, s0:]  # [B, p'], p' < T: the segment in progress
        if rest.shape[1] > 0:
            logits, _ = self.model(rest, state)  # read from the committed memory; not committed
            chunks.append(logits[:, max(first - s0, 0) :])
        logits = torch.cat(chunks, dim=1)  # [B, keep, V]
        loss = None
        if labels is not None:
            if keep != n:
                raise ValueError("labels need the logits of every position (logits_to_keep=0)")
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].to(logits.device).reshape(-1),
                ignore_index=-100,
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = MnemoMemoryCache(state, rest) if use_cache else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: MnemoMemoryCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | None = None,
        **kwargs,
    ) -> dict:
        """Only the tokens the memory has not read yet go to forward (generate() passes the whole sequence)."""
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.get_seq_length() :]
        inputs = {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask}
        if use_cache is not None:
            inputs["use_cache"] = use_cache
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    def _reorder_cache(self, past_key_values: MnemoMemoryCache, beam_idx: torch.Tensor) -> MnemoMemoryCache:
        return past_key_values.index_select(beam_idx)
