"""Issue 11: paired quantisation noise, frozen / re-initialised AuxT components."""

import pytest
import torch
from compressai.entropy_models import EntropyModel

from energylab import train as train_mod
from energylab.auxt import variant_name
from energylab.config import ConfigError, TrainConfig
from energylab.klt import klt_projection, subband_vectors
from energylab.models import build_model
from energylab.train import __main__ as train_cli

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
        train_mod.train_step(s, step, s.stream.batch(step - 1))
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




# --- components: remove, freeze, or learn from a neutral start ---------------------------------

def build(**options):
    torch.manual_seed(0)
    return build_model("mbt2018-mean", N=8, M=12, auxt=True, **options)


def differing(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return {k for k in sa if not torch.equal(sa[k], sb[k])}


def olp_weights(model):
    return {k for k in model.state_dict() if k.endswith("olp.linear.weight")}


def scalings(model):
    return {k for k in model.state_dict() if k.endswith("scaling_factors")}


def test_variant_names():
    assert variant_name(True, freeze=["scaling"]) == "auxt-frozen-scaling"
    assert variant_name(True, scaling_init="zero") == "auxt-scaling-init-zero"
    assert variant_name(True, freeze=["orthogonal"]) == "auxt-frozen-orthogonal"
    assert variant_name(True, freeze=["scaling", "orthogonal"],
                        projection_init="klt") == "auxt-frozen-klt+scaling"
    assert variant_name(True, ["scaling"], freeze=["orthogonal"]) == "auxt-no-scaling-frozen-orthogonal"
    assert variant_name(True, projection_init="orthogonal") == "auxt-projection-init-orthogonal"
    with pytest.raises(ValueError, match="both removed and frozen"):
        variant_name(True, ["scaling"], freeze=["scaling"])
    with pytest.raises(ValueError, match="freezable components are"):
        variant_name(True, freeze=["wavelet"])
    with pytest.raises(ValueError, match="only be removed from an AuxT variant"):
        variant_name(False, freeze=["scaling"])


def test_each_option_changes_only_its_component():
    x = torch.rand(1, 3, 64, 64)
    full = build().eval()
    frozen_scaling = build(freeze=["scaling"]).eval()
    assert differing(full, frozen_scaling) == set()
    with torch.no_grad():
        assert torch.equal(full(x)["x_hat"], frozen_scaling(x)["x_hat"])
    zero = build(scaling_init="zero")
    assert differing(full, zero) == scalings(full)
    assert all(torch.all(p == 0) for n, p in zero.named_parameters() if n.endswith("scaling_factors"))
    ortho = build(freeze=["orthogonal"])
    assert differing(full, ortho) == olp_weights(full)
    for name, w in ortho.named_parameters():
        if name.endswith("olp.linear.weight"):
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            torch.testing.assert_close(gram, torch.eye(len(gram)), atol=1e-5, rtol=0)
    frozen = {n for n, p in ortho.named_parameters() if not p.requires_grad}
    assert frozen == olp_weights(full)
    assert {n for n, p in frozen_scaling.named_parameters() if not p.requires_grad} == scalings(full)


@pytest.mark.parametrize("component", ["scaling", "orthogonal"])
def test_frozen_parameters_stay_and_the_rest_trains(tmp_path, component):
    config = TrainConfig(out=tmp_path / "r", auxt=True, freeze=(component,), **TINY)
    s = train_mod.setup(config)
    before = {k: v.clone() for k, v in s.net.state_dict().items()}
    s.model.train()
    train_mod.train_step(s, 1, s.stream.batch(0))
    changed = {k for k, v in s.net.state_dict().items() if not torch.equal(v, before[k])}
    frozen, learned = (scalings, olp_weights) if component == "scaling" else (olp_weights, scalings)
    assert changed.isdisjoint(frozen(s.net))
    assert learned(s.net) <= changed and "g_a.transform.0.weight" in changed


def test_train_command_names_the_flag(tmp_path, capsys):
    assert train_cli.main(["--out", str(tmp_path / "r"), "--freeze", "scaling"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --freeze needs --auxt") and "\n" not in err


def test_config_validates_component_options(tmp_path):
    config = TrainConfig(out=tmp_path, auxt=True, freeze=["scaling", "orthogonal"])
    assert config.freeze == ("orthogonal", "scaling") and config.projection_init == "orthogonal"
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="freeze needs auxt"):
        TrainConfig(out=tmp_path, freeze=("scaling",))
    with pytest.raises(ConfigError, match="scaling_init must be one of release, zero"):
        TrainConfig(out=tmp_path, auxt=True, scaling_init="one")
    with pytest.raises(ConfigError, match="both removed and frozen"):
        TrainConfig(out=tmp_path, auxt=True, remove=("scaling",), freeze=("scaling",))


# --- the data's KLT ----------------------------------------------------------------------------

def test_klt_projection_decorrelates_and_completes():
    torch.manual_seed(1)
    mixing = torch.randn(6, 6)
    v = torch.randn(4000, 6) * torch.tensor([5.0, 3, 2, 1, 0.5, 0.1]) @ mixing
    narrow = klt_projection(v, 3)
    cov = narrow @ torch.cov(v.double().T) @ narrow.T
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-8 * cov.abs().max()
    variances = torch.diag(cov)
    assert torch.all(variances[:-1] >= variances[1:])
    # the top components: no other unit direction has more variance than the first row
    full = torch.linalg.eigvalsh(torch.cov(v.double().T))
    assert variances[0] == pytest.approx(float(full[-1]))
    wide = klt_projection(v, 10)
    torch.testing.assert_close(wide.T @ wide, torch.eye(6, dtype=torch.float64))
    assert torch.all(wide[6:] == 0)


def test_init_klt_decorrelates_the_first_stage_and_mirrors():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 64, 64)
    model = build(freeze=["orthogonal"], projection_init="klt", klt_data=x)
    first = model.g_a.auxiliary_layers[0]
    projected = subband_vectors(first, x).double() @ first.olp.linear.weight.double().T
    cov = torch.cov(projected.T)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-5 * cov.abs().max()
    last = model.g_s.auxiliary_layers[-1]
    assert torch.equal(last.olp.linear.weight, first.olp.linear.weight.T)
    with pytest.raises(ValueError, match="needs training crops"):
        build(projection_init="klt")
