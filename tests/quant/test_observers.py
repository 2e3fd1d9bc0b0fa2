import pytest
import torch
from torch.ao.quantization.observer import (
    MovingAveragePerChannelMinMaxObserver as TorchMovingAveragePerChannel,
)

from qpasses.errors import QPassesError
from qpasses.quant.observers import (
    CalibrationError,
    ChannelMSEObserver,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    _Histogram,
    make_observer,
)
from qpasses.quant.spec import QuantSpec, compute_qparams

U8 = QuantSpec(signed=False, symmetric=False)
S8_SYM = QuantSpec(signed=True, symmetric=True)


def _fake_quant_mse(x: torch.Tensor, observer) -> float:
    scale, zp = observer.qparams()
    spec = observer.spec
    q = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), spec.quant_min, spec.quant_max)
    return float(((q - x) ** 2).mean())


@pytest.fixture(scope="module")
def outlier_data():
    """2M standard normal samples and one outlier at 50. Clipping it costs (50 − t)² / 2·10⁶ of MSE, little
    next to the rounding error saved, so an MSE-optimal 8-bit range ends well below 50."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2_000_000, generator=g)
    x[123] = 50.0
    return x


def test_make_observer_kinds():
    kinds = {
        "minmax": MinMaxObserver,
        "moving_average": MovingAverageMinMaxObserver,
        "histogram": PercentileObserver,
        "percentile": PercentileObserver,
        "entropy": EntropyObserver,
        "mse": MSEObserver,
    }
    for name, cls in kinds.items():
        obs = make_observer(U8.replace(observer=name), name="conv1")
        assert type(obs) is cls and obs.name == "conv1"


def test_minmax_by_hand():
    obs = MinMaxObserver(U8)
    assert not obs.calibrated
    x = torch.tensor([0.0, 1.0], requires_grad=True)
    assert obs(x) is x  # identity on the graph edge: gradients and values pass untouched
    obs(torch.tensor([[-1.0, 3.0]]))
    obs(torch.tensor(0.5))
    lo, hi = obs.range()
    assert (lo.item(), hi.item()) == (-1.0, 3.0) and obs.calibrated and int(obs.batches_seen) == 3
    scale, zp = obs.qparams()
    assert scale.item() == pytest.approx(4 / 255) and zp.item() == 64
    assert not obs.min_val.requires_grad


def test_moving_average_by_hand():
    obs = MovingAverageMinMaxObserver(U8.replace(observer="moving_average", averaging_constant=0.5))
    obs(torch.tensor([0.0, 1.0]))
    obs(torch.tensor([-1.0, 3.0]))
    lo, hi = obs.range()
    assert (lo.item(), hi.item()) == (-0.5, 2.0)  # 0 + ½(−1 − 0), 1 + ½(3 − 1)


def test_moving_average_per_channel_agrees_with_torch():
    spec = S8_SYM.replace(axis=1, observer="moving_average", averaging_constant=0.1)
    ours = make_observer(spec)
    theirs = TorchMovingAveragePerChannel(
        averaging_constant=0.1, ch_axis=1, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        b = torch.randn(2, 3, 5, generator=g) * torch.rand(1, 3, 1, generator=g) * 4
        ours(b)
        theirs(b)
    torch.testing.assert_close(ours.range(), (theirs.min_val, theirs.max_val))
    torch.testing.assert_close(ours.qparams()[0], theirs.calculate_qparams()[0])


def test_sub_8_bit_qparams():
    obs = MinMaxObserver(U8.replace(bits=4))
    obs(torch.tensor([0.0, 3.0]))
    scale, zp = obs.qparams()
    assert scale.item() == pytest.approx(3 / 15) and zp.item() == 0
    obs = MinMaxObserver(S8_SYM.replace(bits=4, narrow_range=True))
    obs(torch.tensor([-2.0, 1.4]))
    assert obs.qparams()[0].item() == pytest.approx(2 / 7)


@pytest.mark.parametrize("kind", ["minmax", "moving_average", "percentile", "entropy", "mse"])
def test_errors_name_the_observer(kind):
    obs = make_observer(U8.replace(observer=kind), name="layer1.relu")
    with pytest.raises(CalibrationError, match=r"at 'layer1.relu'.*no data observed yet"):
        obs.qparams()
    for bad in ("nan", "inf", "-inf"):
        with pytest.raises(CalibrationError, match=r"at 'layer1.relu'.*1 NaN/Inf value\(s\) of 3"):
            obs(torch.tensor([1.0, float(bad), 2.0]))
    with pytest.raises(CalibrationError, match="floating-point"):
        obs(torch.tensor([1, 2]))
    assert issubclass(CalibrationError, QPassesError) and not obs.calibrated


@pytest.mark.parametrize("kind", ["minmax", "percentile", "entropy", "mse"])
def test_constant_zero_input(kind):
    obs = make_observer(U8.replace(observer=kind))
    obs(torch.zeros(10))
    scale, zp = obs.qparams()
    assert scale.item() == torch.finfo(torch.float32).eps and zp.item() == 0


def test_per_channel_errors():
    obs = MinMaxObserver(S8_SYM.replace(axis=2))
    with pytest.raises(CalibrationError, match="axis 2 does not exist in a tensor of shape"):
        obs(torch.ones(3, 4))
    obs = MinMaxObserver(S8_SYM.replace(axis=0))
    obs(torch.ones(3, 4))
    with pytest.raises(CalibrationError, match="5 channels in this batch, 3 in earlier ones"):
        obs(torch.ones(5, 4))
    with pytest.raises(ValueError, match="per tensor only"):
        PercentileObserver(S8_SYM.replace(axis=0))


@pytest.mark.parametrize("kind", ["minmax", "mse"])
def test_state_dict_round_trip_and_inference_mode(kind):
    spec = S8_SYM.replace(axis=0) if kind == "minmax" else U8.replace(observer=kind)
    obs = make_observer(spec)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        obs(torch.randn(4, 6, generator=g))
    with torch.no_grad():  # buffers must still be ordinary tensors after an inference-mode batch
        obs(torch.randn(4, 6, generator=g) * 3)
    fresh = make_observer(spec)
    fresh.load_state_dict(obs.state_dict())
    assert fresh.calibrated
    for ours, theirs in zip(fresh.qparams(), obs.qparams(), strict=True):
        assert torch.equal(ours, theirs)


def test_percentile_on_known_distributions():
    x = torch.linspace(-1.0, 1.0, 200_001)
    sym = PercentileObserver(S8_SYM.replace(observer="percentile", percentile=90.0))
    sym(x)
    lo, hi = sym.range()
    assert hi.item() == pytest.approx(0.9, abs=2e-3) and lo.item() == pytest.approx(-0.9, abs=2e-3)
    tails = PercentileObserver(U8.replace(observer="percentile", percentile=95.0))
    tails(x[x.abs() < 2] * 0.5 + 0.5)  # uniform on [0, 1]
    lo, hi = tails.range()
    assert lo.item() == pytest.approx(0.05, abs=2e-3) and hi.item() == pytest.approx(0.95, abs=2e-3)
    full = PercentileObserver(U8.replace(observer="percentile", percentile=100.0))
    full(x)
    assert [v.item() for v in full.range()] == [-1.0, 1.0]


@pytest.mark.parametrize("cls", [EntropyObserver, MSEObserver])
def test_outliers_are_clipped(cls, outlier_data):
    bulk = float(outlier_data.abs().quantile(0.999))
    for spec in (S8_SYM, U8):
        obs = cls(spec)
        for chunk in outlier_data.chunk(4):
            obs(chunk)
        lo, hi = obs.range()
        assert bulk <= hi.item() <= 0.5 * 50.0, (spec, hi)
        assert lo.item() <= -min(bulk, 4.0), (spec, lo)


@pytest.mark.parametrize("cls", [EntropyObserver, MSEObserver])
def test_outliers_are_clipped_after_relu(cls, outlier_data):
    relu = torch.relu(outlier_data)
    obs = cls(U8)
    obs(relu)
    lo, hi = obs.range()
    assert lo.item() == 0.0 and float(relu.quantile(0.999)) <= hi.item() <= 0.5 * 50.0


@pytest.mark.parametrize("spec", [S8_SYM, U8, U8.replace(bits=4)], ids=str)
def test_mse_beats_minmax_and_is_near_the_best_clip(spec, outlier_data):
    data = outlier_data[:300_000]
    mse_obs, minmax = MSEObserver(spec), MinMaxObserver(spec)
    mse_obs(data)
    minmax(data)
    chosen, plain = _fake_quant_mse(data, mse_obs), _fake_quant_mse(data, minmax)
    assert chosen < 0.9 * plain
    # Brute force on the data itself, on a grid of tops (the bottom as chosen, or −top if symmetric).
    lo = float(mse_obs.range()[0])

    def qdq_mse(top: float) -> float:
        probe = MinMaxObserver(spec)
        probe(torch.tensor([-top if spec.symmetric else lo, top]))
        return _fake_quant_mse(data, probe)

    coarse = min(torch.linspace(1.0, 50.0, 50).tolist(), key=qdq_mse)
    best = min(qdq_mse(t) for t in torch.linspace(coarse - 1.0, coarse + 1.0, 41).tolist())
    assert chosen <= 1.02 * best


def test_kl_divergences_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    counts = (torch.rand(60, generator=g) * 10).floor()
    counts[counts < 3] = 0
    levels = 8

    def direct(i: int) -> float:
        p = counts[:i].double().clone()
        p[-1] += counts[i:].sum()
        ref = counts[:i].double()
        q = torch.zeros(i, dtype=torch.float64)
        for group in range(levels):
            members = [j for j in range(i) if j * levels // i == group]
            nonempty = [j for j in members if ref[j] > 0]
            for j in nonempty:
                q[j] = ref[members].sum() / len(nonempty)
        p, q = p / p.sum(), q / q.sum()
        return sum(
            float(p[j] * torch.log(p[j] / (q[j] if q[j] > 0 else 1e-12))) for j in range(i) if p[j] > 0
        )

    cuts = torch.arange(levels, 61)
    fast = EntropyObserver.kl_divergences(counts, cuts, levels)
    torch.testing.assert_close(fast, torch.tensor([direct(int(i)) for i in cuts], dtype=torch.float64))


def _stream(cls, spec):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(150_000, generator=g), torch.randn(50, generator=g) * 6])
    one, many = cls(spec), cls(spec)
    one(x)
    sizes = {k: v.shape for k, v in many.state_dict().items()}
    for b in x[torch.randperm(x.numel(), generator=g)].chunk(100):
        many(b)
    assert {k: v.shape for k, v in many.state_dict().items()} == sizes  # memory independent of batch count
    assert many.histogram.numel() == 2048 and many.histogram.sum().item() == x.numel()
    assert float(many.hist_hi - many.hist_lo) <= 2.5 * float(x.max() - x.min())  # resolution kept
    return x, one, many


@pytest.mark.parametrize("cls", [PercentileObserver, MSEObserver])
def test_streaming_histogram_one_batch_vs_many(cls):
    x, one, many = _stream(cls, U8.replace(observer="percentile", percentile=99.9))
    width = float(x.max() - x.min())
    for a, b in zip(one.range(), many.range(), strict=True):
        assert abs(a.item() - b.item()) <= 0.01 * width


def test_streaming_histogram_one_batch_vs_many_entropy():
    # KL minima are flat (two thresholds far apart can be within 1% in KL), so compare how good the
    # streamed choice is on the one-batch histogram rather than where it lies.
    x, one, many = _stream(EntropyObserver, S8_SYM)
    hist = _Histogram(one.histogram, float(one.hist_lo), float(one.hist_hi), float(x.abs().max()))
    counts, width = hist.abs_histogram(EntropyObserver.abs_bins)
    cuts = torch.arange(128, counts.numel() + 1)
    kl = EntropyObserver.kl_divergences(counts, cuts, 128)
    streamed_cut = round(many.range()[1].item() / width)
    assert abs(one.range()[1].item() - float(cuts[kl.argmin()]) * width) < 1e-4
    assert kl[streamed_cut - 128].item() <= 1.05 * kl.min().item()


def _batches_of_changing_range():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4000, generator=g) * s + c for s, c in [(0.1, 0), (1, 0), (3, 2), (0.5, -9), (10, 0)]]


def test_streaming_rebinning_is_exact():
    # Old bins nest inside new bins, so the streamed counts equal a histogram of all data on the final window.
    batches = _batches_of_changing_range()
    obs = HistogramObserver(U8, bins=256)
    for b in batches:
        obs(b)
    every = torch.cat(batches).double()
    lo, hi = float(obs.hist_lo), float(obs.hist_hi)
    width = (hi - lo) / 256
    assert lo <= float(every.min()) and hi > float(every.max())
    assert width == 2.0 ** round(torch.tensor(width).log2().item())  # a power of two
    assert (hi - lo) < 2 * float(every.max() - every.min()) * 256 / 255  # the smallest such width
    direct = torch.bincount(torch.floor((every - lo) / width).long(), minlength=256).double()
    assert torch.equal(direct, obs.histogram)


@pytest.mark.parametrize(("scale", "offset"), [(1.0, 0.0), (1.0, 1e7), (1e6, 0.0), (1e-30, 0.0), (1e-40, 0.0)])
def test_bin_numbers_are_exact_near_zero_far_from_it_and_at_any_scale(scale, offset):
    # Small bin numbers are computed in float32, others in float64 (offset 1e7, bins wider than 1, or narrower
    # than 2^-127 for subnormal data): the same exact counts.
    g = torch.Generator().manual_seed(3)
    values = torch.randn(20_000, generator=g) * scale + offset
    obs = HistogramObserver(U8, bins=128)
    for chunk in values.chunk(5):
        obs(chunk)
    lo, hi = float(obs.hist_lo), float(obs.hist_hi)
    width = (hi - lo) / 128
    direct = torch.bincount((torch.floor(values.double() / width) - lo / width).long(), minlength=128).double()
    assert torch.equal(direct, obs.histogram)


@pytest.mark.parametrize("cls", [PercentileObserver, EntropyObserver, MSEObserver])
def test_histogram_depends_only_on_the_values_not_the_batches_or_their_order(cls):
    batches = _batches_of_changing_range()
    one, streamed, reordered = cls(U8), cls(U8), cls(U8)
    one(torch.cat(batches))
    for b in batches:
        streamed(b)
    for b in reversed(torch.cat(batches).chunk(7)):
        reordered(b)
    for other in (streamed, reordered):
        for key, value in one.state_dict().items():
            if key != "batches_seen":
                assert torch.equal(value, other.state_dict()[key]), key
        assert torch.equal(one.qparams()[0], other.qparams()[0])


@pytest.mark.parametrize(("kind", "axis"), [("minmax", None), ("moving_average", None), ("percentile", None),
                                           ("entropy", None), ("mse", None), ("minmax", 1), ("moving_average", 1)])
def test_merged_shards_equal_one_observer_on_all_batches_in_order(kind, axis):
    spec = U8.replace(observer=kind, axis=axis, averaging_constant=0.3)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(3, 4, 5, generator=g) * (1 + i) + i for i in range(5)]
    whole = make_observer(spec)
    for b in batches:
        whole(b)
    # Three "ranks" (rank 2 sees nothing); batch i on rank i % 3, as distributed calibration deals them.
    shards = [make_observer(spec) for _ in range(3)]
    for i, b in enumerate(batches[:4]):
        shards[i % 2].batch_index = i
        shards[i % 2](b)
    shards[0].batch_index = 4
    shards[0](batches[4])
    merged = make_observer(spec)
    merged.merge_states([s.shard_state() for s in shards])
    assert int(merged.batches_seen) == 5
    for key, value in whole.state_dict().items():
        assert torch.equal(value, merged.state_dict()[key]), key
    assert all(torch.equal(a, b) for a, b in zip(whole.qparams(), merged.qparams(), strict=True))


def test_a_histogram_off_the_lattice_cannot_grow_or_merge():
    observer = PercentileObserver(U8)
    observer(torch.randn(100))
    observer.hist_lo.fill_(float(observer.hist_lo) + 0.001)  # as a state saved under the old growth rule could be
    with pytest.raises(CalibrationError, match="not on the power-of-two lattice"):
        observer(torch.randn(100) * 10)


def test_moving_average_outside_distributed_calibration_cannot_be_merged():
    observer = make_observer(U8.replace(observer="moving_average"))
    observer(torch.randn(10))
    with pytest.raises(CalibrationError, match="global order is unknown"):
        observer.shard_state()


def test_entropy_ignores_the_spike_of_exact_zeros_after_relu():
    # ReLU6 outputs of a real net: most values exactly 0, the rest spread over [0, 6]. Every grid holds
    # 0 exactly, so the spike must not pull the range in (with it, KL chose [0, 0.375]).
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200_000, generator=g) * 6
    x[torch.rand(200_000, generator=g) < 0.9] = 0
    spec = QuantSpec(bits=8, signed=False, symmetric=False, observer="entropy", reduce_range=True)
    observer = make_observer(spec)
    observer(x)
    lo, hi = observer.range()
    assert float(lo) == 0.0 and float(hi) > 5.5
    assert float(observer.exact_zeros) == float((x == 0).sum())


def test_channel_mse_observer_clips_outlier_weights_per_channel():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 64, 3, 3, generator=g) * 0.1
    weight[0, 0, 0, 0] = 1.0  # one outlier: clipping it buys resolution for the other 575 values
    spec = QuantSpec(signed=True, symmetric=True, axis=0, observer="mse", bits=4)
    observer = make_observer(spec)
    assert type(observer).__name__ == "ChannelMSEObserver"
    observer(weight)
    lo, hi = observer.range()
    rows = weight.reshape(3, -1)

    def error(ratio_lo, ratio_hi):
        scale, zp = compute_qparams(ratio_lo, ratio_hi, spec)
        codes = torch.clamp(torch.round(rows / scale[:, None]) + zp[:, None], spec.quant_min, spec.quant_max)
        return (((codes - zp[:, None]) * scale[:, None] - rows) ** 2).sum(1)

    chosen, full = error(lo, hi), error(*torch.aminmax(rows, dim=1))
    assert float(hi[0]) < 1.0  # the outlier channel is clipped
    assert bool((chosen <= full + 1e-12).all()) and float(chosen[0]) < 0.7 * float(full[0])
    for ratio in torch.linspace(0.3, 1.0, 71):  # no candidate on the grid does better
        mins, maxs = torch.aminmax(rows, dim=1)
        assert bool((chosen <= error(mins * ratio, maxs * ratio) + 1e-12).all())
    with pytest.raises(QPassesError, match="searched on one tensor"):
        observer(weight)


def _channel_mse_reference(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel MSE search written plainly: each channel, each of the 71 ratios, the first strictly
    smaller error wins, a channel whose every error overflows keeps its full range."""
    lows, highs = [], []
    for row in weight.movedim(spec.axis, 0).reshape(weight.shape[spec.axis], -1):
        full_lo, full_hi = torch.aminmax(row)
        best, lo, hi = float("inf"), full_lo, full_hi
        for ratio in torch.linspace(0.3, 1.0, 71):
            scale, zp = compute_qparams(full_lo * ratio, full_hi * ratio, spec)
            codes = torch.clamp(torch.round(row / scale) + zp, spec.quant_min, spec.quant_max)
            error = float((((codes - zp) * scale - row) ** 2).sum())
            if error < best:
                best, lo, hi = error, full_lo * ratio, full_hi * ratio
        lows.append(lo)
        highs.append(hi)
    return torch.stack(lows), torch.stack(highs)


