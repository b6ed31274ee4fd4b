"""Content identities of a tokenizer and a model, the inputs of every KV block hash chain's root.

``tokenizer_hash`` and ``model_fingerprint`` are SHA-256 hex digests of *content*, never of paths,
object ids or Python's salted ``hash()``: two processes (or hosts) that load the same files get the
same strings, and any change that could change a token id or a KV value changes them. Both end up in
``CacheIdentity`` (``block_hash.py``), so a rolling update's old and new versions can never share a
cached block.

Weight digests are expensive (GBs), so each file's SHA-256 is cached in a small JSON beside the
model, keyed by (name, size, mtime_ns), and recomputed when any of the three changes. When the
model's folder is not writable the cache lives under ``~/.cache/baton/fingerprints/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DIGEST_CACHE_NAME = ".baton_digests.json"
# Keys that describe where or with what a config was saved, not what the model computes.
_CONFIG_IGNORED_KEYS = frozenset({"_name_or_path", "transformers_version", "_commit_hash"})
# Python-side tokenizer flags that change ids or decoded text outside the backend's JSON.
_TOKENIZER_FLAGS = (
    "add_bos_token",
    "add_eos_token",
    "add_prefix_space",
    "clean_up_tokenization_spaces",
    "legacy",
    "do_lower_case",
    "split_special_tokens",
)


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _field(h: Any, label: str, data: bytes) -> None:
    """Length-prefixed, labelled update so no two different inputs serialize alike."""
    tag = label.encode()
    h.update(len(tag).to_bytes(4, "little") + tag + len(data).to_bytes(8, "little") + data)


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def _backend_json(tokenizer: Any) -> dict[str, Any] | None:
    """The tokenizers-library JSON (vocab, merges, added tokens, normalizer, pre-tokenizer, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "to_str") and hasattr(tokenizer, "encode_batch"):
        backend = tokenizer  # a bare ``tokenizers.Tokenizer``
    if backend is None:
        return None
    doc = json.loads(backend.to_str())
    # Truncation/padding are call-time settings the library stores on the object, not tokenization.
    doc.pop("truncation", None)
    doc.pop("padding", None)
    return doc


def _saved_files_json(tokenizer: Any) -> dict[str, Any]:
    """Fallback for slow tokenizers: the content of the files ``save_pretrained`` writes."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="baton-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            data = path.read_bytes()
            if path.suffix == ".json":
                doc = json.loads(data)
                if isinstance(doc, dict):
                    doc.pop("name_or_path", None)
                out[path.name] = doc
            else:
                out[path.name] = hashlib.sha256(data).hexdigest()
    return out


def tokenizer_hash(tokenizer: Any) -> str:
    """SHA-256 hex over a tokenizer's canonical content.

    Covers the backend JSON (vocab, merges, added/special tokens, normalizer, pre-tokenizer,
    post-processor, decoder), the chat template, the special-tokens map and the Python-side flags
    that change ids. Accepts an HF fast tokenizer, a bare ``tokenizers.Tokenizer``, or (fallback)
    any tokenizer with ``save_pretrained``.
    """
    h = hashlib.sha256(b"baton-tokenizer-v1")
    backend = _backend_json(tokenizer)
    if backend is not None:
        _field(h, "backend", _canonical_json(backend))
    elif hasattr(tokenizer, "save_pretrained"):
        _field(h, "files", _canonical_json(_saved_files_json(tokenizer)))
    else:
        raise ValueError(f"cannot hash tokenizer of type {type(tokenizer).__name__}")
    _field(h, "chat_template", _canonical_json(getattr(tokenizer, "chat_template", None)))
    special = getattr(tokenizer, "special_tokens_map", None) or {}
    _field(h, "special_tokens", _canonical_json({k: str(v) for k, v in dict(special).items()}))
    init_kwargs = getattr(tokenizer, "init_kwargs", None) or {}
    flags = {}
    for name in _TOKENIZER_FLAGS:
        value = init_kwargs.get(name, getattr(tokenizer, name, None))
        if isinstance(value, bool | int | str) or value is None:
            flags[name] = value
    _field(h, "flags", _canonical_json(flags))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


def default_fingerprint_cache_dir() -> Path:
    return Path.home() / ".cache" / "baton" / "fingerprints"


def _weight_files(model_path: Path) -> tuple[Path, list[Path]]:
    """(folder holding the digest cache, weight files); a single file (one GGUF) is its own list."""
    if model_path.is_file():
        return model_path.parent, [model_path]
    files = [
        p
        for p in sorted(model_path.rglob("*"))
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith(".")
    ]
    return model_path, files


def _cache_locations(folder: Path, fallback_dir: Path) -> tuple[Path, Path]:
    """(beside the model, fallback under the user's cache keyed by the folder's absolute path)."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
    return folder / DIGEST_CACHE_NAME, fallback_dir / f"{key}.json"


