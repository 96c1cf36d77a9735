"""Latency targets: the table, its cache, the greedy selection, the end-to-end correction, bad input."""
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cdp_gfi import CDPPruner
from cdp_gfi.flops import macs_of
from cdp_gfi.masks.select import select
from cdp_gfi.graph.scope import prunable_units
from cdp_gfi.graph.trace import trace
from cdp_gfi.latency import select as select_module, table as table_module
from cdp_gfi.latency.report import compare_latency, latency_line, latency_summary
from cdp_gfi.latency.select import auto_order, removal_path, select_for_latency, slimmed_copy, time_pair
from cdp_gfi.latency.table import Curve, cache_file, cache_key, latency_table
from cdp_gfi.latency.timing import BenchmarkTimer


class Tiny(nn.Module):
    """Four block-internal convs at 16x16: each its own unit."""

    def __init__(self):
        super().__init__()
        def block(cin, cout, k):
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.features = nn.Sequential(block(3, 16, 3), block(16, 32, 3), block(32, 32, 1), block(32, 16, 3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.features(x))


class FakeTimer:
    """Deterministic seconds: 1 ns per MAC of convs and linears, 3x3 MACs ``k3`` times dearer; a whole
    ``Tiny`` costs ``factor`` times that plus ``overhead`` (what the per-unit table cannot see)."""

    name = "fake"

    def __init__(self, k3=1.0, factor=1.0, overhead=0.0):
        self.k3, self.factor, self.overhead, self.calls = k3, factor, overhead, 0

    def __call__(self, module, x):
        self.calls += 1
        total = []

        def hook(mod, _, out):
            w = self.k3 if isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3) else 1.0
            positions = out.shape[0] * (out.shape[2] * out.shape[3] if out.dim() == 4 else 1)
            total.append(w * mod.weight.numel() * positions)

        handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            module(x)
        for h in handles:
            h.remove()
        seconds = 1e-9 * sum(total)
        return seconds * self.factor + self.overhead if isinstance(module, Tiny) else seconds


def setup(seed=0):
    torch.manual_seed(seed)
    model = Tiny().eval()
    dummy = torch.randn(1, 3, 16, 16)
    graph = trace(model, dummy)
    units = prunable_units(graph, "internal")
    scores = {c: torch.rand(graph.modules[c].out_channels) for u in units.values() for c in u.convs}
    return model, dummy, graph, units, scores


def run(tmp_path, timer, reduction=0.3, scores=None, **kw):
    model, dummy, graph, units, random_scores = setup()
    scores = scores or random_scores
    return select_for_latency(scores, reduction=reduction, model=model, graph=graph, units=units,
                              dummy_input=dummy, timer=timer, cache_dir=tmp_path, **kw)


def test_greedy_prefers_more_seconds_saved_per_score_lost():
    curves = {"a": Curve([1, 4], [1.0, 7.0]), "b": Curve([1, 4], [1.0, 4.0])}  # a saves 2 s a group, b 1 s
    path = removal_path(curves, {"a": np.ones(4), "b": np.ones(4)}, {"a": 1, "b": 1})
    assert [u for u, _, _ in path] == ["a", "a", "a", "b", "b", "b"]
    path = removal_path(curves, {"a": np.full(4, 3.0), "b": np.ones(4)}, {"a": 1, "b": 1})  # 1.5 vs 1 per s
    assert [u for u, _, _ in path][:3] == ["b", "b", "b"]
    assert path[-1][2] == pytest.approx(9.0)


def test_flat_curve_jumps_to_the_next_grid_width():
    curves = {"a": Curve([1, 2, 4], [1.0, 5.0, 5.0])}  # nothing saved until 1 group is left
    path = removal_path(curves, {"a": np.ones(4)}, {"a": 1})
    assert [(u, k) for u, k, _ in path] == [("a", 1)]
    assert removal_path(curves, {"a": np.ones(4)}, {"a": 2}) == []  # the cap keeps 2: nothing to gain


