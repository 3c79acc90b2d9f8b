"""`mnemo data verify` and `mnemo data inspect`: check and look at a prepared dataset.

verify first checks the tokenizer copy against manifest.json's sha256 and the
manifest's vocab_size against that tokenizer (check_vocab_size, training's
check too). Then it opens every shard named by index.json and checks, in order: the file
exists and has the size index.json records, its hashes match, it decompresses
to the recorded raw size and hashes, its sample count and offsets agree with
the index, and every sample decodes to tokens of the manifest's dtype that
end with EOS and stay below the vocabulary size. Then the totals (documents
per part, tokens) are checked against manifest.json. The first problem raises DataError naming the shard.

Over 500 lines: verify, inspect, evaluation's reader and training's pre-start check share one set of
checks of a dataset dir (shard entries, columns, samples, totals, the tokenizer copy); kept in one module
so that each check has one implementation the readers cannot drift from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from mnemo.data_pipeline.errors import DataError, brief, visible
from mnemo.data_pipeline.files import MAX_JSON_BYTES, NotRegularFile, load_json, not_a_regular_file, open_regular
from mnemo.data_pipeline.lean_imports import import_streaming
from mnemo.data_pipeline.paths import not_a_directory
from mnemo.data_pipeline.split import filler_documents, heldout_mask, train_only_from


def read_json_file(path: str, what: str, limit: int = MAX_JSON_BYTES) -> dict:
    """The JSON object in ``path``, a regular file of at most ``limit`` bytes; else DataError naming it."""
    try:
        obj = load_json(path, limit)
    except FileNotFoundError:
        raise DataError(f"{path}: missing ({what})") from None
    except NotRegularFile as e:  # a directory, FIFO (never waited on), device, or too big
        raise DataError(f"{path}: {e} ({what})") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable {what} ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a JSON object ({what})")
    return obj


@contextmanager
def _well_formed(data_dir: str) -> Iterator[None]:
    """A field of index.json or manifest.json missing or of the wrong type is a DataError, not a traceback."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise DataError(
            f"{data_dir}: index.json or manifest.json is malformed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def read_manifest(data_dir: str) -> dict:
    """manifest.json of a dataset written by `mnemo prepare` (DataError if absent)."""
    # os.path.isdir says False for a file, a FIFO or a folder it may not look into: all were "no such directory".
    try:
        why = not_a_directory(data_dir)
    except OSError as e:
        why = f"data dir {data_dir}: {e.strerror or e}"
    if why is not None:
        raise DataError(why)
    m = read_json_file(os.path.join(data_dir, "manifest.json"), "dataset manifest (written by mnemo prepare)")
    for key in ("tokenizer_sha256", "vocab_size", "eos_id", "token_dtype", "num_documents", "num_tokens"):
        if key not in m:
            raise DataError(f"{data_dir}/manifest.json: no {key!r} (not written by mnemo prepare?)")
    return m


def check_vocab_size(manifest: dict, manifest_path: str, tokenizer_vocab: int, tokenizer: str) -> int:
    """``manifest``'s vocab_size (the model's vocabulary: the trainer sizes its embedding by it) when it is a whole
    number >= 1 equal to ``tokenizer_vocab``, the vocab size of ``tokenizer`` (the run's, or the dataset's copy);
    else DataError naming ``manifest_path``. The one check of train's pre-start check and of verify and inspect
    (which said OK for 10**12 and 1e3, where training refused both)."""
    vocab = manifest["vocab_size"]
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise DataError(f"{manifest_path}: vocab_size is {brief(vocab)}, not a whole number >= 1")
    if vocab != tokenizer_vocab:
        raise DataError(
            f"{manifest_path}: vocab_size {vocab} is not the vocab size {tokenizer_vocab} of the tokenizer {tokenizer}"
        )
    return vocab


def dataset_train_only(data_dir: str) -> int:
    """The samples of local dataset ``data_dir`` never held out (split.train_only_from its manifest.json; 0
    without one: an MDS dir not written by mnemo prepare holds no passkey documents of ours)."""
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.lexists(path):  # a manifest that is no regular file is read_json_file's one-line error
        return 0
    return train_only_from(read_json_file(path, "the dataset's manifest"), path)


