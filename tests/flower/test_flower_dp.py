"""Flower's differential-privacy wrappers and mods around FedRotLoRA, in float32 and bfloat16.

Each wrapper/mod pair runs through real Flower code (Strategy.start, the wrapper, the
ClientApp with its mods) on the in-process Grid of flower_dp_app. Ray simulations run the
the common setup (server-side fixed clipping, noise 0.5, clip 1.0, bf16) and every wrapper/mod pair
in fp32 and bf16, checking the global against clipping recomputed from the clients' saved adapters.
Norms are measured as Flower measures them: over every array of the record, as NumPy.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from peft import get_peft_model_state_dict

import fedrot_ext
from fedrot_ext.flower import (
    RAW_STYPE,
    FedRotLoRA,
    arrayrecord_to_state_dict,
    make_train_reply,
    read_global,
    state_dict_to_arrayrecord,
)
from flower_dp_app import run_in_process
from helpers.peft_models import tiny_bert

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLIP = 0.05  # well under the clients' unclipped update norms (about 0.2 to 0.6), so clipping binds
FP32_SLACK = 1e-5  # relative: Flower clips in float32


def _wrap(kind: str, noise: float, clip: float):
    """(strategy -> wrapper, client mods, wrapper -> clipping norm in force) for one Flower DP setup."""
    # Flower refuses noise 0.5 with its default clipped-count noise for 3 clients (too low to reach it)
    count_std = {"clipped_count_stddev": 1.0} if noise > 0 else {}
    if kind == "server-fixed":
        return (lambda s: DifferentialPrivacyServerSideFixedClipping(s, noise, clip, 3)), [], None
    if kind == "server-adaptive":
        return ((lambda s: DifferentialPrivacyServerSideAdaptiveClipping(s, noise, 3, initial_clipping_norm=clip, **count_std)), [],
                lambda w: w.clipping_norm)
    if kind == "client-fixed":
        return (lambda s: DifferentialPrivacyClientSideFixedClipping(s, noise, clip, 3)), [fixedclipping_mod], None
    if kind == "client-adaptive":
        return ((lambda s: DifferentialPrivacyClientSideAdaptiveClipping(s, noise, 3, initial_clipping_norm=clip, **count_std)),
                [adaptiveclipping_mod], None)
    raise ValueError(f"kind: unknown DP setup {kind!r}")


KINDS = ["server-fixed", "server-adaptive", "client-fixed", "client-adaptive"]


def _flower_norm(a: ArrayRecord, b: ArrayRecord, keys=None) -> float:
    """‖a − b‖ over the arrays (or ``keys``), read as Flower's wrappers read them."""
    keys = list(a.keys()) if keys is None else keys
    return float(np.sqrt(sum(((a[k].numpy().astype(np.float64) - b[k].numpy()) ** 2).sum() for k in keys)))


def _torch_norm(a, b, keys) -> float:
    return float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys)))