def test_a_steeper_stretch_further_down_does_not_make_the_greedy_jump():
    curves = {"a": Curve([1, 2, 4], [0.0, 3.0, 4.0])}  # one group saves 0.5 s from 4 to 2, then 3 s
    path = removal_path(curves, {"a": np.ones(4)}, {"a": 1})
    assert [(u, k) for u, k, _ in path] == [("a", 3), ("a", 2), ("a", 1)]


def test_gfi_aps_adaptive_cap_holds_a_unit_until_enough_is_removed_elsewhere():
    curves = {"a": Curve([1, 4], [1.0, 4.0]), "b": Curve([1, 4], [1.0, 4.0])}
    costs, floors = {"a": np.full(4, 0.01), "b": np.ones(4)}, {"a": 1, "b": 1}
    assert [u for u, _, _ in removal_path(curves, costs, floors)] == ["a", "a", "a", "b", "b", "b"]
    # a's third group would be 3 of 4 lost at p = 3/8 (cap (1 + p) / 2 = 2.75 groups): it waits for b's first
    capped = removal_path(curves, costs, floors, adaptive_cap=True)
    assert [u for u, _, _ in capped] == ["a", "a", "b", "a", "b", "b"]


def test_a_gfi_ap_latency_target_keeps_the_adaptive_cap(tmp_path):
    widths = {"features.0.0": 16, "features.1.0": 32, "features.2.0": 32, "features.3.0": 16}
    cheap = {c: torch.full((n,), 1e-3 if c == "features.0.0" else 1.0) for c, n in widths.items()}  # one cheap unit
    free = run(tmp_path, FakeTimer(k3=4.0), 0.3, cheap, tolerance=0.05, order="greedy").keep  # global: no cap
    capped = run(tmp_path, FakeTimer(k3=4.0), 0.3, cheap, rule="adaptive", tolerance=0.05, order="greedy").keep
    removed = sum(int((~capped[c]).sum()) for c in widths) / sum(widths.values())
    assert all(int((~capped[c]).sum()) <= (1 + removed) / 2 * n for c, n in widths.items())
    assert int(free["features.0.0"].sum()) < int(capped["features.0.0"].sum())
    with pytest.raises(ValueError, match="unknown selection rule"):
        run(tmp_path, FakeTimer(), 0.3, rule="greedy")


def test_selection_meets_the_budget(tmp_path):
    timer = FakeTimer(k3=4.0)
    result = run(tmp_path, timer, 0.3)
    assert abs(result.measured - 0.3) <= 0.02
    assert result.slim_seconds == pytest.approx(result.dense_seconds * (1 - result.measured))
    kept = {c: int(k.sum()) for c, k in result.keep.items()}
    assert set(kept) == {"features.0.0", "features.1.0", "features.2.0", "features.3.0"}
    assert all(k >= 1 for k in kept.values())


def test_selection_spends_the_budget_where_a_channel_saves_most(tmp_path):
    # with 3x3 MACs 4x dearer, a channel of features.0.0 saves 1260 MAC-units a position, the others 608-1152
    widths = {"features.0.0": 16, "features.1.0": 32, "features.2.0": 32, "features.3.0": 16}
    flat = {c: torch.ones(n) for c, n in widths.items()}
    kept = {c: int(k.sum()) for c, k in run(tmp_path, FakeTimer(k3=4.0), 0.3, flat, order="greedy").keep.items()}
    assert kept["features.0.0"] < 16 and all(kept[c] == n for c, n in widths.items() if c != "features.0.0")
    precious = {**flat, "features.0.0": torch.full((16,), 10.0)}  # now its channels lose 10x more score
    kept = {c: int(k.sum()) for c, k in run(tmp_path, FakeTimer(k3=4.0), 0.3, precious, order="greedy").keep.items()}
    assert kept["features.0.0"] == 16


