"""The command line's persistent compilation cache: which folder, and that it fills."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from caasl_jax import cli, compile_cache

X86 = "processor\t: 0\nflags\t\t: sse2 avx2 fpu\nbogomips\t: 1\nflags\t\t: other\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd sve\n"


def test_cpu_features_reads_the_first_feature_line_in_a_stable_order():
    assert compile_cache.cpu_features(X86) == "avx2 fpu sse2"
    assert compile_cache.cpu_features(ARM) == "asimd fp sve"
    assert compile_cache.cpu_features("model name\t: something\n") == ""


def test_machine_tag_separates_instruction_sets_and_jaxlib_versions():
    tag = compile_cache.machine_tag(X86, "x86_64", "0.10.2")
    assert tag == compile_cache.machine_tag(X86.replace("avx2 fpu", "fpu avx2"), "x86_64", "0.10.2")
    assert tag.startswith("x86_64-") and len(tag) == len("x86_64-") + 12
    others = {
        compile_cache.machine_tag(X86.replace(" avx2", ""), "x86_64", "0.10.2"),  # no AVX2
        compile_cache.machine_tag(X86, "x86_64", "0.11.0"),
        compile_cache.machine_tag(ARM, "aarch64", "0.10.2"),
    }
    assert tag not in others and len(others) == 3


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"HOME": "/home/u"}, "/home/u/.cache/caasl-jax/xla/TAG"),
        ({"HOME": "/home/u", "XDG_CACHE_HOME": "/c"}, "/c/caasl-jax/xla/TAG"),
        ({"HOME": "/home/u", "CAASL_COMPILE_CACHE": "/scratch/xla"}, "/scratch/xla"),
        ({"HOME": "/home/u", "CAASL_COMPILE_CACHE": "~/x"}, "/home/u/x"),
        ({"HOME": "/home/u", "XDG_CACHE_HOME": "~/c"}, "/home/u/c/caasl-jax/xla/TAG"),
        # no HOME in environ (not even the real one is consulted): no cache
        ({}, None),
        ({"CAASL_COMPILE_CACHE": "~/x"}, None),
        ({"HOME": "/home/u", "CAASL_COMPILE_CACHE": "off"}, None),
        ({"CAASL_COMPILE_CACHE": " OFF "}, None),
        # JAX's own variable wins, and JAX applies it itself
        ({"JAX_COMPILATION_CACHE_DIR": "/j", "CAASL_COMPILE_CACHE": "/scratch/xla"}, None),
    ],
)
def test_resolve_cache_dir(environ, expected):
    folder = compile_cache.resolve_cache_dir(environ, "TAG")
    assert folder == (None if expected is None else Path(expected))


def test_every_cli_command_turns_the_cache_on_first(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(compile_cache, "enable", lambda: calls.append("enable"))
    assert cli.main(["envs", "--d", "3"]) == 0
    assert calls == ["enable"] and "linear-d3" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # pretrain-reward parses its own arguments
        cli.main(["pretrain-reward", "--help"])
    assert calls == ["enable"] * 2


ENABLE_AND_COMPILE = textwrap.dedent(
    """
    import os
    from caasl_jax import compile_cache
    folder = compile_cache.enable()
    import jax, jax.numpy as jnp
    print("FOLDER", folder)
    print("CHILDREN", os.environ.get("JAX_COMPILATION_CACHE_DIR"))
    print("SUM", float(jax.jit(lambda x: jnp.sin(x).sum())(jnp.arange(3.0))))
    """
)


def _run(environ: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "CAASL_"))}
    env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **environ)
    return subprocess.run(
        [sys.executable, "-c", ENABLE_AND_COMPILE], capture_output=True, text=True, env=env
    )


def test_enable_fills_the_chosen_folder_and_an_unusable_one_only_warns(tmp_path):
    folder = tmp_path / "cache"
    result = _run({"CAASL_COMPILE_CACHE": str(folder)})
    assert f"FOLDER {folder}" in result.stdout, result.stderr[-3000:]
    assert f"CHILDREN {folder}" in result.stdout  # spawned workers share it
    assert any(folder.iterdir())  # the compiled program was written
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    result = _run({"CAASL_COMPILE_CACHE": str(blocked / "xla")})
    assert "FOLDER None" in result.stdout and "SUM 1.75" in result.stdout, result.stderr[-3000:]
    assert "CHILDREN None" in result.stdout
    assert "compilation cache off" in result.stderr
    assert blocked.read_text() == "not a folder"
