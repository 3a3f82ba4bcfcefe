"""The partition's tf-idf encoder is stored as plain arrays: it round-trips exactly, and a crafted
file cannot run code (no pickle anywhere in moescope's source)."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from moescope.errors import MoescopeError
from moescope.partition.embedding import TfidfSvdEncoder

TEXTS = ["def add(a, b): return a + b", "the river flows north to the sea", "12 * 3 = 36 answer 36",
         "def rev(s): return s[::-1]", "paris lies on the seine", "half of 50 is 25"] * 2


@pytest.mark.parametrize("dim", [4, 128])  # 128 > terms: SVD reduced to what the corpus allows
def test_round_trip_is_exact(tmp_path, dim):
    enc = TfidfSvdEncoder.fit(TEXTS, dim=dim, seed=0)
    enc.save(tmp_path / "e.npz")
    again = TfidfSvdEncoder.load(tmp_path / "e.npz")
    new = ["a river and a sea", "def add(x): return x", "unseen words only"]
    np.testing.assert_array_equal(again.encode(new), enc.encode(new))
    np.testing.assert_array_equal(again.encode(TEXTS), enc.encode(TEXTS))


def test_degenerate_encoders_round_trip(tmp_path):
    for texts in (["", "  "], ["word"]):  # no vocabulary at all; one word (no SVD step)
        enc = TfidfSvdEncoder.fit(texts, dim=8)
        enc.save(tmp_path / "e.npz")
        again = TfidfSvdEncoder.load(tmp_path / "e.npz")
        np.testing.assert_array_equal(again.encode(["word", "x"]), enc.encode(["word", "x"]))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_crafted_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "code_ran"
    crafted = tmp_path / "encoder.npz"
    crafted.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(MoescopeError, match="encoder.npz: not a tf-idf encoder"):
        TfidfSvdEncoder.load(crafted)
    # an .npz whose arrays are pickled objects is refused too (allow_pickle=False)
    buf = io.BytesIO()
    np.savez(buf, meta=np.array([_Payload(marker)], dtype=object))
    crafted.write_bytes(buf.getvalue())
    with pytest.raises(MoescopeError, match="not a tf-idf encoder"):
        TfidfSvdEncoder.load(crafted)
    assert not marker.exists()


def test_foreign_parameters_are_refused(tmp_path):
    enc = TfidfSvdEncoder.fit(TEXTS, dim=4)
    enc.save(tmp_path / "e.npz")
    with np.load(tmp_path / "e.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["meta"] = np.array(str(arrays["meta"]).replace('"lowercase"', '"tokenizer"'))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (tmp_path / "e.npz").write_bytes(buf.getvalue())
    with pytest.raises(MoescopeError, match="unexpected vectorizer parameters"):
        TfidfSvdEncoder.load(tmp_path / "e.npz")


def test_no_pickle_in_moescope_source():
    src = Path(__file__).resolve().parents[1] / "src" / "moescope"
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py")
                 if re.search(r"^\s*(import pickle|from pickle|import cloudpickle|import dill)|pickle\.loads?\(",
                              p.read_text(encoding="utf-8"), re.M)]
    assert offenders == []
    mine = [*sorted((src / "embed").rglob("*.py")), src / "partition" / "embedding.py", src / "commands" / "embed.py"]
    for path in mine:
        text = path.read_text(encoding="utf-8")
        assert "weights_only=False" not in text and "trust_remote_code=True" not in text, path
