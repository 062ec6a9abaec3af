"""`logitstore` command line: info, verify, cp, show, commit; merge, subset, add-text (cli_ops.py);
decontaminate (cli_decontaminate.py).

Exit status (logitstore/exit_codes.py): 0 success / clean store; 1 a store error, one
paragraph `logitstore: error: ...`, or a damaged store (verify, cp), one `DAMAGED <file>:
<problem>` line per problem (verify then prints the count); 2 a usage error; 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from logitstore import __version__, exit_codes
from logitstore.errors import LogitStoreError
from logitstore.format import CLASSIFIER

PROG = "logitstore"


def _fail(err: Exception, code: int = exit_codes.USER_ERROR) -> None:
    exit_codes.fail(PROG, str(err), code=code)


class _Group(exit_codes.Group):
    """Every subcommand reports a store error, or an OSError on the user's paths, as one
    paragraph and exit status 1: a missing store, a damaged file, an I/O failure with its
    URL, a bad URL scheme, an unknown sample id."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (LogitStoreError, OSError) as err:
            _fail(err)


@click.group(name=PROG, cls=_Group,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="logitstore")
def main() -> None:
    """Inspect, verify and move logitstore stores (local paths or any fsspec URL)."""


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print manifest + counts + sizes as JSON.")
def info(store: str, as_json: bool) -> None:
    """Summary of STORE: kind, signals (or heads and features), counts, sizes, compression."""
    from logitstore.info import size_report
    from logitstore.reader import StoreReader

    try:
        reader = StoreReader(store)
    except LogitStoreError as err:
        _fail(err)
    manifest = reader.manifest
    sizes = size_report(manifest)
    if as_json:
        click.echo(json.dumps({**manifest, "sizes": sizes}, indent=1, sort_keys=True))
        return
    counts = manifest["counts"]
    settings = manifest["settings"]
    click.echo(f"store        {store}")
    click.echo(f"format       {manifest['format']} {manifest['format_version']} "
               f"(written by logitstore {manifest['tool_version']}, committed "
               f"{manifest['committed']})")
    click.echo(f"kind         {reader.kind}")
    if reader.kind == CLASSIFIER:
        _info_classifier(reader, sizes)
        return
    click.echo(f"tokenizer    {settings['tokenizer_name'] or '-'}  vocab {settings['vocab_size']}  "
               f"fingerprint {settings['tokenizer_fingerprint'][:16]}")
    click.echo(f"dataset      fingerprint {manifest['dataset_fingerprint'][:16]}")
    click.echo(f"counts       {counts['samples']} samples, {counts['tokens']} tokens "
               f"({counts['target_tokens']} targets), {counts['parts']} part(s), "
               f"{counts['segments']} segment(s)")
    click.echo(f"size         {sizes['total_bytes'] / 1e6:.2f} MB, "
               f"{sizes['bytes_per_token']:.2f} B/token")
    for name, spec in settings["signals"].items():
        teacher = spec.get("teacher", {})
        model = teacher.get("model_id") or teacher.get("hub_id") or teacher.get("name") or "-"
        click.echo(f"signal {name}: teacher {model} "
                   f"{teacher.get('quantization', '')}".rstrip())
        for kind in ("topk", "sampled"):
            if spec.get(kind):
                s = sizes["signals"][name][kind]
                settings_text = ", ".join(f"{k}={v}" for k, v in spec[kind].items())
                click.echo(f"  {kind:8s} {settings_text}: {s['bytes_per_token']:.2f} B/token, "
                           f"{s['bytes_per_entry']:.2f} B/entry "
                           f"({s['entries_per_token']:.1f} entries/token), "
                           f"{s['compression_ratio']:.1f}x vs raw")
        for kind in ("hidden", "attention"):
            if spec.get(kind):
                click.echo(f"  {kind:8s} " + ", ".join(f"{k}={v}" for k, v in spec[kind].items()))
    click.echo("arrays:")
    for name, a in sizes["arrays"].items():
        click.echo(f"  {name:40s} {a['bytes'] / 1e6:9.3f} MB  {a['bytes_per_token']:7.3f} B/token  "
                   f"{a['bytes_per_entry']:6.3f} B/entry  {a['compression_ratio']:5.1f}x")


