"""The safetensors reader: round trips against the reference writer, layouts, and every way a
checkpoint can be broken, each with a message that names the file and tensor."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lines_fast.checkpoint import Checkpoint, TensorInfo, read_header
from lines_fast.errors import MergeInputError


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    out = {
        "f64": torch.randn(3, 5, dtype=torch.float64, generator=g),
        "f32": torch.randn(7, 2, generator=g),
        "f16": torch.randn(9, generator=g).half(),
        "bf16": torch.randn(4, 3, generator=g).bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (5,), generator=g),
        "i32": torch.randint(-(2**30), 2**30, (2, 2), dtype=torch.int32, generator=g),
        "i16": torch.randint(-(2**14), 2**14, (3,), dtype=torch.int16, generator=g),
        "i8": torch.randint(-128, 127, (6,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (6,), dtype=torch.uint8, generator=g),
        "bool": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(2, 0, dtype=torch.bfloat16),
    }
    if hasattr(torch, "float8_e4m3fn"):
        out["f8e4m3"] = torch.randn(8, generator=g).to(torch.float8_e4m3fn)
        out["f8e5m2"] = torch.randn(8, generator=g).to(torch.float8_e5m2)
    return out


def same_bits(a, b):
    """Bitwise equality (NaNs and -0.0 included), for any dtype and shape."""
    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8)

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))


def write_raw(path, header, data=b"", header_bytes=None):
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_round_trip_all_dtypes(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    with Checkpoint.open(tmp_path / "m.safetensors") as ckpt:
        assert set(ckpt.names()) == set(tensors)
        assert ckpt.files == [tmp_path / "m.safetensors"]
        assert ckpt.total_bytes() == sum(t.numel() * t.element_size() for t in tensors.values())
        for name, ref in tensors.items():
            got = ckpt.tensor(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape, name
            assert same_bits(got, ref), name
            info = ckpt.info(name)
            assert info.numel == ref.numel() and info.shape == tuple(ref.shape)
            assert info.is_float == ref.is_floating_point()
        assert ckpt.tensor("scalar").item() == 3.25
        # Stable order: by offset within the file.
        offsets = [ckpt.info(n).offset for n in ckpt.names()]
        assert offsets == sorted(offsets)


def test_views_are_zero_copy(tmp_path):
    tensors = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.arange(500, dtype=torch.float32)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    ckpt = Checkpoint.open(path)
    a, b = ckpt.tensor("a"), ckpt.tensor("b")
    # Both views sit in one mapping of the whole file, at their file offsets.
    base_a = a.data_ptr() - ckpt.info("a").offset
    base_b = b.data_ptr() - ckpt.info("b").offset
    assert base_a == base_b
    assert ckpt.tensor("a").data_ptr() == a.data_ptr()  # the map is cached, not reopened
    # Views outlive close(): the map is released by the last view, never under it.
    ckpt.close()
    assert torch.equal(a, tensors["a"]) and torch.equal(b, tensors["b"])


def test_prefetch_is_harmless(tmp_path):
    save_file({"a": torch.ones(5000), "z": torch.zeros(0)}, tmp_path / "m.safetensors")
    ckpt = Checkpoint.open(tmp_path / "m.safetensors")
    ckpt.prefetch("a")
    ckpt.prefetch("z")
    assert ckpt.tensor("a").sum().item() == 5000


def test_misaligned_tensor_is_read_correctly(tmp_path):
    # No header padding and a 3-byte tensor first: the f32 tensor lands at an odd offset.
    header = {"u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "f": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = write_raw(tmp_path / "m.safetensors", None, b"\x01\x02\x03" + struct.pack("<2f", 1.5, -2.0), raw)
    f = Checkpoint.open(path).tensor("f")
    assert f.tolist() == [1.5, -2.0]


def make_sharded(tmp_path, tensors, split):
    """Saves tensors as two shards plus an index, in Hugging Face layout."""
    model = tmp_path / "model"
    model.mkdir()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:split], "model-00002-of-00002.safetensors": names[split:]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, model / file)
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return model


def test_sharded_directory(tmp_path):
    tensors = {f"layers.{i}.w": torch.full((3, i + 1), float(i)) for i in range(6)}
    model = make_sharded(tmp_path, tensors, 4)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "README.md"):
        (model / name).write_text("{}")
    with Checkpoint.open(model, label="ft1") as ckpt:
        assert ckpt.label == "ft1"
        assert [p.name for p in ckpt.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        # File by file, each by offset.
        assert [ckpt.info(n).file.name[:11] for n in ckpt.names()] == ["model-00001"] * 4 + ["model-00002"] * 2
        for name, ref in tensors.items():
            assert torch.equal(ckpt.tensor(name), ref)
        aux = [p.name for p in ckpt.aux_files()]
        assert aux == sorted(["chat_template.jinja", "config.json", "generation_config.json",
                              "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])
    # The index file itself is accepted too.
    assert len(Checkpoint.open(model / "model.safetensors.index.json").tensors) == 6


def test_directory_layouts(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    save_file({"w": torch.ones(2)}, single / "model.safetensors")
    (single / "config.json").write_text("{}")
    ckpt = Checkpoint.open(single)
    assert ckpt.names() == ["w"] and ckpt.label == str(single)
    assert [p.name for p in ckpt.aux_files()] == ["config.json"]
    assert Checkpoint.open(single / "model.safetensors").aux_files() == []

    other = tmp_path / "adapter"
    other.mkdir()
    save_file({"w": torch.ones(2)}, other / "weights.safetensors")
    assert Checkpoint.open(other).files == [other / "weights.safetensors"]


def error_of(path, label=None):
    with pytest.raises(MergeInputError) as e:
        Checkpoint.open(path, label=label)
    return str(e.value)


def test_missing_path_and_empty_directories(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nope", label="base")
    assert "'base'" in error_of(tmp_path / "nope", label="base")
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = error_of(empty)
    assert "no .safetensors" in msg and str(empty) in msg
    (empty / "pytorch_model.bin").write_bytes(b"x")
    msg = error_of(empty)
    assert "pytorch_model.bin" in msg and "onvert" in msg
    assert "onvert" in error_of(empty / "pytorch_model.bin")
    two = tmp_path / "two"
    two.mkdir()
    save_file({"a": torch.ones(1)}, two / "a.safetensors")
    save_file({"b": torch.ones(1)}, two / "b.safetensors")
    assert "model.safetensors.index.json" in error_of(two)


def test_truncated_files(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02\x03")
    msg = error_of(short, label="ft2")
    assert "ft2" in msg and str(short) in msg and "truncated" in msg

    lying = write_raw(tmp_path / "lying.safetensors", None, header_bytes=b"{}")
    data = lying.read_bytes()
    lying.write_bytes(struct.pack("<Q", 1000) + data[8:])
    msg = error_of(lying)
    assert str(lying) in msg and "truncated" in msg

    # A valid file cut short in the data: the last tensor's offsets point past the end.
    cut = tmp_path / "cut.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(100)}, cut)
    cut.write_bytes(cut.read_bytes()[:-10])
    msg = error_of(cut)
    assert str(cut) in msg and "'b'" in msg and "truncated" in msg


@pytest.mark.parametrize(
    "header_bytes, words",
    [
        (b"{not json", ["not valid JSON"]),
        (b"\xff\xfe{}", ["not valid JSON"]),
        (b"[1, 2]", ["not an object"]),
        (json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode(), ["'w'", "Q7"]),
        (json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(), ["'w'", "12 bytes"]),
        (json.dumps({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}).encode(), ["'w'", "shape"]),
        (json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}).encode(), ["'w'", "data_offsets"]),
        (json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(), ["'w'", "truncated"]),
        (json.dumps({"w": [1]}).encode(), ["'w'", "not an object"]),
        (json.dumps({"__metadata__": {"a": 1}}).encode(), ["__metadata__"]),
        (
            json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode(),
            ["'a'", "'b'", "overlap"],
        ),
    ],
)
def test_corrupt_headers(tmp_path, header_bytes, words):
    path = write_raw(tmp_path / "bad.safetensors", None, b"\0" * 12, header_bytes)
    msg = error_of(path, label="ft1")
    assert "ft1" in msg and str(path) in msg
    for word in words:
        assert word in msg


def test_bad_index(tmp_path):
    tensors = {"a": torch.ones(2), "b": torch.zeros(3)}
    model = make_sharded(tmp_path, tensors, 1)
    index = model / "model.safetensors.index.json"
    good = json.loads(index.read_text())

    index.write_text("{oops")
    msg = error_of(model)
    assert str(index) in msg and "not valid JSON" in msg

    index.write_text(json.dumps({"metadata": {}}))
    assert "weight_map" in error_of(model)

    index.write_text("[]")
    assert "not a JSON object" in error_of(model)

    index.write_text(json.dumps({"weight_map": {**good["weight_map"], "c": "model-00009-of-00009.safetensors"}}))
    msg = error_of(model)
    assert "model-00009-of-00009.safetensors" in msg and "does not exist" in msg

    index.write_text(json.dumps({"weight_map": {**good["weight_map"], "c": "model-00001-of-00002.safetensors"}}))
    msg = error_of(model, label="base")
    assert "'c'" in msg and "model-00001-of-00002.safetensors" in msg and "base" in msg

    # A broken shard is reported with its own path.
    index.write_text(json.dumps(good))
    shard = model / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:5])
    assert str(shard) in error_of(model)


def test_unknown_tensor_name(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "m.safetensors")
    ckpt = Checkpoint.open(tmp_path / "m.safetensors", label="base")
    with pytest.raises(MergeInputError, match="'base'.*'nope'"):
        ckpt.tensor("nope")


def test_read_header_and_info(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2, 3, dtype=torch.bfloat16)}, path, metadata={"format": "pt", "k": "v"})
    tensors, metadata = read_header(path)
    assert metadata == {"format": "pt", "k": "v"}
    info = tensors["w"]
    assert isinstance(info, TensorInfo)
    assert (info.dtype.torch, info.shape, info.nbytes, info.file) == (torch.bfloat16, (2, 3), 12, path)
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert info.offset == 8 + n


def test_release_keeps_views_valid(tmp_path):
    ref = torch.arange(100_000, dtype=torch.float32)
    save_file({"a": ref, "b": torch.ones(3)}, tmp_path / "m.safetensors")
    ckpt = Checkpoint.open(tmp_path / "m.safetensors")
    a = ckpt.tensor("a")
    assert torch.equal(a, ref)
    ckpt.release("a")  # pages leave the resident set; the view faults them back in
    assert torch.equal(a, ref) and torch.equal(ckpt.tensor("b"), torch.ones(3))


def test_flat_span_views_tensors_stored_back_to_back(tmp_path):
    from helpers import write_safetensors
    a, b = torch.arange(5, dtype=torch.float32), torch.arange(3, dtype=torch.float32) + 10
    c, h = torch.ones(2, 2, dtype=torch.float32), torch.zeros(4, dtype=torch.bfloat16)
    write_safetensors(tmp_path / "m.safetensors", {"a": a, "b": b, "c": c, "h": h})
    with Checkpoint.open(tmp_path / "m.safetensors") as ckpt:
        span = ckpt.flat_span(["a", "b", "c"])
        assert span is not None and torch.equal(span, torch.cat([a, b, c.reshape(-1)]))
        assert ckpt.flat_span(["a", "c"]) is None            # not adjacent: b lies between
        assert ckpt.flat_span(["b", "a"]) is None            # not in file order
        assert ckpt.flat_span(["c", "h"]) is None            # two dtypes
        ckpt.release_many(["a", "b", "c"])                   # pages go; a later read faults them back
        assert torch.equal(ckpt.tensor("b"), b)
