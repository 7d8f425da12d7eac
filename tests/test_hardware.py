"""Native bf16 detection, what `mixed_precision: auto` resolves to and why, and the measured-peak cache (no timings)."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from shardtune import ShardtuneError
from shardtune import hardware
from shardtune.hardware import cpu_flags, matmul_peak_flops, mfu_peak, native_bf16, resolve_mixed_precision

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme de pse tsc msr avx f16c avx2 fma bmi2 vaes vpclmulqdq
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu vme de pse tsc msr avx f16c avx2 fma bmi2 vaes vpclmulqdq
"""
ZEN4 = ZEN3.replace("vpclmulqdq", "vpclmulqdq avx512f avx512bw avx512_bf16 avx512_vnni")
SAPPHIRE_RAPIDS = ZEN3.replace("vpclmulqdq", "avx512f avx512_bf16 amx_bf16 amx_tile amx_int8")
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid sve bf16 i8mm
CPU implementer\t: 0x41
"""


def test_cpu_flags_come_from_the_first_processor_line():
    assert "avx2" in cpu_flags(ZEN3) and "sysret_ss_attrs" not in cpu_flags(ZEN3)
    assert "bf16" in cpu_flags(GRAVITON3)
    assert cpu_flags("processor\t: 0\n") is None


@pytest.mark.parametrize(
    "text, native, words",
    [
        (ZEN3, False, ["neither avx512_bf16 nor amx_bf16", "emulated"]),
        (ZEN4, True, ["avx512_bf16"]),
        (SAPPHIRE_RAPIDS, True, ["amx_bf16 and avx512_bf16"]),
        (GRAVITON3, True, ["bf16"]),
    ],
)
def test_native_bf16_on_cpus(text, native, words):
    ok, why = native_bf16("cpu", cpuinfo=text)
    assert ok is native
    for w in words:
        assert w in why, why


def test_this_machines_answer_agrees_with_pytorchs_own_cpu_detection():
    ok, _ = native_bf16("cpu")
    assert ok == bool(hardware._torch_cpu_bf16())


def _peaks(bf16: float, fp32: float):
    return lambda dtype: bf16 if dtype == torch.bfloat16 else fp32


def test_auto_resolves_to_bf16_only_where_native_and_measured_faster_and_says_why(monkeypatch):
    monkeypatch.delenv(hardware.AUTO_ENV)  # the suite pins auto to no (conftest); here auto decides
    choice, why = resolve_mixed_precision("auto", "cpu", cpuinfo=ZEN4, peak=_peaks(600e9, 190e9))
    assert (choice, why) == ("bf16", "auto chose bf16: this CPU has avx512_bf16 (measured bf16 matmul peak 600 GFLOP/s vs fp32 190 GFLOP/s)")
    # the flag is there, the speed is not: fp32, and the run says why
    choice, why = resolve_mixed_precision("auto", "cpu", cpuinfo=ZEN4, peak=_peaks(16e9, 27e9))
    assert choice == "no" and "this CPU has avx512_bf16, but its measured bf16 matmul peak 16 GFLOP/s vs fp32 27 GFLOP/s" in why
    choice, why = resolve_mixed_precision("auto", "cpu", cpuinfo=ZEN3, peak=lambda dtype: pytest.fail("nothing to measure"))
    assert choice == "no" and why.startswith("auto chose no (fp32): this CPU has neither")


def test_explicit_values_pass_through_with_a_note_where_bf16_is_not_native():
    assert resolve_mixed_precision("no", "cpu", cpuinfo=ZEN4) == ("no", "no as configured")
    assert resolve_mixed_precision("bf16", "cpu", cpuinfo=ZEN4) == ("bf16", "bf16 as configured")
    choice, why = resolve_mixed_precision("bf16", torch.device("cpu"), cpuinfo=ZEN3)
    assert choice == "bf16" and why.startswith("bf16 as configured, although this CPU has neither")
    with pytest.raises(ShardtuneError, match="not one of auto, no, bf16, fp16"):
        resolve_mixed_precision("fp8", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without CUDA")
def test_cuda_without_cuda_is_not_native():
    assert native_bf16("cuda") == (False, "CUDA is not available")


def test_the_peak_is_measured_once_per_process_and_dtype(monkeypatch, tmp_path):
    calls = []
    real = hardware._matmul_seconds

    def counted(a, b):
        calls.append(a.shape[0])
        return real(a, b)

    monkeypatch.setattr(hardware, "_matmul_seconds", counted)
    monkeypatch.setattr(hardware, "_PEAKS", {})
    first = matmul_peak_flops(torch.float32, "cpu", budget_s=0.05, max_size=256)
    measured = len(calls)
    assert first > 0 and measured >= 2 and set(calls) == {256}  # max_size caps the size
    assert matmul_peak_flops(torch.float32, "cpu", budget_s=0.05, max_size=256) == first
    assert len(calls) == measured  # cached: nothing timed again
    again = matmul_peak_flops(torch.float32, "cpu", budget_s=0.05, max_size=256, refresh=True)
    assert len(calls) > measured
    # train/mfu on CPU divides by that number, kept per machine in $SHARDTUNE_CACHE: measured once, then read
    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path))
    before = len(calls)
    assert mfu_peak("cpu", "no")[0] == again
    assert len(calls) == before  # this process had measured it already
    monkeypatch.setattr(hardware, "_PEAKS", {})
    assert mfu_peak("cpu", "no")[0] == json.loads((tmp_path / "cpu-peaks.json").read_text()).popitem()[1]
    assert len(calls) == before  # read from the file, not timed again
    assert "measured fp32 matmul peak" in mfu_peak("cpu", "no")[1]
    assert mfu_peak("cpu", "bf16", measure=False) == (None, "peak measurement off")


def test_auto_can_be_pinned_for_every_machine(monkeypatch):
    monkeypatch.setenv(hardware.AUTO_ENV, "bf16")
    assert resolve_mixed_precision("auto", "cpu", cpuinfo=ZEN3) == ("bf16", f"auto chose bf16: {hardware.AUTO_ENV}=bf16")
    assert resolve_mixed_precision("no", "cpu", cpuinfo=ZEN4) == ("no", "no as configured")  # only auto is pinned
    monkeypatch.setenv(hardware.AUTO_ENV, "fp8")
    with pytest.raises(ShardtuneError, match="must be no or bf16"):
        resolve_mixed_precision("auto", "cpu")


def test_measuring_the_peak_leaves_the_seeded_random_stream_alone(monkeypatch, tmp_path):
    """The first run on a machine measures the peak (no cpu-peaks.json yet), later ones read it: the same seed
    must draw the same dropout masks and head init either way (it did not: the kill matrix's reference run,
    the first on a fresh machine, logged other losses than its relaunches)."""
    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_PEAKS", {})
    monkeypatch.setattr(hardware, "matmul_peak_flops", partial(matmul_peak_flops, budget_s=0.05, max_size=256))
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    assert mfu_peak("cpu", "no")[0] > 0 and (tmp_path / "cpu-peaks.json").is_file()  # measured here, not read
    assert torch.equal(torch.rand(4), expected)


def test_a_peak_measured_on_a_busy_machine_is_measured_again_once_a_run_beats_it(monkeypatch, tmp_path):
    """A peak measured while other jobs shared the cores stays in cpu-peaks.json for every later run (seen: 85
    GFLOP/s cached, half the real one, so the quickstart logged train/mfu 1.2-1.3). A run whose model FLOP/s
    exceed it measures once more, keeps the larger value, and says so."""
    from types import SimpleNamespace

    from transformers import BertConfig, BertForSequenceClassification

    from shardtune.perf import Throughput

    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_PEAKS", {})
    monkeypatch.setattr(hardware, "matmul_peak_flops", partial(matmul_peak_flops, budget_s=0.05, max_size=256))
    path = tmp_path / "cpu-peaks.json"
    hardware.cpu_peak_cached(torch.float32)
    low = {key: value / 100 for key, value in json.loads(path.read_text()).items()}  # as if measured on a busy machine
    path.write_text(json.dumps(low))
    (poisoned,) = low.values()

    model = BertForSequenceClassification(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64))
    perf = Throughput(SimpleNamespace(device=torch.device("cpu"), world=1), model, seq_len=16, mixed_precision="no")
    assert perf.peak == poisoned
    per_device = 2 * poisoned / perf.flops_per_token  # model FLOP/s twice the cached peak
    with pytest.warns(UserWarning, match="measured while the machine was busy; measured it again"):
        mfu = perf._mfu(per_device)
    (healed,) = json.loads(path.read_text()).values()
    assert healed > 10 * poisoned and perf.peak == healed and mfu == pytest.approx(2 * poisoned / healed)
    assert mfu < 1
    assert perf._mfu(per_device) == mfu  # checked once per run: no second measurement
    monkeypatch.setattr(hardware, "_PEAKS", {})
    assert mfu_peak("cpu", "no")[0] == healed  # later runs read the better peak
