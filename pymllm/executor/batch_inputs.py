"""A batch's integer inputs packed on the host and moved to the device with one copy.

Every integer a forward needs from the host (token ids, positions, KV slots, request rows,
lengths, and where each new KV slot goes in the req_to_token table) is written into one int64
host array; int32 fields sit two per int64 word, so the device gets them in the dtype its
kernels read without conversion kernels. The packing functions are pure numpy;
``InputStager`` owns the host staging buffers and issues the copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch

if TYPE_CHECKING:
    from pymllm.orchestrator.schedule_batch import ScheduledBatch

# Segments start on 16-byte boundaries, so kernels may use vectorised loads on any of them.
_ALIGN_WORDS = 2
_MIN_STAGING_WORDS = 4096


@dataclass
class HostBatch:
    """One forward's integer inputs on the host (int64 numpy arrays)."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    out_cache_loc: np.ndarray  # [T]
    req_pool_indices: np.ndarray  # [B]
    seq_lens: np.ndarray  # [B] total length after this forward
    # req_to_token.view(-1)[kv_write_index[i]] = kv_write_loc[i]: the new tokens' slots, plus
    # reused prefix-cache slots of requests starting their first extend.
    kv_write_index: np.ndarray  # [W]
    kv_write_loc: np.ndarray  # [W]
    extend_seq_lens: Optional[np.ndarray] = None  # [B], extend batches only
    extend_prefix_lens: Optional[np.ndarray] = None  # [B], extend batches only
    mrope_position_deltas: Optional[np.ndarray] = None  # [B], mrope decode only

    @property
    def batch_size(self) -> int:
        return int(self.req_pool_indices.shape[0])


def _i64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def decode_host_batch(
    last_ids: Sequence[int], prefix_lens: Sequence[int], rows: Sequence[int], out_cache_loc, row_stride: int
) -> HostBatch:
    """One new token per request at position prefix_len (the last sampled token)."""
    positions = _i64(prefix_lens)
    rows_np = _i64(rows)
    loc = _i64(out_cache_loc)
    return HostBatch(
        input_ids=_i64(last_ids), positions=positions, out_cache_loc=loc, req_pool_indices=rows_np,
        seq_lens=positions + 1, kv_write_index=rows_np * row_stride + positions, kv_write_loc=loc,
    )


def next_decode_host_batch(hb: HostBatch) -> HostBatch:
    """The decode step after the decode step ``hb`` if the same requests go on: positions,
    lengths and req_to_token writes one further; tokens and new slots 0 until they are known
    (sampled / allocated; ``GraphPacker.set_new_tokens``)."""
    zeros = np.zeros_like(hb.input_ids)
    return HostBatch(
        input_ids=zeros, positions=hb.positions + 1, out_cache_loc=zeros.copy(), req_pool_indices=hb.req_pool_indices,
        seq_lens=hb.seq_lens + 1, kv_write_index=hb.kv_write_index + 1, kv_write_loc=zeros.copy(),
        mrope_position_deltas=hb.mrope_position_deltas,
    )


def extend_host_batch(
    token_ids: Sequence[Sequence[int]],
    prefix_lens: Sequence[int],
    rows: Sequence[int],
    out_cache_loc,
    row_stride: int,
    cached_prefixes: Sequence[Tuple[int, np.ndarray]] = (),
) -> HostBatch:
    """token_ids[i] are request i's new tokens, placed after its prefix_lens[i] cached ones.

    cached_prefixes: (row, slots) of prefix-cache slots to copy into a request's row, whose
    entries land at positions [0, len(slots)) of that row.
    """
    lens = _i64([len(t) for t in token_ids])
    prefix = _i64(prefix_lens)
    rows_np = _i64(rows)
    total = int(lens.sum())
    starts = np.cumsum(lens) - lens
    # Token k of request i sits at flat index starts[i] + k and position prefix[i] + k.
    positions = np.arange(total, dtype=np.int64) - np.repeat(starts - prefix, lens)
    loc = _i64(out_cache_loc)
    write_index = [np.repeat(rows_np, lens) * row_stride + positions]
    write_loc = [loc]
    for row, slots in cached_prefixes:
        write_index.append(row * row_stride + np.arange(len(slots), dtype=np.int64))
        write_loc.append(_i64(slots))
    return HostBatch(
        input_ids=_i64([t for ids in token_ids for t in ids]), positions=positions, out_cache_loc=loc,
        req_pool_indices=rows_np, seq_lens=prefix + lens,
        kv_write_index=np.concatenate(write_index), kv_write_loc=np.concatenate(write_loc),
        extend_seq_lens=lens, extend_prefix_lens=prefix,
    )


