"""The container: a versioned, self-describing byte layout shared by every scheme (see docs/codec-format.md).

A stream is one header followed by independent chunks:

    header  = fixed part | layer table | positions | scheme section | chunk table | header CRC-32
    chunk i = the bytes of token chunk i (scheme specific), checked by its own CRC-32

Everything is little-endian. Nothing is pickled; the parser checks every length against the bytes it
has and every shape against hard limits before it allocates, so bad bytes raise `CodecError`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import zstandard

from kvlife.errors import KvlifeError

MAGIC = b"KVLC"
VERSION = 3  # what the encoder writes: 3 = version 2 with chunk checksums seeded by the version
READABLE_VERSIONS = (1, 2, 3)  # 2: kvlife's rANS entropy section; 1: constriction's ANS coder (still decoded)
# Version 3 seeds each chunk's CRC-32 with a constant of its own, so a stream whose version field is
# rewritten (and its header checksum recomputed) fails every chunk's checksum, whatever its bytes: the
# version is bound to the chunks' layout deterministically, not only by the entropy coder's end state.
_CRC_SEEDS = {1: 0, 2: 0, 3: zlib.crc32(b"KVLC chunk, format version 3")}


def chunk_crc(part: bytes | memoryview, version: int = VERSION) -> int:
    """A chunk's checksum as a stream of format `version` records it in its chunk table."""
    return zlib.crc32(part, _CRC_SEEDS[version])

SCHEMES = ("kvlife", "fp16", "int8", "int8+zstd", "lmcache")
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Hard limits a header must respect: they bound every allocation a decoder makes.
MAX_LAYERS = 4096
MAX_HEADS = 4096  # batch * kv_heads of one layer
MAX_HEAD_DIM = 4096
MAX_TOKENS = 1 << 26
MAX_CHUNK_TOKENS = 1 << 16
MAX_CHUNK_ELEMENTS = 1 << 28  # elements one chunk decodes to (1 GiB as float32)
MAX_SECTION_BYTES = 1 << 30
DEFAULT_MAX_BYTES = 8 << 30  # decoded K/V + positions a stream may claim unless the caller allows more

FLAG_PRE_ROPE = 1  # keys are coded before RoPE; the decoder re-applies it (rope_theta, rotary_dim)
FLAG_CHANNEL_STEPS = 2  # the kvlife scheme section carries per-channel step multipliers

_FIXED = struct.Struct("<4sHBBIIHHqdHHI")  # magic .. n_chunks (44 bytes)
_LAYER = struct.Struct("<HHHHIi")  # batch, kv_heads, head_dim, reserved, tokens, window (-1: none)
_CHUNK = struct.Struct("<II")  # byte length, CRC-32
CHUNK_PREFIX = struct.Struct("<BBH")  # every chunk's first bytes: level id, exact tokens, reserved
CUSTOM_LEVEL_ID = 255  # the level id of a chunk coded at a level that is not a named one


class CodecError(KvlifeError):
    """A codec stream is truncated, corrupt, of an unknown version, or asks for something impossible."""


@dataclass(frozen=True)
class LayerShape:
    batch: int
    kv_heads: int
    head_dim: int
    tokens: int
    window: int | None = None

    @property
    def heads(self) -> int:
        """Rows the codec treats as heads: batch and KV heads folded together."""
        return self.batch * self.kv_heads


@dataclass
class Header:
    scheme: str
    dtype: str
    chunk_tokens: int
    layers: list[LayerShape]
    next_position: int
    positions: Positions  # per layer [kv_heads, tokens] int64, decompressed on first use
    rope_theta: float = 0.0
    rotary_dim: int = 0
    flags: int = 0
    scheme_section: bytes = b""
    chunk_lengths: list[int] = field(default_factory=list)
    chunk_crcs: list[int] = field(default_factory=list)
    header_bytes: int = 0  # size of the encoded header (set by parse/pack)
    version: int = VERSION  # the format version the stream was written in (set by parse)

    @property
    def n_chunks(self) -> int:
        return chunk_count(self.layers, self.chunk_tokens)

    @property
    def pre_rope(self) -> bool:
        return bool(self.flags & FLAG_PRE_ROPE)

    def chunk_span(self, index: int, layer: int) -> tuple[int, int]:
        """Token range [start, stop) of chunk `index` in `layer` (empty when the layer is shorter)."""
        tokens = self.layers[layer].tokens
        start = min(index * self.chunk_tokens, tokens)
        return start, min(start + self.chunk_tokens, tokens)

    def elements(self) -> int:
        return sum(2 * s.heads * s.tokens * s.head_dim for s in self.layers)