def _load_cache(paths: tuple[Path, Path]) -> dict[str, dict[str, Any]]:
    for path in paths:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("files"), dict):
            return doc["files"]
    return {}


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".baton-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, sort_keys=True, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _store_cache(paths: tuple[Path, Path], files: dict[str, dict[str, Any]]) -> Path | None:
    doc = {"version": 1, "files": files}
    for path in paths:
        try:
            _write_json_atomic(path, doc)
            return path
        except OSError:
            continue
    return None  # read-only everywhere: digests are recomputed next time, still correct


def file_digests(
    model_path: str | os.PathLike[str], *, cache_dir: Path | None = None
) -> dict[str, str]:
    """SHA-256 hex of each weight file (relative name -> digest), served from the on-disk cache when
    the file's (size, mtime_ns) still match the cached record."""
    folder, files = _weight_files(Path(model_path))
    locations = _cache_locations(folder, cache_dir or default_fingerprint_cache_dir())
    cached = _load_cache(locations)
    fresh: dict[str, dict[str, Any]] = {}
    changed = False
    for path in files:
        name = path.relative_to(folder).as_posix()
        st = path.stat()
        rec = cached.get(name)
        if rec and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
            fresh[name] = rec
            continue
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        fresh[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        changed = True
    if changed:
        # Keep records of files of the same folder we were not asked about (another file of a GGUF
        # folder).
        _store_cache(locations, {**cached, **fresh})
    return {name: rec["sha256"] for name, rec in fresh.items()}


def canonical_config(model_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """config.json without save-time bookkeeping keys; None when there is none (a bare GGUF)."""
    path = Path(model_path)
    config = path / "config.json" if path.is_dir() else None
    if config is None or not config.is_file():
        return None
    doc = json.loads(config.read_text())
    return {k: v for k, v in doc.items() if k not in _CONFIG_IGNORED_KEYS}


def model_fingerprint(
    model_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    dummy_seed: int | None = None,
    cache_dir: Path | None = None,
) -> str:
    """SHA-256 hex over the canonical config.json and the weight files' digests (by relative name).

    ``revision`` (an immutable hub commit) stands in for the weight digests. ``dummy_seed`` marks a
    model run with random weights: the fingerprint covers config + "dummy" + seed, so two runs with
    the same seed share blocks and a real checkpoint never does. A folder without config.json or
    weights is an error, not an empty hash.
    """
    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    config = canonical_config(path)
    h = hashlib.sha256(b"baton-model-v1")
    _field(h, "config", _canonical_json(config))
    if dummy_seed is not None:
        if config is None:
            raise ValueError(f"dummy weights need a config.json in {path}")
        _field(h, "weights", b"dummy")
        _field(h, "seed", str(int(dummy_seed)).encode())
        return h.hexdigest()
    if revision is not None:
        _field(h, "revision", revision.encode())
        return h.hexdigest()
    digests = file_digests(path, cache_dir=cache_dir)
    if not digests:
        raise ValueError(
            f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {path}; "
            "pass dummy_seed for a dummy-weight model or revision for a hub commit"
        )
    if path.is_file():  # one self-contained file (GGUF): its name is a path detail, not content
        digests = {"<file>": next(iter(digests.values()))}
    _field(h, "weights", _canonical_json(digests))
    return h.hexdigest()
