"""Shared test set-up: seeding, and the tiny studies trained once per test session.

The tiny studies are trained through :func:`tiny_ablation_dir`, the one place that knows how a test
trains an ablation; every test module that needs a trained ablation takes the session fixtures below
instead of training its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", module="compressai")
warnings.filterwarnings("ignore", message=".*torch_geometric.*")

TINY = {"steps": 8, "eval_every": 4, "capture_every": 4, "N": 8, "M": 12, "batch_size": 2,
        "test_size": 64, "probe_count": 2, "probe_size": 64}
"""Training options of the tiny studies: three evaluations and three captures per cell."""
ABLATION = {"remove": ["scaling"], "seeds": [0, 1]}
"""The tiny ablation: baseline, auxt and auxt-no-scaling, two seeds."""
SWEEP = {"seeds": [0], "lmbdas": [0.0035, 0.025]}
"""The tiny R-D sweep: baseline and auxt at two λ, one seed."""


def flags(**options) -> list[str]:
    """Command-line flags of ``options`` (``batch_size=2`` -> ``--batch-size 2``; a list after
    one flag, ``remove`` repeated; ``True`` a bare flag)."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if key == "remove":
            argv += [a for component in value for a in (flag, component)]
        elif value is True:
            argv.append(flag)
        elif isinstance(value, list | tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def ablation_argv(out: Path, **options) -> list[str]:
    """``energylab.ablate`` arguments of a tiny ablation into ``out`` (:data:`TINY` + ``options``)."""
    return ["--out", str(out), *flags(**{**TINY, **options})]


def tiny_ablation_dir(tmp_path_factory: pytest.TempPathFactory, name: str, **options) -> Path:
    """The tiny ablation ``name`` with ``options`` (see :func:`ablation_argv`), trained at its first
    use in the session and reused after."""
    from energylab.ablate.__main__ import main as ablate
    from energylab.rundir import AblationDir

    root = tmp_path_factory.getbasetemp() / "tiny" / name
    if AblationDir(root).summary() is None:
        shutil.rmtree(root, ignore_errors=True)
        assert ablate(ablation_argv(root, **options)) == 0
    return root



@pytest.fixture(scope="session")
def tiny_ablation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:data:`ABLATION`, summarised, with its figures."""
    return tiny_ablation_dir(tmp_path_factory, "ablation", **ABLATION)


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:data:`SWEEP`, summarised, with BD-rates."""
    return tiny_ablation_dir(tmp_path_factory, "sweep", **SWEEP)


ENTRY_POINTS = ("train", "ablate", "evaluate", "analyze", "figures")
"""The commands users run as ``python -m energylab.<command>``."""

_FORK_SERVER = """
import os, sys

def _serve():
    import json
    import energylab.cli
    for name in sys.argv[1:]:
        __import__(f"energylab.{name}")  # what `python -m energylab.<name>` imports before __main__
    # the imported objects out of the collector's reach: a child's collections (and its exit) would
    # otherwise touch, and so copy, every page of them (8 s instead of 2 on this machine)
    import gc
    gc.freeze()
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: set up as `python -m energylab.<name> <args>` started in <cwd>
            os.chdir(request["cwd"])
            write = os.O_WRONLY | os.O_CREAT
            for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], write),
                                    (2, request["stderr"], write)):
                opened = os.open(path, flags)
                os.dup2(opened, fd)
                os.close(opened)
            sys.path[0] = os.getcwd()
            sys.argv = ["-m", *request["args"]]
            return "energylab." + request["name"]
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
    raise SystemExit(0)

_module = _serve()
del os, sys, _serve
__import__("runpy")._run_module_as_main(_module)
"""
"""One Python that imports the entry points once, then forks a child per request that runs
``python -m energylab.<name>`` from there: ``runpy._run_module_as_main``, what ``-m`` calls, in the
request's folder, with ``sys.argv``, ``sys.path[0]``, stdin (``/dev/null``), stdout and stderr
(files) as a fresh ``python -m`` would have them, an uncaught exception printed and the exit status
set by the interpreter's own exit. What a fork cannot show is what happens before: the interpreter's
start and the imports (warnings printed while importing, a module that cannot be found), which the
``--help`` tests of ``tests/test_entry_points.py`` check in real ``python -m`` processes."""


@dataclass
class Completed:
    """What :class:`EntryPoints` gives back, as :class:`subprocess.CompletedProcess` would."""

    returncode: int
    stdout: str
    stderr: str


class EntryPoints:
    """``python -m energylab.<name> <args>`` run in forked children of one started Python
    (:data:`_FORK_SERVER`): the imports paid once for all commands instead of once per run."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.runs = folder, 0
        self.log = open(folder / "server.stderr", "w+")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [sys.executable, "-c", _FORK_SERVER, *ENTRY_POINTS], cwd=folder, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, text=True,
            env={**os.environ, "PYTHONWARNINGS": "default"})
        ready = self.process.stdout.readline()
        self.log.seek(0)
        printed = self.log.read()
        if ready != "ready\n" or printed:  # a child must start as quiet as a fresh `python -m`
            self.close()
            raise RuntimeError(f"the entry-point server did not start quietly: {ready!r} {printed}")

    def __call__(self, name: str, *args: str, cwd: Path) -> Completed:
        self.runs += 1
        out, err = (self.folder / f"{self.runs}.{kind}" for kind in ("stdout", "stderr"))
        request = {"name": name, "args": list(args), "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        status = self.process.stdout.readline()
        if not status:
            raise RuntimeError("the entry-point server stopped")
        return Completed(int(status), out.read_text(), err.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        finally:
            self.process.kill()  # no-op once it has exited
            self.log.close()


@pytest.fixture(scope="session")
def entry_point(tmp_path_factory: pytest.TempPathFactory):
    """``entry_point(name, *args, cwd=folder)``: ``python -m energylab.<name> <args>`` in ``folder``,
    in a forked child of one Python that imported every entry point once (:class:`EntryPoints`);
    returns ``returncode``, ``stdout`` and ``stderr``."""
    server = EntryPoints(tmp_path_factory.mktemp("entry_points"))
    yield server
    server.close()


TINY_STUDIES = {"tiny_ablation", "tiny_sweep"}
"""The session fixtures that train: under ``pytest -n`` (pytest-xdist) every test that takes one
runs on one worker (``xdist_group``, with ``--dist loadgroup``), so each study is trained once and
its tests read (and some write) it one after another, as in one process."""


def pytest_configure(config: pytest.Config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # an xdist worker: its share of the cores, for torch here and the processes it starts
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(workers))
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    """Under ``pytest -n N --dist loadgroup``: one worker for the tests of the tiny studies
    (:data:`TINY_STUDIES`), and one for the tests of a module that share one of its module-scoped
    fixtures (a trained run, a compiled model), so that each is set up once and its tests run one
    after another as without xdist; every other test goes to whichever worker is free."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & TINY_STUDIES:
            item.add_marker(pytest.mark.xdist_group("tiny_studies"))
            continue
        definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        shared = ("package", "module", "class")
        if any(d.scope in shared for name in names for d in definitions.get(name, ())):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    result = yield  # pytest-xdist's own hook reads the marks
    if getattr(config.option, "loadgroup", False):
        _name_the_groups(items)
    return result


def _name_the_groups(items: list[pytest.Item]) -> None:
    """pytest-xdist 3.8 tells the controller a test's group by renaming ``item._nodeid`` to
    ``<nodeid>@<group>``, which pytest 9.2 no longer reads (node ids are structured), so that every
    test goes to any worker (pytest-xdist issue 1386; the fix proposed, pull request 1388, renames the
    structured id). Where the rename did not take, rename the structured id; with a pytest-xdist
    that does so itself, nothing is left to do here."""
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # string node ids: pytest-xdist's rename took
        return
    for item in items:
        groups = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                  for m in item.iter_markers("xdist_group")}
        if groups and not item.nodeid.endswith("@" + "_".join(sorted(groups))) and hasattr(item, "_id"):
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(sorted(groups))}")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@contextmanager
def interrupted_at(step: int) -> Iterator[None]:
    """Inside the block, training raises ``KeyboardInterrupt`` (Ctrl-C) when it asks for the batch of
    ``step`` (so during step ``step + 1``); the real batches again after it."""
    from energylab.data import TrainSampler

    real_batch = TrainSampler.batch

    def dying_batch(self, at, *args, **kwargs):
        if at == step:
            raise KeyboardInterrupt
        return real_batch(self, at, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainSampler, "batch", dying_batch)
        yield
