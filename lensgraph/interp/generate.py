"""Generation from any decoder lensgraph reads, with TransformerLens's hook points per step.

    gen = generate("tiny.cache.onnx", prompt_ids, max_new_tokens=20, points=["blocks.*.hook_resid_post"])
    gen.tokens            # [batch, pos + new], the prompt included
    gen.steps[3]          # the hook activations that produced new token 3 (its position only)

Two engines. An onnxruntime-genai folder runs through onnxruntime-genai's own Generator; with
hook points, a copy of its model with the hook outputs runs instead, and `Generator.get_output`
reads them at each step (onnxruntime-genai 0.18 hands out any graph output by name). A KV-cache
graph (`lensgraph export --with-cache`, or any graph with `past_key_values.*` inputs) runs in
onnxruntime sessions here: the prompt first, with an empty past, then one token at a time, each
step's present fed back as the next past.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

from ..errors import BadInputError
from ..store.folder import is_model_folder, model_file
from ..store.runner import cache_dims, empty_past
from ..store.model import LensModel
from .cache import is_point, session, token_ids
from .hooks import add_hooks, select

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


@dataclass
class Generation:
    tokens: np.ndarray  # int64 [batch, pos + new]: the prompt and the new tokens
    prompt_length: int
    steps: list[dict[str, np.ndarray]] = field(default_factory=list)  # per new token: its hook activations
    engine: str = "onnxruntime"  # or "onnxruntime-genai"

    @property
    def new_tokens(self) -> np.ndarray:
        return self.tokens[:, self.prompt_length:]


def generate(model, prompt_ids, max_new_tokens: int, points=None, do_sample: bool = False, seed: int | None = None,
             eos_token_id: int | None = None, provider: str = "CPUExecutionProvider",
             interventions=None) -> Generation:
    """Greedy (or, with `do_sample`, seeded sampled) decoding of `max_new_tokens` tokens, stopping early
    only when every sequence has produced `eos_token_id` (when one is given).

    `interventions` (ablate, patch, add) apply at every step, at every position; the hook points in
    `points` then show the changed model's activations."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise BadInputError(f"max_new_tokens must be a positive whole number, not {max_new_tokens!r}")
    if not isinstance(model, (str, os.PathLike)):
        raise BadInputError(f"model must be a path to a KV-cache graph or an onnxruntime-genai folder, not "
                            f"{type(model).__name__}")
    model = os.fspath(model)
    if is_model_folder(model):
        return _generate_genai(model, prompt_ids, max_new_tokens, points, do_sample, seed, eos_token_id, interventions,
                               provider)
    return _generate_onnxruntime(model, prompt_ids, max_new_tokens, points, do_sample, seed, eos_token_id, provider,
                                 interventions)


def _steady(model: str, interventions) -> dict:
    """{point: interventions}, each the same at every step: no positions, and no patch (its values
    belong to one prompt's positions)."""
    from .interventions import resolve

    changes = resolve(model, interventions)
    for name, ivs in changes.items():
        for iv in ivs:
            if iv.kind == "patch" or not (iv.positions is None or (isinstance(iv.positions, str) and
                                                                     iv.positions == "all")):
                raise BadInputError(f"{name}: in generation an intervention applies at every position of every step; "
                                    "give no positions (and ablate or add rather than patch)")
    return changes


def _generate_onnxruntime(path, prompt_ids, n, points, do_sample, seed, eos, provider, interventions=None) -> Generation:
    parts = None
    if interventions:
        from .interventions import engine_for, means_for, parts_for

        changes = _steady(path, interventions)
        cache = select(engine_cache_points(path), points) if points else []
        engine, _, _ = engine_for(path, list(changes), provider, cache=cache)
        sess = engine.pieces[0][0]
        means = means_for(path, provider, changes, token_ids(prompt_ids, None, None))

        def parts(step_ids):
            return parts_for(engine, changes, step_ids, means)
    else:
        sess = session(path, provider, points or [])
    dims_known = cache_dims(path)
    inputs = {i.name: i for i in sess.get_inputs()}
    past = {name: PAST.match(name) for name in inputs if PAST.match(name)}
    if not past:
        raise BadInputError(f"{path}: has no past_key_values.* inputs: generation needs a KV-cache graph "
                            "(lensgraph export --with-cache)")
    outputs = [o.name for o in sess.get_outputs()]
    present = {name: f"present.{m.group(1)}.{m.group(2)}" for name, m in past.items()}
    missing = [p for p in present.values() if p not in outputs]
    if missing:
        raise BadInputError(f"{path}: has no output {missing[0]} to carry the cache to the next step")
    logits_name = "logits" if "logits" in outputs else outputs[0]
    hooks = [o for o in outputs if is_point(o)]
    tokens = prompt = token_ids(prompt_ids, None, None).astype(np.int64)
    batch = tokens.shape[0]
    cache = {name: empty_past(inputs[name], batch, dims_known, path) for name in past}
    rng = np.random.default_rng(seed)
    steps, step_ids, done = [], tokens, np.zeros(batch, bool)
    for _ in range(n):
        total = tokens.shape[1]
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
        names = [logits_name] + list(present.values()) + hooks
        values = dict(zip(names, sess.run(names, feeds)))
        nxt = _choose(values[logits_name][:, -1].astype(np.float64), do_sample, rng)
        if eos is not None:
            nxt = np.where(done, eos, nxt)
            done |= nxt == eos
        tokens = np.concatenate([tokens, nxt[:, None].astype(np.int64)], axis=1)
        if points:
            steps.append({h: _last_position(h, values[h]) for h in hooks})
        cache = {name: values[p] for name, p in present.items()}
        step_ids = nxt[:, None]
        if eos is not None and done.all():
            break
    return Generation(tokens, prompt.shape[1], steps, "onnxruntime")


def engine_cache_points(path: str) -> list[str]:
    from .interventions import placed_points

    return placed_points(path)


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
            from .interventions import frozen_model

            path = model_file(folder)
            hooks = select(engine_cache_points(path), points) if points else []
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
                if (eos is not None and int(gen.get_next_tokens()[0]) == eos) or gen.is_done():
                    break
            out.append(np.asarray(gen.get_sequence(0), np.int64))
    width = max(len(s) for s in out)
    pad = eos if eos is not None else 0
    steps = [{h: np.concatenate(v) for h, v in step.items()} for step in steps if len(next(iter(step.values()))) ==
             len(out)]
    return Generation(np.stack([np.pad(s, (0, width - len(s)), constant_values=pad) for s in out]),
                      tokens.shape[1], steps, "onnxruntime-genai")
