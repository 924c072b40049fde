"""What the data says about ``max_length``, padding and packing: the token lengths of a data set, read and tokenized
as the runner and TRL's ``SFTTrainer`` would, and what follows from them.

:func:`profile_data` loads the data (:func:`.data.load_data`: local files, Hub ids), detects its format, converts it as
the runner does (:func:`.data.to_trl_dataset`) and tokenizes it as ``SFTTrainer`` does with the model's tokenizer
(:func:`lengths_and_starts`: the lengths of :func:`.data.token_lengths`, in batches, and where the trained tokens
start); without one (a size such as ``7B``, a Hub model not cached offline) it counts ``ceil(characters / 4)``
tokens per example (:data:`APPROXIMATION`) and says so.  From the lengths:

* the distribution: p50 / p90 / p99 / max (nearest-rank percentiles: the smallest length that at least that share of
  the examples do not exceed) and a histogram;
* the recommended ``max_length``: p99, so that at most 1% of the examples are truncated, unless the model's
  ``max_position_embeddings`` is shorter (or memory, decided with the planner: :func:`plan_with_data`); the share
  of examples longer than the ``max_length`` used, and of those whose trained tokens (the answer) all lie beyond it:
  TRL 1.16's ``SFTTrainer`` drops those when it truncates ("Drop examples left fully masked by truncation"), so the
  plan counts the examples it keeps;
* padding waste at a micro-batch (:meth:`DataProfile.with_batch`): the share of padded positions when the examples,
  truncated to ``max_length``, are batched in a random order (as the Trainer's ``RandomSampler`` draws them; seed
  :data:`ORDER_SEED` here) and each batch is padded to its longest, as TRL's ``DataCollatorForLanguageModeling``
  pads (``pad_to_multiple_of`` unset);
* packing: the rows TRL's own ``pack_dataset`` makes at ``max_length`` (:func:`.data.packed_rows`), and whether it
  pays: fewer positions (packed rows x ``max_length``, what the planner budgets a packed row as) than the padded
  positions of the unpacked batches.

Larger data is sampled (``sample`` examples without replacement, fixed seed) and every estimate carries its
sampling error (:data:`SAMPLING_NOTE`): 95% order-statistic bounds for the percentiles, standard errors for the
shares and the packed rows.  Reading and profiling 100k examples takes 14-17 s on 2 cores
(``benchmarks/data_profile_speed.py``).

Importing this module is free: ``datasets``, ``transformers`` and ``trl`` are imported by the functions that use them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import FinetuneHelperError, first_line
from ..units import fmt_run_length

#: examples tokenized at most; larger data is sampled (0 or None: all)
DEFAULT_SAMPLE = 10_000
#: the seed of the sample and of the random batch order
SAMPLE_SEED = 0
ORDER_SEED = 0
#: the percentiles reported
PERCENTILES = (50, 90, 99)
#: the percentile ``max_length`` covers
COVER = 99
#: bars of the histogram up to p99 (one more holds the examples above p99)
HISTOGRAM_BINS = 20
#: two-sided 95% normal quantile
Z95 = 1.959964
CHARS_PER_TOKEN = 4
APPROXIMATION = ("ceil(characters / 4) tokens per example, chat-template and special tokens not counted (OpenAI: "
                 "\"one token generally corresponds to ~4 characters of text for common English text\", "
                 "help.openai.com, What are tokens and how to count them?); code and other languages differ")
SAMPLING_NOTE = ("percentiles: 95% distribution-free bounds from the order statistics of the sample (the binomial "
                 "rank interval, normal approximation, finite-population corrected); shares: +-1.96 binomial "
                 "standard errors (finite-population corrected); padding waste: +-1.96 standard errors of a ratio "
                 "over the batches; packed rows: the sample's rows scaled to the data, +-1.96 standard errors of a "
                 "ratio over TRL's packing batches of 1000 examples")
PADDING_ORDER = (f"batches drawn in a random order as the Trainer's RandomSampler draws them (seed {ORDER_SEED} here), "
                 "each padded to its longest example as TRL's DataCollatorForLanguageModeling pads")

BUILTIN_DATA = "builtin:arithmetic"
BUILTIN_MODEL = "builtin:tiny-llama"


# ------------------------------------------------------------------------------------------------ pure statistics

def nearest_rank(sorted_values: list[int], p: float) -> int:
    """The ``p``-th percentile (0 < p <= 100) by nearest rank: the smallest value that at least ``p`` % of the values
    do not exceed (numpy's ``percentile(..., method="inverted_cdf")``)."""
    n = len(sorted_values)
    return sorted_values[min(n, max(1, math.ceil(p / 100 * n))) - 1]


def _fpc(n: int, population: int) -> float:
    """The finite-population correction of a variance: sampling ``n`` of ``population`` without replacement."""
    return 0.0 if n >= population else (population - n) / max(1, population - 1)


def percentile_bounds(sorted_values: list[int], p: float, population: int) -> tuple[int, int]:
    """95% bounds of the population's ``p``-th percentile from a sample: the order statistics at ranks
    ``n p -+ 1.96 sqrt(n p (1 - p))`` (the number of sample values below the true percentile is binomial; normal
    approximation, finite-population corrected).  Exact (both bounds the percentile) when the sample is everything."""
    n = len(sorted_values)
    q = p / 100
    spread = Z95 * math.sqrt(n * q * (1 - q) * _fpc(n, population))
    if spread == 0:
        value = nearest_rank(sorted_values, p)
        return value, value
    low = max(1, math.floor(n * q - spread))
    high = min(n, math.ceil(n * q + spread))
    return sorted_values[low - 1], sorted_values[high - 1]


def share_se(share: float, n: int, population: int) -> float:
    """The binomial standard error of a share measured on ``n`` of ``population`` examples (0 when all)."""
    return math.sqrt(share * (1 - share) / n * _fpc(n, population)) if n else 0.0


def batch_order(n: int, seed: int | None) -> list[int]:
    """The order batches are drawn in: the data's (``seed`` None) or a shuffle by ``random.Random(seed)``."""
    order = list(range(n))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


def padding(lengths: list[int], batch: int, *, seed: int | None = ORDER_SEED) -> dict[str, float]:
    """Batches of ``batch`` examples (``lengths``, already truncated), in :func:`batch_order`, each padded to its
    longest (the last batch may be smaller, as the Trainer's DataLoader keeps it): ``positions`` (rows x longest,
    summed), ``tokens``, ``waste`` = padded share of the positions, and ``waste_se``: the standard error of that ratio
    over the batches, ``sqrt(sum (pad_i - waste * pos_i)^2 / (k (k - 1))) / mean(pos)``."""
    if batch < 1:
        raise FinetuneHelperError("batch", f"must be a positive integer, got {batch!r}")
    order = batch_order(len(lengths), seed)
    pads: list[int] = []
    positions: list[int] = []
    for start in range(0, len(order), batch):
        chunk = [lengths[i] for i in order[start:start + batch]]
        longest = max(chunk)
        positions.append(longest * len(chunk))
        pads.append(longest * len(chunk) - sum(chunk))
    total, padded = sum(positions), sum(pads)
    waste = padded / total if total else 0.0
    k = len(positions)
    if k > 1 and total:
        residual = sum((pad - waste * pos) ** 2 for pad, pos in zip(pads, positions))
        se = math.sqrt(residual / (k * (k - 1))) / (total / k)
    else:
        se = 0.0
    return {"positions": total, "tokens": total - padded, "waste": waste, "waste_se": se}


def histogram(sorted_values: list[int], upper: int, bins: int = HISTOGRAM_BINS) -> list[dict[str, Any]]:
    """Equal-width bars of whole token counts from the shortest example to ``upper`` (p99), at most ``bins`` of them,
    and one more for the examples longer than ``upper`` when there are any: ``low``, ``high`` (inclusive),
    ``count`` and ``share`` of the values."""
    n = len(sorted_values)
    low = sorted_values[0]
    upper = max(upper, low)
    width = max(1, math.ceil((upper - low + 1) / bins))
    edges = list(range(low, upper + 1, width))
    out = []
    for start in edges:
        end = min(start + width - 1, upper)
        out.append({"low": start, "high": end, "count": 0})
    for value in sorted_values:
        if value > upper:
            break
        out[(value - low) // width]["count"] += 1
    above = sum(1 for value in sorted_values if value > upper)
    if above:
        out.append({"low": upper + 1, "high": sorted_values[-1], "count": above})
    for bar in out:
        bar["share"] = bar["count"] / n
    return out


# ---------------------------------------------------------------------------------------------------- the profile

@dataclass(frozen=True)
class DataProfile:
    """The token lengths of a data set and what follows from them (see the module docstring).  Counts of examples,
    positions and rows are for the whole data (estimated from the sample when ``sampled``)."""

    source: str
    split: str
    config: str | None
    format: str
    #: rows in the data (exact)
    examples: int
    #: examples tokenized: all of them, or a sample of this many
    sample_size: int
    sample_seed: int | None
    #: the tokenizer's name, or None when the lengths are :data:`APPROXIMATION`
    tokenizer: str | None
    #: why there is no tokenizer (None when there is one)
    tokenizer_note: str | None
    min: int
    p50: int
    p90: int
    p99: int
    max: int
    mean: float
    #: 95% bounds of each percentile ({"p50": (low, high), ...}; equal to it when not sampled)
    percentile_bounds: dict[str, tuple[int, int]]
    histogram: list[dict[str, Any]]
    #: the model's max_position_embeddings
    model_max_length: int
    recommended_max_length: int
    #: "p99", "max_position_embeddings" or "memory"
    max_length_source: str
    max_length_reason: str
    #: the max_length the figures below are for: the recommended one, or the one given (--seq-len)
    max_length: int
    max_length_given: bool
    truncated_share: float
    truncated_share_se: float
    #: examples whose trained tokens all lie beyond max_length (the prompt alone fills it): TRL's SFTTrainer drops
    #: them when it truncates (not when it packs)
    dropped_share: float
    dropped_share_se: float
    packing_strategy: str
    packed_rows: int
    packed_rows_se: float
    #: the micro-batch padding waste is measured at (None until :meth:`with_batch`)
    batch: int | None = None
    padding_waste: float | None = None
    padding_waste_se: float | None = None
    #: padded positions of the unpacked batches, for the whole data
    unpacked_positions: int | None = None
    #: tokens of each example in the sample (untruncated), in data order
    lengths: tuple[int, ...] = field(default=(), repr=False, compare=False)
    #: where each example's trained tokens start (0: every token is trained)
    starts: tuple[int, ...] = field(default=(), repr=False, compare=False)
    #: the sample's packed rows (unscaled), at max_length
    sample_packed_rows: int = field(default=0, repr=False)
    #: how the plan chose between packed and unpacked training when the user left it open (:func:`plan_with_data`
    #: with ``choose_packing``): ``packed`` / ``unpacked`` with the reason; None when packing was given
    packing_choice: str | None = None
    packing_choice_reason: str | None = None

    # ----------------------------------------------------------------------------------------------- derived
    @property
    def sampled(self) -> bool:
        return self.sample_size < self.examples

    @property
    def scale(self) -> float:
        """Examples per sampled example (1 when everything was read)."""
        return self.examples / self.sample_size

    @property
    def approximated(self) -> bool:
        return self.tokenizer is None

    @property
    def packed_positions(self) -> int:
        """Packed rows x max_length: the positions the planner budgets packed training for (TRL's padding-free
        batches of bfd-packed rows process only their tokens, at most this many)."""
        return self.packed_rows * self.max_length

    @property
    def packing_pays(self) -> bool | None:
        """Whether packed rows x max_length are fewer positions than the unpacked batches' padded positions (None
        until :meth:`with_batch`)."""
        if self.unpacked_positions is None:
            return None
        return self.packed_positions < self.unpacked_positions

    @property
    def mean_truncated(self) -> float:
        """Tokens per example after truncation to max_length (what is trained)."""
        return sum(self._truncated(self.max_length)) / len(self.lengths)

    @property
    def truncated_examples(self) -> int:
        return round(self.truncated_share * self.examples)

    @property
    def trained_examples(self) -> int:
        """The examples SFTTrainer trains on unpacked: all but those it drops (:attr:`dropped_share`)."""
        return self.examples - round(self.dropped_share * self.examples)

    def _truncated(self, max_length: int) -> list[int]:
        return [min(n, max_length) for n in self.lengths]

    def _kept(self, max_length: int) -> list[int]:
        """The truncated lengths of the examples SFTTrainer keeps when it truncates (unpacked training)."""
        return [min(n, max_length) for n, start in zip(self.lengths, self.starts) if start < max_length]

    # ----------------------------------------------------------------------------------------------- updates
    def at_max_length(self, max_length: int, *, given: bool | None = None) -> DataProfile:
        """The same data's truncation, packing (and padding, when measured) at ``max_length``."""
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise FinetuneHelperError("seq-len", f"must be a positive integer, got {max_length!r}")
        n = len(self.lengths)
        truncated = sum(1 for length in self.lengths if length > max_length) / n
        dropped = sum(1 for start in self.starts if start >= max_length) / n
        tokens = self._truncated(max_length)
        # bfd truncates each example to max_length before packing; the other strategies split the overflow
        chunks = _packed_chunks(tokens if self.packing_strategy == "bfd" else list(self.lengths), max_length,
                                self.packing_strategy)
        rows = sum(r for r, _ in chunks)
        rows_se = 0.0
        if self.sampled and len(chunks) > 1:  # a ratio over TRL's packing batches: rows per example
            ratio = rows / n
            k = len(chunks)
            residual = sum((r - ratio * m) ** 2 for r, m in chunks)
            rows_se = self.examples * math.sqrt(residual / (k * (k - 1))) / (n / k) * math.sqrt(_fpc(n, self.examples))
        elif self.sampled:  # one batch: from the spread of the tokens
            mean = sum(tokens) / n
            sd = math.sqrt(sum((t - mean) ** 2 for t in tokens) / max(1, n - 1))
            rows_se = rows * self.scale * sd / math.sqrt(n) * math.sqrt(_fpc(n, self.examples)) / mean
        estimate = round(rows * self.scale)
        updated = dataclasses.replace(
            self, max_length=max_length, max_length_given=self.max_length_given if given is None else given,
            truncated_share=truncated, truncated_share_se=share_se(truncated, n, self.examples),
            dropped_share=dropped, dropped_share_se=share_se(dropped, n, self.examples),
            packed_rows=max(1, estimate), packed_rows_se=rows_se, sample_packed_rows=rows)
        return updated.with_batch(self.batch) if self.batch else updated

    def with_recommendation(self, length: int, source: str, reason: str) -> DataProfile:
        """Another recommended max_length (the caller's memory cap); the figures follow it unless a max_length was
        given."""
        updated = dataclasses.replace(self, recommended_max_length=length, max_length_source=source,
                                      max_length_reason=reason)
        return updated if self.max_length_given else updated.at_max_length(length, given=False)

    def with_batch(self, batch: int) -> DataProfile:
        """Padding waste, and whether packing pays, at micro-batch ``batch`` (:func:`padding`)."""
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise FinetuneHelperError("batch", f"must be a positive integer, got {batch!r}")
        kept = self._kept(self.max_length)
        if not kept:
            return dataclasses.replace(self, batch=batch, padding_waste=0.0, padding_waste_se=0.0,
                                       unpacked_positions=0)
        pad = padding(kept, batch)
        return dataclasses.replace(self, batch=batch, padding_waste=pad["waste"], padding_waste_se=pad["waste_se"],
                                   unpacked_positions=round(pad["positions"] * self.scale))

    # ------------------------------------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        pays = self.packing_pays
        return {
            "source": self.source, "split": self.split, "config": self.config, "format": self.format,
            "examples": self.examples, "sampled": self.sampled, "sample_size": self.sample_size,
            "sample_seed": self.sample_seed if self.sampled else None,
            "tokenizer": self.tokenizer, "approximation": APPROXIMATION if self.approximated else None,
            "tokenizer_note": self.tokenizer_note,
            "tokens": {"min": self.min, "p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max,
                       "mean": round(self.mean, 2)},
            "percentile_bounds_95": {k: list(v) for k, v in self.percentile_bounds.items()},
            "histogram": [dict(bar) for bar in self.histogram],
            "model_max_length": self.model_max_length,
            "recommended_max_length": self.recommended_max_length,
            "max_length_source": self.max_length_source,
            "max_length_reason": self.max_length_reason,
            "max_length": self.max_length, "max_length_given": self.max_length_given,
            "truncated_share": self.truncated_share, "truncated_share_se": self.truncated_share_se,
            "truncated_examples": self.truncated_examples,
            "dropped_share": self.dropped_share, "dropped_share_se": self.dropped_share_se,
            "trained_examples": self.trained_examples,
            "padding": None if self.batch is None else {
                "batch": self.batch, "waste": self.padding_waste, "waste_se": self.padding_waste_se,
                "positions": self.unpacked_positions, "order": PADDING_ORDER},
            "packing": {"strategy": self.packing_strategy, "max_length": self.max_length, "rows": self.packed_rows,
                        "rows_se": round(self.packed_rows_se, 2), "positions": self.packed_positions,
                        "unpacked_positions": self.unpacked_positions, "pays": pays,
                        "tokens": round(self.mean_truncated * self.examples),
                        "saving": (1 - self.packed_positions / self.unpacked_positions
                                   if self.unpacked_positions else None),
                        "choice": self.packing_choice, "choice_reason": self.packing_choice_reason},
            "sampling_error": SAMPLING_NOTE if self.sampled else "none: every example was tokenized (the padding "
                                                                 "waste still varies with the batch order: +-1.96 "
                                                                 "standard errors)",
        }


# ------------------------------------------------------------------------------------------------------- loading

#: examples TRL's ``pack_dataset`` packs together at most: it packs in the batches of ``datasets``' ``map`` (1000 rows
#: by default), so rows never mix examples of two batches
PACK_BATCH = 1000


def _packed_chunks(lengths: list[int], max_length: int, strategy: str) -> list[tuple[int, int]]:
    """(packed rows, examples) of each batch of :data:`PACK_BATCH` examples, packed by TRL's own ``pack_dataset``
    (:func:`.data.packed_rows`): their sum is the rows of one call over all the examples (tested), and their spread
    gives the sampling error of the rows."""
    from .data import packed_rows

    with _quiet_datasets():
        return [(packed_rows(lengths[i:i + PACK_BATCH], max_length, strategy), len(lengths[i:i + PACK_BATCH]))
                for i in range(0, len(lengths), PACK_BATCH)]


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars from ``datasets`` (reading, mapping, packing) while profiling, and no tokenizer warning that
    an example is longer than the model's maximum (measuring that is the point); restored afterwards."""
    import logging

    from datasets.utils import logging as ds_logging

    from .data import logger_at

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        with logger_at("transformers.tokenization_utils_base", logging.ERROR):
            yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _model_spec(model: Any):
    from ..recommender.model import ModelSpec, resolve_model

    if isinstance(model, ModelSpec):
        return model
    if str(model).strip() == BUILTIN_MODEL:
        from .tiny import TINY_LLAMA_CONFIG

        return ModelSpec.from_config(TINY_LLAMA_CONFIG, name=BUILTIN_MODEL, origin="builtin")
    return resolve_model(str(model))


def _tokenizer_source(spec) -> tuple[str | None, str | None]:
    """Where the model's tokenizer is (a folder or a Hub id), or (None, why there is none)."""
    from pathlib import Path

    if spec.origin == "builtin" or spec.name == BUILTIN_MODEL:
        from .tiny import base_model_dir

        return str(base_model_dir()), None
    if spec.origin == "size":
        return None, f"{spec.name} is a size, not a model with a tokenizer"
    if spec.origin == "local":
        path = Path(spec.name).expanduser()
        return str(path.parent if path.is_file() else path), None
    return spec.name, None


def load_tokenizer(source: str) -> tuple[Any | None, str | None]:
    """``AutoTokenizer.from_pretrained(source)`` (a folder, or a Hub id: the local cache first), with the runner's
    default chat template when it has none; ``(None, why)`` when it cannot be loaded (offline and not cached,
    gated, no tokenizer files)."""
    from transformers import AutoTokenizer

    from .prepare import DEFAULT_CHAT_TEMPLATE

    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache (or not a local folder): the Hub, unless offline
        import os

        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        if offline:
            return None, f"the tokenizer of {source} is not available offline (HF_HUB_OFFLINE is set, not cached)"
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as exc:  # noqa: BLE001 - gated, missing, no network: all fall back the same way
            return None, f"cannot load the tokenizer of {source}: {first_line(exc)[:160]}"
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # what the runner trains with (prepare.load_tokenizer)
    return tokenizer, None


def _load(data: str, split: str, config: str | None, fmt: str | None):
    from .data import detect_format, load_data

    if data == BUILTIN_DATA:
        from datasets import Dataset

        if split != "train" or config:
            raise FinetuneHelperError("data.split" if split != "train" else "data.config",
                                      f"{BUILTIN_DATA} has one split, train, and no configurations")
        from .tiny import N_DEMO_TRAIN, synthetic_dataset

        dataset = Dataset.from_list(synthetic_dataset(N_DEMO_TRAIN, seed=0, split="train", fmt=fmt or "alpaca"))
        return dataset, detect_format(dataset.column_names, dataset[0])
    return load_data(data, split=split, config=config, fmt=fmt)


def _chars(example: dict) -> int:
    def text(value: Any) -> int:
        if isinstance(value, str):
            return len(value)
        return sum(len(str(turn.get("content") or "")) for turn in value)

    if "prompt" in example:
        return text(example["prompt"]) + text(example["completion"])
    return text(example["messages"] if "messages" in example else example["text"])


#: examples tokenized per call (the chat template renders one by one; the tokenizer encodes a batch at once)
TOKENIZE_BATCH = 256


def lengths_and_starts(dataset, tokenizer) -> tuple[list[int], list[int]]:
    """The tokens of each example of a dataset :func:`.data.to_trl_dataset` made, and where its trained tokens start,
    as TRL 1.16's ``SFTTrainer`` tokenizes and masks them (``_prepare_dataset``), in batches
    (:data:`TOKENIZE_BATCH`: ``apply_chat_template`` and the tokenizer take lists; the lengths are those of
    :func:`.data.token_lengths`, tested):

    * prompt/completion: the completion starts where the tokenized prompt (conversational: with the generation
      prompt) and the tokenized prompt + completion diverge (``trl.data_utils.common_prefix_length``); a text
      completion gets its EOS first;
    * a conversation trained with ``assistant_only_loss``: at its first assistant token (``assistant_masks``);
    * plain text (EOS appended when missing): at 0, every token is trained.

    An example whose start is at or beyond ``max_length`` has no trained token left after truncation: TRL drops it."""
    from trl.data_utils import common_prefix_length

    eos = tokenizer.eos_token or ""

    def chat(conversations: list, **kwargs) -> dict:
        return tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True, **kwargs)

    def with_eos(text: str) -> str:
        return text if text.endswith(eos) else text + eos

    lengths: list[int] = []
    starts: list[int] = []
    for first in range(0, len(dataset), TOKENIZE_BATCH):
        columns = dataset[first:first + TOKENIZE_BATCH]
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        out: list[tuple[int, int] | None] = [None] * len(rows)
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            kind = ("chat_pc" if isinstance(row["prompt"], list) else "text_pc") if "prompt" in row else \
                "messages" if "messages" in row else "text"
            groups.setdefault(kind, []).append(i)
        for kind, index in groups.items():
            if kind == "chat_pc":
                prompts = chat([rows[i]["prompt"] for i in index], add_generation_prompt=True)["input_ids"]
                fulls = chat([rows[i]["prompt"] + rows[i]["completion"] for i in index])["input_ids"]
                found = [(len(f), common_prefix_length(p, f)) for p, f in zip(prompts, fulls)]
            elif kind == "text_pc":
                prompts = tokenizer(text=[rows[i]["prompt"] for i in index])["input_ids"]
                fulls = tokenizer(text=[rows[i]["prompt"] + with_eos(rows[i]["completion"]) for i in index])[
                    "input_ids"]
                found = [(len(f), common_prefix_length(p, f)) for p, f in zip(prompts, fulls)]
            elif kind == "messages":
                encoded = chat([rows[i]["messages"] for i in index], return_assistant_tokens_mask=True)
                found = [(len(ids), list(mask).index(1) if 1 in mask else 0)
                         for ids, mask in zip(encoded["input_ids"], encoded["assistant_masks"])]
            else:
                found = [(len(ids), 0) for ids in tokenizer(text=[with_eos(rows[i]["text"]) for i in index])[
                    "input_ids"]]
            for i, pair in zip(index, found):
                out[i] = pair
        lengths += [length for length, _ in out]
        starts += [start for _, start in out]
    return lengths, starts


def _approximate_start(example: dict) -> int:
    """:func:`lengths_and_starts`' start by :data:`APPROXIMATION`: the characters before the trained part, over 4."""
    if "prompt" in example:
        return _chars({"text": example["prompt"]}) // CHARS_PER_TOKEN
    if "messages" in example:
        before = 0
        for turn in example["messages"]:
            if turn.get("role") == "assistant":
                return before // CHARS_PER_TOKEN
            before += len(str(turn.get("content") or ""))
    return 0


_ROW = re.compile(r"^row (\d+): ")


def profile_data(data: str, *, model: Any, split: str = "train", config: str | None = None,
                 max_length: int | None = None, batch: int | None = None, sample: int | None = DEFAULT_SAMPLE,
                 seed: int = SAMPLE_SEED, tokenizer: Any = None, fmt: str | None = None,
                 packing_strategy: str = "bfd") -> DataProfile:
    """Read ``data`` (a local .json/.jsonl/.csv/.parquet file or folder, a Hub dataset id, or ``builtin:arithmetic``)
    and profile its token lengths for ``model`` (a ModelSpec, or what ``--model`` takes).

    ``tokenizer``: None loads the model's own (its folder, or its Hub id from the cache); a name or folder loads that
    one; a tokenizer object is used as it is.  Without one the lengths are :data:`APPROXIMATION`.
    ``max_length``: the length the figures are for (``--seq-len``); None: the recommended one.  ``batch``: measure the
    padding waste at this micro-batch now (else :meth:`DataProfile.with_batch`).  ``sample``: tokenize at most this
    many examples, drawn without replacement by ``random.Random(seed)`` and kept in data order (0 or None: all).
    Bad input raises :class:`FinetuneHelperError` naming ``data.path`` / ``data.split`` / ``data.config`` (the
    loader's fields) or ``data-sample``."""
    if sample is not None and (not isinstance(sample, int) or isinstance(sample, bool) or sample < 0):
        raise FinetuneHelperError("data-sample", f"must be a whole number >= 0 (0: every example), got {sample!r}")
    if packing_strategy not in ("bfd", "bfd_split", "wrapped"):
        raise FinetuneHelperError("packing_strategy", f"{packing_strategy!r} is not one of bfd, bfd_split, wrapped")
    spec = _model_spec(model)
    with _quiet_datasets():
        dataset, detected = _load(str(data), split, config, fmt)
        total = len(dataset)
        indices = None
        if sample and total > sample:
            indices = sorted(random.Random(seed).sample(range(total), sample))
            dataset = dataset.select(indices)

        note = None
        name = None
        if tokenizer is None:
            source, note = _tokenizer_source(spec)
            if source is not None:
                tokenizer, note = load_tokenizer(source)
                name = source if tokenizer is not None else None
        elif isinstance(tokenizer, str):
            source = tokenizer
            tokenizer, note = load_tokenizer(source)
            name = source if tokenizer is not None else None
        else:
            name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)

        from .data import chat_template_supports_assistant_mask, to_trl_dataset

        supported = chat_template_supports_assistant_mask(tokenizer) if tokenizer is not None else True
        try:
            converted, _, _ = to_trl_dataset(dataset, detected, assistant_mask_supported=supported)
        except FinetuneHelperError as exc:  # name the file's row, not the sample's
            match = _ROW.match(exc.message)
            if match and indices is not None:
                row = indices[int(match.group(1))]
                raise FinetuneHelperError(exc.field, f"row {row}: {exc.message[match.end():]}") from None
            raise
        if tokenizer is not None:
            lengths, starts = lengths_and_starts(converted, tokenizer)
        else:
            lengths = [max(1, math.ceil(_chars(example) / CHARS_PER_TOKEN)) for example in converted]
            starts = [_approximate_start(example) for example in converted]

    n = len(lengths)
    ordered = sorted(lengths)
    p = {f"p{q}": nearest_rank(ordered, q) for q in PERCENTILES}
    cover = p[f"p{COVER}"]
    limit = spec.max_position_embeddings
    if cover > limit:
        recommended, source_of = limit, "max_position_embeddings"
        reason = f"the model's max_position_embeddings, below p{COVER} ({cover} tokens)"
    else:
        recommended, source_of = cover, f"p{COVER}"
        reason = (f"p{COVER} of the token lengths: at most {100 - COVER}% of the examples are truncated (the model "
                  f"allows {limit})")
    profile = DataProfile(
        source=str(data), split=split, config=config, format=detected, examples=total, sample_size=n,
        sample_seed=seed, tokenizer=name, tokenizer_note=note, min=ordered[0], **p, max=ordered[-1],
        mean=sum(lengths) / n,
        percentile_bounds={f"p{q}": percentile_bounds(ordered, q, total) for q in PERCENTILES},
        histogram=histogram(ordered, cover), model_max_length=limit, recommended_max_length=recommended,
        max_length_source=source_of, max_length_reason=reason, max_length=recommended, max_length_given=False,
        truncated_share=0.0, truncated_share_se=0.0, dropped_share=0.0, dropped_share_se=0.0,
        packing_strategy=packing_strategy, packed_rows=0, packed_rows_se=0.0, lengths=tuple(lengths),
        starts=tuple(starts))
    profile = profile.at_max_length(max_length if max_length is not None else recommended,
                                    given=max_length is not None)
    return profile.with_batch(batch) if batch else profile