@pytest.mark.parametrize("spec", [
    QuantSpec(signed=True, symmetric=True, axis=0, observer="mse"),  # x86 / fbgemm weights
    QuantSpec(signed=True, symmetric=True, axis=0, observer="mse", bits=4),
    QuantSpec(signed=True, symmetric=False, axis=0, observer="mse", bits=4),  # zero points != 0
    QuantSpec(signed=False, symmetric=True, axis=1, observer="mse", bits=4),
], ids=str)
def test_channel_mse_search_picks_the_ranges_of_the_plain_search(spec, monkeypatch):
    g = torch.Generator().manual_seed(0)
    clipped = 0
    for i, shape in enumerate([(16, 32, 3, 3), (8, 1, 5, 5), (24, 60, 10), (6, 7, 1, 1)]):
        weight = torch.randn(shape, generator=g)
        weight.view(-1)[::97] *= 6.0  # outliers, so that clipping pays on some channels
        if i % 2:  # skewed data: affine zero points move off 0, and unsigned grids get their kind of data
            weight = weight.abs() if not spec.signed else weight + 0.5 * weight.abs().amax()
        if i == 3:
            weight.select(spec.axis, 1).zero_()  # a constant channel: every candidate scores 0, ratio 0.3 wins
        expected_lo, expected_hi = _channel_mse_reference(weight, spec)
        clipped += int((expected_hi < weight.movedim(spec.axis, 0).flatten(1).amax(1)).sum())
        for chunk in (1 << 20, 50):  # every channel in one chunk, and one channel a chunk
            monkeypatch.setattr(ChannelMSEObserver, "chunk_elements", chunk)
            observer = make_observer(spec)
            observer(weight)
            lo, hi = observer.range()
            assert torch.equal(lo, expected_lo) and torch.equal(hi, expected_hi), (shape, chunk)
    assert clipped > 4  # the search chose something other than the full range, so the comparison can fail


