"""Run benches with a :class:`~mllm_kit.inference.Generator`: shard items over ranks, generate (or score options),
update the bench's metric (its states sync across ranks), gather per-sample rows on rank 0 and write them in
lmms-eval's output layout: ``<out>/<date>_results.json`` and ``<out>/<date>_samples_<bench>.jsonl``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mllm_kit.evaluation.benches import Bench, Output
from mllm_kit.evaluation.formats import Item
from mllm_kit.files import atomic_write_json, atomic_write_text
from mllm_kit.inference import GenerationConfig, Generator
from mllm_kit.log import progress

RESULTS_FORMAT = "lmms-eval"


@dataclass
class BenchResult:
    name: str
    metrics: dict[str, float]
    num_samples: int
    rows: list[dict[str, Any]] = field(default_factory=list)  # on rank 0 only


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_bench(generator: Generator, name: str, bench: Bench, items: Sequence[Item], config: GenerationConfig | None = None,
              batch_size: int = 8, show_progress: bool = True) -> BenchResult:
    """Score ``items`` (every rank passes the same list; rank r takes items r, r + world, ...). Metrics are over all items."""
    rank, world = rank_and_world()
    config = config or GenerationConfig(max_new_tokens=bench.max_new_tokens)
    mine = list(items)[rank::world]
    metric = bench.metric(items).to(generator.device)
    rows: list[dict[str, Any]] = []
    chunks = [mine[k : k + batch_size] for k in range(0, len(mine), batch_size)]
    for chunk in progress(chunks, f"{name} (rank {rank})" if world > 1 else name) if show_progress else chunks:
        outputs = _outputs(generator, bench, chunk, config, batch_size)
        bench.update(metric, chunk, outputs)
        rows += [_row(bench, item, output) for item, output in zip(chunk, outputs)]
    metrics = bench.compute(metric)  # torchmetrics all-reduces the states when a process group is up
    if world > 1:
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part] if rank == 0 else []
    order = {item.id: k for k, item in enumerate(items)}
    rows.sort(key=lambda r: order[r["id"]])
    return BenchResult(name, metrics, len(items), rows)


def _outputs(generator: Generator, bench: Bench, items: Sequence[Item], config: GenerationConfig, batch_size: int) -> list[Output]:
    prompts = [item.prompt for item in items]
    if bench.scoring == "generate":
        return list(generator.generate(prompts, config, batch_size=batch_size))
    pairs = [(p, text) for p, item in zip(prompts, items) for text in item.options.values()]
    scores = generator.loglikelihood([p for p, _ in pairs], [t for _, t in pairs], batch_size=batch_size)
    out, k = [], 0
    for item in items:
        out.append([s for s, _ in scores[k : k + len(item.options)]])
        k += len(item.options)
    return out


def _row(bench: Bench, item: Item, output: Output) -> dict[str, Any]:
    response = output if isinstance(output, str) else [round(s, 6) for s in output]
    return {"doc_id": item.id, "id": item.id, "input": item.prompt.text, "target": item.answers,
            "resps": [[response]], "filtered_resps": [response], **bench.record(item, output)}


def write_results(out_dir: str | Path, results: Sequence[BenchResult], config: dict[str, Any]) -> Path:
    """``<date>_results.json`` (lmms-eval's keys: results, n-samples, config, date) and one samples JSONL per bench,
    each written atomically. Returns the results file."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    for r in results:
        atomic_write_text(out / f"{stamp}_samples_{r.name}.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in r.rows))
    payload = {
        "results": {r.name: {"alias": r.name, **{f"{k},none": v for k, v in r.metrics.items()}} for r in results},
        "n-samples": {r.name: {"original": r.num_samples, "effective": r.num_samples} for r in results},
        "config": config,
        "date": time.time(),
        "format": RESULTS_FORMAT,
    }
    path = out / f"{stamp}_results.json"
    atomic_write_json(path, payload)
    return path


def results_table(results: Sequence[BenchResult]):
    from rich.table import Table

    table = Table(title="benchmarks")
    for column in ("bench", "samples", "metric", "value"):
        table.add_column(column)
    for r in results:
        for k, (metric, value) in enumerate(sorted(r.metrics.items())):
            table.add_row(r.name if k == 0 else "", str(r.num_samples) if k == 0 else "", metric, f"{value:.4f}")
    return table