def _ulps(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of each value of `t` in `dtype` (bf16: 8 significand bits, fp32: 24), as float64."""
    bits = 8 if dtype == torch.bfloat16 else 24
    return 2.0 ** (torch.frexp(t.float().abs().clamp_min(2.0 ** -126))[1].double() - bits)


def _ulp_norm(state, keys) -> float:
    """‖one bf16 ulp of each value‖: the rounding a bf16 adapter adds when it takes a clipped float32 update."""
    return float(torch.sqrt(sum((_ulps(state[k], torch.bfloat16) ** 2).sum() for k in keys)))


def _clip_in_force(kind, grid, server_round: int, msg) -> float:
    if kind.startswith("client"):
        return float(msg.content["config"][KEY_CLIPPING_NORM])  # what the wrapper told the mod
    return grid.probes.get(server_round, CLIP)


def _lora_keys(state):
    return [k for k in state if "lora_" in k]


# ----------------------------------------------------------------------------- wire format
def test_numpy_wire_format_round_trips_bf16_and_fp16_exactly_and_flower_reads_it():
    g = torch.Generator().manual_seed(0)
    special = [0.0, -0.0, float("inf"), -float("inf"), 1e-40, -3.0e38, 65504.0]
    for dtype in (torch.bfloat16, torch.float16):
        state = {"a": torch.randn(4, 7, generator=g).to(dtype), "special": torch.tensor(special).to(dtype),
                 "nan": torch.tensor([float("nan")], dtype=dtype), "empty": torch.zeros(0, 3, dtype=dtype)}
        record = state_dict_to_arrayrecord(state)  # the default
        assert all(record[k].stype == "numpy.ndarray" and record[k].dtype == str(dtype).split(".")[1] for k in state)
        arrays = record.to_numpy_ndarrays()  # what every Flower wrapper and mod calls
        for (k, t), values in zip(state.items(), arrays):
            assert values.dtype == np.float32 and values.shape == tuple(t.shape), k
            np.testing.assert_array_equal(values, t.float().numpy())  # the exact upcast
        back = arrayrecord_to_state_dict(record)
        for k, t in state.items():
            assert back[k].dtype == dtype and back[k].shape == t.shape
            if k != "nan":
                bits = torch.int16
                assert torch.equal(back[k].view(bits), t.view(bits)), (dtype, k)  # bit for bit, -0 and subnormals included
        assert torch.isnan(back["nan"]).all()


def test_float32_rewritten_by_flower_comes_back_in_the_adapters_dtype():
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(3, 5, generator=g).to(torch.bfloat16), "steps": torch.arange(3)}
    rewritten = state_dict_to_arrayrecord(state).to_numpy_ndarrays()
    flower_view = ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(state, rewritten)})  # as a wrapper rebuilds it
    assert arrayrecord_to_state_dict(flower_view)["w"].dtype == torch.float32
    back = arrayrecord_to_state_dict(flower_view, like=state)
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"], state["w"])
    assert back["steps"].dtype == torch.int64  # only 16-bit floats are cast back
    with pytest.raises(TypeError, match="like: expected a mapping"):
        arrayrecord_to_state_dict(flower_view, like=[torch.bfloat16])
    from test_flower import _instruction

    msg = _instruction(RecordDict({"arrays": flower_view, "config": ConfigRecord({"server-round": 1})}), node=5)
    assert read_global(msg, like=state)[0]["w"].dtype == torch.bfloat16  # the ClientApp side of the same


def test_unknown_wire_format_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"wire_format: expected one of \('numpy', 'compact'\), got 'raw'"):
        FedRotLoRA(wire_format="raw")
    with pytest.raises(ValueError, match="wire_format: expected one of"):
        state_dict_to_arrayrecord({"w": torch.zeros(1)}, wire_format="bf16")


@pytest.mark.parametrize("kind", ["server-fixed", "client-fixed", "server-adaptive", "client-adaptive"])
def test_compact_format_under_a_dp_wrapper_raises_a_clear_error(kind):
    wrap, mods, probe = _wrap(kind, 0.5, 1.0)
    with pytest.raises(ValueError, match=r"wire_format: 'compact' .*DifferentialPrivacy.*use FedRotLoRA\(wire_format='numpy'\)"):
        run_in_process(torch.bfloat16, wrap, mods, num_rounds=1, probe_of=probe, wire_format="compact")


def test_compact_reply_under_a_clipping_mod_raises_a_clear_error():
    from test_flower import _instruction

    state = {"w": torch.ones(2, dtype=torch.bfloat16)}
    clipped = _instruction(RecordDict({"config": ConfigRecord({"server-round": 1, KEY_CLIPPING_NORM: 1.0})}), node=5)
    with pytest.raises(ValueError, match="wire_format: 'compact' bfloat16 arrays cannot be read by Flower's client-side clipping mods"):
        make_train_reply(clipped, state, 3, wire_format="compact")
    # the client follows the format the server announces, "numpy" when it announces none
    compact = _instruction(RecordDict({"config": ConfigRecord({"server-round": 1, "fedrot-wire-format": "compact"})}), node=5)
    assert make_train_reply(compact, state, 3).content["arrays"]["w"].stype == RAW_STYPE
    plain = _instruction(RecordDict({"config": ConfigRecord({"server-round": 1})}), node=5)
    assert make_train_reply(plain, state, 3).content["arrays"]["w"].stype == "numpy.ndarray"


def test_bytes_per_round_of_each_wire_format():
    """One adapter upload (or global download) of tiny_bert, as Flower counts it (ArrayRecord.count_bytes)."""
    sizes = {}
    for name, dtype in DTYPES.items():
        adapter = get_peft_model_state_dict(tiny_bert(dtype, seed=0))
        for fmt in ("numpy", "compact"):
            sizes[(name, fmt)] = state_dict_to_arrayrecord(adapter, wire_format=fmt).count_bytes()
    print("\nArrayRecord bytes per adapter (tiny_bert): " + ", ".join(f"{d}/{f}={n}" for (d, f), n in sizes.items()))
    values = sum(t.numel() for t in adapter.values())
    assert sizes[("fp32", "numpy")] == sizes[("fp32", "compact")] == sizes[("bf16", "numpy")]  # bf16 travels as float32
    assert sizes[("bf16", "numpy")] - sizes[("bf16", "compact")] >= 2 * values  # 2 bytes a value (and NumPy's headers) saved


# ----------------------------------------------------------------------------- wrappers and mods
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_clipping_really_applies_to_the_lora_factors(kind, dtype_name):
    """Noise 0, clip 0.05, 2 rounds: every update Flower passes on is within the clip norm of the
    global it was trained from (clipped, since every unclipped one is larger), and round 1's
    aggregate (FedIT: a convex combination) moves the global by at most the clip norm."""
    dtype = DTYPES[dtype_name]
    wrap, mods, probe = _wrap(kind, 0.0, CLIP)
    strategy, _, result, grid, trained, initial = run_in_process(dtype, wrap, mods, num_rounds=2, probe_of=probe)
    assert [len(h.accepted) for h in strategy.history] == [3, 3] and not any(h.rejected for h in strategy.history)
    lora = _lora_keys(initial)
    for server_round, replies in grid.received.items():
        for msg, reply in zip(grid.sent[server_round], replies):
            clip = _clip_in_force(kind, grid, server_round, msg)
            sent, got = msg.content["arrays"], reply.content["arrays"]
            assert _flower_norm(got, sent) <= clip * (1 + FP32_SLACK), (server_round, reply.metadata.src_node_id)
            own = trained[(server_round, reply.metadata.src_node_id)]
            start = arrayrecord_to_state_dict(sent)
            assert _torch_norm(own, start, lora) > clip  # the clipping had work to do ...
            assert not torch.equal(own[lora[0]].float(), torch.from_numpy(got[lora[0]].numpy()))  # ... on the factors
    g0 = arrayrecord_to_state_dict(grid.sent[1][0].content["arrays"])
    g1 = arrayrecord_to_state_dict(grid.sent[2][0].content["arrays"])
    assert all(t.dtype == dtype for t in g1.values())  # the wrapper's float32 came back as the adapter's dtype
    slack = CLIP * FP32_SLACK if dtype == torch.float32 else 2 * _ulp_norm(g1, list(g1))
    assert _torch_norm(g1, g0, list(g0)) <= _clip_in_force(kind, grid, 1, grid.sent[1][0]) + slack
    final = arrayrecord_to_state_dict(result.arrays, like=initial)
    assert all(t.dtype == dtype and torch.isfinite(t).all() for t in final.values())


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_noise_reaches_the_global_adapter(kind, dtype_name):
    """Noise 0.5, clip 1.0 (the common setup), 1 round: the global differs from FedRotLoRA's own
    aggregate of the replies Flower passed on; for fixed clipping by Gaussian noise of std
    noise × clip / 3 clients."""
    dtype = DTYPES[dtype_name]
    wrap, mods, probe = _wrap(kind, 0.5, 1.0)
    strategy, _, result, grid, _, initial = run_in_process(dtype, wrap, mods, num_rounds=1, probe_of=probe)
    assert len(strategy.history[0].accepted) == 3
    reference = arrayrecord_to_state_dict(grid.sent[1][0].content["arrays"])
    replies = [arrayrecord_to_state_dict(r.content["arrays"], like=reference) for r in grid.received[1]]
    weights = [float(r.content["metrics"]["num-examples"]) for r in grid.received[1]]
    noise_free = fedrot_ext.aggregate_state_dicts(replies, reference=reference, weights=weights, round=0)
    noisy = arrayrecord_to_state_dict(result.arrays)  # as the wrapper returned it: float32
    diff = torch.cat([(noisy[k].double() - noise_free[k].double()).flatten() for k in noisy])
    assert float(diff.abs().max()) > 0.01
    if kind.endswith("fixed"):
        std = float(diff.std())
        assert 0.8 * 0.5 / 3 < std < 1.2 * 0.5 / 3, std


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_local_dp_mod_clips_and_noises_each_upload(dtype_name):
    """Flower's LocalDpMod (local DP: clip, then Gaussian noise on the client) under a plain FedRotLoRA:
    with sensitivity 0 every upload is within the clip norm; with noise, its distance to the global
    is that of the noise (std σ per value)."""
    dtype = DTYPES[dtype_name]
    epsilon, delta, sensitivity = 1.0, 1e-5, 0.01
    sigma = sensitivity * np.sqrt(2 * np.log(1.25 / delta)) / epsilon  # Flower's formula
    for noisy in (False, True):
        mod = LocalDpMod(CLIP, sensitivity if noisy else 0.0, epsilon, delta)
        strategy, _, _, grid, trained, initial = run_in_process(dtype, lambda s: s, [mod], num_rounds=1)
        assert len(strategy.history[0].accepted) == 3, strategy.history
        values = sum(t.numel() for t in initial.values())
        for msg, reply in zip(grid.sent[1], grid.received[1]):
            distance = _flower_norm(reply.content["arrays"], msg.content["arrays"])
            if noisy:
                assert 0.8 < distance / (sigma * np.sqrt(values)) < 1.2, distance
            else:
                assert distance <= CLIP * (1 + FP32_SLACK)
                own = trained[(1, reply.metadata.src_node_id)]
                assert _torch_norm(own, arrayrecord_to_state_dict(msg.content["arrays"]), _lora_keys(own)) > CLIP


# ----------------------------------------------------------------------------- Ray simulation
@pytest.mark.slow
def test_ray_simulation_server_side_fixed_clipping_bf16(tmp_path):
    """The common run: DifferentialPrivacyServerSideFixedClipping(FedRotLoRA(), noise 0.5, clip 1.0),
    3 clients, a bf16 tiny BERT, 2 rounds in a Ray simulation (it crashed in round 1 with the
    compact codec as the only format)."""
    from test_flower import _simulate

    wrap = lambda s: DifferentialPrivacyServerSideFixedClipping(s, 0.5, 1.0, 3)  # noqa: E731
    strategy, result, initial, seconds = _simulate(tmp_path, 2, {}, wrap=wrap)
    assert [len(h.accepted) for h in strategy.history] == [3, 3], strategy.history
    assert not any(h.rejected or h.failed for h in strategy.history)
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    final = arrayrecord_to_state_dict(result.arrays, like=initial)  # the wrapper's noisy float32, cast back
    assert all(final[k].dtype == torch.bfloat16 and torch.isfinite(final[k]).all() for k in initial)
    assert any(not torch.equal(final[k], initial[k]) for k in _lora_keys(initial))
    print(f"\nRay simulation, server-side fixed clipping, bf16, 3 clients x 2 rounds: {seconds:.1f} s")


CLIENT_MODS = {"server-fixed": "none", "server-adaptive": "none", "client-fixed": "fixed", "client-adaptive": "adaptive"}


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_ray_simulation_clips_the_lora_factors(tmp_path, kind, dtype_name):
    """Each wrapper (with its client mod) around FedRotLoRA in a Ray simulation, noise 0, clip 0.05, 1 round:
    the global equals FedRotLoRA's aggregate of the clients' own adapters (saved before any mod ran)
    with each update clipped to norm 0.05 over all arrays, factors included, as Flower clips;
    and it is far from the aggregate of the unclipped adapters."""
    from test_flower import _saved_replies, _simulate

    dtype = DTYPES[dtype_name]
    wrap, _, _ = _wrap(kind, 0.0, CLIP)
    strategy, result, g0, seconds = _simulate(tmp_path, 1, {"dtype": dtype_name}, client_mods=CLIENT_MODS[kind], wrap=wrap)
    (summary,) = strategy.history
    assert len(summary.accepted) == 3 and not summary.rejected and not summary.failed, summary
    trained, weights = _saved_replies(tmp_path, 1, summary.accepted)
    keys, clipped = list(g0), []
    for own in trained:
        norm = _torch_norm(own, g0, keys)
        assert norm > 2 * CLIP, norm  # the clipping has work to do
        assert _torch_norm(own, g0, _lora_keys(g0)) > CLIP / 2  # ... much of it on the factors
        clipped.append({k: (g0[k].double() + (own[k].double() - g0[k].double()) * (CLIP / norm)).to(dtype) for k in keys})
    expected = fedrot_ext.aggregate_state_dicts(clipped, reference=g0, weights=weights, round=0)
    unclipped = fedrot_ext.aggregate_state_dicts(trained, reference=g0, weights=weights, round=0)
    g1 = arrayrecord_to_state_dict(result.arrays, like=g0)
    assert all(g1[k].dtype == dtype for k in keys)
    for k in keys:  # Flower clips in float32; a bf16 value may round the other way (1 ulp)
        ulp = _ulps(expected[k], dtype)
        bound = (ulp if dtype == torch.bfloat16 else 16 * ulp) + 1e-9
        assert ((g1[k].double() - expected[k].double()).abs() <= bound).all(), k
    moved, unclipped_moved = _torch_norm(g1, g0, keys), _torch_norm(unclipped, g0, keys)
    assert moved <= CLIP * 1.05 and unclipped_moved > 2 * CLIP, (moved, unclipped_moved)  # convex combination of clipped
    print(f"\nRay simulation, {kind} clipping, {dtype_name}, 3 clients x 1 round: {seconds:.1f} s, "
          f"|g1-g0| = {moved:.4f} (unclipped {unclipped_moved:.4f}), |g1-expected| = {_torch_norm(g1, expected, keys):.2e}")