# ------------------------------------------------------------------------------------------------------ planning

#: attention implementations with a variable-length kernel: packed rows attend per example, not as one masked
#: sequence (TRL warns that padding-free rows need a flash-attention variant; transformers' SDPA builds a
#: block-diagonal mask over the whole row, quadratic in its length)
VARLEN_ATTENTION = ("flash_attention_2",)


def plan_with_data(req, profile: DataProfile, *, choose_packing: bool = False):  # -> (Plan, DataProfile)
    """Plan ``req`` for the profiled data: the dataset size is the examples SFTTrainer trains on (all but those whose
    answer lies wholly beyond max_length, which it drops; with ``req.packing`` the packed rows at the max_length
    used), the sequence length the recommended max_length unless ``req.seq_len`` is given
    (then the profile must be at that length: ``profile_data(max_length=...)``).  When batch 1 does not fit at the
    recommended length but fits at a shorter one, the longest that fits (:func:`longest_fitting`) is recommended
    instead, with that reason.  Returns the plan and the profile with its padding waste at the plan's micro-batch.

    ``choose_packing`` (packing left open by the user): both ways are planned and the one predicted faster for
    this data is taken (:func:`data_seconds`; without catalog rates for the GPU, the one with fewer positions),
    packed only where the run's attention has a variable-length kernel (:data:`VARLEN_ATTENTION`) on a GPU; the
    choice and its reason are in the profile (``packing_choice``)."""
    if not choose_packing:
        return _plan_with_data(req, profile)
    unpacked, u_profile = _plan_with_data(dataclasses.replace(req, packing=False), profile)
    packed, p_profile = _plan_with_data(dataclasses.replace(req, packing=True), profile)
    attn = req.attn_implementation or req.model.default_attn_implementation
    u_time, p_time = data_seconds(unpacked, u_profile), data_seconds(packed, p_profile)
    if u_time is not None and p_time is not None and packed.fits:
        better, gain = p_time < u_time, "be faster"
        figures = (f"packed {fmt_run_length(p_time)} against unpacked {fmt_run_length(u_time)} (predicted for "
                   f"{req.gpu.name}, unpacked batches padded as this data pads them)")
    else:
        better, gain = bool(u_profile.packing_pays) and packed.fits, "take fewer positions"
        figures = (f"packed rows take {p_profile.packed_positions:,} positions against "
                   f"{u_profile.unpacked_positions:,} unpacked (no catalog rates for {req.gpu.name} to time them)")
    varlen = attn in VARLEN_ATTENTION and req.device != "cpu"
    if better and not varlen:
        reason = (f"packing would {gain}: {figures}; but {attn}{' on the CPU' if req.device == 'cpu' else ''} "
                  "has no variable-length kernel and attends a packed row as one masked sequence, quadratic in its "
                  "length (--attn-implementation flash_attention_2 on a GPU, or --packing, packs)")
    else:
        reason = figures + ("" if better else "; --packing packs anyway")
    choice = "packed" if better and varlen else "unpacked"
    plan, chosen = (packed, p_profile) if choice == "packed" else (unpacked, u_profile)
    return plan, dataclasses.replace(chosen, packing_choice=choice, packing_choice_reason=reason)