def chunk_count(layers: list[LayerShape], chunk_tokens: int) -> int:
    longest = max((s.tokens for s in layers), default=0)
    return -(-longest // chunk_tokens) if longest else 0


def check_shapes(layers: list[LayerShape], chunk_tokens: int) -> None:
    """Raise CodecError if shapes break the format's limits (called by encoder and parser alike)."""
    if not 1 <= len(layers) <= MAX_LAYERS:
        raise CodecError(f"a stream holds 1..{MAX_LAYERS} layers, not {len(layers)}")
    if not 1 <= chunk_tokens <= MAX_CHUNK_TOKENS:
        raise CodecError(f"chunk_tokens must be in 1..{MAX_CHUNK_TOKENS}, not {chunk_tokens}")
    channels = 0
    for index, s in enumerate(layers):
        if not (1 <= s.batch and 1 <= s.kv_heads and s.heads <= MAX_HEADS):
            raise CodecError(f"layer {index}: batch*kv_heads must be in 1..{MAX_HEADS} "
                             f"(got {s.batch}x{s.kv_heads})")
        if not 1 <= s.head_dim <= MAX_HEAD_DIM:
            raise CodecError(f"layer {index}: head_dim must be in 1..{MAX_HEAD_DIM}, not {s.head_dim}")
        if not 0 <= s.tokens <= MAX_TOKENS:
            raise CodecError(f"layer {index}: token count must be in 0..{MAX_TOKENS}, not {s.tokens}")
        channels += 2 * s.heads * s.head_dim
    if channels * min(chunk_tokens, max(s.tokens for s in layers) or 1) > MAX_CHUNK_ELEMENTS:
        raise CodecError(
            f"one chunk would decode to more than {MAX_CHUNK_ELEMENTS} elements; use smaller chunk_tokens"
        )


# ---- positions -------------------------------------------------------------------------------------

class Positions(Sequence[np.ndarray]):
    """Per layer token positions [kv_heads, tokens] int64, kept compact until asked for.

    The stream holds them as one zstd frame: per layer a u8 mode and, for mode 0 (every head holds
    start, start+1, ...), the i64 start; for mode 1 (explicit), i64 deltas [kv_heads, tokens] along
    tokens. A parsed header keeps the frame and decompresses it on first use: a header claiming
    millions of tokens costs nothing until a chunk has been read, and a mode-0 layer is then a
    read-only broadcast view (8 bytes per token, not per head and token). Compare two by `==`.
    """

    def __init__(self, layers: list[LayerShape], blob: bytes | None = None,
                 arrays: list[np.ndarray] | None = None) -> None:
        self.layers = layers
        self._blob = blob
        self._arrays = arrays  # per layer: an array, or the int start of a mode-0 layer

    @classmethod
    def counting(cls, layers: list[LayerShape], start: int = 0) -> Positions:
        """Every head of every layer holds start, start+1, ... (no arrays are made)."""
        return cls(layers, arrays=[start] * len(layers))

    @property
    def blob(self) -> bytes:
        """The zstd frame the header stores."""
        if self._blob is None:
            self._blob = _pack_positions(self._arrays or [])
        return self._blob

    def _entries(self) -> list[np.ndarray | int]:
        if self._arrays is None:
            self._arrays = _unpack_positions(self._blob or b"", self.layers)
        return self._arrays

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index):  # noqa: ANN001 - int or slice, as a list
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        entry = self._entries()[index]
        if isinstance(entry, np.ndarray):
            return entry
        shape = self.layers[index]
        counting = np.arange(entry, entry + shape.tokens, dtype=np.int64)
        return np.broadcast_to(counting, (shape.kv_heads, shape.tokens))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Positions):
            return NotImplemented
        return self.layers == other.layers and self.blob == other.blob

    __hash__ = None  # type: ignore[assignment]


def _pack_positions(positions: list[np.ndarray | int]) -> bytes:
    """Per layer: mode 0 = every head holds start, start+1, ... (stores start); mode 1 = explicit."""
    out = bytearray()
    for pos in positions:
        if isinstance(pos, int):
            out += struct.pack("<Bq", 0, pos)
        elif pos.size and (pos == pos[:1, :1] + np.arange(pos.shape[1])).all():
            out += struct.pack("<Bq", 0, int(pos[0, 0]))
        elif not pos.size:
            out += struct.pack("<Bq", 0, 0)
        else:
            deltas = np.diff(pos, axis=1, prepend=0).astype("<i8")
            out += struct.pack("<B", 1) + deltas.tobytes()
    return zstandard.ZstdCompressor(level=3).compress(bytes(out))