@pytest.mark.parametrize("order", ["ranking", "greedy"])
def test_end_to_end_correction_converges(tmp_path, order):
    timer = FakeTimer(k3=4.0, factor=0.6, overhead=2e-5)  # the network saves less than the table says
    result = run(tmp_path, timer, 0.3, order=order)
    assert result.order == order
    assert len(result.tries) > 1 and abs(result.tries[0][1] - 0.3) > 0.02
    assert abs(result.measured - 0.3) <= 0.02


def test_the_ranking_order_cuts_the_criterions_ranking(tmp_path):
    result = run(tmp_path, FakeTimer(k3=4.0), 0.3, order="ranking")
    _, _, _, _, scores = setup()
    removed = torch.cat([scores[c][~k] for c, k in result.keep.items()])
    kept = torch.cat([scores[c][k] for c, k in result.keep.items()])
    assert len(removed) and removed.max() < kept.min()  # the lowest scores go, whatever their latency
    model, dummy, graph, units, _ = setup()
    macs = 1 - macs_of(graph, result.keep) / macs_of(graph, {})
    by_macs, _ = select("cdp", scores, flops_reduction=macs, graph=graph, units=units)
    assert all(torch.equal(by_macs[c], k) for c, k in result.keep.items())  # the MACs target's network
    greedy = run(tmp_path, FakeTimer(k3=4.0), 0.3, order="greedy").keep
    assert any(not torch.equal(greedy[c], k) for c, k in result.keep.items())  # the greedy spends by time instead


def test_auto_takes_the_greedy_where_the_ranking_cannot_reach(tmp_path):
    widths = {"features.0.0": 16, "features.1.0": 32, "features.2.0": 32, "features.3.0": 16}
    # the global ranking (no cap) takes the lowest-scored unit first and stops before emptying it: 43% of the
    # latency; the greedy takes every unit down to one channel
    low_first = {c: torch.full((n,), 1e-3 if c == "features.3.0" else 1.0) + 1e-4 * torch.arange(n)
                 for c, n in widths.items()}
    with pytest.raises(ValueError, match=r"cannot cut the measured latency by 60.00%.*closest reachable: 4\d"):
        run(tmp_path, FakeTimer(k3=4.0), 0.6, low_first, order="ranking")
    result = run(tmp_path, FakeTimer(k3=4.0), 0.6, low_first)
    assert result.order == "greedy" and abs(result.measured - 0.6) <= 0.02
    with pytest.raises(ValueError, match="unknown latency order"):
        run(tmp_path, FakeTimer(), 0.3, order="fastest")


