"""The environment record that `compare` writes into results.json: each field against the library it comes from."""

import json
import platform

import torch

from lmrefinery.compare.report import _environment_lines
from lmrefinery.environment import cpu_flags, cpu_model, describe, summary_line

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme avx2 avx512f amx_tile amx_bf16

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
"""


def test_cpu_model_is_the_first_model_name_of_cpuinfo_and_falls_back_to_the_platform():
    assert cpu_model(CPUINFO) == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    # no model name (e.g. some ARM kernels): the platform's own answer, never an empty string
    fallback = cpu_model("processor\t: 0\nBogoMIPS\t: 50.00\n")
    assert fallback == (platform.processor() or platform.machine()) and fallback


def test_cpu_flags_are_the_kernel_flags_of_the_first_processor_in_a_fixed_order():
    assert cpu_flags(CPUINFO) == ["avx2", "avx512f", "amx_bf16", "amx_tile"]
    assert cpu_flags("processor\t: 0\n") == []


def test_describe_reports_this_process_libraries_and_kernels_and_survives_json():
    environment = describe()
    assert environment["packages"]["torch"] == torch.__version__
    assert environment["python"] == platform.python_version()
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert environment["torch_threads"] == torch.get_num_threads()
    assert environment["accelerators"] == ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                                           if torch.cuda.is_available() else [])
    assert json.loads(json.dumps(environment)) == environment
    line = summary_line(environment)
    assert environment["cpu_capability"] in line and f"torch {torch.__version__}" in line


def test_a_report_counts_the_environments_its_units_ran_on():
    here = describe()
    elsewhere = {**here, "cpu": "Another CPU", "cpu_flags": ["avx2"]}
    same = {"mixture": {"uniform": {0: {"environment": here}, 1: {"environment": here}}},
            "distillation": None, "shared": None}
    assert _environment_lines(same, here)[-1] == ("Every unit (2: each method and seed, and the shared stages) "
                                                  "ran there too.")
    mixed = {"mixture": {"uniform": {0: {"environment": here}, 1: {"environment": elsewhere}}},
             "distillation": {"sft": {0: {"environment": elsewhere}}},
             "shared": {"teacher": "t"}}  # a unit written before environments were recorded
    lines = _environment_lines(mixed, here)
    assert "4 units" in lines[2] and "3 different environments" in lines[2]
    assert lines[4:] == [f"- 2 on {summary_line(elsewhere)}", f"- 1 on {summary_line(here)}", "- 1 on not recorded"]
