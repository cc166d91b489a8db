"""A shared context's life: compress once (multi-request: before any query), store, fetch, answer
many queries.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lifecycle.py [--set first|all] [--samples 8] [--collect]
        [--long-samples 3] [--only "kvzip(ratio=0.25)"] [--match 'kv-8192$']
    .venv/bin/python benchmarks/lifecycle.py --set all --fetch    # no model: the 100 Mbit/s fetch times

Per row (recipe, encoding, task, context length), in priority order (`ROWS`):
1. accuracy: `kvlife bench --mode multi-request --store disk:DIR --store-encoding ENC` in-process into
   results/lifecycle/<run-id>-<encoding>/ (resumable: rows are written a sample at a time); accuracy over
   every turn, reference NLL, the paired difference against dense (raw) on the same samples with its 95%
   bootstrap interval, the stored bytes per context token (what the store took for the context: a
   whole-context entry for a compressed recipe, prefix chunks for dense). A coded row of a compressed
   recipe first re-encodes its raw row's stored entries (`seed`: the same compressed cache, not computed
   twice); its answers come from the decoded entries;
2. times on the first sample, back to back in one process: the first token after a full prefill (with its
   compression; compression seconds from the prefill's stats) and after a disk-store hit of the same context
   (a coded row takes the full prefill's from its raw row; an 8K row from its first sample if that missed);
3. with --fetch (no model): one context fetched from `kvlife serve --trace constant:100mbit` (the server's
   shaped link), timed: a compressed recipe's stored entry streamed as `kvlife fetch` streams it (pieces of
   one layer at the row's encoding, `StreamClient.fetch_pieces`: manifest, pieces, checksums, decode), a
   blob of the stored chunks' size for dense.
Each finished row is saved as results/lifecycle/rows/<slug>.json at once (a killed run resumes at the next
row); after every row benchmarks/results/lifecycle.json and lifecycle.md are rewritten. Each row takes
/tmp/kvlife-heavy.lock while it runs a model, so other model jobs interleave. results/ is git-ignored: in
a fresh checkout the rows of the committed lifecycle.json are carried as recorded (never dropped), and each
new row keeps its per-sample scores there, so later rows pair with it (docs/lifecycle.md).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from foundation import machine  # noqa: E402
from lifecycle_fetch import fetch_rows  # noqa: E402
from lifecycle_report import report  # noqa: E402

from kvlife import models  # noqa: E402
from kvlife.bench.runner import BenchConfig, read_rows, run  # noqa: E402
from kvlife.bench.stats import paired_difference  # noqa: E402
from kvlife.bench.summary import by_sample  # noqa: E402
from kvlife.bench.tasks import get_task  # noqa: E402
from kvlife.session import Session  # noqa: E402
from kvlife.store import open_store  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LOCK = "/tmp/kvlife-heavy.lock"
RAW, BALANCED, SPARSE = "raw", "kvlife:balanced", "kvlife:sparse+profile"
AGNOSTIC = ["kvzip(ratio=0.25)", "expected_attention(ratio=0.25)", "keydiff(ratio=0.25)",
            "chunkkv(ratio=0.25)", "duo_attention(ratio=0.25)"]
# KVzip as published (no safeguard): kvzip's default until Ada-KV's safeguard (alpha=0.2) replaced it;
# the rows measured before then carry its name
PUBLISHED = "kvzip(ratio=0.25,alpha=0)"
# (recipe, encoding, task, context tokens or None for the profile's), most important first
FIRST = [(spec, RAW, task, None) for task in ("kv", "prefix_suffix")
         for spec in ["dense", "kvzip(ratio=0.25)", "snapkv(ratio=0.25)", *AGNOSTIC[1:], PUBLISHED]]
# the default until KVzip's "pair" replaced it
FIRST += [("kvzip(ratio=0.25,level=uniform,alpha=0)", RAW, "kv", None)]
LATER = ([(spec, RAW, task, None) for task in ("qa_eng", "repoqa")
          for spec in ["dense", "kvzip(ratio=0.25)", "snapkv(ratio=0.25)", *AGNOSTIC[1:], PUBLISHED]]
         + [(spec, RAW, task, None) for task in ("kv", "prefix_suffix", "qa_eng", "repoqa")
            for spec in ["kivi(bits=2)", "kvzip(ratio=0.1,alpha=0)", "kvzip(ratio=0.5,alpha=0)"]]
         + [(spec, BALANCED, task, None) for task in ("kv", "prefix_suffix", "qa_eng", "repoqa")
            for spec in ["dense", "kvzip(ratio=0.25)", PUBLISHED]]
         + [(spec, enc, "kv", 8192) for spec in ["dense", "kvzip(ratio=0.25)", PUBLISHED]
            for enc in (RAW, BALANCED)]
         # does a finer step keep the exact strings (UUIDs, prefixes) that kvlife:balanced loses?
         + [(PUBLISHED, "kvlife:high", task, None) for task in ("kv", "prefix_suffix")]
         + [(PUBLISHED, "kvlife:high", "kv", 8192)]
         # the codec's query-weighted key steps (the model's shipped profile), tuned with the levels; and
         # the level for pruned caches (finer keys, coarser values)
         + [(PUBLISHED, BALANCED + "+profile", "repoqa", None)]
         + [(PUBLISHED, SPARSE, "repoqa", None)]
         + [(PUBLISHED, BALANCED + "+profile", task, None) for task in ("kv", "prefix_suffix")]
         + [(PUBLISHED, BALANCED + "+profile", "kv", 8192)]
         + [(PUBLISHED, BALANCED + "+profile", "qa_eng", None)]
         # sparse was dominated by balanced+profile on these three (docs/lifecycle.md): no more rows of it
         + [(PUBLISHED, SPARSE, task, None) for task in ("kv", "prefix_suffix")]
         # KVzip's head-level variant (each layer's budget spread over its heads) where the pair level
         # stays under 0.9x dense
         + [("kvzip(ratio=0.25,level=head,alpha=0)", RAW, "kv", None)]
         # KVzip's own normalisation (per chunk) and KVzip+'s value weighting, on the same task
         + [(f"kvzip(ratio=0.25,{options},alpha=0)", RAW, "kv", None)
            for options in ("normalize=chunk", "plus=true", "normalize=chunk,plus=true")]
         # the budget between a quarter (0.87x dense on kv) and a half (= dense) that keeps kv's UUIDs
         + [(f"kvzip(ratio={ratio},alpha=0)", RAW, "kv", None) for ratio in (0.3, 0.35, 0.4)]
         # with the safeguard (the default since): the 8K row's profile-weighted entry, and the budgets
         + [("kvzip(ratio=0.25)", BALANCED + "+profile", "kv", 8192)]
         # where plain balanced still costs most (the same loss as at alpha 0)
         + [("kvzip(ratio=0.25)", BALANCED + "+profile", "repoqa", None)]
         + [(spec, RAW, task, None) for task in ("kv", "prefix_suffix", "qa_eng", "repoqa")
            for spec in ["kvzip(ratio=0.1)", "kvzip(ratio=0.5)"]])
SETS = {"first": FIRST, "all": FIRST + LATER}


@contextmanager
def heavy_lock():
    with open(LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def row_key(row: dict) -> tuple:
    return (row["recipe"], row["encoding"], row["task"], row["target_context_tokens"])


def slug(spec: str, encoding: str, task: str, context_tokens: int | None) -> str:
    text = f"{spec}-{encoding}-{task}-{context_tokens or 'default'}"
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip() or "unknown"


def fp16_bytes_per_token(model) -> int:
    """K and V of every layer and KV head at 2 bytes an element: the fp16 dense cache's bytes per token."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * config.num_key_value_heads * head_dim * 2 * 2


