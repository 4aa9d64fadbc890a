// The ditkernels._cpu_<isa> modules: the CPU kernels, compiled once per instruction set (setup.py
// builds this file and csrc/cpu/*.cpp with -march=<level> -DDK_MODULE=_cpu_<isa> -DDK_ISA=<isa>).
// No torch headers: every function takes raw pointers (as integers), sizes and strides.
// ditkernels/_ext.py asks the generic module which ISAs the running CPU supports, then imports one.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#if !defined(DK_MODULE) || !defined(DK_ISA)
#error "build with -DDK_MODULE=_cpu_<isa> -DDK_ISA=<isa> (setup.py does)"
#endif
#define DK_STR2(x) #x
#define DK_STR(x) DK_STR2(x)

namespace py = pybind11;

void register_attention_cpu(py::module_& m);       // csrc/cpu/attention.cpp
void register_selective_scan_cpu(py::module_& m);  // csrc/cpu/selective_scan.cpp

namespace {

// ISAs whose module this CPU (and its OS: the AVX / AVX-512 register state) can run, best last.
// x86-64-v3 / v4 as setup.py compiles them (psABI levels), checked feature by feature.
std::vector<std::string> cpu_isas() {
  std::vector<std::string> out{"generic"};
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx") && __builtin_cpu_supports("avx2") &&
                  __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                  __builtin_cpu_supports("movbe") && __builtin_cpu_supports("popcnt");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
  if (v3) out.push_back("avx2");
  if (v4) out.push_back("avx512");
#endif
  return out;
}

}  // namespace

PYBIND11_MODULE(DK_MODULE, m) {
  m.doc() = "ditkernels CPU kernels (torch-independent), compiled for the " DK_STR(DK_ISA) " instruction set";
  m.attr("isa") = DK_STR(DK_ISA);
  m.def("cpu_isas", &cpu_isas,
        "instruction sets of the _cpu_<isa> modules this CPU can run, e.g. ['generic', 'avx2', 'avx512']");
  register_attention_cpu(m);
  register_selective_scan_cpu(m);
}
