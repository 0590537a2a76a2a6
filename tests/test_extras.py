"""Each extra installs everything its commands need: each command runs in a fresh virtual environment
that holds lensgraph, its dependencies and one extra's, and nothing else.

A real `pip install` of the export or gguf extra (torch, transformers, ...) takes about two minutes
here, more than this whole concern may add to the suite, so the environment is made from the
distributions already installed: the closure of lensgraph's requirements for the extra is read from
their metadata (Requires-Dist, with markers and extras, as pip resolves it) and each distribution's
files are linked into the new environment's site-packages. What runs there can import exactly what
`pip install 'lensgraph[EXTRA]'` would have installed, at the versions of this environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

TEXT = "The capital of France is"


def closure(extras: set[str]) -> dict[str, metadata.Distribution]:
    """lensgraph with `extras`, and every distribution its requirements reach."""
    env = default_environment()
    found: dict[str, tuple[metadata.Distribution, set[str]]] = {}
    todo = [("lensgraph", set(extras))]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if key in found and wanted <= found[key][1]:
            continue
        dist = found[key][0] if key in found else metadata.distribution(name)
        have = found[key][1] | wanted if key in found else set(wanted)
        found[key] = (dist, have)
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in [""] + sorted(have)):
                todo.append((req.name, set(req.extras)))
    return {k: d for k, (d, _) in found.items()}


def fresh_venv(path, extras: set[str]) -> str:
    """A virtual environment at `path` with lensgraph[extras] and nothing more; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    site = subprocess.run([str(path / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for dist in closure(extras).values():
        assert dist.files is not None, f"{dist.metadata['Name']} has no RECORD of its files"
        for top in {f.parts[0] for f in dist.files if f.parts and f.parts[0] != ".."}:
            source = str(dist.locate_file(top))
            if os.path.exists(source) and not os.path.exists(os.path.join(site, top)):
                os.symlink(source, os.path.join(site, top))
    return str(path / "bin" / "python")


def run(python: str, *commands) -> subprocess.CompletedProcess:
    """`lensgraph COMMAND` for each command, in one process (one start-up), then exit with the last code."""
    code = "import sys\nfrom lensgraph.cli import main\n" + "".join(
        f"code = main({[str(a) for a in argv]!r})\nif code:\n    sys.exit(code)\n" for argv in commands)
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=600)


def test_the_closure_follows_extras_and_markers():
    core = set(closure(set()))
    assert {"lensgraph", "numpy", "onnxruntime", "tokenizers", "jinja2"} <= core and "torch" not in core
    gguf = set(closure({"gguf"}))
    assert {"torch", "transformers", "gguf", "accelerate"} <= gguf and "transformer-lens" not in gguf


def test_the_core_install_reads_and_generates_text_from_a_converted_folder(folders, tmp_path):
    _, folder, _ = folders("gpt2")
    python = fresh_venv(tmp_path / "venv", set())
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0  # really not there
    done = run(python, ["generate", folder, "--prompt", TEXT, "-n", "3", "--chat"], ["inspect", folder])
    assert done.returncode == 0, done.stderr
    code = (f"import lensgraph; logits, cache = lensgraph.run_with_cache({folder!r}, [{TEXT!r}, 'A fox']); "
            f"print(len(cache), lensgraph.to_str_tokens({folder!r}, 'A fox'))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "'A'" in done.stdout, done.stderr


def test_the_gguf_extra_installs_what_converting_a_gguf_file_needs(folders, tmp_path):
    """transformers reads a GGUF file only with accelerate; the export's packages come with the extra."""
    from tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(folders("llama")[0], str(tmp_path / "tiny.gguf"))
    python = fresh_venv(tmp_path / "venv", {"gguf"})
    done = run(python, ["-q", "convert", gguf, "-o", tmp_path / "out", "--no-verify"],
               ["generate", tmp_path / "out", "--prompt", TEXT, "-n", "3"])
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 2, done.stderr


def test_the_genai_extra_runs_an_onnxruntime_genai_folder(genai, tmp_path):
    folder = genai("llama")
    python = fresh_venv(tmp_path / "venv", {"genai"})
    done = run(python, ["generate", folder, "--prompt", "the quick brown", "-n", "3"])
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 2, done.stderr
