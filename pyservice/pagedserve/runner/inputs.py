"""A step's flat model inputs: built on the host from the scheduled work, then uploaded.

The host half is what a tensor-parallel driver sends its workers (each rank uploads
it itself); the upload packs every array of one dtype into one pinned buffer on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.engine.batch import SeqWork
from pagedserve.model.layers import AttentionMetadata

_TORCH_INT = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}


@dataclass
class HostInputs:
    """A step's flat inputs on the host, before the upload (what a tensor-parallel
    driver sends its workers: each rank uploads them itself)."""

    int64: list[np.ndarray]  # slot mapping, token ids, positions, logit rows
    int32: list[np.ndarray]  # prefill tables, query starts, context lens; decode tables,
    # context lens; [FlashAttention cumulative lengths]
    num_prefill_tokens: int
    flash: tuple[int, int, int] | None  # (num_paged_prefills, flash_token_start, flash_max_len)
    order: list[int]
    sample_works: list[int]
    first_rows: list[int]


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    metadata: AttentionMetadata
    order: list[int]  # packed sequence i is batch.work[order[i]]
    logit_rows: torch.Tensor  # rows of the hidden states that sample
    sample_works: list[int]  # indices into batch.work, aligned with logit_rows
    first_rows: list[int]  # packed sequence i's first token is input_ids[first_rows[i]]


def host_inputs(work: list[SeqWork], *, block_size: int, max_model_len: int,
                flash_prefill: bool) -> HostInputs:
    """A step's flat, unpadded inputs on the host: multi-token sequences first, then
    decodes. With FlashAttention prefill, chunks over a cached context precede
    whole-context ones."""
    multi = [i for i, w in enumerate(work) if len(w.token_ids) > 1]
    if flash_prefill:
        multi = ([i for i in multi if work[i].start_pos > 0]
                 + [i for i in multi if work[i].start_pos == 0])
    order = multi + [i for i, w in enumerate(work) if len(w.token_ids) == 1]
    if len(order) != len(work):
        raise ValueError("every SeqWork needs at least one token to feed")
    seqs = [work[i] for i in order]
    num_prefills = sum(1 for w in seqs if len(w.token_ids) > 1)
    lens = np.array([len(w.token_ids) for w in seqs], dtype=np.int64)
    starts = np.array([w.start_pos for w in seqs], dtype=np.int64)
    context = starts + lens
    if int(context.max()) > max_model_len:
        raise ValueError(f"sequence length {int(context.max())} exceeds max_model_len "
                         f"{max_model_len}")
    ends = np.cumsum(lens)
    seq_of_token = np.repeat(np.arange(len(seqs)), lens)
    positions = np.arange(int(ends[-1])) - np.repeat(ends - lens, lens) + starts[seq_of_token]
    table_lens = np.array([len(w.block_table) for w in seqs], dtype=np.int64)
    short = np.nonzero(table_lens * block_size < context)[0]
    if short.size:
        w = seqs[int(short[0])]
        raise ValueError(f"block_table of seq {w.seq_id} has {len(w.block_table)} blocks, "
                         f"too few for {int(context[short[0]])} tokens")
    width = int(table_lens.max())
    tables = np.zeros((len(seqs), width), dtype=np.int64)
    for r, w in enumerate(seqs):
        tables[r, : len(w.block_table)] = w.block_table
    bs = block_size
    slots = tables[seq_of_token, positions // bs] * bs + positions % bs
    token_ids = np.fromiter((t for w in seqs for t in w.token_ids), dtype=np.int64,
                            count=int(ends[-1]))
    npf = int(ends[num_prefills - 1]) if num_prefills else 0
    sampling = [r for r, w in enumerate(seqs) if w.sample]
    int64 = [slots, token_ids, positions, ends[sampling] - 1]
    # Whole-context chunks (ordered last among the prefills) for FlashAttention.
    num_paged = sum(1 for w in seqs[:num_prefills] if w.start_pos > 0)
    flash = flash_prefill and num_paged < num_prefills
    fresh = lens[num_paged:num_prefills]
    int32 = [tables[:num_prefills], np.concatenate(([0], ends[:num_prefills])),
             context[:num_prefills], tables[num_prefills:], context[num_prefills:]]
    flash_args = None
    if flash:
        int32.append(np.concatenate(([0], np.cumsum(fresh))))
        flash_args = (num_paged, int(ends[num_paged - 1]) if num_paged else 0, int(fresh.max()))
    return HostInputs(int64, int32, npf, flash_args, order, [order[r] for r in sampling],
                      (ends - lens).tolist())


def upload_inputs(host: HostInputs, device: torch.device) -> StepInputs:
    """The step's tensors on the runner's device and its attention metadata."""
    slot_t, ids_t, pos_t, rows_t = _upload(host.int64, np.int64, device)
    pf_tables, qsl, pf_ctx, dec_tables, dec_ctx, *flash_cu = _upload(host.int32, np.int32, device)
    md = AttentionMetadata(
        slot_mapping=slot_t,
        num_prefill_tokens=host.num_prefill_tokens,
        prefill_block_tables=pf_tables,
        prefill_query_start_loc=qsl,
        prefill_context_lens=pf_ctx,
        decode_block_tables=dec_tables,
        decode_context_lens=dec_ctx,
    )
    if host.flash is not None:
        md.flash_cu_seqlens = flash_cu[0]
        md.num_paged_prefills, md.flash_token_start, md.flash_max_len = host.flash
    return StepInputs(input_ids=ids_t, positions=pos_t, metadata=md, order=host.order,
                      logit_rows=rows_t, sample_works=host.sample_works,
                      first_rows=host.first_rows)


def _upload(arrays: list[np.ndarray], dtype, device: torch.device) -> list[torch.Tensor]:
    """The arrays as tensors of `dtype` on `device`, shapes kept. On
    CUDA they go up packed in one pinned buffer by one non-blocking copy (the
    caching host allocator keeps the buffer until that copy has run)."""
    arrays = [np.ascontiguousarray(a, dtype=dtype) for a in arrays]
    if device.type != "cuda":
        return [torch.from_numpy(a) for a in arrays]
    sizes = [a.size for a in arrays]
    host = torch.empty(sum(sizes), dtype=_TORCH_INT[np.dtype(dtype)], pin_memory=True)
    flat = host.numpy()
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    for a, lo, hi in zip(arrays, offsets[:-1], offsets[1:]):
        flat[lo:hi] = a.reshape(-1)
    dev = host.to(device, non_blocking=True)
    return [dev[lo:hi].view(a.shape) for a, lo, hi in zip(arrays, offsets[:-1], offsets[1:])]


def feed_tokens(ids: torch.Tensor, rows: list[int], tokens: torch.Tensor, src: list[int]) -> None:
    """ids[rows] = tokens[src] on the device (the step before sampled them and the
    host has not read them yet)."""
    n = len(rows)
    if rows == list(range(rows[0], rows[0] + n)) and src == list(range(src[0], src[0] + n)):
        ids[rows[0]:rows[0] + n].copy_(tokens[src[0]:src[0] + n])  # the usual case: in order
        return
    index = torch.tensor([rows, src], dtype=torch.int64)
    if ids.is_cuda:
        index = index.pin_memory().to(ids.device, non_blocking=True)
    ids.index_copy_(0, index[0], tokens.index_select(0, index[1]))
