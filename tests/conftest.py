"""Shared test set-up: seeding, and the tiny studies trained once per test session.

The tiny studies are trained through :func:`tiny_ablation_dir`, the one place that knows how a test
trains an ablation; every test module that needs a trained ablation takes the session fixtures below
instead of training its own.
"""

from __future__ import annotations

import shutil
import warnings
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


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