def dataset_train_documents(data_dir: str, val_fraction: float) -> int:
    """The training documents of local dataset ``data_dir`` at ``val_fraction``: the samples of its index.json
    less those the split holds out (split.heldout_mask, as the training streams count them)."""
    num_samples = sum(shard["samples"] for shard in check_index(data_dir))
    return int((~heldout_mask(num_samples, val_fraction, dataset_train_only(data_dir))).sum())


def other_tokenizer(manifest: dict, tokenizer_sha256: str | None) -> str | None:
    """The sha256 of the tokenizer the data was made with, when it is not ``tokenizer_sha256``; else None.

    Unknown on either side (an older manifest, a tokenizer object without a
    hash) is no mismatch. Callers raise, naming the setting at fault.
    """
    want = manifest.get("tokenizer_sha256")
    if want and tokenizer_sha256 and want != tokenizer_sha256:
        return want
    return None


def read_shard(data_dir: str, shard: dict) -> tuple[str, bytes]:
    """(name, raw bytes) of one shard after the size/hash/decompression checks; DataError naming the shard.

    Also training's diagnosis of a shard that streaming failed to read (streams.MDSSource).
    """
    import_streaming()  # without transformers (lean_imports.py)
    from streaming.base.compression import decompress
    from streaming.base.hashing import get_hash

    check_shard_entry(shard, os.path.join(data_dir, "index.json"))
    zinfo, rinfo = shard.get("zip_data"), shard["raw_data"]
    info = zinfo or rinfo
    name = info["basename"]
    path = os.path.join(data_dir, name)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            # The size first: a replaced file is never read into memory whole.
            data = f.read(info["bytes"] + 1) if size == info["bytes"] else b""
    except FileNotFoundError:
        raise DataError(f"shard {name}: missing") from None
    except NotRegularFile as e:  # a FIFO is refused, never waited on
        raise DataError(f"shard {name}: {e}") from None
    except OSError as e:
        raise DataError(f"shard {name}: cannot be read ({e.strerror or e})") from None
    if size != info["bytes"] or len(data) != info["bytes"]:
        raise DataError(f"shard {name}: {size} bytes, index.json says {info['bytes']} (truncated or replaced)")
    for algo, want in (info.get("hashes") or {}).items():
        if get_hash(algo, data) != want:
            raise DataError(f"shard {name}: {algo} does not match index.json (corrupted)")
    if zinfo:
        try:
            data = decompress(shard["compression"], data)
        except Exception as e:  # zstd/gzip/... each raise their own error type
            raise DataError(f"shard {name}: does not decompress ({e}) (corrupted)") from None
        if len(data) != rinfo["bytes"]:
            raise DataError(f"shard {name}: decompresses to {len(data)} bytes, index.json says {rinfo['bytes']}")
        for algo, want in (rinfo.get("hashes") or {}).items():
            if get_hash(algo, data) != want:
                raise DataError(f"shard {name}: decompressed {algo} does not match index.json (corrupted)")
    return name, data


# A shard's file name in index.json: what streaming's MDS writer names them ("shard.00000.mds", ".zstd" beside
# it), under the part dir the merged index puts in front ("part-00000/"). Each '/'-separated component starts
# with a letter, digit or '_' (no '..', no absolute path, no hidden name) and holds no other separator.
_SHARD_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}\Z")


def _shard_name(name: Any, index_path: str) -> str:
    """``name`` when it is a shard file name of the kind an MDS index holds; else DataError naming ``index_path``.

    index.json is data someone may have sent: a name that is absolute or climbs out with '..' would
    have verify and evaluation read a file outside the dataset dir.
    """
    if not (isinstance(name, str) and all(_SHARD_NAME_PART.match(p) for p in name.split("/"))):
        raise DataError(
            f"{index_path}: shard file name {brief(name)} is not a relative name inside the dataset dir "
            f"(like part-00000/shard.00000.mds.zstd)"
        )
    return name


def _index_count(entry: dict, key: str, where: str) -> int:
    """``entry[key]``, a whole number >= 0 (not a bool, a string or a float); else DataError naming the field."""
    v = entry.get(key)
    if type(v) is not int or v < 0:
        raise DataError(f"{where}: field {key!r} is {brief(v)}, not a whole number >= 0")
    return v