def _unpack_positions(blob: bytes, layers: list[LayerShape]) -> list[np.ndarray | int]:
    limit = sum(9 + 8 * s.kv_heads * s.tokens for s in layers)
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise CodecError(f"the positions section is corrupt: {exc}") from None
    except MemoryError:
        raise CodecError(f"not enough memory for the positions of this stream "
                         f"({limit / 2**30:.1f} GiB)") from None
    positions: list[np.ndarray | int] = []
    offset = 0
    for index, s in enumerate(layers):
        if offset + 1 > len(raw):
            raise CodecError("the positions section is truncated")
        mode = raw[offset]
        if mode == 0:
            if offset + 9 > len(raw):
                raise CodecError("the positions section is truncated")
            start = struct.unpack_from("<q", raw, offset + 1)[0]
            if not -(1 << 62) <= start <= (1 << 62):
                raise CodecError(f"layer {index}: position start {start} is out of range")
            offset += 9
            positions.append(start)
        elif mode == 1:
            size = 8 * s.kv_heads * s.tokens
            if offset + 1 + size > len(raw):
                raise CodecError("the positions section is truncated")
            deltas = np.frombuffer(raw, dtype="<i8", count=s.kv_heads * s.tokens, offset=offset + 1)
            positions.append(np.cumsum(deltas.reshape(s.kv_heads, s.tokens), axis=1))
            offset += 1 + size
        else:
            raise CodecError(f"layer {index}: unknown positions mode {mode}")
    if offset != len(raw):
        raise CodecError("the positions section has trailing bytes")
    return positions


# ---- header ----------------------------------------------------------------------------------------

def pack_header(header: Header) -> bytes:
    check_shapes(header.layers, header.chunk_tokens)
    if len(header.chunk_lengths) != header.n_chunks or len(header.chunk_crcs) != header.n_chunks:
        raise CodecError("internal: chunk table does not match the chunk count")
    out = bytearray(
        _FIXED.pack(
            MAGIC, header.version, SCHEMES.index(header.scheme), DTYPES.index(header.dtype), header.flags,
            header.chunk_tokens, len(header.layers), 0, header.next_position, header.rope_theta,
            header.rotary_dim, 0, header.n_chunks,
        )
    )
    for s in header.layers:
        out += _LAYER.pack(s.batch, s.kv_heads, s.head_dim, 0, s.tokens, -1 if s.window is None else s.window)
    positions = header.positions.blob
    out += struct.pack("<I", len(positions)) + positions
    out += struct.pack("<I", len(header.scheme_section)) + header.scheme_section
    for length, crc in zip(header.chunk_lengths, header.chunk_crcs):
        out += _CHUNK.pack(length, crc)
    out += struct.pack("<I", zlib.crc32(out))
    header.header_bytes = len(out)
    return bytes(out)


class _Reader:
    def __init__(self, blob: bytes | memoryview) -> None:
        self.blob = memoryview(blob)
        self.offset = 0

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or self.offset + size > len(self.blob):
            raise CodecError(f"stream truncated while reading {what} (needs {size} bytes at {self.offset})")
        part = self.blob[self.offset : self.offset + size]
        self.offset += size
        return part

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))


