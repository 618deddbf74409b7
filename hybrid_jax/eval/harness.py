"""lm-evaluation-harness model ``hybrid-jax``: our checkpoints scored by lm-eval's tasks.

    import hybrid_jax.eval.harness          # registers "hybrid-jax" with lm-eval
    lm = HybridJaxLM(checkpoint="ckpt/", batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])
    # or: lm_eval.simple_evaluate(model="hybrid-jax", model_args="checkpoint=ckpt/,dtype=bfloat16")

Model arguments: ``checkpoint`` (required: a transformers, orbax or training-run checkpoint
directory, ``hybrid_jax.eval.checkpoints``),
``tokenizer`` (a tokenizer.json; default the checkpoint's), ``batch_size`` (rows per compiled
call; "auto" means the default, 8), ``dtype`` (float32 | bfloat16; default the checkpoint's),
``max_length`` (default the config's ``max_position_embeddings``), ``max_gen_toks`` (default
256), ``prefix_token_id`` (the context of an empty context; default BOS, else EOS),
``min_bucket`` (the shortest padded length, default 64) and ``seed`` (for sampled generation).
``device`` and ``max_batch_size``, which lm-eval passes to every model, are ignored: jax places
the model.

Text becomes tokens exactly as lm-eval's Hugging Face causal model (``HFLM``) does, so that the
two score a checkpoint alike: the tokenizer's own special tokens are added (its post-processor,
as ``tokenizer.encode`` does) unless the text already starts with the prefix token's text;
context and continuation are encoded whole and split (``TemplateLM._encode_pair``, inherited);
an empty context is the prefix token; rolling windows hold ``max_length`` tokens; generated
text is decoded without special tokens and cut at the task's stop strings and the EOS text.
The tokenizer's BOS and EOS are the ``bos_token`` / ``eos_token`` of the tokenizer_config.json
(or special_tokens_map.json) beside the tokenizer file, as transformers reads them; without
one, EOS is the model config's. Generation stops at the model config's EOS ids, as
transformers' ``generate`` does.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from hybrid_jax.eval import scoring
from hybrid_jax.eval.checkpoints import load_model
from hybrid_jax.inference.text import TOKENIZER_FILE, TokenizerError, load_tokenizer

log = logging.getLogger(__name__)

# lm-eval's own models go into its registry first: it fills the registry with them only when it
# is empty, and "hybrid-jax" alone would hide "hf" and the others.
importlib.import_module("lm_eval.models")

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
_SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p"}



def special_token_texts(tokenizer_file: str | os.PathLike) -> dict[str, str]:
    """``bos_token`` / ``eos_token`` / ``pad_token`` texts from the tokenizer_config.json or
    special_tokens_map.json beside ``tokenizer_file`` (the first that names each); {} when
    neither is there."""
    found: dict[str, str] = {}
    for name in _SPECIAL_FILES:
        path = Path(tokenizer_file).parent / name
        if not path.is_file():
            continue
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{path}: not readable JSON ({e})") from None
        for key in ("bos_token", "eos_token", "pad_token"):
            value = entries.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and key not in found:
                found[key] = value
    return found


def _batch_size(value: int | str | None) -> int:
    """lm-eval's batch_size (an int, a numeral, "auto" or "auto:N") as a positive int; "auto"
    is the default, as shapes are compiled per batch size."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size <= 0:
        raise ValueError(f"hybrid-jax: batch_size must be positive, got {value!r}")
    return size