def check_shard_entry(shard: Any, index_path: str) -> None:
    """DataError naming ``index_path`` unless ``shard`` (an entry of its "shards") has files named like an MDS
    shard's (_shard_name) and whole-number sizes and sample count: checked before any file of it is opened."""
    if not (isinstance(shard, dict) and isinstance(shard.get("raw_data"), dict)):
        raise DataError(f"{index_path}: a shard entry is {brief(shard)}, not an object with 'raw_data'")
    for info in (shard.get("zip_data"), shard["raw_data"]):
        if info is not None:
            if not isinstance(info, dict):
                raise DataError(f"{index_path}: a shard's 'zip_data' is {brief(info)}, not an object")
            name = _shard_name(info.get("basename"), index_path)
            _index_count(info, "bytes", f"{index_path}: shard {name}")
    _index_count(shard, "samples", f"{index_path}: shard {shard['raw_data']['basename']}")


def check_index(data_dir: str) -> list[dict[str, Any]]:
    """The shard entries of ``data_dir``/index.json; DataError unless it is an MDS index whose entries pass
    check_shard_entry.

    For readers that hand the dataset to streaming (training): it opens, and may decompress into, the
    files an index names, under whatever names it holds.
    """
    path = os.path.join(data_dir, "index.json")
    shards = read_json_file(path, "the merged shard index").get("shards")
    if not isinstance(shards, list):
        raise DataError(f"{path}: 'shards' is {brief(shards)}, not a list (not an MDS index)")
    for shard in shards:
        check_shard_entry(shard, path)
        check_columns(f"{path}: shard {shard['raw_data']['basename']}", shard)
    return shards


def check_sample_total(data_dir: str, shards: list[dict[str, Any]]) -> None:
    """DataError unless the samples of ``shards`` (data_dir's index.json entries, checked by check_index) add up
    to manifest.json's num_documents, where data_dir has a manifest that records it (an MDS dir of another
    writer has none). No shard is read: a shard listed twice had training read each of its documents twice
    per epoch, which only verify's full read found."""
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.lexists(path):  # a manifest that is no regular file is read_json_file's one-line error
        return
    want = read_json_file(path, "the dataset's manifest").get("num_documents")
    got = sum(shard["samples"] for shard in shards)
    if type(want) is int and got != want:
        raise DataError(
            f"{os.path.join(data_dir, 'index.json')}: its shards hold {got} samples, manifest.json says {want} "
            "documents (a shard listed twice, or the index of another dataset)"
        )


# MDS column encodings whose decoder runs code from the file (streaming's "pkl" unpickles each value).
CODE_ENCODINGS = frozenset({"pkl"})


def refuse_code_columns(where: str, names: Any, encodings: Any) -> None:
    """DataError naming the first column of a shard (``where``) whose encoding would run code when read.

    mnemo writes tokens, strings and integers (``manifest.columns``); a dataset dir is data someone
    may have sent, so a shard that asks to be unpickled is refused before any sample of it is decoded.
    streaming's StreamingDataset (training) refuses these itself; its MDSReader, read directly here
    (``mnemo data verify``, evaluation's reader), does not.
    """
    for name, enc in zip(names or [], encodings or []):
        if str(enc).split(":")[0] in CODE_ENCODINGS:
            raise DataError(f"{where}: column {name!r} is encoded as {enc!r}, which runs code when read: refused")


def check_columns(where: str, shard: dict) -> None:
    """DataError naming a shard (``where``) whose columns (of its index entry ``shard``) would run code when read
    (refuse_code_columns) or hold no ``tokens`` column, the one every reader of a sample reads (was a KeyError
    traceback in each training rank and in `mnemo eval --data`). Checked before any sample is decoded; an entry
    without column_names (no MDS writer's) is left to its reader."""
    names, encodings = shard.get("column_names"), shard.get("column_encodings")
    refuse_code_columns(where, names, encodings)
    if names is not None and (not isinstance(names, list) or "tokens" not in names):
        raise DataError(f"{where}: no 'tokens' column (columns: {brief(names)}; not written by mnemo prepare?)")


def check_sample_count(name: str, n: int, shard: dict, index_path: str = "index.json") -> None:
    """DataError naming shard ``name`` unless the ``n`` samples its file holds are the count its index entry
    (``shard``, of ``index_path``) records: training takes that count on trust (fewer lost documents silently,
    0 was streaming's "Stream contains no samples", 10**12 an allocation of its sample table)."""
    if n != shard["samples"]:
        raise DataError(f"shard {name}: holds {n} samples, {index_path} says {shard['samples']}")


