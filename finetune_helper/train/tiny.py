"""The embedded tiny default: a fully offline fine-tune on CPU (behind ``make demo``).

Four pieces, all local, no network, deterministic for a seed:

* :func:`build_tiny_assets` writes a random-init Llama-style model (:data:`TINY_LLAMA_CONFIG`, safetensors) and a
  byte-level BPE tokenizer trained here, on text this module generates, with a chat template that TRL can train on
  (``{% generation %}`` around assistant turns, so ``assistant_only_loss=True`` works).  Tests use it.
* :func:`pretrain_base` pre-trains that model on plain-text dialogues (:data:`PRETRAINING`) into the base that is
  shipped in ``tiny-base/`` (:func:`base_model_dir`, checked by :func:`check_base`): what the demo fine-tunes.
  Rebuild it with ``python -m finetune_helper.train.tiny pretrain``.
* :func:`synthetic_dataset` makes checkable instruction data (two-digit addition, optionally digit reversal) in
  the five formats users bring (alpaca, sharegpt, messages, prompt_completion, text); :func:`write_dataset` writes
  it as .jsonl / .json / .csv / .parquet.
* :func:`exact_match` scores a (plain or PEFT) model by greedy generation through the chat template;
  :func:`text_exact_match` through the base's pre-training text format.

torch, transformers and tokenizers are imported inside the functions only: importing this module is free.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
from typing import Any, Iterable, Sequence

#: bump when the assets built by :func:`build_tiny_assets` change for the same seed (invalidates old directories)
TINY_ASSETS_VERSION = 1

MANIFEST_NAME = "tiny_manifest.json"

#: special tokens, in id order (the first ids of the vocabulary)
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS.values()]

#: the model, as the config.json dict it is saved with ("config in the repo").  0.85 M parameters: vocab 512 (the
#: BPE trainer stops at ~390 tokens on this corpus; the rest are spare rows), hidden 128, 4 layers, grouped-query
#: attention with 4 query / 2 KV heads, tied embeddings.  Measured (TRL SFT, 1000 steps, lr 3e-3): 2 layers learn
#: two-digit addition only by luck of the seed (8.5-52 % exact match, one 93 % at 700 steps), 4 layers reached
#: 99.5 %; hidden 256 x 4 layers (3.3 M) was 5x slower a step and learned more slowly.
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

#: tokenizer training parameters (part of the manifest: changing them rebuilds)
TINY_TOKENIZER_PARAMS: dict[str, Any] = {"kind": "byte_level_bpe", "vocab_size": 512, "min_frequency": 2,
                                         "individual_digits": True, "corpus_examples": 3000}

#: Chat template.  Every turn is ``<|role|>\n{content}<|end|>\n``; assistant content *and* its ``<|end|>`` sit inside
#: ``{% generation %}`` so the model learns to stop.  Rendered with trim_blocks, so newlines are explicit.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' + '\\n' }}"
    "{% generation %}{{ message['content'] | trim }}{{ eos_token }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + (message['content'] | trim) + eos_token + '\\n' }}"
    "{% else %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\\n' }}{% endif %}"
)

#: The held-out problems the demo scores (exact match, greedy) before and after fine-tuning.
N_HOLDOUT = 200
#: Training examples the demo generates when the recipe gives no ``data.max_examples``.
N_DEMO_TRAIN = 3000

#: How the shipped base model (:func:`base_model_dir`) was pre-trained by :func:`pretrain_base`: next-token loss on
#: every token of text dialogues (:func:`pretraining_text`) about the *train* split of two-digit addition, packed
#: into blocks of ``block`` tokens, AdamW from the random init of :func:`build_model` with a pre-training learning
#: rate (3e-3, betas (0.9, 0.95), clipping at 1.0: nanoGPT's small-model settings), 100 warmup steps and cosine decay
#: to 0 over ``steps``.  Addition is learned in a sudden transition (loss plateau near 0.56, then a drop below 0.5)
#: whose step depends on the data order and on float rounding (measured here: ~1500 to ~4400 steps for different
#: orders), so the base is built once and shipped, and :func:`pretrain_base` refuses to save a base below
#: ``min_text_exact_match``.  Stopping soon after the transition matters for the fine-tune: from this recipe's base
#: the demo fine-tune reached 99.5 % held-out exact match; from a base trained on to 6000 steps, 3-17 %; from one
#: stopped 250 steps after the transition at 4750 steps, 56.5 % (same fine-tune, measured 2026-11-29).  Part of the
#: manifest: changing a value means rebuilding.
PRETRAINING: dict[str, Any] = {
    "text_format": "User:\n{question}\nAssistant:\n{answer}\n",
    "tasks": ["add"],
    "split": "train",
    "block": 64,
    "batch": 32,
    "steps": 2000,
    "learning_rate": 3.0e-3,
    "warmup_steps": 100,
    "betas": [0.9, 0.95],
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "min_text_exact_match": 0.8,
    "seed": 0,
}

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
TASKS = ("add", "reverse")
_TEST_BUCKETS = 10  # one problem in 10 (by hash) belongs to the test split


# --------------------------------------------------------------------------------------------------- datasets

def _problem_key(task: str, args: tuple) -> str:
    return task + ":" + ",".join(map(str, args))


def _is_test(key: str) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % _TEST_BUCKETS == 0


def _problem_pool(task: str) -> list[tuple]:
    if task == "add":  # two-digit addition: 8100 problems
        return [(a, b) for a in range(10, 100) for b in range(10, 100)]
    if task == "reverse":  # reverse a 3-5 digit string: 111000 problems
        return [(f"{n:0{k}d}",) for k in (3, 4, 5) for n in range(10 ** k)]
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def _render(task: str, args: tuple) -> tuple[str, str]:
    """(question, answer) of one problem."""
    if task == "add":
        a, b = args
        return f"What is {a} + {b}?", str(a + b)
    (s,) = args
    return f"Reverse the digits {s}.", s[::-1]


_POOLS: dict[tuple[str, str], list[tuple]] = {}


def _split_pool(task: str, split: str) -> list[tuple]:
    if (task, split) not in _POOLS:
        want_test = split == "test"
        _POOLS[task, split] = [p for p in _problem_pool(task) if _is_test(_problem_key(task, p)) == want_test]
    return _POOLS[task, split]


def format_example(question: str, answer: str, fmt: str = "alpaca", system: str | None = None) -> dict[str, Any]:
    """One (question, answer) pair in one of :data:`FORMATS`."""
    if fmt == "alpaca":
        ex = {"instruction": question, "input": "", "output": answer}
        if system:
            ex["system"] = system
        return ex
    if fmt == "sharegpt":
        conv = ([{"from": "system", "value": system}] if system else []) + [
            {"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return {"conversations": conv}
    if fmt == "messages":
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return {"messages": msgs}
    if fmt == "prompt_completion":
        return {"prompt": (system + "\n\n" if system else "") + question, "completion": answer}
    if fmt == "text":
        return {"text": (system + "\n\n" if system else "") + f"User: {question}\nAssistant: {answer}"}
    raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")


def synthetic_dataset(n: int, *, seed: int = 0, split: str = "train", fmt: str = "alpaca",
                      tasks: Sequence[str] = ("add",), system: str | None = None) -> list[dict]:
    """``n`` deterministic, checkable instruction examples ("What is 37 + 48?" -> "85").

    The split of a problem is fixed by a hash of the problem itself (one in ten is ``test``), so ``train`` and
    ``test`` never share a problem whatever the seeds; ``seed`` picks which problems (without replacement) and their
    order.  ``tasks`` mixes tasks round-robin: ``add`` (two-digit addition, 7.3k train / 0.8k test problems) and
    ``reverse`` (reverse a 3-5 digit string).  ``fmt`` is one of :data:`FORMATS`; every format carries the same
    problems in the same order.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    if not tasks:
        raise ValueError("tasks must not be empty")
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(f"finetune-helper-tiny:{seed}:{split}")
    counts = [n // len(tasks) + (1 if i < n % len(tasks) else 0) for i in range(len(tasks))]
    picked: list[list[tuple]] = []
    for task, k in zip(tasks, counts):
        pool = _split_pool(task, split)
        if k > len(pool):
            raise ValueError(f"asked for {k} {split} problems of task {task!r}, only {len(pool)} exist")
        picked.append(rng.sample(pool, k))
    out = []
    for i in range(max(counts, default=0)):
        for task, probs in zip(tasks, picked):
            if i < len(probs):
                out.append(format_example(*_render(task, probs[i]), fmt=fmt, system=system))
    return out


def question_answer(example: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, expected answer) of an example in any of :data:`FORMATS`.

    The prompt is the conversation up to (not including) the last assistant turn, in OpenAI role/content form.
    """
    if "messages" in example or "conversations" in example:
        role_of = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
        raw = example.get("messages") or example.get("conversations")
        msgs = [{"role": role_of[m.get("role", m.get("from"))], "content": m.get("content", m.get("value"))}
                for m in raw]
        if not msgs or msgs[-1]["role"] != "assistant":
            raise ValueError("a conversation must end with an assistant turn")
        return msgs[:-1], msgs[-1]["content"]
    if "instruction" in example:
        user = example["instruction"] + (("\n\n" + example["input"]) if example.get("input") else "")
        msgs = ([{"role": "system", "content": example["system"]}] if example.get("system") else [])
        return msgs + [{"role": "user", "content": user}], example["output"]
    if "prompt" in example:
        return [{"role": "user", "content": example["prompt"]}], example["completion"]
    if "text" in example:
        head, sep, answer = example["text"].rpartition("\nAssistant: ")
        if not sep:
            raise ValueError("text example must contain '\\nAssistant: '")
        system, _, user = head.rpartition("User: ")
        msgs = [{"role": "system", "content": system.strip()}] if system.strip() else []
        return msgs + [{"role": "user", "content": user}], answer
    raise ValueError(f"cannot tell the format of an example with keys {sorted(example)}")


def write_dataset(path: str | os.PathLike, examples: Sequence[dict[str, Any]]) -> pathlib.Path:
    """Write ``examples`` by suffix: ``.jsonl`` (one object a line), ``.json`` (a list), ``.csv`` and ``.parquet``
    (flat formats only: alpaca, prompt_completion, text).  Returns the path."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(ex, ensure_ascii=False) + "\n")
        return path
    if suffix == ".json":
        path.write_text(json.dumps(list(examples), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path
    if suffix not in (".csv", ".parquet"):
        raise ValueError(f"unsupported suffix {suffix!r}: use .jsonl, .json, .csv or .parquet")
    if not examples:
        raise ValueError(f"cannot write an empty {suffix} file (no columns)")
    columns = list(examples[0])
    for ex in examples:
        if list(ex) != columns:
            raise ValueError(f"all examples must have the same columns {columns}, got {list(ex)}")
        nested = [k for k, v in ex.items() if not isinstance(v, (str, int, float, bool)) and v is not None]
        if nested:
            raise ValueError(f"{suffix} needs a flat format (alpaca, prompt_completion, text); "
                             f"columns {nested} are nested: use .jsonl or .json")
    if suffix == ".csv":
        import csv

        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(examples)
        return path
    import pyarrow as pa  # a dependency of datasets
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(list(examples)), path)
    return path


# --------------------------------------------------------------------------------------------------- assets

def _tokenizer_corpus(n: int) -> list[str]:
    """Text for the BPE trainer, generated by this module: the tasks in every format, rendered turns."""
    lines = []
    for task in TASKS:
        for i, ex in enumerate(synthetic_dataset(n, seed=12345, fmt="messages", tasks=(task,))):
            user, answer = ex["messages"][0]["content"], ex["messages"][1]["content"]
            fmt = FORMATS[i % len(FORMATS)]
            lines.append(json.dumps(format_example(user, answer, fmt=fmt, system="You are a helpful assistant.")))
            lines.append(f"User: {user}\nAssistant: {answer}")
    return lines


def build_tokenizer(seed: int = 0):
    """The tiny tokenizer (a ``PreTrainedTokenizerFast``): byte-level BPE, digits split one by one, trained here.

    ``seed`` is accepted for symmetry: BPE training on a fixed corpus is deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    p = TINY_TOKENIZER_PARAMS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=p["individual_digits"]),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=p["vocab_size"], min_frequency=p["min_frequency"],
                                  special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_corpus(p["corpus_examples"]), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS.values()), chat_template=CHAT_TEMPLATE,
        padding_side="right", model_max_length=TINY_LLAMA_CONFIG["max_position_embeddings"],
    )


def build_model(seed: int = 0):
    """The random-init ``LlamaForCausalLM`` of :data:`TINY_LLAMA_CONFIG` (fp32, eval mode)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in TINY_LLAMA_CONFIG.items() if k not in ("model_type", "architectures")}
    config = LlamaConfig(**cfg)
    config.architectures = list(TINY_LLAMA_CONFIG["architectures"])
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=False, max_new_tokens=16)
    return model.eval()


