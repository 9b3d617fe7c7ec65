"""Fetch one piece of the model at a time (embedding rows, a layer, its routed experts, final norm,
lm_head blocks) as the arrays `forward.py` computes with.

Names come from `names.py`, bytes from `tensors.py`. The checkpoint's storage choices are resolved here:
linears stored dense, packed int or block FP8 (each needs its config.json quantization), the dense MLP of the first
`first_k_dense_replace` layers, an optional router bias. Only what a step computes with is fetched: never
vision tensors or the experts' `weight_shape` metadata. Holds no weights between calls. Every piece is
read for a `slot` (the reader's buffer lifetime): layer i's tensors and experts for slot i, the final norm
for slot L (the layer count), lm_head block j for slot L + j; the embedding rows get buffers of their own.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from ..checkpoint import names
from ..checkpoint.config import BlockFP8, ModelConfig, Quantization
from ..errors import CheckpointError
from ..evidence.schema import BUILTIN_KERNELS
from .forward import Attention, DenseMLP, Experts, ExpertStack, Layer, MoE
from ..checkpoint.inventory import layer_tensors
from .linear import Linear
from ..read.tensors import PendingTensor, TensorReader

HEAD_ROWS_PER_BLOCK = 16384  # lm_head rows computed at a time (K2.5: 235 MB of bf16 per block)
MAX_STACK_BYTES = 1 << 30    # one stacked expert tensor's bytes at most (_stack_batches); K2.5: 146 experts


class WeightFetcher:
    """Resolves names and fetches one piece of the model at a time; holds nothing between calls."""

    def __init__(self, cfg: ModelConfig, reader: TensorReader, kernels: str = BUILTIN_KERNELS):
        self.cfg = cfg
        self.kernels = kernels  # the kernels every Linear fetched here is computed with
        self.reader = reader
        self.checkpoint = reader.checkpoint
        self.tensor_names = names.TensorNames(cfg.weight_prefix)
        self._expert_bytes: dict[int, int] = {}
        self._guesses: dict[int, tuple[list[int], list]] = {}   # layer -> (guessed ids, stacks read ahead)
        self._head_first = None                                 # lm_head block 0, read during the last layer
        # layer -> (experts guessed or None, experts used, of them guessed or None), until the runner takes it
        self.guess_stats: dict[int, tuple[int | None, int, int | None]] = {}

    def _make_linear(self, base: str, parts: list[mx.array] | tuple[mx.array, ...]) -> Linear:
        """The Linear of `base` (or a stack like it) from its stored parts, as `names.linear_parts` lists them."""
        kind, q = names.linear_format(base, self.checkpoint), self.cfg.quantization
        if kind == names.DENSE:
            return Linear.dense(parts[0], self.kernels)
        if kind == names.PACKED_INT and isinstance(q, Quantization):
            return Linear.packed(parts[0], parts[1], q.num_bits, q.group_size, self.kernels)
        if kind == names.BLOCK_FP8 and isinstance(q, BlockFP8):
            return Linear.fp8(parts[0], parts[1], q.block_size, self.kernels)
        # validate() refuses this before any step; kept for a fetcher used without it
        raise CheckpointError(f"{self.checkpoint.dir}: tensor {names.linear_parts(base, self.checkpoint)[1]} is "
                              f"{kind} but config.json's quantization_config does not describe it")

    def linear(self, base: str, slot: int) -> Linear:
        return self._make_linear(base, [self.reader.tensor(p, slot) for p in names.linear_parts(base, self.checkpoint)])

    def _stack_reads(self, projections: list[list[str]], slot: int, ahead: bool = False,
                     own: bool = False, expert: str | None = None) -> tuple[list[PendingTensor], int]:
        """Issue the reads of linears stacked per projection (routed experts), one expert at a time: the
        pending arrays (each stored part of a projection: weight, then scale where there is one) and how
        many parts a projection has. `expert`: the cache key when the stacks are that one expert's."""
        parts = [[names.linear_parts(b, self.checkpoint) for b in bases] for bases in projections]
        per_linear = len(parts[0][0])
        groups = [[p[part] for p in group] for group in parts for part in range(per_linear)]
        return self.reader.start_stacked(groups, slot, ahead, own, expert), per_linear

    def _stack_linears(self, arrays: list[mx.array] | tuple[mx.array, ...], per_linear: int, base: str) -> list[Linear]:
        return [self._make_linear(base, arrays[i:i + per_linear]) for i in range(0, len(arrays), per_linear)]

    def start_stacked_linears(self, stacks: list[list[str]], slot: int) -> Callable[[], list[Linear]]:
        """Issue the reads of linears stacked (n, out, in), one stack per list of bases, all stored like the
        first (a layer's routed experts, a stack per projection), for `slot`, position by position as the
        routed experts' reads are. The function returned waits for the bytes and gives the stacked Linears in
        the order of `stacks`: for callers that choose the projections (the vindex reads no up_proj)."""
        pending, per_linear = self._stack_reads(stacks, slot)
        return lambda: self._stack_linears([p.wait() for p in pending], per_linear, stacks[0][0])

    def _read_experts(self, layer: int, ids: list[int], ahead: bool = False) -> list[tuple[ExpertStack, tuple, Callable]]:
        """Start reading routed experts `ids` of `layer`: those the cache will take (`WeightCache.takes`) one
        stack each, in slots of the cache's slab (arrays of their own); the rest in stacks in the layer's
        arena. Each stack comes with the arrays to offer the cache once used (else an empty tuple) and a
        function that cancels the reads of the stack positions given (experts a guess read that nobody uses)."""
        n, cache, nbytes = self.tensor_names.layer(layer), self.reader.cache, self.expert_bytes(layer)
        kept = [e for e in ids if cache is not None and cache.takes(self._expert_key(layer, e), nbytes, not ahead)]
        rest = sorted(set(ids) - set(kept))
        batches = [([e], True) for e in kept] + [(batch, False) for batch in self._stack_batches(layer, rest) if batch]
        out = []
        for batch, own in batches:
            pending, per_linear = self._stack_reads([[n.experts(e, m) for e in batch] for m in names.MLP_PROJECTIONS],
                                                    layer, ahead, own, self._expert_key(layer, batch[0]) if own else None)

            def arrived(u: int, pending=pending) -> None:
                for stack in pending:
                    stack.wait_part(u)

            def unused(positions: list[int], pending=pending) -> None:
                for stack in pending:
                    stack.cancel(positions)

            arrays = tuple(p.array for p in pending)
            linears = self._stack_linears(arrays, per_linear, n.experts(batch[0], names.MLP_PROJECTIONS[0]))
            out.append((ExpertStack(np.array(batch, dtype=np.int64), *linears, arrived=arrived),
                        arrays if own else (), unused))
        return out

    def _stack_batches(self, layer: int, ids: list[int]) -> list[list[int]]:
        """`ids` in consecutive stacks, each stored part of a stack (one projection's weight for its experts)
        at most MAX_STACK_BYTES: an MLX dimension is a 32-bit int (a stack of 384 K2.5 experts' gate_proj
        is 2.8 GB). With direct reads, one expert a stack: in the file each expert's tensors are separated by
        its `weight_shape` tensors, so experts stacked contiguously in memory cannot all sit at their file
        offsets' page phase, and their reads went through a staging copy; alone, each lands in place. Which
        stack holds an expert never changes a bit (forward.moe)."""
        if self.reader.storage.policy.method == "direct":
            return [[e] for e in ids]
        n = self.tensor_names.layer(layer)
        largest = max(self.checkpoint.info(t).nbytes for m in names.MLP_PROJECTIONS
                      for t in names.linear_parts(n.experts(0, m), self.checkpoint))
        per_stack = max(1, MAX_STACK_BYTES // largest)
        return [ids[i:i + per_stack] for i in range(0, len(ids), per_stack)]

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one routed expert of `layer` (its three projections as stored)."""
        if layer not in self._expert_bytes:
            n = self.tensor_names.layer(layer)
            self._expert_bytes[layer] = sum(self.checkpoint.info(t).nbytes for m in names.MLP_PROJECTIONS
                                            for t in names.linear_parts(n.experts(0, m), self.checkpoint))
        return self._expert_bytes[layer]

    def prefetch_layer(self, layer: int) -> None:
        """Issue the reads of a layer's non-expert tensors (norms, attention, router, shared or dense MLP)."""
        if layer >= self.cfg.text.num_hidden_layers:
            self.reader.prefetch([self.tensor_names.norm], layer)
            self._head_first = self._start_head_block(0, ahead=True)  # the lm_head's first block, same slot
            return
        self.reader.prefetch(layer_tensors(self.checkpoint, self.cfg, layer), layer)

    # ------------------------------------------------------------------ the pieces of a step
    def embedding(self, token_ids: list[int]) -> mx.array:
        """Embedding rows of `token_ids` (T, hidden), reading each distinct id's row once."""
        distinct = sorted(set(token_ids))
        rows = self.reader.rows(self.tensor_names.embed_tokens, distinct)  # (U, hidden)
        return rows[mx.array(np.searchsorted(distinct, token_ids))]

    def layer(self, layer: int) -> Layer:
        self.prefetch_layer(layer)  # everything in flight at once; no-op for what is already on its way
        n = self.tensor_names.layer(layer)
        text = self.cfg.text

        def tensor(name: str) -> mx.array:
            return self.reader.tensor(name, layer)

        def linear(base: str) -> Linear:
            return self.linear(base, layer)

        if text.q_lora_rank:
            q = dict(q_a_proj=linear(n.q_a_proj), q_a_layernorm=tensor(n.q_a_layernorm),
                     q_b_proj=linear(n.q_b_proj))
        else:
            q = dict(q_proj=linear(n.q_proj))
        self_attn = Attention(kv_a_proj_with_mqa=linear(n.kv_a_proj_with_mqa),
                              kv_a_layernorm=tensor(n.kv_a_layernorm),
                              kv_b_proj=linear(n.kv_b_proj),
                              o_proj=linear(n.o_proj), **q)
        if text.is_moe_layer(layer):
            shared = None
            if text.n_shared_experts:
                shared = DenseMLP(*(linear(n.shared_experts(m)) for m in names.MLP_PROJECTIONS))
            bias = n.e_score_correction_bias
            mlp = MoE(gate=Linear.dense(tensor(n.gate), self.kernels),
                      e_score_correction_bias=tensor(bias) if bias in self.checkpoint else None,
                      shared_experts=shared)
        else:
            mlp = DenseMLP(*(linear(n.mlp(m)) for m in names.MLP_PROJECTIONS))
        return Layer(input_layernorm=tensor(n.input_layernorm),
                     post_attention_layernorm=tensor(n.post_attention_layernorm),
                     self_attn=self_attn, mlp=mlp)

    def experts(self, layer: int, ids: np.ndarray) -> Experts:
        """The routed experts `ids` (ascending, distinct) of `layer`: those the cache holds, those read ahead
        on a guess, and the rest, read now (in flight on return, in the order of `ids`). Each is read once."""
        n, nbytes = self.tensor_names.layer(layer), self.expert_bytes(layer)
        per_linear = len(names.linear_parts(n.experts(0, names.MLP_PROJECTIONS[0]), self.checkpoint))
        stacks: list[ExpertStack] = []
        used: list[tuple[ExpertStack, tuple]] = []  # stacks read for this use, with arrays the cache may take
        missing = []
        for e in (int(e) for e in ids):
            hit = self.reader.cached(self._expert_key(layer, e), nbytes, expert=True)
            if hit is None:
                missing.append(e)
            else:
                base = n.experts(e, names.MLP_PROJECTIONS[0])
                stacks.append(ExpertStack(np.array([e]), *self._stack_linears(hit, per_linear, base)))
        guess = self._guesses.pop(layer, None)
        self.guess_stats[layer] = (None, len(ids), None)
        if guess is not None:
            guessed, read_ahead = guess
            self.guess_stats[layer] = (len(guessed), len(ids), len(set(guessed) & set(int(e) for e in ids)))
            for stack, arrays, unused in read_ahead:
                wanted = [e in missing for e in stack.ids.tolist()]
                unused([u for u, w in enumerate(wanted) if not w])  # wrong guesses: free the storage queue now
                if any(wanted):
                    used.append((stack, arrays))
            served = {e for stack, _ in used for e in stack.ids.tolist()}
            missing = [e for e in missing if e not in served]
        if missing:
            used += [(stack, arrays) for stack, arrays, _ in self._read_experts(layer, missing)]
        stacks += [stack for stack, _ in used]
        # Offered to the cache in expert order, wherever they were read (ahead on a guess or now): the order
        # they become recent in, so a guess never changes which expert a later eviction picks.
        for stack, arrays in sorted(used, key=lambda u: int(u[0].ids[0])):
            if arrays and int(stack.ids[0]) in ids:  # one expert per stack when the cache takes them
                self.reader.keep(layer, self._expert_key(layer, int(stack.ids[0])), arrays, nbytes, expert=True)
        return Experts(tuple(stacks))

    def guess_experts(self, layer: int, ids: list[int]) -> None:
        """Read ahead the routed experts a guess says `layer` will use (router look-ahead). The real routing
        decides what is used: a wrong guess costs a read, never counted, and the bytes are never kept. `layer`
        is a MoE layer."""
        cache = self.reader.cache
        to_read = [e for e in ids if cache is None or self._expert_key(layer, e) not in cache]
        self._guesses[layer] = (list(ids), self._read_experts(layer, to_read, ahead=True) if to_read else [])

    def forget_guesses(self) -> None:
        """Between steps: guesses and a head block read ahead but not used (the reader cancels their reads
        at end_step)."""
        self._guesses.clear()
        self._head_first = None

    def router(self, layer: int) -> tuple[mx.array, Linear, mx.array | None]:
        """MoE layer `layer`'s post_attention_layernorm, router and router bias for a guess (looked at, not
        consumed: the layer still reads and counts them)."""
        n = self.tensor_names.layer(layer)
        bias = n.e_score_correction_bias
        return (self.reader.peek(n.post_attention_layernorm, layer),
                Linear.dense(self.reader.peek(n.gate, layer), self.kernels),
                self.reader.peek(bias, layer) if bias in self.checkpoint else None)

    @staticmethod
    def _expert_key(layer: int, expert: int) -> str:
        return f"layers.{layer}.experts.{expert}"

    def final_norm(self) -> mx.array:
        return self.reader.tensor(self.tensor_names.norm, self.cfg.text.num_hidden_layers)

    def _head_quantized(self) -> bool:
        return names.linear_format(self.tensor_names.lm_head, self.checkpoint) != names.DENSE

    def _head_blocks(self, rows_per_chunk: int = HEAD_ROWS_PER_BLOCK) -> tuple[str, list[tuple[int, int]]]:
        head = names.dense_weight(self.tensor_names.lm_head)
        vocab = self.checkpoint.info(head).shape[0]
        return head, [(start, min(start + rows_per_chunk, vocab)) for start in range(0, vocab, rows_per_chunk)]

    def _start_head_block(self, j: int, ahead: bool = False):
        """lm_head block j: (cache key, bytes, the cached array or its pending read for slot L + j), or None
        for a quantized head (read whole)."""
        if self._head_quantized():
            return None
        head, blocks = self._head_blocks()
        lo, hi = blocks[j]
        key, nbytes = f"{head}[{lo}:{hi}]", (hi - lo) * self.checkpoint.info(head).row_bytes
        cache = self.reader.cache
        if cache is not None and key in cache:
            return key, nbytes, None
        own = cache is not None and cache.admits(nbytes, expert=False)
        return key, nbytes, self.reader.start_rows(head, list(range(lo, hi)), self.cfg.text.num_hidden_layers + j,
                                                   own, ahead)

    def lm_head_chunks(self):
        """The lm_head as consecutive row blocks (vocab rows), each block's read issued while the previous
        one is used (block 0's during the last layer): the head never sits in memory whole (it is the largest
        tensor a step reads). Block j is read for slot L + j: the caller releases each slot once its block's
        product is evaluated. Blocks the weight cache holds are not read; blocks it will take are read into
        arrays of their own."""
        if self._head_quantized():
            yield self.linear(self.tensor_names.lm_head, self.cfg.text.num_hidden_layers)  # quantized heads are small
            return
        _, blocks = self._head_blocks()
        pending, self._head_first = self._head_first or self._start_head_block(0), None
        for j in range(len(blocks)):
            key, nbytes, block = pending
            if block is None:
                block = self.reader.cached(key, nbytes)[0]
            else:
                if block.own:
                    self.reader.keep(self.cfg.text.num_hidden_layers + j, key, (block.array,), nbytes, expert=False)
                block = block.wait()
            if j + 1 < len(blocks):
                pending = self._start_head_block(j + 1)
            yield Linear.dense(block, self.kernels)