class Depthwise(nn.Module):
    """A pointwise conv, a depthwise conv on its channels, a head: a MobileNet block in miniature."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.features(x))


def test_auto_takes_the_greedy_for_depthwise_convs_or_where_only_it_reaches():
    _, _, graph, _, _ = setup()
    depthwise = trace(Depthwise().eval(), torch.randn(1, 3, 16, 16))
    pick = lambda _: {}  # noqa: E731 (auto decides on structure and reach, not on the selections)
    reaches = {"ranking": (pick, 0.5), "greedy": (pick, 0.5)}
    assert auto_order(reaches, 0.3, graph) == "ranking"
    assert auto_order(reaches, 0.3, depthwise) == "greedy"
    assert auto_order({"ranking": (pick, 0.2), "greedy": (pick, 0.5)}, 0.3, graph) == "greedy"  # only it reaches
    assert auto_order({"ranking": (pick, 0.2), "greedy": (pick, 0.25)}, 0.3, graph) == "ranking"  # neither does



class Repeated(nn.Module):
    """A stem and three equal 16-channel blocks: the first two blocks' units touch equal modules at equal shapes."""

    def __init__(self):
        super().__init__()
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.features = nn.Sequential(block(3, 16), block(16, 16), block(16, 16), block(16, 16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.features(x))


def test_units_of_equal_modules_and_shapes_are_timed_once(tmp_path):
    torch.manual_seed(0)
    model, dummy = Repeated().eval(), torch.randn(1, 3, 16, 16)
    graph = trace(model, dummy)
    units = prunable_units(graph, "internal")
    timer = FakeTimer()
    table = latency_table(model, graph, units, dummy, timer, torch.device("cpu"), tmp_path)
    alone = {u: table_module.time_parts(*table_module.unit_parts(graph, unit), FakeTimer(), 1, torch.device("cpu"),
                                        torch.float32) for u, unit in units.items()}
    assert table.curves == alone  # sharing changes no curve
    assert table.curves["features.1.0"] == table.curves["features.2.0"]
    widths = {u: len(c.widths) for u, c in alone.items()}
    assert timer.calls == 1 + sum(widths.values()) - widths["features.2.0"]  # the dense net, then each curve once


def test_table_is_cached_and_a_stale_file_rebuilt(tmp_path, monkeypatch):
    model, dummy, graph, units, _ = setup()
    timer = FakeTimer()
    first = latency_table(model, graph, units, dummy, timer, torch.device("cpu"), tmp_path)
    calls = timer.calls
    again = latency_table(model, graph, units, dummy, timer, torch.device("cpu"), tmp_path)
    assert again.reused and not first.reused and timer.calls == calls
    assert again.curves == first.curves and again.dense == first.dense
    path = cache_file(first.key, tmp_path)
    data = json.loads(path.read_text())
    data["key"]["torch"] = "0.0.1"  # a file measured under another torch at the same place
    path.write_text(json.dumps(data))
    rebuilt = latency_table(model, graph, units, dummy, timer, torch.device("cpu"), tmp_path)
    assert not rebuilt.reused and timer.calls > calls
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    other = latency_table(model, graph, units, dummy, timer, torch.device("cpu"), tmp_path)
    assert not other.reused and other.key["torch"] == "9.9.9"


def test_cache_key_changes_with_what_the_table_depends_on(monkeypatch):
    model, dummy, graph, units, _ = setup()
    cpu, timer = torch.device("cpu"), FakeTimer()
    base = cache_key(graph, units, (1, 3, 16, 16), cpu, torch.float32, timer)
    assert cache_key(graph, units, (1, 3, 16, 16), cpu, torch.float32, timer) == base
    assert cache_key(graph, units, (8, 3, 16, 16), cpu, torch.float32, timer) != base
    assert cache_key(graph, units, (1, 3, 16, 16), cpu, torch.float16, timer) != base
    other_graph = trace(model, torch.randn(1, 3, 32, 32))
    assert cache_key(other_graph, units, (1, 3, 16, 16), cpu, torch.float32, timer) != base
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert cache_key(graph, units, (1, 3, 16, 16), cpu, torch.float32, timer) != base
    finally:
        torch.set_num_threads(threads)
    one, two = (cache_key(graph, units, (1, 3, 16, 16), cpu, torch.float32, BenchmarkTimer(threads=n)) for n in (1, 2))
    assert one["threads"] == 1 and two["threads"] == 2
    monkeypatch.setattr(table_module, "device_name", lambda device: "another cpu")
    assert cache_key(graph, units, (1, 3, 16, 16), cpu, torch.float32, timer) != base
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert cache_key(graph, units, (1, 3, 16, 16), cpu, torch.float32, timer)["torch"] == "9.9.9"


def test_unreachable_target_names_the_closest_reachable(tmp_path):
    with pytest.raises(ValueError, match=r"cannot cut the measured latency by 90.00%.*closest reachable: \d"):
        run(tmp_path, FakeTimer(), 0.9, max_layer_sparsity=0.5)


class JitteryTimer(FakeTimer):
    """A whole network takes 1x to 3x its fake time, at random: a machine too loaded to time on."""

    def __init__(self):
        super().__init__()
        self.draw = np.random.default_rng(0)

    def __call__(self, module, x):
        seconds = super().__call__(module, x)
        return seconds * self.draw.uniform(1.0, 3.0) if isinstance(module, Tiny) else seconds


def test_timings_that_never_settle_say_so(tmp_path):
    with pytest.raises(ValueError, match=r"did not settle within 2 points of 30.00% in 3 tries.*vary too much"):
        run(tmp_path, JitteryTimer(), 0.3, max_tries=3, rounds=1)


def test_missing_device_and_bad_batch(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="latency device 'cuda' is not there"):
            run(tmp_path, FakeTimer(), 0.3, device="cuda")
    with pytest.raises(ValueError, match="unknown latency device 'gpu0'"):
        run(tmp_path, FakeTimer(), 0.3, device="gpu0")
    with pytest.raises(ValueError, match="latency_batch must be a positive integer"):
        run(tmp_path, FakeTimer(), 0.3, batch=0)


def loader():
    return DataLoader(TensorDataset(torch.randn(40, 3, 16, 16), torch.arange(40) % 10), batch_size=20)


def test_pruner_refuses_two_targets_and_a_missing_device():
    config = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]
    with pytest.raises(ValueError, match="latency_reduction or flops_reduction, not both"):
        CDPPruner(Tiny().eval(), config, loader(), latency_reduction=0.3, flops_reduction=0.3)
    with pytest.raises(ValueError, match="latency_reduction must lie strictly between 0 and 1"):
        CDPPruner(Tiny().eval(), config, loader(), latency_reduction=1.5)
    with pytest.raises(ValueError, match="latency_batch must be a positive integer, got 0"):
        CDPPruner(Tiny().eval(), config, loader(), latency_reduction=0.3, latency_batch=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not there"):
            CDPPruner(Tiny().eval(), config, loader(), latency_reduction=0.3, latency_device="cuda")


def test_pruner_meets_a_latency_target(tmp_path, monkeypatch):
    monkeypatch.setenv("CDP_GFI_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = Tiny().eval()
    pruner = CDPPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], loader(), stop_batch=2,
                       progress=False, latency_reduction=0.3, latency_timer=FakeTimer(k3=2.0))
    _, masks = pruner.compress()
    pruner.unwrap_model()
    assert abs(pruner.latency.measured - 0.3) <= 0.02
    assert set(masks) >= set(pruner.keep) and any(not k.all() for k in pruner.keep.values())
    assert list(tmp_path.glob("latency/*.json"))


