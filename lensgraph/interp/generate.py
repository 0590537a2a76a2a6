"""Generation from any decoder lensgraph reads, with TransformerLens's hook points per step.

    gen = generate("smollm2/", "The capital of France is", max_new_tokens=20, points=["blocks.*.hook_resid_post"])
    gen.tokens            # [batch, pos + new], the prompt included
    gen.text              # the new tokens as text, one string per sequence
    gen.steps[3]          # the hook activations that produced new token 3 (its position only)

The prompt is token ids or text (tokenized by the folder's tokenizer as TransformerLens does, or with
`chat` through its chat template). Decoding stops at `max_new_tokens` or once every sequence has
produced an end token: by default the tokenizer's EOS and those of generation_config.json and
genai_config.json, as HuggingFace's generate reads them.

Two engines. An onnxruntime-genai folder runs through onnxruntime-genai's own Generator; with
hook points, a copy of its model with the hook outputs runs instead, and `Generator.get_output`
reads them at each step (onnxruntime-genai 0.18 hands out any graph output by name). Any other
model runs in onnxruntime sessions here. A KV-cache graph (what `lensgraph convert` writes by
default, `lensgraph export --with-cache`, any graph with `past_key_values.*` inputs) takes the
prompt first, with an empty past, then one token at a time, each step's present fed back as the
next past. A graph without a cache runs the whole sequence again for each new token: n new tokens
after p prompt tokens cost about n * (p + n / 2) positions of work instead of p + n.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

from ..errors import BadInputError
from ..store.folder import model_file
from ..store.model import LensModel
from ..store.resolve import resolve
from ..store.runner import empty_past
from .cache import points_session, token_ids
from .hooks import add_hooks, select
from .tokens import Tokenizer, end_ids, prompt, tokenizer_for

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


@dataclass
class Generation:
    tokens: np.ndarray  # int64 [batch, pos + new]: the prompt and the new tokens
    prompt_length: int
    steps: list[dict[str, np.ndarray]] = field(default_factory=list)  # per new token: its hook activations
    engine: str = "onnxruntime"  # or "onnxruntime-genai"
    tokenizer: Tokenizer | None = field(default=None, repr=False)  # the model folder's, where it has one

    @property
    def new_tokens(self) -> np.ndarray:
        return self.tokens[:, self.prompt_length:]

    @property
    def text(self) -> list[str] | None:
        """The new tokens of each sequence as text (special tokens shown), or None without a tokenizer."""
        return None if self.tokenizer is None else [self.tokenizer.decode(row) for row in self.new_tokens]


def generate(model, prompt_ids, max_new_tokens: int = 20, points=None, do_sample: bool = False,
             seed: int | None = None, eos_token_id=None, provider: str = "CPUExecutionProvider",
             chat: bool = False, prepend_bos: bool | None = None, interventions=None) -> Generation:
    """Greedy (or, with `do_sample`, seeded sampled) decoding of up to `max_new_tokens` tokens.

    `model` is a folder `lensgraph convert` wrote, an onnxruntime-genai folder or an ONNX file;
    `prompt_ids` is token ids, a string, or a list of strings of one length in tokens (with `chat`, a
    user message or a list of {"role", "content"} messages). A sequence is done at an end token:
    `eos_token_id` (an id or a list; [] never stops) or, by default, the folder's end tokens.

    `interventions` (ablate, add) apply at every step, at every position; the hook points in
    `points` then show the changed model's activations."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise BadInputError(f"max_new_tokens must be a positive whole number, not {max_new_tokens!r}")
    files = resolve(model)
    given = prompt(files, prompt_ids, prepend_bos, chat=chat)
    if given.attention_mask is not None:
        raise BadInputError("these prompts have different lengths in tokens; generate them one at a time")
    eos = _end_ids(files, eos_token_id)
    if files.genai:
        gen = _generate_genai(files.folder, given.ids, max_new_tokens, points, do_sample, seed, eos, interventions,
                              provider)
    else:
        gen = _generate_onnxruntime(files, given.ids, max_new_tokens, points, do_sample, seed, eos, provider,
                                    interventions)
    gen.tokenizer = given.tokenizer or tokenizer_for(files, required=False)
    return gen


