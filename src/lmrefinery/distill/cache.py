"""The teacher's top-k cache: binary shards (safetensors) plus a self-describing manifest.

    cache_dir/
      manifest.json              teacher, tokenizer fingerprint, vocab size, k, dtypes, example count,
                                 examples fingerprint, data config, per-shard checksums, concentrated-knowledge stats
      shard-00000.safetensors    ids [P, k] (uint16 when the vocabulary fits, else int32), logprobs [P, k] (fp16 or
                                 fp32), tail [P] (log of the mass outside the top-k), offsets [E + 1] (int64)
      shard-00000.json           that shard's checksum and statistics: its presence marks the shard complete

P counts the response positions of the shard's E examples (positions whose next token is supervised), in the order
of the examples and, within one, of the positions. Shards are read lazily, a slice at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmrefinery.data.tokenize import tokenizer_fingerprint
from lmrefinery.errors import UserError
from lmrefinery.fileio import atomic_write_json, atomic_write_text, file_sha256

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HISTOGRAM_BINS = 1000
STAT_KS = tuple(range(1, 11))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def vocabulary_fingerprint(tokenizer) -> str:
    """Of the token ↔ id map (added special tokens included): two tokenizers with equal fingerprints give every id
    the same meaning, whatever their chat templates."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def examples_fingerprint(examples) -> str:
    """Of the tokenised examples (ids and labels), so a cache is only used with exactly the data it was made from."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(np.asarray(example.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(example.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def id_dtype_for(vocab_size: int) -> torch.dtype:
    return torch.uint16 if vocab_size <= 65536 else torch.int32


class ConcentrationStats:
    """Cumulative top-k probability mass per response position, k = 1..10: running histograms (mergeable)."""

    def __init__(self, histograms: np.ndarray | None = None, sums: np.ndarray | None = None):
        self.histograms = histograms if histograms is not None else np.zeros((len(STAT_KS), HISTOGRAM_BINS),
                                                                             dtype=np.int64)
        self.sums = sums if sums is not None else np.zeros(len(STAT_KS), dtype=np.float64)

    def add(self, top_probs: torch.Tensor) -> None:
        """top_probs: [P, ≥10] sorted probabilities."""
        cumulative = top_probs[:, : len(STAT_KS)].double().cumsum(dim=-1).clamp(0, 1).cpu().numpy()
        bins = np.minimum((cumulative * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
        for column in range(cumulative.shape[1]):
            self.histograms[column] += np.bincount(bins[:, column], minlength=HISTOGRAM_BINS)
            self.sums[column] += cumulative[:, column].sum()

    def merge(self, other: "ConcentrationStats") -> None:
        self.histograms += other.histograms
        self.sums += other.sums

    def to_json(self) -> dict:
        """Sparse: per k, the [bin, count] pairs of the non-empty bins (a few dozen, not 1,000 zeros)."""
        return {"histograms": [[[int(b), int(c)] for b, c in zip(np.nonzero(row)[0], row[np.nonzero(row)[0]])]
                               for row in self.histograms], "sums": self.sums.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> "ConcentrationStats":
        histograms = np.zeros((len(STAT_KS), HISTOGRAM_BINS), dtype=np.int64)
        for row, pairs in zip(histograms, data["histograms"]):
            if pairs and not isinstance(pairs[0], list):  # dense rows (one count per bin): still read, so that
                # caches written in that form keep working
                row[:] = pairs
            for index, count in (pairs if pairs and isinstance(pairs[0], list) else []):
                row[index] = count
        return cls(histograms, np.asarray(data["sums"], dtype=np.float64))

    def summary(self) -> dict:
        """For k = 1..10: mean, median and 5th percentile of the top-k mass (percentiles to 1/1000)."""
        result = {}
        for column, k in enumerate(STAT_KS):
            counts = self.histograms[column]
            total = counts.sum()
            if total == 0:
                continue
            cumulative = np.cumsum(counts)
            quantile = lambda q: float((np.searchsorted(cumulative, q * total) + 0.5) / HISTOGRAM_BINS)  # noqa: E731
            result[str(k)] = {"mean": float(self.sums[column] / total), "median": quantile(0.5),
                              "p5": quantile(0.05)}
        return result


def write_shard(directory: Path, index: int, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor,
                offsets: torch.Tensor, first_example: int, stats: ConcentrationStats,
                provenance: dict | None = None) -> dict:
    """Write shard `index` atomically (tensor file, then its metadata file, each via a temporary name)."""
    name = shard_name(index)
    final = directory / f"{name}.safetensors"
    temporary = directory / f".{name}.tmp-shard"
    save_file({"ids": ids.contiguous(), "logprobs": logprobs.contiguous(), "tail": tail.contiguous(),
               "offsets": offsets.contiguous()}, str(temporary))
    temporary.replace(final)
    meta = {"file": final.name, "index": index, "first_example": first_example,
            "num_examples": int(offsets.numel() - 1), "positions": int(ids.shape[0]), "sha256": file_sha256(final),
            "provenance": provenance or {}, "stats": stats.to_json()}
    atomic_write_text(directory / f"{name}.json", json.dumps(meta, separators=(",", ":")) + "\n")
    return meta


def shard_provenance(teacher: str, k: int, shard_size: int, logprob_dtype: str, examples) -> dict:
    """What a shard must have been made with to be reused by a resumed teacher pass."""
    return {"teacher": teacher, "k": k, "shard_size": shard_size, "logprob_dtype": logprob_dtype,
            "examples_fingerprint": examples_fingerprint(examples)}


def write_manifest(directory: Path, *, teacher: str, tokenizer, vocab_size: int, k: int, logprob_dtype: str,
                   pool, data: dict, model: dict, provenance: dict | None = None) -> dict:
    """Collect the completed shards into manifest.json (after checking that every shard is there)."""
    shards = completed_shards(directory, provenance)
    position = 0
    for index in sorted(shards):  # contiguous, in order, covering every example exactly once
        if shards[index]["first_example"] != position:
            raise RuntimeError(f"{directory}: shard {index} starts at example {shards[index]['first_example']}, "
                               f"expected {position}")
        position += shards[index]["num_examples"]
    if position != len(pool.examples):
        raise RuntimeError(f"{directory}: shards cover {position} of {len(pool.examples)} examples")
    merged = ConcentrationStats()
    for meta in shards.values():
        merged.merge(ConcentrationStats.from_json(meta["stats"]))
    manifest = {
        "format_version": FORMAT_VERSION, "teacher": teacher,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "tokenizer_size": len(tokenizer),
        "vocab_size": int(vocab_size), "k": k, "id_dtype": str(id_dtype_for(vocab_size)).replace("torch.", ""),
        "logprob_dtype": logprob_dtype, "examples": len(pool.examples),
        "positions": sum(s["positions"] for s in shards.values()),
        "examples_fingerprint": examples_fingerprint(pool.examples), "sources": pool.names,
        "source_sizes": pool.sizes, "data": data, "model": model,
        "shards": [{key: value for key, value in shards[i].items() if key != "stats"} for i in sorted(shards)],
        "concentrated_knowledge": merged.summary()}
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def completed_shards(directory: Path, provenance: dict | None = None) -> dict[int, dict]:
    """Shards whose metadata exists, whose tensor file matches the recorded checksum and — when `provenance` is
    given — that were made by the same teacher, k, shard size and examples (others are recomputed on resume)."""
    done = {}
    for meta_path in sorted(directory.glob("shard-*.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):  # torn by a crash: the shard is simply not complete
            log.warning("%s: unreadable (torn by an interrupted write); its shard will be recomputed", meta_path)
            continue
        tensor_path = directory / meta["file"]
        if provenance is not None and meta.get("provenance") != provenance:
            continue
        if tensor_path.exists() and file_sha256(tensor_path) == meta["sha256"]:
            done[meta["index"]] = meta
    return done


class TeacherCache:
    """Read access to a finished cache: manifest checks, checksum verification, lazy per-example rows."""

    def __init__(self, directory: str | Path, verify: bool = True):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise UserError(f"{manifest_path}: no teacher cache here (run `lmrefinery teacher` first, or finish it "
                            f"with --resume)") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{manifest_path}: corrupt manifest ({exc})") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{manifest_path}: cache format {self.manifest.get('format_version')} is not "
                            f"{FORMAT_VERSION}; recreate it with this version of lmrefinery")
        self.shards = sorted(self.manifest["shards"], key=lambda s: s["first_example"])
        self.k = int(self.manifest["k"])
        if verify:
            self.verify()
        self._starts = [s["first_example"] for s in self.shards]

    def verify(self) -> None:
        for shard in self.shards:
            path = self.directory / shard["file"]
            if not path.exists():
                raise UserError(f"{path}: cache shard missing")
            if file_sha256(path) != shard["sha256"]:
                raise UserError(f"{path}: checksum mismatch (the shard is corrupt); delete it and its .json, then "
                                f"rerun `lmrefinery teacher --resume` to recompute it")

    def check_student_tokenizer(self, student_tokenizer, teacher_tokenizer) -> None:
        """A student reads the teacher's token ids directly, so its vocabulary must be the teacher's. Its chat
        template may differ or be absent (a base model, the paper's setting): the data is tokenised as the cache was."""
        if vocabulary_fingerprint(student_tokenizer) != vocabulary_fingerprint(teacher_tokenizer):
            student, teacher = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
            differing = sorted(t for t in set(student) | set(teacher) if student.get(t) != teacher.get(t))
            raise UserError(f"{self.directory / MANIFEST}: the student's tokenizer {student_tokenizer.name_or_path!r} "
                            f"has a different vocabulary from the teacher's ({len(differing)} tokens differ, e.g. "
                            f"{differing[:3]}); teacher and student must share token ids")

    def check_compatible(self, tokenizer, examples) -> None:
        """The tokenizer and the tokenised examples must be the ones the cache was made with."""
        where = self.directory / MANIFEST
        if self.manifest["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
            raise UserError(f"{where}: the cache was made with a different tokenizer than {tokenizer.name_or_path!r} "
                            f"(fingerprints differ); teacher and student must share the tokenizer")
        if self.manifest["examples_fingerprint"] != examples_fingerprint(examples):
            raise UserError(f"{where}: the training examples differ from those the cache was made from "
                            f"(data files, max_length, truncation or chat template changed)")

    def check_vocabulary(self, vocab_size: int) -> None:
        """The student's output layer must cover every id the teacher could have cached. Sizes may differ by padding
        rows (e.g. 152064 vs 151936 in one model family), so only a smaller vocabulary is an error."""
        needed = max(int(self.manifest["tokenizer_size"]), 1 + self.max_cached_id())
        if vocab_size < needed:
            raise UserError(f"{self.directory / MANIFEST}: the student's vocabulary ({vocab_size} rows) is smaller "
                            f"than the cache needs ({needed}: tokenizer size and largest cached id + 1)")

    def max_cached_id(self) -> int:
        return max(int(self._open(s["file"])[0].get_slice("ids")[:].to(torch.int64).max()) for s in self.shards)

    @lru_cache(maxsize=8)
    def _open(self, file: str):
        handle = safe_open(str(self.directory / file), framework="pt")
        return handle, handle.get_slice("offsets")[:].tolist()

    def rows(self, example: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [P, k] int64, logprobs [P, k] fp32, tail [P] fp32) of one example's response positions."""
        position = int(np.searchsorted(self._starts, example, side="right")) - 1
        shard = self.shards[position]
        local = example - shard["first_example"]
        if position < 0 or local >= shard["num_examples"]:
            raise IndexError(f"example {example} is not in the cache")
        handle, offsets = self._open(shard["file"])
        start, end = offsets[local], offsets[local + 1]
        ids = handle.get_slice("ids")[start:end].to(torch.int64)
        return ids, handle.get_slice("logprobs")[start:end].float(), handle.get_slice("tail")[start:end].float()

    def batch_rows(self, examples: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of several examples concatenated in order (the order of a boolean mask over [B, T])."""
        parts = [self.rows(e) for e in examples]
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))