def test_x86_weights_use_the_per_channel_mse_search():
    from qpasses.quant.backends import get_backend

    assert get_backend("x86").default_config().weight.observer == "mse"
    with pytest.raises(ValueError, match="per tensor only"):
        QuantSpec(signed=False, symmetric=False, axis=0, observer="entropy")


def test_affine_mse_search_does_not_repeat_a_search_it_already_made(monkeypatch):
    # After ReLU the bottom stays 0, so the second round's search for the top is the first one's.
    calls = []
    search = MSEObserver._search
    monkeypatch.setattr(MSEObserver, "_search", lambda self, score, upper: calls.append(upper) or search(
        self, score, upper))
    g = torch.Generator().manual_seed(0)
    relu = make_observer(U8.replace(observer="mse"))
    relu(torch.randn(10_000, generator=g).relu())
    lo, hi = relu.range()
    assert len(calls) == 1 and float(lo) == 0.0 and 0.0 < float(hi) <= calls[0]
    calls.clear()
    signed = make_observer(U8.replace(observer="mse"))
    signed(torch.randn(10_000, generator=g))
    signed.range()
    assert len(calls) == 2 * MSEObserver.rounds  # top and bottom, each round: each depends on the other's move


def _qdq_error(x: torch.Tensor, lo: float, hi: float, spec: QuantSpec, power: float) -> float:
    probe = MinMaxObserver(spec)
    probe(torch.tensor([lo, hi]))
    scale, zp = probe.qparams()
    q = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), spec.quant_min, spec.quant_max)
    return float((q - x).abs().pow(power).mean())