def _end_ids(files, eos_token_id) -> list[int]:
    if eos_token_id is None:
        return end_ids(files)
    ids = [eos_token_id] if not isinstance(eos_token_id, (list, tuple)) else list(eos_token_id)
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise BadInputError(f"eos_token_id must be a token id or a list of them, not {eos_token_id!r}")
    return [int(i) for i in ids]


def _steady(model: str, interventions) -> dict:
    """{point: interventions}, each the same at every step: no positions, and no patch (its values
    belong to one prompt's positions)."""
    from .interventions import changes_for

    changes = changes_for(model, interventions)
    for name, ivs in changes.items():
        for iv in ivs:
            if iv.kind == "patch" or not (iv.positions is None or (isinstance(iv.positions, str) and
                                                                     iv.positions == "all")):
                raise BadInputError(f"{name}: in generation an intervention applies at every position of every step; "
                                    "give no positions (and ablate or add rather than patch)")
    return changes


def _generate_onnxruntime(files, prompt_ids, n, points, do_sample, seed, eos, provider,
                          interventions=None) -> Generation:
    parts = None
    if interventions:  # the compiled cut's session, its inputs fed at each step
        from .interventions import engine_for, means_for, parts_for, placed_points

        changes = _steady(files.model, interventions)
        cache = select(placed_points(files.model), points) if points else []
        engine, limits, dims_known = engine_for(files.model, list(changes), provider, cache=cache)
        sess, held, about = engine.pieces[0][0], {p: p for p in cache}, {"limits": limits, "cache_dims": dims_known}
        means = means_for(files.model, provider, changes, token_ids(prompt_ids, *limits))

        def parts(step_ids):
            return parts_for(engine, changes, step_ids, means)
    else:
        sess, held, about = points_session(files, provider, points or [])
    inputs = {i.name: i for i in sess.get_inputs()}
    past = {name: PAST.match(name) for name in inputs if PAST.match(name)}
    outputs = [o.name for o in sess.get_outputs()]
    present = {name: f"present.{m.group(1)}.{m.group(2)}" for name, m in past.items()}
    missing = [p for p in present.values() if p not in outputs]
    if missing:
        raise BadInputError(f"{files.given}: has no output {missing[0]} to carry the cache to the next step")
    logits_name = "logits" if "logits" in outputs else outputs[0]
    tokens = first = token_ids(prompt_ids, *about["limits"]).astype(np.int64)
    batch = tokens.shape[0]
    cache = {name: empty_past(inputs[name], batch, about["cache_dims"], files.given) for name in past}
    rng = np.random.default_rng(seed)
    steps, step_ids, done = [], tokens, np.zeros(batch, bool)
    for _ in range(n):
        total = tokens.shape[1]
        if not past:  # no cache: the whole sequence again
            step_ids = tokens
        feeds = dict(cache)
        for name, inp in inputs.items():
            if name in cache:
                continue
            dtype = np.int32 if inp.type == "tensor(int32)" else np.int64
            if "mask" in name:
                feeds[name] = np.ones((batch, total), dtype)
            elif "position" in name:
                feeds[name] = np.tile(np.arange(total - step_ids.shape[1], total, dtype=dtype), (batch, 1))
            else:
                feeds[name] = step_ids.astype(dtype)
        if parts is not None:
            feeds.update(parts(step_ids))
        names = list(dict.fromkeys([logits_name] + list(present.values()) + list(held.values())))
        values = dict(zip(names, sess.run(names, feeds)))
        nxt = _choose(values[logits_name][:, -1].astype(np.float64), do_sample, rng)
        if eos:
            nxt = np.where(done, eos[0], nxt)  # a finished sequence is padded with its end token
            done |= np.isin(nxt, eos)
        tokens = np.concatenate([tokens, nxt[:, None].astype(np.int64)], axis=1)
        if points:
            steps.append({h: _last_position(h, values[out]) for h, out in held.items()})
        cache = {name: values[p] for name, p in present.items()}
        step_ids = nxt[:, None]
        if eos and done.all():
            break
    return Generation(tokens, first.shape[1], steps, "onnxruntime")


