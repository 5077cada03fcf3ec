"""The console process: its quick exit keeps the command's exit status, its output and the exit handlers; the
allocator tuning applies on glibc."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import atexit, sys, threading, time
    import typer
    from kvbatch.console import ConsoleTyper

    app = ConsoleTyper(add_completion=False)
    atexit.register(lambda: print("exit handler ran", flush=False))

    class Teardown:  # its __del__ runs when the interpreter clears module globals at a normal exit
        def __del__(self):
            print(" teardown")

    marker = Teardown()

    @app.command()
    def main(code: int, thread: bool = False) -> None:
        if thread:  # a non-daemon thread still running: the interpreter's own exit waits for it
            threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished"))).start()
        sys.stdout.write("unflushed output")
        raise typer.Exit(code)

    app()
    """
)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("code", [0, 3])
def test_status_output_and_exit_handlers_survive(code: int) -> None:
    done = run(str(code))
    assert done.returncode == code, done.stderr
    assert done.stdout == "unflushed outputexit handler ran\n"  # and no interpreter teardown


def test_a_running_thread_gets_a_normal_exit() -> None:
    done = run("4", "--thread")
    assert done.returncode == 4, done.stderr
    assert "thread finished" in done.stdout and "exit handler ran" in done.stdout and "teardown" in done.stdout


def test_usage_errors_keep_their_status() -> None:
    assert run("not-a-number").returncode == 2


def test_a_closed_stdout_keeps_the_status() -> None:
    """Started with stdout closed (`kvbatch run ... >&-` from cron), Python has no sys.stdout: the command's
    output goes nowhere, and its exit status stays the command's, not a traceback's 1."""
    script = textwrap.dedent(
        """
        import typer
        from kvbatch.console import ConsoleTyper

        app = ConsoleTyper(add_completion=False)

        @app.command()
        def main(code: int) -> None:
            typer.echo("summary")  # click writes nothing where there is no stdout
            raise typer.Exit(code)

        app()
        """
    )
    for code in (0, 3):
        done = subprocess.run(
            [sys.executable, "-c", script, str(code)],
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            preexec_fn=lambda: os.close(1),
        )
        assert (done.returncode, done.stderr) == (code, "")


def tuned(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env_extra
    code = "from kvbatch.console import tune_malloc; print(tune_malloc())"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True
    ).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_allocator_is_tuned_unless_the_user_set_malloc_variables() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert tuned({}) == "True"  # in a subprocess: the test process keeps its own allocator
    assert tuned({"MALLOC_ARENA_MAX": "2"}) == "False"


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGUSR1"])
def test_a_signal_while_starting_exits_3(name: str) -> None:
    """Before a job installs its handlers (while torch imports), Slurm's signal must still mean 'rerun': code 3."""
    code = textwrap.dedent(
        f"""
        import os, signal, time
        from kvbatch.early_signals import exit_on_early_signals
        exit_on_early_signals()
        os.kill(os.getpid(), signal.{name})
        time.sleep(10)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and f"stopped by {name} before any job ran; rerun to run it" in done.stderr


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_the_command_takes_signals_before_it_imports_the_cli(name: str) -> None:
    """The CLI's imports (torch, pyarrow, pandas) take a second or more: a signal landing in them exits 3 too. An
    import hook sends the signal as kvbatch.cli starts to import, then waits for it."""
    done = _kvbatch_signalled_on_import("kvbatch.cli", name, "--help")
    assert done.returncode == 3 and f"stopped by {name} before any job ran; rerun to run it" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("module", ["importlib.metadata", "typer"])
def test_a_signal_in_kvbatchs_first_imports_exits_3(module: str) -> None:
    """The package's version lookup (importlib.metadata) and the console's Typer import came before the handlers:
    Ctrl-C in the first half second of a run printed a KeyboardInterrupt traceback and exited 1 or 130."""
    done = _kvbatch_signalled_on_import(module, "SIGINT", "--version")
    assert (done.returncode, done.stderr) == (3, "kvbatch: stopped by SIGINT before any job ran; rerun to run it\n")


def _kvbatch_signalled_on_import(module: str, name: str, argument: str) -> subprocess.CompletedProcess:
    """`kvbatch ARGUMENT` with an import hook that sends the signal `name` as `module` starts to import, then waits
    for it."""
    code = textwrap.dedent(
        f"""
        import importlib.abc, os, signal, sys, time

        class SignalOnImport(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname, path, target=None):
                if fullname == {module!r}:
                    os.kill(os.getpid(), signal.{name})
                    time.sleep(10)
                return None

        sys.meta_path.insert(0, SignalOnImport())
        sys.argv = ["kvbatch", {argument!r}]
        from kvbatch.__main__ import main
        main()
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_signal_while_starting_exits_3_with_no_reader_on_stderr() -> None:
    """Slurm's SIGTERM reaches `| tee log` too: the start-up handler's message raised BrokenPipeError, exit 1."""
    code = "import os, signal, time\nfrom kvbatch.early_signals import exit_on_early_signals\nexit_on_early_signals()\n"
    code += "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(10)\n"
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run([sys.executable, "-c", code], stdout=writer, stderr=writer, timeout=60)
    finally:
        os.close(writer)
    assert done.returncode == 3


def test_a_removed_working_folder_is_named_not_a_traceback(tmp_path) -> None:
    """A shell left in a folder since removed (or a job started there): transformers resolves a path against the
    working folder as it imports, and the command ended with its FileNotFoundError traceback and exit 1."""
    gone = tmp_path / "gone"
    gone.mkdir()
    code = f"import os, sys\nos.chdir({str(gone)!r})\nos.rmdir({str(gone)!r})\nsys.argv = ['kvbatch', '--version']\n"
    code += "from kvbatch.__main__ import main\nmain()\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (
        2,
        "kvbatch: error: the working folder was removed; cd to a folder that exists and rerun\n",
    )
