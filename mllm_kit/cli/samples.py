"""Human-readable view of an encoded sample: supervised spans marked, image spans collapsed."""

from __future__ import annotations

from itertools import groupby

from rich.markup import escape
from transformers import PreTrainedTokenizerBase

from mllm_kit.batch import IGNORE_INDEX
from mllm_kit.data.dataset import Sample


def render_sample(sample: Sample, tokenizer: PreTrainedTokenizerBase, image_token_id: int) -> str:
    """Rich markup: supervised text in green brackets ``[[...]]``, ``<image×N>`` for image spans."""
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    kinds = ["image" if i == image_token_id else "target" if lab != IGNORE_INDEX else "prompt" for i, lab in zip(ids, labels)]
    out = [f"[bold]sample {sample.id}[/] — {len(ids)} tokens, {sum(k == 'target' for k in kinds)} supervised"]
    text, pos = "", 0
    for kind, run in groupby(kinds):
        n = len(list(run))
        piece = ids[pos : pos + n]
        pos += n
        if kind == "image":
            text += f"[magenta]<image×{n}>[/]"
        elif kind == "target":
            text += f"[green]{escape('[[' + tokenizer.decode(piece) + ']]')}[/]"  # escaped whole: rich reads "[x]" as a tag
        else:
            text += escape(tokenizer.decode(piece))
    out.append(text)
    return "\n".join(out)
