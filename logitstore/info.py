"""Size accounting of a committed store: bytes per token and per entry for each array."""

from __future__ import annotations

from typing import Any

from logitstore.format import PARTS_DIR, TOKENIZER_DIR, StoreSettings

# What each array would take uncompressed in the raw baseline (int32 ids, float16 values).
_RAW_BYTES = {"input_ids": 4, "loss_mask": 1, "topk_ids": 4, "topk_logprobs": 2, "topk_tail": 2,
              "sampled_nuniq": 2, "sampled_nmulti": 0, "sampled_ids": 4, "sampled_counts": 2,
              "sampled_logprobs": 2, "hidden": 2, "attention": 2,
              "sample_bytes": 4, "gap": 4, "length": 4, "kind": 1}
# 2.3: the per-sample arrays of a classifier store (raw baseline: 4 bytes per value)
CLASSIFIER_ARRAYS = ("heads/", "features/", "labels/")


def array_name(rel: str) -> str | None:
    """parts/P/seg-N/signals/S/topk_ids/c/0 -> 'signals/S/topk_ids'; None for non-array files."""
    pieces = rel.split("/")
    if len(pieces) < 4 or pieces[0] != PARTS_DIR:
        return None
    inner = pieces[3:]
    if inner[0] == "signals" and len(inner) >= 3:
        return "/".join(inner[:3])
    # 2.3: heads/H/logits/<file>, features/P/<file>, labels/H/<file> (not their groups')
    if inner[0] == "heads" and len(inner) >= 4:
        return "/".join(inner[:3])
    if inner[0] in ("features", "labels") and len(inner) >= 3:
        return "/".join(inner[:2])
    if inner[0] in ("input_ids", "loss_mask"):
        return inner[0]
    if inner[0] in ("text", "spans") and len(inner) >= 2:  # 2.1: text/utf8, spans/gap, ...
        return "/".join(inner[:2])
    if inner[0] == "tokenizations" and len(inner) >= 4:  # 2.2: tokenizations/T/spans/gap, ...
        return "/".join(inner[:4] if inner[2] == "spans" else inner[:3])
    return None


def size_report(manifest: dict[str, Any]) -> dict[str, Any]:
    """Stored bytes of every array and signal, per token / per entry, and vs the raw baseline."""
    settings = StoreSettings.from_json(manifest["settings"])
    counts = manifest["counts"]
    tokens = max(1, counts["tokens"])
    stored: dict[str, int] = {}
    for rel, meta in manifest["files"].items():
        name = array_name(rel)
        if name is not None:
            stored[name] = stored.get(name, 0) + meta["size"]
    arrays = {}
    for name, size in sorted(stored.items()):
        leaf = name.rsplit("/", 1)[-1]
        elements = _elements(settings, counts, name)
        unit = 4 if name.startswith(CLASSIFIER_ARRAYS) else _RAW_BYTES.get(leaf, 4)
        arrays[name] = {"bytes": size, "bytes_per_token": size / tokens,
                        "bytes_per_entry": size / max(1, elements),
                        "raw_bytes": elements * unit,
                        "compression_ratio": elements * unit / max(1, size)}
    signals = {}
    for sig, spec in settings.signals.items():
        entry = {}
        for kind, entries in (("topk", tokens * (spec.topk.k if spec.topk else 0)),
                              ("sampled", counts.get("sampled_entries", {}).get(sig, 0))):
            if getattr(spec, kind) is None:
                continue
            parts = {n: a for n, a in arrays.items() if n.startswith(f"signals/{sig}/{kind}_")}
            size = sum(a["bytes"] for a in parts.values())
            raw = sum(a["raw_bytes"] for a in parts.values())
            entry[kind] = {"bytes": size, "bytes_per_token": size / tokens,
                           "bytes_per_entry": size / max(1, entries), "entries": entries,
                           "entries_per_token": entries / tokens,
                           "compression_ratio": raw / max(1, size)}
        signals[sig] = entry
    # The tokenizer's files (2.1) are a fixed cost, not a per-token one: counted apart.
    tokenizer = sum(meta["size"] for rel, meta in manifest["files"].items()
                    if rel.startswith(TOKENIZER_DIR + "/"))
    total = sum(meta["size"] for meta in manifest["files"].values()) + \
        manifest["index"]["size"] - tokenizer
    return {"total_bytes": total, "bytes_per_token": total / tokens, "arrays": arrays,
            "signals": signals, "tokenizer_bytes": tokenizer}


def _elements(settings: StoreSettings, counts: dict, name: str) -> int:
    tokens, samples = counts["tokens"], counts["samples"]
    leaf = name.rsplit("/", 1)[-1]
    if name.startswith(CLASSIFIER_ARRAYS):  # 2.3: [samples, C], [samples, D], [samples]
        sizes = settings.heads if name.startswith("heads/") else \
            settings.features if name.startswith("features/") else {}
        return samples * sizes.get(name.split("/")[1], 1)
    if leaf in ("input_ids", "loss_mask", "topk_tail", "sampled_nuniq", "sampled_nmulti"):
        return tokens
    if name.startswith(("text/", "spans/")):  # 2.1; text/utf8: raw ~4 B of text per token
        return samples if leaf == "sample_bytes" else tokens
    if name.startswith("tokenizations/"):  # 2.2; counted on the store's token axis
        return samples if leaf in ("sample_tokens", "covered_bytes") else tokens
    if leaf == "sampled_counts":  # raw baseline stores a count per id
        return counts.get("sampled_entries", {}).get(name.split("/")[1], 0)
    sig = settings.signals[name.split("/")[1]]
    if leaf.startswith("topk_"):
        return tokens * sig.topk.k
    if leaf.startswith("sampled_"):
        return counts.get("sampled_entries", {}).get(name.split("/")[1], 0)
    if leaf == "hidden":
        return samples * len(sig.hidden.layers) * sig.hidden.dim
    if leaf == "attention":
        a = sig.attention
        return samples * len(a.layers) * a.num_heads * a.grid * a.grid
    return tokens