def _info_classifier(reader, sizes: dict[str, Any]) -> None:
    """`info` of a classifier store (2.3): counts, heads, feature parts, splits, arrays."""
    from logitstore.classifier_reader import ClassifierReader, classifier_info_lines

    counts = reader.manifest["counts"]
    click.echo(f"dataset      fingerprint {reader.manifest['dataset_fingerprint'][:16]}")
    click.echo(f"counts       {counts['samples']} samples, {counts['parts']} part(s), "
               f"{counts['segments']} segment(s)")
    click.echo(f"size         {sizes['total_bytes'] / 1e6:.2f} MB, "
               f"{sizes['total_bytes'] / max(1, counts['samples']):.1f} B/sample")
    for line in classifier_info_lines(ClassifierReader(reader), sizes):
        click.echo(line)


@main.command()
@click.argument("store")
@click.option("--quiet", "-q", is_flag=True)
def verify(store: str, quiet: bool) -> None:
    """Recompute every checksum and invariant of STORE; exit 1 naming each damaged file."""
    from logitstore.verify import verify_store

    problems = verify_store(store)
    for problem in problems:
        click.echo(f"DAMAGED {problem}", err=True)
    if problems:
        click.echo(f"{store}: {len(problems)} problem(s)", err=True)
        sys.exit(exit_codes.USER_ERROR)
    if not quiet:
        click.echo(f"{store}: ok")


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--overwrite", is_flag=True, help="Replace a store already at DST.")
def cp(src: str, dst: str, overwrite: bool) -> None:
    """Copy the committed store SRC to DST (any fsspec URLs), verified on arrival."""
    from tqdm import tqdm

    from logitstore.transfer import copy_store
    from logitstore.verify import verify_store

    bar = tqdm(unit="B", unit_scale=True, desc="copy", disable=None)
    try:
        copy_store(src, dst, overwrite=overwrite, progress=lambda rel, n: bar.update(n))
    except (LogitStoreError, OSError) as err:
        bar.close()
        _fail(err)
    bar.close()
    problems = verify_store(dst)
    if problems:
        for problem in problems:
            click.echo(f"DAMAGED {problem}", err=True)
        sys.exit(exit_codes.USER_ERROR)
    click.echo(f"copied {src} -> {dst}; verified")


@main.command()
@click.argument("store")
@click.argument("sample_id", required=False)
@click.option("--index", "position", type=int, help="Select the N-th sample in store order.")
@click.option("--tokenizer", type=click.Path(exists=True),
              help="tokenizer.json or a directory holding one, to decode tokens (default: the "
                   "tokenizer stored in the store, if any).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--top", default=5, show_default=True, help="Entries shown per position (text).")
def show(store: str, sample_id: str | None, position: int | None, tokenizer: str | None,
         as_json: bool, top: int) -> None:
    """One sample's tokens with its top-k / sampled targets."""
    from logitstore.reader import StoreReader

    if (sample_id is None) == (position is None):
        _fail(LogitStoreError("give either SAMPLE_ID or --index N (not both)"),
              code=exit_codes.USAGE)
    # before the store is opened: the cheaper input first
    decode = _decoder(tokenizer) if tokenizer else None
    try:
        reader = StoreReader(store)
        key = sample_id if position is None else position
        if reader.kind == CLASSIFIER:
            from logitstore.classifier_reader import ClassifierReader
            sample = ClassifierReader(reader).sample(key)
        else:
            sample = reader.sample(key)
            decode = decode or _stored_decoder(reader)
    except LogitStoreError as err:
        _fail(err)
    if reader.kind == CLASSIFIER:  # 2.3: heads, features and labels of one input
        click.echo(_classifier_show(sample, reader.settings, as_json, top))
        return
    if as_json:
        cut_decoders = {name: _extra_decoder(reader, name) for name in sample.tokenizations}
        click.echo(json.dumps(_sample_json(sample, decode, reader.settings, cut_decoders),
                              indent=1))
        return
    decode = decode or _decoder(None)
    click.echo(f"sample {sample.sample_id}  source={sample.source} split={sample.split} "
               f"tags={sample.tags}  tokens={len(sample.input_ids)} "
               f"targets={int(sample.loss_mask.sum())}")
    text = sample.text_spans
    if text is not None:
        click.echo(f"text {text.text!r}")
    own = {n: s for n, s in sample.signals.items() if reader.settings.signals[n].tokenization
           is None}
    _echo_tokens(sample.input_ids, sample.loss_mask, text, own, decode, top)
    for tokenization, cut in sample.tokenizations.items():  # 2.2: another tokenizer's tokens
        click.echo(f"tokenization {tokenization}: tokens={len(cut)} covers bytes "
                   f"[0:{cut.covered_bytes}]")
        cut_decode = _extra_decoder(reader, tokenization) or _decoder(None)
        signals = {n: s for n, s in sample.signals.items()
                   if reader.settings.signals[n].tokenization == tokenization}
        _echo_tokens(cut.input_ids, cut.loss_mask, cut, signals, cut_decode, top)