def _header_stream(f, compression: str):
    """A reader of the decompressed bytes of the open compressed shard ``f``, or None for an algorithm read only
    whole (br, snappy). Decoded as a stream: the sample count comes first, so one block is decompressed."""
    algo = compression.split(":")[0]
    if algo == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(f)
    if algo == "gz":
        import gzip

        return gzip.GzipFile(fileobj=f)
    if algo == "bz2":
        import bz2

        return bz2.BZ2File(f)
    return None


def check_shard_header(data_dir: str, shard: dict, index_path: str = "index.json") -> None:
    """``check_sample_count`` of one shard (checked by check_shard_entry) of local ``data_dir`` without reading it
    whole: the count in its MDS header (the first 4 bytes) of the file training reads, its compressed one
    (decompressed as a stream) where index.json lists one, else its raw one. Nothing is checked for a file that
    is missing (the caller names it) or compressed with br or snappy (read only whole). DataError naming the
    shard for a file that ends before its header or does not decompress."""
    zinfo, rinfo = shard.get("zip_data"), shard["raw_data"]
    for info in (zinfo, rinfo):
        if info is None:
            continue
        name = info["basename"]
        try:
            with open_regular(os.path.join(data_dir, name)) as f:
                reader = _header_stream(f, str(shard.get("compression") or "")) if info is zinfo else f
                if reader is None:
                    return
                head = b""
                while len(head) < 4 and (more := reader.read(4 - len(head))):
                    head += more
        except FileNotFoundError:
            continue
        except NotRegularFile as e:
            raise DataError(f"shard {name}: {e}") from None
        except Exception as e:  # zstd/gzip/bz2 each raise their own error type; an OSError
            raise DataError(f"shard {name}: does not decompress or cannot be read ({e}) (corrupted)") from None
        if len(head) < 4:
            raise DataError(f"shard {name}: too short to hold a sample count")
        check_sample_count(name, int.from_bytes(head, "little"), shard, index_path)
        return