def host_batch(batch: "ScheduledBatch", row_stride: int) -> HostBatch:
    """The HostBatch of a scheduled batch; row_stride is the req_to_token row length."""
    reqs = batch.reqs
    rows = [r.req_pool_idx for r in reqs]
    if batch.mode.is_decode():
        hb = decode_host_batch([r.output_ids[-1] for r in reqs], batch.prefix_lens, rows,
                               batch.out_cache_loc, row_stride)
        # Requests with images decode at seq position + mrope delta; the deltas ride in the
        # same single copy as the other inputs (into the graph's static buffer when replaying).
        mms = [getattr(r, "mm_inputs", None) for r in reqs]
        if any(mm is not None for mm in mms):
            hb.mrope_position_deltas = _i64([mm.mrope_position_delta if mm is not None else 0 for mm in mms])
        return hb
    token_ids, cached = [], []
    for req, prefix, n in zip(reqs, batch.prefix_lens, batch.extend_lens):
        token_ids.append(req.fill_ids[prefix : prefix + n])
        # Slots reused from the prefix cache were computed under other requests' rows; this
        # row gets them at its first extend (later chunks start past cache_owned_len).
        if prefix and prefix == req.cache_owned_len:
            cached.append((req.req_pool_idx, req.kv_slots[:prefix]))
    return extend_host_batch(token_ids, batch.prefix_lens, rows, batch.out_cache_loc, row_stride, cached)


@dataclass
class ExtendRows:
    """An extend batch recast as one decode row per new token (see ``extend_as_decode_rows``)."""

    rows: HostBatch  # decode-style: row i is new token i, attending to its own prefix
    prefix_write_index: np.ndarray  # req_to_token writes that are not one per new token:
    prefix_write_loc: np.ndarray  # cached prefix slots copied into a request's row
    sample_rows: List[int]  # the row of each request's last new token


def extend_as_decode_rows(hb: HostBatch) -> ExtendRows:
    """Causal attention over new tokens is, token by token, decode attention over the request's
    slots up to and including that token. So new token i of request r can run as a decode row
    of r's req_to_token row with seq_len = position + 1, once all new K/V are in the cache
    (each layer stores its new K/V before its attention reads them). A short extend on a long
    cached prefix then replays a captured decode graph instead of launching hundreds of kernels
    one by one. The first len(input_ids) writes of an extend HostBatch are the new tokens'
    (extend_host_batch puts the cached-prefix copies after them)."""
    if hb.extend_seq_lens is None:
        raise ValueError("extend_as_decode_rows needs an extend batch")
    num_tokens = len(hb.input_ids)
    rows = HostBatch(
        input_ids=hb.input_ids, positions=hb.positions, out_cache_loc=hb.out_cache_loc,
        req_pool_indices=np.repeat(hb.req_pool_indices, hb.extend_seq_lens), seq_lens=hb.positions + 1,
        kv_write_index=hb.kv_write_index[:num_tokens], kv_write_loc=hb.kv_write_loc[:num_tokens],
    )
    return ExtendRows(
        rows=rows,
        prefix_write_index=hb.kv_write_index[num_tokens:],
        prefix_write_loc=hb.kv_write_loc[num_tokens:],
        sample_rows=(np.cumsum(hb.extend_seq_lens) - 1).tolist(),
    )