def _classifier_show(sample, settings, as_json: bool, top: int) -> str:
    """One classifier sample (2.3) as JSON, or as text: its input, and per head the label
    and the `top` most likely classes under the stored logits; features summarised."""
    if as_json:
        return json.dumps({
            "sample_id": sample.sample_id, "image": sample.image, "text": sample.text,
            "source": sample.source, "split": sample.split, "tags": sample.tags,
            "labels": {h: sample.label(h) for h in settings.heads},
            "logits": {h: np.asarray(v, np.float64).round(5).tolist()
                       for h, v in sample.logits.items()},
            "features": {p: np.asarray(v, np.float64).round(5).tolist()
                         for p, v in sample.features.items()}}, indent=1)
    lines = [f"sample {sample.sample_id}  source={sample.source} split={sample.split} "
             f"tags={sample.tags}", f"image {sample.image!r}", f"text {sample.text!r}"]
    for head, logits in sample.logits.items():
        z = np.asarray(logits, np.float64)
        probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        best = np.argsort(-probs, kind="stable")[:top]
        lines.append(f"head {head}: label {sample.label(head)}  top: " +
                     " ".join(f"{int(c)}:{probs[c]:.3f}" for c in best))
    for part, values in sample.features.items():
        v = np.asarray(values, np.float64)
        lines.append(f"feature {part}: dim {len(v)}  mean {v.mean():.4f}  "
                     f"norm {np.linalg.norm(v):.4f}")
    return "\n".join(lines)


def _echo_tokens(ids, loss_mask, text, signals, decode, top: int) -> None:
    """One line per token: id, decoded piece, byte span (with `text`: anything with spans,
    special, roles), and the signals' top entries at its position."""
    for t, tok in enumerate(ids.tolist()):
        mark = "*" if loss_mask[t] else " "
        line = f"{t:5d} {mark} {tok:7d} {decode([tok])!r:16s}"
        if text is not None:
            start, end = (int(v) for v in text.spans[t])
            line += f" [{start}:{end}]{'S' if text.special[t] else ' '}r{int(text.roles[t])}"
        for name, sig in signals.items():
            if sig.topk is not None:
                order = np.argsort(-sig.topk.logprobs[t])[:top]
                line += f" | {name} top: " + " ".join(
                    f"{decode([int(sig.topk.ids[t][i])])!r}:{np.exp(sig.topk.logprobs[t][i]):.3f}"
                    for i in order)
            if sig.sampled is not None:
                ids, counts, _ = sig.sampled.position(t)
                order = np.argsort(-counts)[:top]
                line += f" | {name} drawn: " + " ".join(
                    f"{decode([int(ids[i])])!r}x{int(counts[i])}" for i in order)
        click.echo(line)


def _decoder(path: str | None):
    """Token ids -> text with the tokenizer at `path` (a tokenizer.json file or a directory
    holding one), or the ids as text when `path` is None; LogitStoreError when `path` holds
    no readable tokenizer."""
    if path is None:
        return lambda ids: str(ids[0]) if len(ids) == 1 else str(ids)
    from tokenizers import Tokenizer

    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    expected = ("expected --tokenizer to be a tokenizer.json file (Hugging Face tokenizers "
                "format) or a directory holding one, e.g. the teacher's model directory")
    if not file.is_file():
        raise LogitStoreError(f"no tokenizer at {path}: {file} does not exist; {expected}")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for any unreadable file
        raise LogitStoreError(f"{file} is not a tokenizer file ({err}); {expected}") from None
    return lambda ids: tok.decode(list(ids), skip_special_tokens=False)


