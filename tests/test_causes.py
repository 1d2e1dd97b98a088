"""Issue 11: paired quantisation noise, frozen / re-initialised AuxT components."""

import torch
from compressai.entropy_models import EntropyModel

from energylab import train as train_mod
from energylab.config import TrainConfig

TINY = {"N": 8, "M": 12, "batch_size": 2, "steps": 3, "probe_count": 2, "probe_size": 64,
        "test_size": 64, "device": "cpu"}


def noise_of_steps(monkeypatch, config, steps):
    """The training noise tensors drawn by CompressAI's entropy models at each of ``steps``."""
    drawn: list = []
    original = EntropyModel.quantize

    def quantize(self, inputs, mode, means=None):
        if mode == "noise":  # the draw CompressAI is about to make, from the same RNG state
            state = torch.get_rng_state()
            drawn.append(torch.empty_like(inputs).uniform_(-0.5, 0.5))
            torch.set_rng_state(state)
        return original(self, inputs, mode, means)

    monkeypatch.setattr(EntropyModel, "quantize", quantize)
    s = train_mod.setup(config)
    s.model.train()
    per_step = []
    for step in steps:
        drawn.clear()
        train_mod.train_step(s, step)
        per_step.append(list(drawn))
    monkeypatch.setattr(EntropyModel, "quantize", original)
    return per_step


def test_variants_of_a_seed_draw_the_same_noise(tmp_path, monkeypatch):
    base = TrainConfig(out=tmp_path / "b", **TINY)
    baseline = noise_of_steps(monkeypatch, base, [1, 2])
    auxt = noise_of_steps(monkeypatch, TrainConfig(out=tmp_path / "a", auxt=True, **TINY), [1, 2])
    other_seed = noise_of_steps(monkeypatch, TrainConfig(out=tmp_path / "c", seed=1, **TINY), [1])
    for b, a in zip(baseline, auxt, strict=True):
        assert len(b) == len(a) == 2  # z (entropy bottleneck) and y (Gaussian conditional)
        for nb, na in zip(b, a, strict=True):
            assert torch.equal(nb, na)
            assert nb.abs().max() <= 0.5 and nb.std() > 0.1
    assert not torch.equal(baseline[0][1], baseline[1][1])  # a new draw at every step
    assert not torch.equal(baseline[0][1], other_seed[0][1])  # and per seed


def test_noise_seed_depends_on_seed_step_and_rank():
    seeds = {train_mod.noise_seed(s, t, r) for s in (0, 1) for t in (1, 2) for r in (0, 1)}
    assert len(seeds) == 8 and all(0 <= v < 2**63 for v in seeds)
    assert train_mod.noise_seed(3, 5, 0) == train_mod.noise_seed(3, 5, 0)