@dataclass(frozen=True)
class Segment:
    offset: int  # in int64 words
    capacity: int  # elements
    dtype: type  # np.int64 or np.int32

    @property
    def words(self) -> int:
        size = self.capacity * np.dtype(self.dtype).itemsize
        return -(-size // (8 * _ALIGN_WORDS)) * _ALIGN_WORDS

    @property
    def start(self) -> int:
        """First element in the whole buffer viewed as self.dtype."""
        return self.offset * 8 // np.dtype(self.dtype).itemsize


class PackedLayout:
    """Named int64 / int32 segments of one int64 buffer.

    Segments listed in ``host_only`` come last and are not copied to the device: values the
    host needs in the same (pinned) buffer, such as indptr for FlashInfer's plan().
    """

    def __init__(self, fields: Sequence[Tuple[str, int, type]], host_only: Sequence[Tuple[str, int, type]] = ()):
        self.segments: Dict[str, Segment] = {}
        self.host_only = frozenset(name for name, _, _ in host_only)
        self.device_words = self._place(fields, 0)
        self.total_words = self._place(host_only, self.device_words)
        # (name, dtype, first, end) per segment, resolved once: views are taken every step.
        self._ranges = [(name, s.dtype, s.start, s.start + s.capacity) for name, s in self.segments.items()]

    def _place(self, fields: Sequence[Tuple[str, int, type]], offset: int) -> int:
        for name, capacity, dtype in fields:
            self.segments[name] = Segment(offset, capacity, dtype)
            offset += self.segments[name].words
        return offset

    def numpy_views(self, words: np.ndarray) -> Dict[str, np.ndarray]:
        flat = {np.int64: words, np.int32: words.view(np.int32)}
        return {name: flat[dtype][first:end] for name, dtype, first, end in self._ranges}

    def torch_views(self, words: torch.Tensor, host_only: bool = False) -> Dict[str, torch.Tensor]:
        """Views of an int64 tensor holding this layout: the device segments, or (host_only)
        the host-only ones."""
        flat = {np.int64: words, np.int32: words.view(torch.int32)}
        return {
            name: flat[dtype][first:end]
            for name, dtype, first, end in self._ranges
            if (name in self.host_only) == host_only
        }

    def pack(self, values: Dict[str, np.ndarray]) -> np.ndarray:
        """A new int64 array with values[name] at the start of each named segment."""
        words = np.zeros(self.total_words, dtype=np.int64)
        views = self.numpy_views(words)
        for name, value in values.items():
            views[name][: len(value)] = value
        return words


_INT64_FIELDS = ("input_ids", "positions", "out_cache_loc", "req_pool_indices", "kv_write_index")
_INT32_FIELDS = ("seq_lens", "kv_write_loc")
_EXTEND_FIELDS = ("extend_seq_lens", "extend_prefix_lens")


def eager_layout(hb: HostBatch) -> PackedLayout:
    """Segments sized exactly to this batch."""
    int64_names = _INT64_FIELDS + (("mrope_position_deltas",) if hb.mrope_position_deltas is not None else ())
    fields = [(n, len(getattr(hb, n)), np.int64) for n in int64_names]
    names = _INT32_FIELDS + (_EXTEND_FIELDS if hb.extend_seq_lens is not None else ())
    fields += [(n, len(getattr(hb, n)), np.int32) for n in names]
    return PackedLayout(fields)


def graph_layout(max_bs: int) -> PackedLayout:
    """Fixed segments for decode batches up to max_bs: captured graphs read these addresses.
    ``input_ids`` comes first, so an upload can leave it out (tokens a graph's argmax wrote
    there); ``readback_slot`` is the host ring row the graph's argmax also writes its ids to
    (pending_batch.Readback; 0, its scratch row, unless the step reserved one)."""
    fields = [(n, max_bs, np.int64) for n in _INT64_FIELDS + ("mrope_position_deltas",)]
    fields += [("readback_slot", 1, np.int64)]
    fields += [(n, max_bs, np.int32) for n in _INT32_FIELDS]
    return PackedLayout(fields, host_only=[("kv_indptr", max_bs + 1, np.int32), ("seq_lens_host", max_bs, np.int32)])


def pack_eager(hb: HostBatch) -> Tuple[PackedLayout, np.ndarray]:
    layout = eager_layout(hb)
    return layout, layout.pack({name: getattr(hb, name) for name in layout.segments})


def pack_graph(hb: HostBatch, layout: PackedLayout, padded_bs: int, padding_row: int, row_stride: int) -> np.ndarray:
    """A decode batch padded to padded_bs in a new array: see ``GraphPacker``."""
    words = np.zeros(layout.total_words, dtype=np.int64)
    fill_graph_words(layout.numpy_views(words), hb, padded_bs, padding_row, row_stride)
    return words


class GraphPacker:
    """pack_graph into one reused array: the packed words only live until the stager has
    copied them into its pinned buffer, and a fresh array plus its views cost more host time
    than the whole copy."""

    def __init__(self, layout: PackedLayout, padding_row: int, row_stride: int):
        self.words = np.zeros(layout.total_words, dtype=np.int64)
        self._views = layout.numpy_views(self.words)
        self.padding_row, self.row_stride = padding_row, row_stride

    def pack(self, hb: HostBatch, padded_bs: int) -> np.ndarray:
        """The batch's words, valid until the next pack."""
        self.words.fill(0)
        fill_graph_words(self._views, hb, padded_bs, self.padding_row, self.row_stride)
        return self.words

    def set_new_tokens(self, tokens: Sequence[int], slots) -> np.ndarray:
        """Fill in the tokens and new KV slots of the decode batch packed last: what pack would
        have written had they been known; returns the words. (Its HostBatch keeps zeros there:
        what is read of it later, next_decode_host_batch and the lengths, does not need them.)"""
        n = len(tokens)
        views = self._views
        views["input_ids"][:n] = tokens
        views["out_cache_loc"][:n] = slots
        views["kv_write_loc"][:n] = slots
        return self.words


def fill_graph_words(
    views: Dict[str, np.ndarray], hb: HostBatch, padded_bs: int, padding_row: int, row_stride: int
) -> None:
    """Write a decode batch padded to padded_bs into zeroed graph_layout views, with the
    host-only kv_indptr and seq_lens (what FlashInfer's plan() reads).

    Padding sequences touch only reserved memory: they read the pool's all-zero padding row
    (one KV entry, slot 0) and write KV slot 0, which the allocator never hands out. Their
    req_to_token write (the graphs scatter every row's) puts 0 at position 0 of the padding row,
    which leaves it all-zero; row_stride is the req_to_token row length. Their token, position
    and mrope delta are 0.
    """
    bs = hb.batch_size
    if padded_bs < bs:
        raise ValueError(f"batch size {bs} exceeds the padded size {padded_bs}")
    for name in _INT64_FIELDS + _INT32_FIELDS:
        values = getattr(hb, name)
        views[name][: len(values)] = values
    if hb.mrope_position_deltas is not None:
        views["mrope_position_deltas"][:bs] = hb.mrope_position_deltas
    views["req_pool_indices"][bs:padded_bs] = padding_row
    views["seq_lens"][bs:padded_bs] = 1
    views["kv_write_index"][bs:padded_bs] = padding_row * row_stride
    lens = views["seq_lens_host"]
    lens[:bs] = hb.seq_lens
    lens[bs:padded_bs] = 1
    np.cumsum(lens[:padded_bs], dtype=np.int32, out=views["kv_indptr"][1 : padded_bs + 1])


class ViewCache:
    """Views (slices of static or staging buffers) made once and reused: on a decode step's host
    path every slice costs microseconds. Keys are the caller's; a cached view keeps its base
    alive, so a key naming the base by data_ptr cannot alias a newer buffer. Past ``limit``
    entries (bases that change every step, as on the CPU) it starts over."""

    def __init__(self, limit: int):
        self._views: Dict[Hashable, Any] = {}
        self._limit = limit

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= self._limit:
                self._views.clear()
            view = self._views[key] = make()
        return view

    def clear(self) -> None:
        self._views.clear()


class InputStager:
    """Copies packed host words to the device, one copy per batch.

    On CUDA the words go through pinned host buffers, so the copy is truly asynchronous (from
    pageable memory it would be staged by the driver on the calling thread). A pinned buffer
    must not be rewritten while a copy from it is still pending, including copies that a
    consumer (FlashInfer's plan) makes later from views of it. Two buffers alternate; when
    one is handed over for the next batch, an event is recorded after everything enqueued for
    the batch it held, and it is written again only once that event has completed. The host
    has waited for a step's tokens before it uploads the step after next (overlapped decoding
    keeps at most two steps in flight), so in practice that wait returns at once.

    On CPU the packed array itself is the result (no copy), so nothing is ever reused.
    """

    def __init__(self, device: torch.device, num_buffers: int = 2):
        self.device = device
        self._on_cuda = device.type == "cuda"
        self._pinned: List[Optional[torch.Tensor]] = [None] * num_buffers
        self._events = [torch.cuda.Event() if self._on_cuda else None for _ in range(num_buffers)]
        self._current = num_buffers - 1
        self._device_words: Optional[torch.Tensor] = None
        # Per-step host time is the point of this class, so what can be reused is: the pinned
        # buffers' numpy views and slices, the destination slices, the current stream object
        # (re-fetched only when the raw stream changes: torch.cuda.current_stream costs ~10 us).
        self._numpy: List[Optional[np.ndarray]] = [None] * num_buffers
        self._slices = ViewCache(limit=64)
        self._raw_stream: Optional[int] = None
        self._stream: Optional[torch.cuda.Stream] = None

    @staticmethod
    def _capacity(words: int) -> int:
        return max(_MIN_STAGING_WORDS, 1 << (words - 1).bit_length())

    def _device_buffer(self, words: int) -> torch.Tensor:
        buf = self._device_words
        if buf is None or buf.numel() < words:
            # Earlier batches' views keep the old buffer alive; the caching allocator frees it
            # in stream order, after the kernels that read it.
            with torch.inference_mode(False):
                buf = torch.empty(self._capacity(words), dtype=torch.int64, device=self.device)
            self._device_words = buf
            self._slices.clear()  # let the old buffer go once its batches are done with it
        return buf

    def current_stream(self) -> "torch.cuda.Stream":
        """The device's current stream, as an object made once per raw stream."""
        raw = torch._C._cuda_getCurrentRawStream(self.device.index if self.device.index is not None
                                                 else torch.cuda.current_device())
        if raw != self._raw_stream:
            self._raw_stream, self._stream = raw, torch.cuda.current_stream(self.device)
        return self._stream

    def _next_pinned(self, words: int) -> int:
        """Index of the pinned buffer for the next upload, holding at least ``words``."""
        # Hand over the buffer of the previous batch: all its consumers are enqueued by now.
        self._events[self._current].record(self.current_stream())
        self._current = (self._current + 1) % len(self._pinned)
        self._events[self._current].synchronize()
        buf = self._pinned[self._current]
        if buf is None or buf.numel() < words:
            with torch.inference_mode(False):
                buf = torch.empty(self._capacity(words), dtype=torch.int64, pin_memory=True)
            self._pinned[self._current] = buf
            self._numpy[self._current] = buf.numpy()
            self._slices.clear()
        return self._current

    def _slice(self, tensor: torch.Tensor, n: int) -> torch.Tensor:
        return self._slices.get((tensor.data_ptr(), n), lambda: tensor[:n])

    def upload(self, words: np.ndarray, device_words: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(host, device) int64 tensors holding ``words``; the device one has its first
        ``device_words`` words, in a reused staging buffer (valid until the next upload)."""
        n = len(words)
        if not self._on_cuda:
            host = torch.from_numpy(words)
            return host, host
        index = self._next_pinned(n)
        self._numpy[index][:n] = words
        buf = self._pinned[index]
        target = self._device_buffer(device_words)
        self._slice(target, device_words).copy_(self._slice(buf, device_words), non_blocking=True)
        return self._slice(buf, n), target


class StaticWordsUpload:
    """Copies a graph batch's packed words into the graphs' static input buffer.

    The InputStager serves batches of any size through alternating buffers it looks up per call;
    the graphs' words always have one layout, so this keeps one pinned host buffer, the slices of
    the copy made once, and one event: recorded (``seal``) after the last copy that reads the
    buffer (before the graph launch, so a step packed while the previous one runs does not wait
    for that whole step), waited on before the buffer is written again. That is less host work on
    the path to every graph launch. ``host`` also holds the host-only words (what FlashInfer's
    plan reads), valid until the next upload. ``upload(words, keep_tokens=True)`` leaves the
    device's first ``token_words`` words (the input tokens, which a graph's argmax already wrote
    there) as they are.
    """

    def __init__(self, device_words: torch.Tensor, total_words: int,
                 stream: Callable[[], "torch.cuda.Stream"], token_words: int = 0):
        self._on_cuda = device_words.is_cuda
        self.host = torch.zeros(total_words, dtype=torch.int64, pin_memory=self._on_cuda)
        self._host_np = self.host.numpy()
        self._src, self._dst = self.host[: device_words.numel()], device_words
        self._tail_src, self._tail_dst = self._src[token_words:], device_words[token_words:]
        self._stream = stream
        self._event = torch.cuda.Event() if self._on_cuda else None
        self._pending = False

    def upload(self, words: np.ndarray, keep_tokens: bool = False) -> torch.Tensor:
        """Copy ``words`` (the packed layout, device part first) in; returns ``host``."""
        if self._pending:  # the last copies must have read the buffer before it is rewritten
            self._event.synchronize()
            self._pending = False
        self._host_np[: len(words)] = words
        if keep_tokens:
            self._tail_dst.copy_(self._tail_src, non_blocking=True)
        else:
            self._dst.copy_(self._src, non_blocking=True)
        return self.host

    def seal(self) -> None:
        """Everything that reads the last upload is enqueued (on the current stream)."""
        if self._on_cuda:
            self._event.record(self._stream())
            self._pending = True