def iter_shard_samples(data_dir: str, index: dict) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(shard name, part, sample dict) of every sample in index order, checking each shard first."""
    import_streaming()  # without transformers (lean_imports.py)
    from streaming.base.format.mds.reader import MDSReader

    for shard in index.get("shards", []):
        name, raw = read_shard(data_dir, shard)
        check_columns(f"shard {name}", shard)
        if len(raw) < 4:
            raise DataError(f"shard {name}: too short to hold a sample count")
        n = int(np.frombuffer(raw, np.uint32, 1)[0])
        check_sample_count(name, n, shard)
        offsets = np.frombuffer(raw, np.uint32, n + 1, offset=4).astype(np.int64)
        if offsets[-1] != len(raw) or (np.diff(offsets) < 0).any():
            raise DataError(f"shard {name}: sample offsets are inconsistent (corrupted)")
        obj = {k: v for k, v in shard.items()}
        reader = MDSReader.from_json(data_dir, None, obj)
        for i in range(n):
            try:
                sample = reader.decode_sample(raw[offsets[i] : offsets[i + 1]])
            except Exception as e:  # a damaged sample can fail anywhere inside the decoder
                raise DataError(f"shard {name}: sample {i} does not decode ({e})") from None
            yield name, i, sample


def verify(data_dir: str, roundtrip_docs: int = 0) -> dict:
    """Check every shard and the totals; DataError naming the first bad shard. Returns a report.

    ``roundtrip_docs`` > 0: also read up to that many documents of the corpus
    again (when its inputs are unchanged) and count those the tokenizer does
    not give back byte for byte (``report["roundtrip"]``; a count, not an error).
    """
    with _well_formed(data_dir):
        rep = _verify(data_dir)
        if roundtrip_docs > 0:
            rep["roundtrip"] = _round_trip(data_dir, roundtrip_docs)
        return rep


def _round_trip(data_dir: str, max_docs: int) -> dict:
    from mnemo.data_pipeline.tokenizer import Tokenizer, corpus_round_trip, find_tokenizer_file

    m = read_manifest(data_dir)
    return corpus_round_trip(
        Tokenizer(find_tokenizer_file(data_dir)),
        m["inputs"],
        m.get("text_field") or "text",
        m.get("id_field"),
        m.get("max_doc_bytes"),
        max_docs=max_docs,
    )


def _tokenizer_copy(data_dir: str, manifest: dict) -> str:
    """The path of the tokenizer copy of ``data_dir``, a regular file whose sha256 is ``manifest``'s; else
    DataError naming it. What verify checks, and inspect before it decodes with it (a copy swapped for
    another tokenizer printed garbage, exit 0)."""
    from mnemo.data_pipeline.tokenizer import file_sha256, find_tokenizer_file

    tok_path = find_tokenizer_file(data_dir)
    why = not_a_regular_file(tok_path)
    if why == "no such file":
        raise DataError(f"{tok_path}: missing (the tokenizer copy)")
    if why is not None:  # a directory; a FIFO, never opened (it would wait forever)
        raise DataError(f"tokenizer {tok_path}: {why}")
    try:
        sha = file_sha256(tok_path)
    except OSError as e:  # replaced since the look above, or unreadable
        raise DataError(f"tokenizer {tok_path}: cannot be read ({e.strerror or e})") from None
    if sha != manifest["tokenizer_sha256"]:
        raise DataError(f"{tok_path}: sha256 differs from manifest.json")
    return tok_path


def _dataset_tokenizer(data_dir: str, manifest: dict) -> tuple[Any, int]:
    """(the tokenizer copy of ``data_dir``, loaded; manifest.json's vocab_size): the copy the one the manifest
    names (_tokenizer_copy), the vocab size its (check_vocab_size). DataError naming the file otherwise."""
    from mnemo.data_pipeline.tokenizer import Tokenizer

    path = _tokenizer_copy(data_dir, manifest)
    tok = Tokenizer(path)
    return tok, check_vocab_size(manifest, os.path.join(data_dir, "manifest.json"), tok.vocab_size, path)


def _verify(data_dir: str) -> dict:
    manifest = read_manifest(data_dir)
    index = read_json_file(os.path.join(data_dir, "index.json"), "the merged shard index")
    dtype = np.dtype(manifest["token_dtype"])
    eos, vocab = int(manifest["eos_id"]), _dataset_tokenizer(data_dir, manifest)[1]
    docs = tokens = 0
    per_part: dict[str, int] = {}
    for name, i, s in iter_shard_samples(data_dir, index):
        t = _sample_tokens(name, i, s, dtype, vocab)
        if int(t[-1]) != eos:
            raise DataError(f"shard {name}: sample {i} does not end with EOS ({eos})")
        docs += 1
        tokens += t.size
        part = name.split("/")[0]
        per_part[part] = per_part.get(part, 0) + 1
    for p in manifest.get("parts", []):
        got = per_part.get(p["name"], 0)
        if got != p["documents"]:
            raise DataError(f"part {p['name']}: {got} samples in its shards, manifest.json says {p['documents']}")
    if docs != manifest["num_documents"]:
        raise DataError(f"{data_dir}: {docs} samples in the shards, manifest.json says {manifest['num_documents']}")
    if tokens != manifest["num_tokens"]:
        raise DataError(f"{data_dir}: {tokens} tokens in the shards, manifest.json says {manifest['num_tokens']}")
    filler_documents(manifest, os.path.join(data_dir, "manifest.json"))  # the split reads it: a bad one is refused
    return {
        "data_dir": data_dir,
        "ok": True,
        "shards": len(index.get("shards", [])),
        "documents": docs,
        "tokens": tokens,
    }


def _sample_tokens(name: str, i: int, sample: dict[str, Any], dtype: np.dtype, vocab: int) -> np.ndarray:
    """The tokens of sample ``i`` of shard ``name``: 1-D, of ``dtype``, not empty, each id below ``vocab``; else
    DataError naming the shard, the sample and the id (inspect decoded them: the tokenizer's IndexError)."""
    t = sample.get("tokens")
    if not isinstance(t, np.ndarray) or t.dtype != dtype or t.ndim != 1 or t.size == 0:
        raise DataError(f"shard {name}: sample {i} has no 1-D {dtype} tokens")
    if int(t.max()) >= vocab:
        raise DataError(f"shard {name}: sample {i} has token id {int(t.max())} >= vocab size {vocab}")
    return t


def inspect(data_dir: str, num_samples: int = 3, max_chars: int = 300) -> dict:
    """Counts, token-length percentiles and histogram, and a few decoded documents."""
    with _well_formed(data_dir):
        return _inspect(data_dir, num_samples, max_chars)


def _inspect(data_dir: str, num_samples: int, max_chars: int) -> dict:
    manifest = read_manifest(data_dir)
    index = read_json_file(os.path.join(data_dir, "index.json"), "the merged shard index")
    tok, vocab = _dataset_tokenizer(data_dir, manifest)
    lengths: list[int] = []
    samples: list[dict] = []
    passkey = 0
    dtype = np.dtype(manifest["token_dtype"])
    for name, i, s in iter_shard_samples(data_dir, index):
        t = _sample_tokens(name, i, s, dtype, vocab)
        lengths.append(int(t.size))
        if s.get("source") == "passkey":
            passkey += 1
        if len(samples) < num_samples:
            text = tok.decode(t[:-1])
            samples.append(
                {
                    "doc_id": s["doc_id"],
                    "source": s["source"],
                    "tokens": int(t.size),
                    "text": text[:max_chars] + ("..." if len(text) > max_chars else ""),
                }
            )
    arr = np.asarray(lengths, dtype=np.int64)
    # To one decimal, as the mean: int() cut p50 of documents of 2 and 7 tokens to 4 beside a mean of 4.5. A whole
    # value stays an int in --json, as before.
    pct = {f"p{q}": _whole_or_tenth(np.percentile(arr, q)) if arr.size else 0 for q in (0, 10, 50, 90, 99, 100)}
    hist: list[tuple[int, int, int]] = []
    if arr.size:
        top = int(np.ceil(np.log2(max(2, arr.max() + 1))))
        edges = [0] + [1 << k for k in range(1, top + 1)]
        counts, _ = np.histogram(arr, bins=edges)
        hist = [(edges[k], edges[k + 1], int(c)) for k, c in enumerate(counts) if c]
    return {
        "data_dir": data_dir,
        "documents": int(arr.size),
        "passkey_documents": passkey,
        "tokens": int(arr.sum()) if arr.size else 0,
        "vocab_size": manifest["vocab_size"],
        "token_dtype": manifest["token_dtype"],
        "shards": len(index.get("shards", [])),
        "skipped": manifest.get("skipped", {}),
        "repaired": manifest.get("repaired", {}),
        "length_percentiles": pct,
        "length_mean": float(arr.mean()) if arr.size else 0.0,
        "length_histogram": hist,
        "samples": samples,
    }


def _whole_or_tenth(x: float) -> int | float:
    """x to one decimal: an int when that is whole (a token count), else a float."""
    r = round(float(x), 1)
    return int(r) if r.is_integer() else r


def format_inspect(rep: dict) -> str:
    lines = [
        f"{rep['data_dir']}: {rep['documents']:,} documents ({rep['passkey_documents']:,} passkey), "
        f"{rep['tokens']:,} tokens, {rep['shards']} shards, vocab {rep['vocab_size']} ({rep['token_dtype']})"
    ]
    if rep["skipped"]:
        lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in rep["skipped"].items()))
    if rep["repaired"]:
        lines.append("repaired: " + ", ".join(f"{k}={v}" for k, v in rep["repaired"].items()))
    p = rep["length_percentiles"]
    lines.append(
        "tokens per document: "
        + " ".join(f"{k}={v:.1f}".removesuffix(".0") for k, v in p.items())
        + f" mean={rep['length_mean']:.1f}"
    )
    if rep["length_histogram"]:
        peak = max(c for _, _, c in rep["length_histogram"])
        for lo, hi, c in rep["length_histogram"]:
            lines.append(f"  [{lo:>8}, {hi:>8}) {c:>9,} {'#' * max(1, round(40 * c / peak))}")
    for s in rep["samples"]:
        # One line: a newline in a file name or an id would forge a header of its own (the text keeps its own).
        lines.append(f"--- {visible(str(s['doc_id']))} ({visible(str(s['source']))}, {s['tokens']} tokens)")
        lines.append(s["text"])
    return "\n".join(lines)