def test_real_timer_smoke(tmp_path):
    model, dummy, graph, units, _ = setup()
    timer = BenchmarkTimer(threads=1, min_run_time=0.01, warmup=1)
    table = latency_table(model, graph, units, dummy, timer, torch.device("cpu"), tmp_path)
    assert table.dense > 0 and all(s > 0 for c in table.curves.values() for s in c.seconds)
    keep = {c: torch.arange(graph.modules[c].out_channels) % 2 == 0 for u in units.values() for c in u.convs}
    dense, slim = time_pair(model, slimmed_copy(model, keep, dummy), dummy, timer, rounds=1)
    assert dense > 0 and slim > 0


def test_latency_summary_fields():
    fields = latency_summary(Tiny(), (3, 16, 16), batches=(1, 2), prefix="slim_", threads=1, min_run_time=0.01)
    assert fields["latency_threads"] == 1 and fields["latency_device"].startswith("cpu")
    assert fields["slim_latency_ms_b1"] > 0 and fields["slim_latency_ms_b2"] > 0
    assert fields["slim_latency_iqr_ms_b2"] >= 0
    with pytest.raises(ValueError, match="a latency batch size must be a positive integer"):
        latency_summary(Tiny(), (3, 16, 16), batches=(0,))


def test_compare_latency_gives_dense_slim_and_reduction_per_batch():
    fields = compare_latency(Tiny(), nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                             (3, 16, 16), batches=(1, 2), threads=1, min_run_time=0.01)
    for b in (1, 2):
        ratio = fields[f"slim_latency_ms_b{b}"] / fields[f"dense_latency_ms_b{b}"]
        assert fields[f"latency_reduction_pct_b{b}"] == pytest.approx(100 * (1 - ratio))
        assert fields[f"dense_latency_iqr_ms_b{b}"] >= 0
    line = latency_line(fields, (1, 2))
    assert line.startswith("latency on cpu") and "1 thread(s)" in line and "batch 2:" in line