def data_seconds(plan, profile: DataProfile) -> float | None:
    """The plan's predicted run length on this data (None without catalog rates): packed rows run full (each
    ``max_length`` tokens, as the plan counts them); unpacked batches process the positions this data pads them to
    (``profile.with_batch``), so the forward / backward share of the plan's time (timed as full rows) is scaled by
    those positions over the full rows'; the optimizer steps are as many either way."""
    time = plan.time()
    if "total_seconds" not in time:
        return None
    if plan.request.packing:
        return time["total_seconds"]
    at_batch = profile.with_batch(plan.per_device_train_batch_size)
    full_rows = plan.request.dataset_size * profile.max_length
    compute = time["seconds_per_micro_step"] * plan.gradient_accumulation_steps * plan.total_steps
    return compute * at_batch.unpacked_positions / full_rows + (time["total_seconds"] - compute)


def _plan_with_data(req, profile: DataProfile):  # (PlanRequest, DataProfile) -> (Plan, DataProfile)
    """:func:`plan_with_data` with the packing ``req`` says."""
    from ..recommender.plan import recommend_plan

    given = req.seq_len is not None
    if given and profile.max_length != req.seq_len:
        profile = profile.at_max_length(req.seq_len, given=True)

    def planned(p: DataProfile):
        size = p.packed_rows if req.packing else p.trained_examples
        if size < 1:
            raise FinetuneHelperError("seq-len", f"at max_length {p.max_length} every example's prompt fills the "
                                      "sequence, so SFTTrainer would drop them all (no answer token left to train); "
                                      "give a longer --seq-len")
        return dataclasses.replace(req, seq_len=p.max_length, dataset_size=size)

    plan = recommend_plan(planned(profile))
    if not given and not plan.fits:
        longest = longest_fitting(planned(profile), profile.recommended_max_length)
        if longest is not None:
            what = f"p{COVER} of the data" if profile.max_length_source == f"p{COVER}" else "the model's maximum"
            profile = profile.with_recommendation(
                longest, "memory", f"the longest sequence with which batch 1 fits in {req.gpu.describe()} "
                f"({profile.recommended_max_length} tokens, {what}, do not fit)")
            plan = recommend_plan(planned(profile))
    return plan, profile.with_batch(plan.per_device_train_batch_size)


def longest_fitting(req, longest: int) -> int | None:  # (PlanRequest, int) -> int | None
    """The longest sequence length up to ``longest`` with which batch 1 fits (``recommend_plan(...).fits``), rounded
    down to a multiple of 8 from 8 on; None when ``longest`` fits, or when even one token does not (the model itself
    does not fit: no length helps)."""
    from ..recommender.plan import recommend_plan

    def fits(length: int) -> bool:
        return recommend_plan(dataclasses.replace(req, seq_len=length)).fits

    if fits(longest) or not fits(1):
        return None
    low, high = 1, longest  # fits(low), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low - low % 8 if low >= 8 else low