def _last_position(name: str, value: np.ndarray) -> np.ndarray:
    """The activations of the newest position: [batch, 1, ...], or [batch, head, 1, key] for a pattern."""
    if name.endswith("hook_pattern") or name.endswith("hook_attn_scores"):
        return value[:, :, -1:, :]
    return value[:, -1:]


def _choose(logits: np.ndarray, do_sample: bool, rng) -> np.ndarray:
    if not do_sample:
        return logits.argmax(-1)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def _generate_genai(folder, prompt_ids, n, points, do_sample, seed, eos, interventions=None,
                    provider: str = "CPUExecutionProvider") -> Generation:
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise BadInputError("an onnxruntime-genai folder needs onnxruntime-genai: pip install onnxruntime-genai "
                            "(or install lensgraph with its genai extra)") from None
    tokens = token_ids(prompt_ids, None, None).astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        hooks = []
        if interventions:  # the same folder, its model with the interventions as constants (and the hooks)
            from .interventions import frozen_model, placed_points

            path = model_file(folder)
            hooks = select(placed_points(path), points) if points else []
            hooked = frozen_model(path, _steady(path, interventions), hooks, provider, tokens)
        elif points:  # the same folder, its model with the hook outputs
            hooked = LensModel.load(model_file(folder))
            hooks = add_hooks(hooked, points).added
        if interventions or points:
            for entry in os.scandir(folder):
                if entry.is_file() and not entry.name.startswith(os.path.basename(hooked.path)):
                    shutil.copy2(entry.path, tmp)
            hooked.save(os.path.join(tmp, os.path.basename(hooked.path)), external_data=True)
        try:
            model = og.Model(tmp if points or interventions else folder)
        except Exception as exc:
            raise BadInputError(f"{folder}: onnxruntime-genai cannot load it ({str(exc).splitlines()[0][:300]})") from exc
        out, steps = [], []
        for row in tokens:  # one generator per sequence
            params = og.GeneratorParams(model)
            # min_length: no early stop at the configuration's end-of-text token; `eos` is checked here
            search = dict(do_sample=do_sample, max_length=len(row) + n, min_length=len(row) + n)
            if seed is not None:
                search["random_seed"] = int(seed)
            params.set_search_options(**search)
            gen = og.Generator(model, params)
            gen.append_tokens(row[None, :].astype(np.int32))
            for k in range(n):
                gen.generate_next_token()
                if hooks:  # the run that chose this token: onnxruntime-genai runs the model for a token
                    # when the next one is asked for, so after generate_next_token the outputs are its
                    step = {h: _last_position(h, np.asarray(gen.get_output(h))) for h in hooks}
                    if len(steps) <= k:
                        steps.append({h: [] for h in hooks})
                    for h in hooks:
                        steps[k][h].append(step[h])
                if int(gen.get_next_tokens()[0]) in eos or gen.is_done():
                    break
            out.append(np.asarray(gen.get_sequence(0), np.int64))
    width = max(len(s) for s in out)
    pad = eos[0] if eos else 0
    steps = [{h: np.concatenate(v) for h, v in step.items()} for step in steps if len(next(iter(step.values()))) ==
             len(out)]
    return Generation(np.stack([np.pad(s, (0, width - len(s)), constant_values=pad) for s in out]),
                      tokens.shape[1], steps, "onnxruntime-genai")