def test_widths_are_multiples_of_the_devices_unless_round_to_says(tmp_path, monkeypatch):
    assert run(tmp_path, FakeTimer(k3=4.0), 0.3).round_to == 1  # the CPU's multiple
    monkeypatch.setattr(select_module, "hardware_multiple", lambda device: 4)  # as a device that tiles by 4 would
    result = run(tmp_path, FakeTimer(k3=4.0), 0.3)
    assert result.round_to == 4 and all(int(k.sum()) % 4 == 0 for k in result.keep.values())
    assert any(not k.all() for k in result.keep.values())
    result = run(tmp_path, FakeTimer(k3=4.0), 0.3, round_to=2)  # the manual choice wins
    assert result.round_to == 2 and all(int(k.sum()) % 2 == 0 for k in result.keep.values())
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        run(tmp_path, FakeTimer(), 0.3, round_to=0)


class Probe(nn.Module):
    """Records, per call, whether autocast was on and whether its input was channels-last."""

    def __init__(self):
        super().__init__()
        self.conv, self.seen = nn.Conv2d(3, 4, 3), []

    def forward(self, x):
        self.seen.append((torch.is_autocast_enabled(x.device.type), x.is_contiguous(memory_format=torch.channels_last)))
        return self.conv(x)


def test_amp_and_channels_last_reach_every_timed_call(tmp_path):
    probe, x = Probe(), torch.randn(1, 3, 8, 8)
    BenchmarkTimer(threads=1, min_run_time=0.01, warmup=1, amp=True, channels_last=True)(probe, x)
    assert probe.seen and all(seen == (True, True) for seen in probe.seen)
    assert probe.conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain = Probe()
    BenchmarkTimer(threads=1, min_run_time=0.01, warmup=1)(plain, x)
    assert all(seen == (False, False) for seen in plain.seen)
    model, dummy, graph, units, _ = setup()  # the table's bundles (inputs as buffers) and the whole network
    timer = BenchmarkTimer(threads=1, min_run_time=0.01, warmup=1, amp=True, channels_last=True)
    table = latency_table(model, graph, units, dummy, timer, torch.device("cpu"), tmp_path)
    assert table.key["timer"] == "torch.utils.benchmark+amp+channels_last" and table.dense > 0
    assert all(s > 0 for c in table.curves.values() for s in c.seconds)
    fields = latency_summary(Tiny(), (3, 16, 16), threads=1, min_run_time=0.01, amp=True, channels_last=True)
    assert fields["latency_timer"] == table.key["timer"] and fields["latency_ms_b1"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_timing_with_amp_and_channels_last(tmp_path):
    probe = Probe().cuda()
    BenchmarkTimer(min_run_time=0.01, amp=True, channels_last=True)(probe, torch.randn(2, 3, 8, 8, device="cuda"))
    assert all(seen == (True, True) for seen in probe.seen)
    fields = compare_latency(Tiny(), Tiny(), (3, 16, 16), device="cuda", batches=(1, 4), min_run_time=0.01,
                             amp=True, channels_last=True)
    assert fields["latency_threads"] is None and fields["dense_latency_ms_b4"] > 0
    result = run(tmp_path, FakeTimer(k3=4.0), 0.3, device="cuda")
    assert result.round_to == 8 and all(int(k.sum()) % 8 == 0 for k in result.keep.values())