def _manifest(seed: int) -> dict[str, Any]:
    return {"name": "finetune-helper tiny assets", "version": TINY_ASSETS_VERSION, "seed": seed,
            "config": TINY_LLAMA_CONFIG, "tokenizer": TINY_TOKENIZER_PARAMS, "chat_template": CHAT_TEMPLATE}


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assets_ok(directory: pathlib.Path, seed: int) -> bool:
    try:
        found = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = found.pop("files", None)
    if found != json.loads(json.dumps(_manifest(seed))) or not isinstance(files, dict) or not files:
        return False
    for name, digest in files.items():
        f = directory / name
        if not f.is_file() or _sha256(f) != digest:
            return False
    return True


def build_tiny_assets(directory: str | os.PathLike, *, seed: int = 0, force: bool = False) -> pathlib.Path:
    """Write the tiny model + tokenizer into ``directory`` (created if needed) and return it.

    Idempotent: if ``directory`` holds a manifest (``tiny_manifest.json``) for the same seed, version, config and
    tokenizer parameters, and every file it lists still has its recorded sha256, nothing is rebuilt.
    ``force=True`` rebuilds.  Deterministic: the same seed writes byte-identical files.  Loads back offline with
    ``AutoModelForCausalLM.from_pretrained(directory)`` / ``AutoTokenizer.from_pretrained(directory)``.
    """
    directory = pathlib.Path(directory)
    if not force and _assets_ok(directory, seed):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST_NAME).unlink(missing_ok=True)  # an interrupted build leaves no valid manifest

    tokenizer = build_tokenizer(seed)
    if len(tokenizer) > TINY_LLAMA_CONFIG["vocab_size"]:
        raise AssertionError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {TINY_LLAMA_CONFIG['vocab_size']}")
    model = build_model(seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    written = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    manifest = _manifest(seed)
    manifest["files"] = {name: _sha256(directory / name) for name in written}
    tmp = directory / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(directory / MANIFEST_NAME)
    return directory


def load_tiny(directory: str | os.PathLike, *, seed: int = 0):
    """(model, tokenizer) from ``directory``, building the assets there first if needed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = build_tiny_assets(directory, seed=seed)
    return AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


# --------------------------------------------------------------------------------------------------- the base model

#: the pre-trained base shipped with the package (built by ``python -m finetune_helper.train.tiny pretrain``)
BASE_DIR_NAME = "tiny-base"


def base_model_dir() -> pathlib.Path:
    """The shipped pre-trained tiny base (model, tokenizer, manifest): what ``builtin:tiny-llama`` loads."""
    return pathlib.Path(__file__).resolve().parent / BASE_DIR_NAME


def pretraining_text(question: str, answer: str) -> str:
    """One pre-training document: a plain-text dialogue (no chat template, no special tokens).

    Its layout puts as many tokens between the question's ``?`` and the answer as the chat template does
    (``?`` ``\\n`` ``Assistant`` ``:`` ``\\n`` against ``?`` ``<|end|>`` ``\\n`` ``<|assistant|>`` ``\\n``), so
    fine-tuning has to teach the template's tokens, not new attention offsets.
    """
    return PRETRAINING["text_format"].format(question=question, answer=answer)


def pretraining_documents(seed: int) -> Iterable[str]:
    """An endless, deterministic stream of :func:`pretraining_text` documents over the pre-training split."""
    rng = random.Random(seed)
    pools = [(task, _split_pool(task, PRETRAINING["split"])) for task in PRETRAINING["tasks"]]
    while True:
        task, pool = pools[rng.randrange(len(pools))] if len(pools) > 1 else pools[0]
        yield pretraining_text(*_render(task, rng.choice(pool)))


def pretraining_blocks(tokenizer, seed: int) -> Iterable[list[int]]:
    """Token blocks of ``PRETRAINING["block"]`` ids: documents, each followed by EOS, concatenated and cut."""
    size, buf = PRETRAINING["block"], []
    for doc in pretraining_documents(seed):
        buf.extend(tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        while len(buf) >= size:
            yield buf[:size]
            buf = buf[size:]


def text_exact_match(model, tokenizer, examples: Sequence[dict[str, Any]]) -> float:
    """Exact match of greedy answers to prompts in the pre-training text format (what the base knows)."""
    import torch

    prompts, want = [], []
    for ex in examples:
        messages, answer = question_answer(ex)
        prompts.append(pretraining_text(messages[-1]["content"], "").rstrip("\n") + "\n")
        want.append(answer.strip())
    old_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        got = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return sum(g.strip().split("\n")[0] == w for g, w in zip(got, want)) / max(len(examples), 1)


def pretrain_base(directory: str | os.PathLike, *, steps: int | None = None, log=print) -> dict[str, Any]:
    """Pre-train the tiny base from :func:`build_model`'s random init as :data:`PRETRAINING` says and save it,
    with its tokenizer and a manifest, into ``directory``.  Returns the manifest.

    Plain torch (no Trainer): this builds the *starting point* of the product's demo, not a fine-tune.  A base
    whose held-out exact match in the text format stays below ``min_text_exact_match`` is not saved (the
    transition came late on this machine: see :data:`PRETRAINING`).  About 3 minutes on 2 CPU cores.  ``steps``
    shortens the run (tests).
    """
    import math
    import time

    import torch

    p = dict(PRETRAINING, steps=steps or PRETRAINING["steps"])
    directory = pathlib.Path(directory)
    tokenizer = build_tokenizer()
    model = build_model(p["seed"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p["learning_rate"], betas=tuple(p["betas"]),
                            weight_decay=p["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / p["warmup_steps"])
                                              * 0.5 * (1 + math.cos(math.pi * step / p["steps"])))
    blocks = iter(pretraining_blocks(tokenizer, p["seed"]))
    t0, losses = time.time(), []
    for step in range(p["steps"]):
        ids = torch.tensor([next(blocks) for _ in range(p["batch"])])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 250 == 0 or step + 1 == p["steps"]:
            log(f"pretrain step {step + 1}/{p['steps']} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    model.eval()
    holdout = synthetic_dataset(N_HOLDOUT, split="test")
    measured = {"loss_first": losses[0], "loss_last_100_mean": sum(losses[-100:]) / len(losses[-100:]),
                "text_exact_match": text_exact_match(model, tokenizer, holdout),
                "chat_exact_match": exact_match(model, tokenizer, holdout),
                "seconds": round(time.time() - t0, 1), "torch": torch.__version__}
    log(f"pretrain: held-out exact match {measured['text_exact_match']:.1%} in the text format, "
        f"{measured['chat_exact_match']:.1%} through the chat template")
    if measured["text_exact_match"] < p["min_text_exact_match"]:
        raise RuntimeError(f"the base reached {measured['text_exact_match']:.1%} held-out exact match in the text "
                           f"format, below {p['min_text_exact_match']:.0%}: addition was not learned in "
                           f"{p['steps']} steps on this machine; nothing was saved")
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    manifest = {**_base_manifest(), "pretraining": p, "measured": measured}
    manifest["files"] = {f.name: _sha256(f) for f in sorted(directory.iterdir())
                         if f.is_file() and f.name != MANIFEST_NAME}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def _base_manifest() -> dict[str, Any]:
    """What the shipped base must have been built from (the code's current constants)."""
    return {"name": "finetune-helper tiny base", "version": TINY_ASSETS_VERSION, "config": TINY_LLAMA_CONFIG,
            "tokenizer": TINY_TOKENIZER_PARAMS, "chat_template": CHAT_TEMPLATE}


def check_base(directory: str | os.PathLike | None = None) -> pathlib.Path:
    """``directory`` (default: the shipped base) if its manifest matches this code and every file its sha256;
    otherwise a ``ValueError`` saying what to rebuild."""
    directory = pathlib.Path(directory or base_model_dir())
    try:
        found = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"no readable tiny base in {directory} ({exc}); rebuild it with "
                         "`python -m finetune_helper.train.tiny pretrain`") from None
    expected = {**json.loads(json.dumps(_base_manifest())), "pretraining": json.loads(json.dumps(PRETRAINING))}
    stale = [k for k in expected if found.get(k) != expected[k]]
    bad = [name for name, digest in found.get("files", {}).items()
           if not (directory / name).is_file() or _sha256(directory / name) != digest]
    if stale or bad or not found.get("files"):
        raise ValueError(f"the tiny base in {directory} does not match this code (stale: {stale}, changed files: "
                         f"{bad}); rebuild it with `python -m finetune_helper.train.tiny pretrain`")
    return directory


# --------------------------------------------------------------------------------------------------- evaluation

def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def generate_answers(model, tokenizer, examples: Sequence[dict[str, Any]], *, max_new_tokens: int = 8,
                     batch_size: int = 32) -> list[str]:
    """Greedy answers (stripped, special tokens removed) to the prompts of ``examples`` (any format), through the
    chat template with ``add_generation_prompt=True``.  Works for plain and PEFT models; restores train mode."""
    import torch

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    prompts = [question_answer(ex)[0] for ex in examples]
    was_training = model.training
    old_side = tokenizer.padding_side
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: list[str] = []
    model.eval()
    tokenizer.padding_side = "left"
    try:
        with torch.inference_mode():
            for chunk in _batches(prompts, batch_size):
                enc = tokenizer.apply_chat_template(list(chunk), add_generation_prompt=True, tokenize=True,
                                                    padding=True, return_tensors="pt", return_dict=True)
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
                new = out[:, enc["input_ids"].shape[1]:]
                answers.extend(s.strip() for s in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return answers


def exact_match(model, tokenizer, examples: Sequence[dict[str, Any]], *, max_new_tokens: int = 8,
                batch_size: int = 32) -> float:
    """Fraction of ``examples`` whose greedy, stripped answer equals the expected answer (stripped).

    0.0 for an empty list.  Deterministic (greedy decoding, eval mode).
    """
    if not examples:
        return 0.0
    got = generate_answers(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    want = [question_answer(ex)[1].strip() for ex in examples]
    return sum(g == w for g, w in zip(got, want)) / len(examples)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m finetune_helper.train.tiny pretrain [--out DIR] [--steps N]``: rebuild the shipped base."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m finetune_helper.train.tiny")
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="pre-train the tiny base (about 3 minutes on 2 CPU cores)")
    pre.add_argument("--out", default=str(base_model_dir()), help="default: the shipped base, %(default)s")
    pre.add_argument("--steps", type=int, default=None, help=f"default: {PRETRAINING['steps']}")
    args = parser.parse_args(argv)
    pretrain_base(args.out, steps=args.steps)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
