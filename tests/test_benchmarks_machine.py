"""`benchmarks.machine`: the machine record every benchmark JSON carries, and how it is saved."""
import json

from benchmarks.machine import machine_info, save_results

CPUINFO = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma bmi2
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma bmi2
"""


def test_reads_the_model_and_the_vector_extensions_that_matter(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    info = machine_info(path)
    assert info["cpu_model"] == "AMD EPYC 7B13"
    assert info["cpu_flags"] == ["avx2", "fma"]
    assert info["cpu_count"] >= 1


def test_bf16_machine_lists_its_extensions_in_a_fixed_order(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("model name : Xeon\nflags : amx_bf16 avx512_bf16 avx512f avx2\n")
    assert machine_info(path)["cpu_flags"] == ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]


def test_without_cpuinfo_the_model_is_unknown(tmp_path):
    info = machine_info(tmp_path / "missing")
    assert info["cpu_model"] is None and info["cpu_flags"] == []


def test_results_are_saved_only_when_a_path_is_given(tmp_path, capsys):
    save_results(None, {"s": 1.0})
    assert capsys.readouterr().out == "" and not list(tmp_path.iterdir())
    path = tmp_path / "nested" / "result.json"
    save_results(path, {"s": 1.0})
    assert json.loads(path.read_text()) == {"s": 1.0}
    assert capsys.readouterr().out == f"written to {path}\n"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temp file left
