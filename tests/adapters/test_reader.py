"""adapters/format.py's own safetensors reader: the same tensors as safetensors' loader, for
every float dtype and alignment; the refusals safetensors itself makes (gaps, overlaps,
trailing bytes, unknown dtypes) made from the header alone; NaN/Inf found on every path."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from hotlora.adapters.errors import AdapterError
from hotlora.adapters.format import WEIGHTS_NAME, load_lora_adapter, read_header, read_tensors
from tests.adapters.conftest import BASE, valid_config, valid_tensors

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F64": torch.float64}


def _raw_file(path: Path, tensors: list[tuple[str, str, list[int], bytes]],
              header_pad: int = 0, trailing: bytes = b"") -> Path:
    """A safetensors file written by hand: (key, dtype, shape, bytes) in order, the header
    padded by header_pad spaces (safetensors pads to 8; other writers need not)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape, data in tensors:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode() + b" " * header_pad
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(t[3] for t in tensors)
                     + trailing)
    return path


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("pad", [0, 1, 2, 3, 5])
def test_every_float_dtype_and_alignment_reads_as_safetensors_does(tmp_path: Path,
                                                                   pad: int) -> None:
    gen = torch.Generator().manual_seed(pad)
    tensors = []
    for i, (name, dtype) in enumerate(DTYPES.items()):
        t = (torch.randn(3, 5, generator=gen) * 10).to(dtype)
        tensors.append((f"t{i}.{name}", name, [3, 5], _bytes(t)))
    # An odd-sized tensor in between shifts everything after it off alignment.
    tensors.insert(2, ("odd", "F16", [1], _bytes(torch.ones(1, dtype=torch.float16))))
    path = _raw_file(tmp_path / WEIGHTS_NAME, tensors, header_pad=pad)
    entries = read_header(path, "x")
    got = read_tensors(path, "x", entries)
    with safe_open(str(path), framework="pt") as f:
        for e in entries:
            want = f.get_tensor(e.key).to(torch.float32)
            assert got[e.key].dtype == torch.float32 and got[e.key].is_contiguous()
            assert torch.equal(got[e.key], want), e.key


def test_float32_tensors_are_views_of_one_mapping(tmp_path: Path) -> None:
    (tmp_path / WEIGHTS_NAME).write_bytes(save(valid_tensors(), metadata={"format": "pt"}))
    (tmp_path / "adapter_config.json").write_text(json.dumps(valid_config()))
    adapter = load_lora_adapter(tmp_path, name="x", base=BASE, max_rank=8)
    tensors = [t for m in adapter.modules for t in (m.A, m.B)]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1  # no per-tensor copy
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in tensors)


def _nan_at(dtype: str, where: int) -> list[tuple[str, str, list[int], bytes]]:
    out = []
    for i in range(3):
        t = torch.ones(4, 4)
        if i == where:
            t[2, 1] = float("nan") if i % 2 else float("-inf")
        out.append((f"k{i}", dtype, [4, 4], _bytes(t.to(DTYPES[dtype]))))
    return out


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F64"])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_a_non_finite_value_is_refused_naming_its_tensor(tmp_path: Path, dtype: str,
                                                         where: int) -> None:
    path = _raw_file(tmp_path / WEIGHTS_NAME, _nan_at(dtype, where))
    with pytest.raises(AdapterError, match="NaN or Inf") as info:
        read_tensors(path, "x", read_header(path, "x"))
    assert info.value.field == f"k{where}"


def test_only_the_tensors_asked_for_are_checked(tmp_path: Path) -> None:
    """A non-finite tensor outside the request (e.g. training state that is skipped) is not
    read; one inside it is found even though the request does not tile the file."""
    path = _raw_file(tmp_path / WEIGHTS_NAME, _nan_at("F32", 1))
    entries = {e.key: e for e in read_header(path, "x")}
    got = read_tensors(path, "x", [entries["k0"], entries["k2"]])
    assert set(got) == {"k0", "k2"}
    with pytest.raises(AdapterError, match="NaN or Inf"):
        read_tensors(path, "x", [entries["k0"], entries["k1"]])


def test_f64_beyond_float32_range_is_refused(tmp_path: Path) -> None:
    t = torch.full((2, 2), 1e300, dtype=torch.float64)
    path = _raw_file(tmp_path / WEIGHTS_NAME, [("big", "F64", [2, 2], _bytes(t))])
    with pytest.raises(AdapterError, match="NaN or Inf"):
        read_tensors(path, "x", read_header(path, "x"))


F32_16 = _bytes(torch.ones(4))


def _header_only(path: Path, header: dict[str, Any], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


HEADER_CASES: dict[str, tuple[dict[str, Any], bytes, str]] = {
    "gap": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
             "b": {"dtype": "F32", "shape": [4], "data_offsets": [20, 36]}}, b"\0" * 36,
            "does not start where"),
    "overlap": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                 "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24,
                "does not start where"),
    "not_from_zero": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [4, 20]}},
                      b"\0" * 20, "does not start where"),
    "trailing": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 20,
                 "cover 16 of the 20"),
    "unknown_dtype": ({"a": {"dtype": "F7", "shape": [4], "data_offsets": [0, 16]}},
                      b"\0" * 16, "unknown dtype"),
    "metadata": ({"__metadata__": {"format": 1}, "a": {"dtype": "F32", "shape": [4],
                                                       "data_offsets": [0, 16]}}, F32_16,
                 "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_header_refusals_safetensors_makes_come_from_the_header(tmp_path: Path,
                                                                case: str) -> None:
    header, data, match = HEADER_CASES[case]
    path = _header_only(tmp_path / WEIGHTS_NAME, header, data)
    with pytest.raises(AdapterError, match=match) as info:
        read_header(path, "x")
    assert info.value.field == WEIGHTS_NAME
    # safetensors' own loader refuses it too, in its own words.
    with pytest.raises(Exception), safe_open(str(path), framework="pt") as f:  # noqa: B017
        for k in f.keys():  # noqa: SIM118
            f.get_tensor(k)


def test_a_file_that_shrank_after_its_header_was_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / WEIGHTS_NAME
    path.write_bytes(save({"a": torch.ones(64)}))
    entries = read_header(path, "x")
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(AdapterError, match="header describes") as info:
        read_tensors(path, "x", entries)
    assert info.value.field == WEIGHTS_NAME


def test_non_float_entries_are_never_read(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / WEIGHTS_NAME,
                     [("i", "I32", [4], _bytes(torch.ones(4, dtype=torch.int32)))])
    with pytest.raises(AdapterError, match="dtype I32") as info:
        read_tensors(path, "x", read_header(path, "x"))
    assert info.value.field == "i"