def _stored_decoder(reader, tokenization: str | None = None):
    """A decoder from the tokenizer.json stored in the store (format 2.1; 2.2: that of an
    extra tokenization), None when it stores none."""
    data = reader.tokenizer_files(tokenization).get("tokenizer.json")
    if data is None:
        return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as err:  # tokenizers raises a bare Exception for any unreadable file
        raise LogitStoreError(f"the tokenizer.json stored in {reader.fs.url} cannot be read "
                              f"({err}); pass --tokenizer to decode with another copy") from None
    return lambda ids: tok.decode(list(ids), skip_special_tokens=False)


def _extra_decoder(reader, tokenization: str):
    """The decoder of an extra tokenization's stored tokenizer (2.2), None when it has none
    or it cannot be read (its tokens are shown as ids: --tokenizer decodes the store's own)."""
    try:
        return _stored_decoder(reader, tokenization)
    except LogitStoreError as err:
        click.echo(f"tokenization {tokenization}: tokens shown as ids ({err})", err=True)
        return None


def _sample_json(sample, decode, settings, cut_decoders: dict | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"sample_id": sample.sample_id, "source": sample.source,
                           "split": sample.split, "input_ids": sample.input_ids.tolist(),
                           "loss_mask": sample.loss_mask.astype(int).tolist(),
                           "tags": sample.tags, "signals": {}}
    if decode is not None:
        out["tokens"] = [decode([t]) for t in sample.input_ids.tolist()]
    if sample.text_spans is not None:
        out.update(text=sample.text_spans.text, spans=sample.text_spans.spans.tolist(),
                   special=sample.text_spans.special.astype(int).tolist(),
                   roles=sample.text_spans.roles.tolist())
    if sample.tokenizations:  # 2.2: the text cut by other tokenizers
        out["tokenizations"] = {name: {
            "input_ids": cut.input_ids.tolist(), "loss_mask": cut.loss_mask.astype(int).tolist(),
            "spans": cut.spans.tolist(), "special": cut.special.astype(int).tolist(),
            "roles": cut.roles.tolist(), "covered_bytes": cut.covered_bytes}
            for name, cut in sample.tokenizations.items()}
        for name, cut_decode in (cut_decoders or {}).items():
            if cut_decode is not None:
                out["tokenizations"][name]["tokens"] = [
                    cut_decode([t]) for t in sample.tokenizations[name].input_ids.tolist()]
    for name, sig in sample.signals.items():
        entry: dict[str, Any] = {}
        if sig.topk is not None:
            entry["topk"] = {"ids": sig.topk.ids.tolist(),
                             "logprobs": np.round(sig.topk.logprobs, 5).tolist()}
        if sig.sampled is not None:
            per = [sig.sampled.position(t) for t in range(sig.sampled.num_positions)]
            entry["sampled"] = {"ids": [p[0].tolist() for p in per],
                                "counts": [p[1].tolist() for p in per],
                                "logprobs": None if sig.sampled.logprobs is None
                                else [np.round(p[2], 5).tolist() for p in per]}
        if sig.hidden is not None:
            entry["hidden"] = {"layers": list(settings.signals[name].hidden.layers),
                               "pools": sig.hidden.tolist()}
        if sig.attention is not None:
            entry["attention"] = {"layers": list(settings.signals[name].attention.layers),
                                  "grid": sig.attention.tolist()}
        out["signals"][name] = entry
    return out


@main.command()
@click.argument("store")
def commit(store: str) -> None:
    """List every committed part of STORE in its manifest (after a multi-writer dump)."""
    from logitstore.commit import commit_store

    try:
        manifest = commit_store(store)
    except LogitStoreError as err:
        _fail(err)
    click.echo(f"{store}: committed {manifest['counts']['parts']} part(s), "
               f"{manifest['counts']['samples']} samples")


# merge, subset and add-text (store operations for sharing) live in cli_ops.py
from logitstore.cli_ops import add_text as _add_text, merge as _merge  # noqa: E402
from logitstore.cli_ops import subset as _subset  # noqa: E402

main.add_command(_merge)
main.add_command(_subset)
main.add_command(_add_text)

# decontaminate (finds evaluation data in a store) lives in cli_decontaminate.py
from logitstore.cli_decontaminate import decontaminate as _decontaminate  # noqa: E402

main.add_command(_decontaminate)


if __name__ == "__main__":
    main()