class Lifecycle:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        (self.out / "rows").mkdir(parents=True, exist_ok=True)
        self.model = self.tokenizer = None

    def load(self):
        if self.model is None:
            self.model, self.tokenizer = models.load(self.args.model, dtype=self.args.dtype)
        return self.model, self.tokenizer

    def store(self, encoding: str):
        return open_store(f"disk:{self.out / 'store' / encoding.replace(':', '-')}", encoding=encoding)

    def samples(self, context_tokens: int | None) -> int:
        return self.args.long_samples if context_tokens else self.args.samples

    def config(self, spec: str, task: str, context_tokens: int | None) -> BenchConfig:
        return BenchConfig(model=self.args.model, tasks=[task], mode="multi-request", method=spec,
                           samples=self.samples(context_tokens), context_tokens=context_tokens,
                           dtype=self.args.dtype)

    def run_dir(self, spec: str, encoding: str, task: str, context_tokens: int | None) -> Path:
        return self.out / f"{self.config(spec, task, context_tokens).run_id()}-{encoding.replace(':', '-')}"

    def row_path(self, key: tuple) -> Path:
        return self.out / "rows" / f"{slug(*key)}.json"

    # ---- one row ---------------------------------------------------------------------------------

    def measure(self, key: tuple) -> dict:
        spec, encoding, task, context_tokens = key
        model, tokenizer = self.load()
        config = self.config(spec, task, context_tokens)
        run_dir = self.run_dir(*key)
        seeded = self.seed(spec, encoding, task, context_tokens) if spec != "dense" and encoding != RAW else 0
        started = time.perf_counter()
        run(config, out=run_dir, model=model, tokenizer=tokenizer, progress=False, store=self.store(encoding))
        accuracy_s = time.perf_counter() - started
        rows = read_rows(run_dir / "predictions.jsonl")
        firsts = [r for r in rows if r["turn"] == 1]
        stored = [r["store"].get("store_put_bytes", 0) or r["store"].get("store_entry_bytes", 0)
                  for r in firsts if r.get("store")]
        stored_tokens = [self.stored_tokens(r, spec) for r in firsts if r.get("store")]
        raw_row = self.row_path((spec, RAW, task, context_tokens))
        full = json.loads(raw_row.read_text()) if encoding != RAW and raw_row.exists() else None
        first = firsts[0] if firsts else {}
        if full is None and context_tokens and first.get("store", {}).get("store_hit_tokens") == 0:
            # a long row's first sample missed the store: its prefill (and compression) is the full one,
            # measured in this process; the store's put is not part of it (saves a prefill of minutes)
            full = {"ttft_full_s": round(first["ttft_s"] - first["store"].get("store_put_s", 0.0), 4),
                    "compress_s": None, "from": f"{first['sample_id']} of the accuracy run (a store miss)"}
        times = self.times(spec, encoding, task, context_tokens, full)
        nll = [r["reference_nll"] for r in rows if r.get("reference_nll") is not None]
        return {
            "recipe": spec, "encoding": encoding, "task": task, "target_context_tokens": context_tokens,
            "context_tokens": round(sum(r["context_tokens"] for r in firsts) / max(1, len(firsts))),
            "samples": len(firsts), "turns": len(rows),
            "accuracy": round(sum(r["score"] for r in rows) / max(1, len(rows)), 4),
            "reference_nll": round(sum(nll) / len(nll), 4) if nll else None,
            "bytes_per_token": round(sum(stored) / max(1, sum(stored_tokens)), 1) if stored else None,
            "dense_fp16_bytes_per_token": fp16_bytes_per_token(model),
            "cache_bytes_turn1": round(sum(r["cache_bytes"] for r in firsts) / max(1, len(firsts))),
            **times, "accuracy_run_s": round(accuracy_s, 1), "run": run_dir.name,
            "entries_transcoded_from_raw": seeded,
            # kept in the results so that a later session pairs with this row without results/ (git-ignored)
            "scores_by_sample": {sample: score for (_, sample), score in by_sample(rows).items()},
            "machine": machine(),
        }

    def seed(self, spec: str, encoding: str, task: str, context_tokens: int | None) -> int:
        """Put in the `encoding` store each sample's compressed context read from the raw store (the raw
        row's entries), re-encoded: exactly the entry a miss would compute and put (the compression is
        deterministic; the raw entry holds its cache exactly), without spending the compression again.
        A sample the raw store lacks is compressed here once and stored both ways. Returns how many coded
        entries were put."""
        from kvlife.methods.compress import stored
        from kvlife.models import model_fingerprint
        from kvlife.store.entries import compressed_namespace, encode_entry, entry_key
        from kvlife.store.profiles import codec_setup

        model, tokenizer = self.load()
        target = self.store(encoding)
        codec = codec_setup(model, encoding)  # the RoPE, and the weights of a +profile encoding
        put = 0
        for sample in get_task(task).samples("default", self.samples(context_tokens), 0, context_tokens):
            session = Session(model, tokenizer, spec, mode="multi-request", store=self.store(RAW))
            session.prefill(sample.context)  # a hit, or computed and put raw: the exact compressed cache
            identity = session.compressed_identity()
            fingerprint = model_fingerprint(model)
            raw_key, key = (entry_key(compressed_namespace(fingerprint, self.args.dtype, identity, enc,
                                                           target.chunk_size), session.context_ids)
                            for enc in (RAW, codec.namespace_encoding))
            if raw_key != session.store.last.get("store_entry"):  # the store's own key, computed here
                raise RuntimeError("lifecycle: the raw entry's key is not the one computed here")
            if target.fetch_prefix([key]):
                continue
            payload = encode_entry(stored.stored_layers(session.cache), encoding, codec.rope,
                                   target.chunk_size, codec.weights)
            target.put(key, payload)
            put += 1
        return put

    @staticmethod
    def stored_tokens(row: dict, spec: str) -> int:
        """Context tokens the stored bytes stand for: the whole context (an entry), or the stored prefix
        chunks of a dense prefill (its shorter-than-a-chunk tail is recomputed, not stored)."""
        store = row["store"]
        if spec == "dense":
            return ((row["context_tokens"] - 1) // 256 * 256 if store.get("store_put_bytes")
                    else store["store_hit_tokens"])
        return row["context_tokens"]

    def times(self, spec: str, encoding: str, task: str, context_tokens: int | None,
              raw_row: dict | None = None) -> dict:
        """First token after a full prefill (and compression) and after a disk-store hit, on the first
        sample. The full prefill does not depend on the store's encoding: a `raw_row` (this recipe's raw
        row, measured the same way) gives it."""
        model, tokenizer = self.load()
        sample = next(iter(get_task(task).samples("default", 1, 0, context_tokens)))
        query = sample.turns[0].query
        figures = {}
        passes = (("full", None), ("hit", self.store(encoding)))
        if raw_row is not None:
            figures.update(ttft_full_s=raw_row["ttft_full_s"], compress_s=raw_row.get("compress_s"),
                           ttft_full_from=raw_row.get("from", "raw row"))
            passes = passes[1:]
        for name, store in passes:
            session = Session(model, tokenizer, spec, mode="multi-request", store=store)
            prefilled = session.prefill(sample.context)
            turn = session.ask(query, max_new_tokens=1, score_reference=False)
            figures[f"ttft_{name}_s"] = round(prefilled.prefill_s + turn.ttft_s, 4)
            if name == "full":
                compress = prefilled.stats.get("compress") or {}
                figures["compress_s"] = compress.get("seconds")
            else:
                last = session.store.last
                figures["hit_tokens"] = last.get("store_hit_tokens")
                figures["hit_fetch_s"], figures["hit_load_s"] = (last.get("store_fetch_s"),
                                                                 last.get("store_load_s"))
                figures["stored_key"] = last.get("store_entry")
        figures["ttft_speedup"] = round(figures["ttft_full_s"] / figures["ttft_hit_s"], 1)
        return figures

    # ---- all rows --------------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        """Every measured row: this checkout's row files, then the rows of the results file that have
        none (measured in an earlier checkout, whose results/ is git-ignored and gone): carried as
        recorded, never dropped."""
        out = [json.loads(path.read_text()) for path in sorted((self.out / "rows").glob("*.json"))]
        have = {row_key(row) for row in out}
        return out + [dict(row, carried=True) for row in self.recorded() if row_key(row) not in have]

    def recorded(self) -> list[dict]:
        path = Path(self.args.json)
        if not path.exists():
            return []
        payload = json.loads(path.read_text())
        # rows recorded before rows named their machine ran on the results file's
        return [{"machine": payload.get("machine"), **row} for row in payload.get("rows", [])]

    def plan(self, keys: list[tuple], redo: set[tuple] = frozenset()) -> list[tuple]:
        """The keys still to measure, in order, with the carried rows in `redo` (measured again, e.g. with
        more samples). A row pairs with its task's dense row by sample: a dense row carried from the
        results file without its per-sample scores is measured again first."""
        done = {row_key(row): row for row in self.rows()}
        todo = [key for key in keys if key not in done or (key in redo and done[key].get("carried"))]
        for key in list(todo):
            dense = ("dense", RAW, key[2], key[3])
            if key != dense and dense in done and "scores_by_sample" not in done[dense] and dense not in todo:
                todo.insert(todo.index(key), dense)
        return todo

    def go(self, keys: list[tuple], redo: set[tuple] = frozenset()) -> None:
        for key in self.plan(keys, redo):
            path = self.row_path(key)
            started = time.perf_counter()
            with heavy_lock():
                row = self.measure(key)
            path.write_text(json.dumps(row, indent=2))
            print(f"# {slug(*key)}: {time.perf_counter() - started:.0f} s", flush=True)
            self.write(keys)

    def by_sample(self, row: dict) -> dict | None:
        """A row's scores by sample (for paired differences): recorded in the row, else read from its run's
        predictions if that run ran the row's recipe; None for a carried row that has neither. (A run's
        directory is named by its recipe as typed, so after a default changed and the old rows were
        relabelled, an old row's directory name can hold a run of the new default.)"""
        if "scores_by_sample" in row:
            return {(row["task"], sample): score for sample, score in row["scores_by_sample"].items()}
        run = self.out / row["run"]
        try:
            ran = json.loads((run / "config.json").read_text())["identity"]["method"]
        except (OSError, ValueError, KeyError):
            return None
        return by_sample(read_rows(run / "predictions.jsonl")) if ran == row["recipe"] else None

    def write(self, keys: list[tuple]) -> None:
        done = {row_key(r): r for r in self.rows()}
        # row -> scores by sample: a dense or raw row pairs with many rows (keyed by the row, not its run
        # directory's name, which two rows can share: see by_sample)
        scores: dict[tuple, dict] = {}

        def scores_of(row: dict) -> dict | None:
            if row_key(row) not in scores:
                scores[row_key(row)] = self.by_sample(row)
            return scores[row_key(row)]

        rows = []
        for key, row in done.items():
            row = dict(row)
            mine = scores_of(row)
            dense = done.get(("dense", RAW, key[2], key[3]))
            if mine is None or (dense is not None and scores_of(dense) is None):
                rows.append(row)  # carried without per-sample scores: its pairing stays as recorded
                continue
            if dense is not None:
                found = paired_difference(mine, scores_of(dense))
                row.update(dense_accuracy=dense["accuracy"],
                           diff_vs_dense=round(found.mean, 4) if found else None,
                           ci_low=round(found.low, 4) if found else None,
                           ci_high=round(found.high, 4) if found else None,
                           verdict=found.verdict if found else None,
                           accuracy_vs_dense=(round(row["accuracy"] / dense["accuracy"], 3)
                                              if dense["accuracy"] else None))
                # against the dense prefill alone (no compression): what a reader of "a full prefill" means;
                # times pair only on one machine
                same = dense.get("machine") == row.get("machine")
                row["ttft_speedup_vs_dense_prefill"] = (round(dense["ttft_full_s"] / row["ttft_hit_s"], 1)
                                                        if same else None)
            else:
                row.update(dense_accuracy=None, diff_vs_dense=None, ci_low=None, ci_high=None, verdict=None,
                           ttft_speedup_vs_dense_prefill=None)
            raw = done.get((key[0], RAW, key[2], key[3])) if key[1] != RAW else None
            # what the encoding costs: against the same recipe stored raw
            raw_scores = scores_of(raw) if raw is not None else None
            found = paired_difference(mine, raw_scores) if raw_scores is not None else None
            if found:
                row["vs_raw"] = {"raw_accuracy": raw["accuracy"], "diff": round(found.mean, 4),
                                 "ci_low": round(found.low, 4), "ci_high": round(found.high, 4),
                                 "verdict": found.verdict}
            if row.get("bytes_per_token"):
                dense_over_stored = row["dense_fp16_bytes_per_token"] / row["bytes_per_token"]
                row["fp16_dense_over_stored"] = round(dense_over_stored, 2)
            rows.append(row)
        order = {key: index for index, key in enumerate(SETS["all"])}
        rows.sort(key=lambda r: order.get((r["recipe"], r["encoding"], r["task"], r["target_context_tokens"]),
                                          1 << 30))
        missing = [slug(*key) for key in SETS["all"] if key not in done]
        payload = {
            "machine": machine(), "commit": commit(), "model": self.args.model, "dtype": self.args.dtype,
            "settings": {"samples": self.args.samples, "long_samples": self.args.long_samples,
                         "profile": "default", "mode": "multi-request"},
            "rows": rows, "missing": missing,
            "notes": "accuracy: mean over every turn of every sample (multi-request: the context "
                     "compressed before any query, each query answered on it). diff_vs_dense, ci_low, "
                     "ci_high: the paired difference against dense (raw store) on the same samples, 95% "
                     "bootstrap interval over samples; inside the interval is no difference. "
                     "bytes_per_token: bytes the store took for a context / its tokens (the model computes"
                     " in float32, so raw entries are float32); dense_fp16_bytes_per_token: K+V of every "
                     "layer at 2 bytes an element. ttft_full_s: prefill (with compression) + first token "
                     "on sample 1 without a store (a coded row takes it from its raw row: it does not "
                     "depend on the store; an 8K row whose first sample missed the store takes that "
                     "sample's turn-1 TTFT less the store's put, as ttft_full_from says); ttft_hit_s: "
                     "the same context from the disk store (warm page "
                     "cache) + first token; ttft_speedup: ttft_full_s / ttft_hit_s; "
                     "ttft_speedup_vs_dense_prefill: the dense row's ttft_full_s (the prefill alone, no "
                     "compression) / ttft_hit_s; compress_s: the compression's own seconds in that "
                     "prefill. fetch_100mbit_s: one context from kvlife serve shaped to a constant 100 "
                     "Mbit/s (--fetch), fetch_bytes received: a compressed recipe's stored entry streamed "
                     "as kvlife fetch streams it (fetch_path stream-pieces: fetch_pieces layers, each at "
                     "the row's encoding, manifest, checksums and decode included), dense a blob of its "
                     "stored chunks' size fetched whole. entries_transcoded_from_raw: how many of a coded "
                     "row's entries were put by re-encoding its raw row's stored entries (the same "
                     "compressed cache) instead of compressing again; its answers come from the coded "
                     "entries, as on any hit. Rows at a set context length (8K) have --long-samples "
                     "samples. vs_raw (a coded row): the paired difference against the same recipe "
                     "stored raw. 'missing': rows of the full plan not measured yet. "
                     "scores_by_sample: a row's score per sample (what later rows pair with); machine: "
                     "where the row ran (the file's own machine is its last writer's; times pair only "
                     "within one machine); carried: a row kept as recorded from an earlier checkout "
                     "(its run files are gone; its pairing fields stand as computed then).",
        }
        target = Path(self.args.json)
        target.write_text(json.dumps(payload, indent=2))
        target.with_suffix(".md").write_text(report(payload))
        print(report(payload), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--long-samples", type=int, default=3,
                        help="samples of the rows at a set context length (8K tokens: each costs minutes)")
    parser.add_argument("--set", default="first", choices=sorted(SETS))
    parser.add_argument("--only", default=None, help="';'-separated recipes: run only these rows of the set")
    parser.add_argument("--match", default=None,
                        help="run only the rows whose slug (as `missing` names them) "
                        "matches this regular expression")
    parser.add_argument("--redo", default=None,
                        help="also measure again the carried rows (from an earlier checkout) whose slug "
                        "matches this regular expression, e.g. with more --long-samples")
    parser.add_argument("--out", default="results/lifecycle")
    parser.add_argument("--json", default=str(RESULTS / "lifecycle.json"),
                        help="results file (and its .md report)")
    parser.add_argument("--fetch", action="store_true",
                        help="run no model: time the saved rows' stored bytes over "
                        "kvlife serve's 100 Mbit/s shaped link, then rewrite the results")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: rewrite the results from saved rows")
    args = parser.parse_args()
    keys = SETS[args.set]
    if args.only:
        keep = set(args.only.split(";"))
        keys = [key for key in keys if key[0] in keep]
    if args.match:
        try:
            pattern = re.compile(args.match)
        except re.error as exc:
            parser.error(f"--match: not a regular expression ({exc})")
        keys = [key for key in keys if pattern.search(slug(*key))]
    redo = set()
    if args.redo:
        try:
            pattern = re.compile(args.redo)
        except re.error as exc:
            parser.error(f"--redo: not a regular expression ({exc})")
        redo = {key for key in keys if pattern.search(slug(*key))}
    lifecycle = Lifecycle(args)
    if args.fetch:
        fetch_rows(lifecycle, keys)
        lifecycle.write(keys)
    elif args.collect:
        lifecycle.write(keys)
    else:
        lifecycle.go(keys, redo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