def test_error_power_searches_the_range_minimising_that_power_and_clips_less():
    # Laplace data (heavy-tailed, like a LayerNorm's or a residual stream's): a larger power weighs the clipped
    # tail's large errors more, so it keeps more of the tail, and still clips the farthest values.
    g = torch.Generator().manual_seed(0)
    data = -torch.rand(200_000, generator=g).log() * torch.where(torch.rand(200_000, generator=g) < 0.5, -1.0, 1.0)
    spec = U8.replace(observer="mse")
    tops = {}
    for power in (2.0, 3.0, 4.0):
        obs = MSEObserver(spec.replace(error_power=power))
        obs(data)
        lo, hi = (float(v) for v in obs.range())
        tops[power] = hi
        # no top on a grid around the chosen one does better at this power (the bottom as chosen)
        chosen = _qdq_error(data, lo, hi, spec, power)
        for top in torch.linspace(0.5 * hi, min(1.5 * hi, float(data.max())), 21).tolist():
            assert chosen <= 1.01 * _qdq_error(data, lo, top, spec, power), (power, hi, top)
    assert tops[2.0] < tops[3.0] < tops[4.0] < float(data.max())


def test_error_power_reaches_the_per_channel_weight_search():
    weight = torch.randn(4, 512, generator=torch.Generator().manual_seed(0))
    weight[:, 0] = 8.0  # one outlier per channel: 4-bit steps make clipping it pay under the squared error
    spec = S8_SYM.replace(axis=0, observer="mse", bits=4)
    highs = {}
    for power in (2.0, 8.0):
        observer = make_observer(spec.replace(error_power=power))
        observer(weight)
        highs[power] = observer.range()[1]
    assert bool((highs[2.0] < 6.0).all()) and bool((highs[8.0] > 7.0).all())


def test_error_power_is_checked():
    assert str(U8.replace(observer="mse", error_power=3)).endswith(" mse(p=3)")
    assert str(U8.replace(observer="mse")).endswith(" mse")
    # the other observers weigh no error: a preset's spec switched to min/max is the plain min/max spec
    assert U8.replace(observer="mse", error_power=3.0).replace(observer="minmax") == U8
    with pytest.raises(ValueError, match=r"in \[1, 16\]"):
        U8.replace(observer="mse", error_power=0.5)