@register_model("hybrid-jax")
class HybridJaxLM(TemplateLM):
    """A ``HybridLM`` checkpoint as an lm-eval model (see the module docstring)."""

    def __init__(self, checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, dtype: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 prefix_token_id: int | None = None, min_bucket: int = scoring.MIN_BUCKET,
                 seed: int = 0, device: str | None = None,
                 max_batch_size: int | None = None) -> None:
        super().__init__()
        del device, max_batch_size  # lm-eval passes them to every model; jax places the model
        self.checkpoint = str(checkpoint)
        self._batch_size = _batch_size(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self.min_bucket = int(min_bucket)
        self.seed = int(seed)
        self._load_tokenizer(tokenizer)
        self.model = load_model(checkpoint, dtype=None if dtype in (None, "auto") else dtype)
        self._check_vocab()
        self._max_length = int(max_length) if max_length else scoring.default_max_length(
            self.model)
        self._eos = self._special_id("eos_token", self.model.config.eos_token_id)
        self._bos = self._special_id("bos_token", None)
        self._prefix = prefix_token_id
        if self._eos is None:
            raise TokenizerError(f"{self.tokenizer_file}: no eos_token in a tokenizer config "
                                 f"beside it and none in the model config")
        self._prefix_text = self.tok_decode([self.prefix_token_id], skip_special_tokens=False)

    # ------------------------------------------------------------------------- set-up
    def _load_tokenizer(self, tokenizer: str | os.PathLike | None) -> None:
        path = Path(tokenizer) if tokenizer is not None else Path(self.checkpoint) / TOKENIZER_FILE
        if tokenizer is None and not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found (the checkpoint has no "
                                 f"{TOKENIZER_FILE}; pass tokenizer=FILE)")
        self.tokenizer_file = path
        self.text_tokenizer = load_tokenizer(path).tokenizer
        self._special_texts = special_token_texts(path)

    def _check_vocab(self) -> None:
        size = self.text_tokenizer.get_vocab_size(with_added_tokens=True)
        if size > self.model.config.vocab_size:
            raise TokenizerError(f"{self.tokenizer_file}: {size} tokens, more than the model's "
                                 f"vocabulary of {self.model.config.vocab_size}")

    def _special_id(self, key: str, fallback: int | None) -> int | None:
        text = self._special_texts.get(key)
        if text is None:
            return fallback
        token = self.text_tokenizer.token_to_id(text)
        if token is None:
            raise TokenizerError(f"{self.tokenizer_file}: its {key} {text!r} is not a token")
        return token

    # ------------------------------------------------------------------------- lm-eval's API
    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is not None:
            return self._prefix
        return self._bos if self._bos is not None else self._eos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer_file).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; special tokens added unless ``add_special_tokens`` is False
        or (None) the string starts with the prefix token's text. ``left_truncate_len`` keeps
        that many tokens from the end."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self._prefix_text)
        ids = self.text_tokenizer.encode(string, add_special_tokens=add_special_tokens).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int] | int, skip_special_tokens: bool = True) -> str:
        tokens = [tokens] if isinstance(tokens, int) else [int(t) for t in tokens]
        return self.text_tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _progress(self, total: int, desc: str, disable: bool) -> tqdm:
        return tqdm(total=total, desc=desc, disable=disable)

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Score (key, context ids, continuation ids) requests; each keyed result goes to the
        cache hook as lm-eval's models do."""
        with self._progress(len(requests), "loglikelihood", disable_tqdm) as bar:
            results = scoring.loglikelihoods(
                self.model, [(c, k) for _, c, k in requests], batch_size=self.batch_size,
                max_length=self.max_length, min_bucket=self.min_bucket, on_batch=bar.update)
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        """Each text's whole log-probability, in disjoint windows of ``max_length`` tokens
        after the prefix token."""
        texts = [req.args[0] for req in requests]
        with self._progress(len(texts), "loglikelihood_rolling", disable_tqdm) as bar:
            totals = scoring.rolling_loglikelihoods(
                self.model, [self.tok_encode(t) for t in texts], prefix_token=self.prefix_token_id,
                batch_size=self.batch_size, max_length=self.max_length,
                min_bucket=self.min_bucket)
            bar.update(len(texts))
        for text, total in zip(texts, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generated text for each (context, generation kwargs) request, requests with the same
        kwargs batched together."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str] = [""] * len(requests)
        with self._progress(len(requests), "generate_until", disable_tqdm) as bar:
            for indices in groups.values():
                contexts = [requests[i].args[0] for i in indices]
                texts = self._generate_group(contexts, requests[indices[0]].args[1], bar.update)
                for i, text in zip(indices, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _generate_group(self, contexts: list[str], gen_kwargs: dict, on_batch: Any) -> list[str]:
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen = int(kwargs.pop("max_gen_toks"))
        max_context = self.max_length - max_gen
        if max_context <= 0:
            raise ValueError(f"hybrid-jax: max_gen_toks {max_gen} leaves no room for a context "
                             f"in max_length {self.max_length}")
        prompts = [self._generation_prompt(c) for c in contexts]
        return scoring.generate_until(
            self.model, prompts, decode=self.tok_decode, until=until, max_new_tokens=max_gen,
            batch_size=self.batch_size, max_prompt_length=max_context, min_bucket=self.min_bucket,
            on_batch=on_batch, **self._sampling(kwargs))

    def _generation_prompt(self, context: str) -> list[int]:
        """A context's ids as HFLM batches them: special tokens unless it starts with the BOS
        text; an empty one is the prefix token."""
        bos_text = self._special_texts.get("bos_token")
        ids = self.tok_encode(context, add_special_tokens=not (
            bos_text is not None and context.startswith(bos_text)))
        return ids or [self.prefix_token_id]

    def _sampling(self, kwargs: dict) -> dict[str, Any]:
        """generate's sampling arguments from normalised generation kwargs: none (greedy)
        unless ``do_sample``; other kwargs are ignored with a warning."""
        ignored = sorted(set(kwargs) - _SAMPLING_KEYS)
        if ignored:
            log.warning("hybrid-jax: ignoring generation kwargs %s", ignored)
        if not kwargs.get("do_sample"):
            return {}
        return {"temperature": float(kwargs.get("temperature") or 1.0),
                "top_k": kwargs.get("top_k"), "top_p": kwargs.get("top_p"), "seed": self.seed}

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in its results."""
        cfg = self.model.config
        return {"checkpoint": self.checkpoint, "model_type": cfg.model_type,
                "model_dtype": cfg.dtype, "tokenizer": str(self.tokenizer_file),
                "max_length": self.max_length}


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_MAX_GEN_TOKS", "HybridJaxLM", "special_token_texts"]