def parse_header(blob: bytes | memoryview, max_bytes: int = DEFAULT_MAX_BYTES,
                 header_only: bool = False) -> Header:
    """Parse and verify a stream's header (magic, version, limits, CRC); chunks are checked on decode.

    `max_bytes` caps what the stream may claim to decode to (K/V in its dtype plus positions), so a
    crafted header cannot make the decoder allocate without bound. `header_only`: `blob` is the header
    alone (streaming sends it apart from the chunks), so its length is not checked against the chunk table.
    """
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, got {type(blob).__name__}")
    reader = _Reader(blob)
    if len(blob) < 4 or bytes(blob[:4]) != MAGIC:
        raise CodecError("not a kvlife codec stream (bad magic); was it written by `kvlife codec encode`?")
    (_, version, scheme, dtype, flags, chunk_tokens, n_layers, _, next_position, rope_theta,
     rotary_dim, _, n_chunks) = reader.unpack(_FIXED, "the fixed header")
    if version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise CodecError(f"codec stream version {version} is not supported "
                         f"(this kvlife reads versions {readable})")
    if scheme >= len(SCHEMES) or dtype >= len(DTYPES):
        raise CodecError(f"unknown scheme {scheme} or dtype {dtype} in the header")
    if not 1 <= n_layers <= MAX_LAYERS:
        raise CodecError(f"the header claims {n_layers} layers (limit {MAX_LAYERS})")
    layers = []
    for _ in range(n_layers):
        batch, kv_heads, head_dim, _, tokens, window = reader.unpack(_LAYER, "the layer table")
        layers.append(LayerShape(batch, kv_heads, head_dim, tokens, None if window < 0 else window))
    check_shapes(layers, chunk_tokens)
    if n_chunks != chunk_count(layers, chunk_tokens):
        raise CodecError(f"the header claims {n_chunks} chunks but its shapes need "
                         f"{chunk_count(layers, chunk_tokens)}")
    if flags & FLAG_PRE_ROPE and not (1.0 < rope_theta < 1e30 and 2 <= rotary_dim and rotary_dim % 2 == 0):
        raise CodecError("the header asks to re-apply RoPE but its rope parameters are invalid")
    (pos_len,) = reader.unpack(struct.Struct("<I"), "the positions length")
    pos_blob = bytes(reader.take(pos_len, "the positions section"))
    (section_len,) = reader.unpack(struct.Struct("<I"), "the scheme section length")
    if section_len > MAX_SECTION_BYTES:
        raise CodecError("the scheme section is absurdly large")
    section = bytes(reader.take(section_len, "the scheme section"))
    table = np.frombuffer(reader.take(_CHUNK.size * n_chunks, "the chunk table"), dtype="<u4").reshape(-1, 2)
    end = reader.offset
    (crc,) = reader.unpack(struct.Struct("<I"), "the header checksum")
    if zlib.crc32(reader.blob[:end]) != crc:
        raise CodecError("header checksum mismatch: the stream is corrupt")
    item = DTYPE_BYTES[DTYPES[dtype]]
    claimed = sum((2 * s.heads * s.head_dim * item + 8 * s.kv_heads) * s.tokens for s in layers)
    if claimed > max_bytes:
        raise CodecError(
            f"the stream claims {claimed / 2**30:.1f} GiB of decoded cache, above the limit of "
            f"{max_bytes / 2**30:.1f} GiB; pass max_bytes= to decode it anyway"
        )
    lengths = [int(x) for x in table[:, 0]]
    if header_only and reader.offset != len(blob):
        raise CodecError(f"header of {reader.offset} bytes followed by {len(blob) - reader.offset} more")
    if not header_only and reader.offset + sum(lengths) != len(blob):
        raise CodecError(
            f"stream length {len(blob)} does not match its chunk table "
            f"({reader.offset + sum(lengths)} expected): truncated or padded"
        )
    for s in layers:
        if rotary_dim > s.head_dim and flags & FLAG_PRE_ROPE:
            raise CodecError("rotary_dim exceeds head_dim")
    header = Header(
        scheme=SCHEMES[scheme], dtype=DTYPES[dtype], chunk_tokens=chunk_tokens, layers=layers,
        next_position=next_position, positions=Positions(layers, blob=pos_blob), rope_theta=rope_theta,
        rotary_dim=rotary_dim, flags=flags, scheme_section=section, chunk_lengths=lengths,
        chunk_crcs=[int(x) for x in table[:, 1]], header_bytes=reader.offset, version=version,
    )
    return header


def chunk_bytes(blob: bytes | memoryview, header: Header, index: int) -> memoryview:
    """The verified bytes of chunk `index`."""
    if not 0 <= index < header.n_chunks:
        raise CodecError(f"chunk {index} does not exist (the stream has {header.n_chunks})")
    start = header.header_bytes + sum(header.chunk_lengths[:index])
    part = memoryview(blob)[start : start + header.chunk_lengths[index]]
    if chunk_crc(part, header.version) != header.chunk_crcs[index]:
        raise CodecError(f"chunk {index} checksum mismatch: the stream is corrupt")
    return part


def assemble(header: Header, chunks: list[bytes]) -> bytes:
    """A whole stream from a header (its chunk table is rewritten) and chunk bytes."""
    header.chunk_lengths = [len(c) for c in chunks]
    header.chunk_crcs = [chunk_crc(c, header.version) for c in chunks]
    return pack_header(header) + b"".join(chunks)
