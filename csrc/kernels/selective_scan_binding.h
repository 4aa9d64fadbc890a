// selective_scan_binding.h - the pybind11 side of selective_scan_args.cuh, shared by the two modules that run the
// selective-scan kernels: ditkernels._cuda (csrc/cuda/bindings_cuda.cpp) and the test-only ditkernels._emu
// (csrc/emu/selective_scan_emu.cpp). Host code only (pybind11): device code never includes it.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "kernels/selective_scan_args.cuh"

namespace dk {
namespace sscan {

// SelectiveScanArgs from a dict of field name -> int (unknown names raise KeyError: they are typos).
inline SelectiveScanArgs args_from_dict(const pybind11::dict& d) {
  SelectiveScanArgs a;
  for (auto item : d) {
    const std::string key = item.first.cast<std::string>();
    const int64_t v = item.second.cast<int64_t>();
    bool found = false;
#define DK_SS_SET(name) \
  if (key == #name) a.name = v, found = true;
    DK_SELECTIVE_SCAN_FIELDS(DK_SS_SET)
#undef DK_SS_SET
    if (!found) throw pybind11::key_error("selective_scan: unknown argument '" + key + "'");
  }
  return a;
}

// The module functions that describe the kernels: selective_scan_configs(), selective_scan_default_config(L),
// selective_scan_field_names().
inline void def_selective_scan_info(pybind11::module_& m) {
  m.def(
      "selective_scan_configs",
      [] {
        pybind11::list l;
#define DK_X(T, I) l.append(pybind11::make_tuple(T, I));
        DK_SELECTIVE_SCAN_CONFIGS(DK_X)
#undef DK_X
        return l;
      },
      "The compiled block configurations: [(threads per block, time steps per thread)].");
  m.def(
      "selective_scan_default_config",
      [](int64_t L) {
        int t = 0, i = 0;
        selective_scan_default_config(L, t, i);
        return pybind11::make_tuple(t, i);
      },
      pybind11::arg("seqlen"), "The configuration (threads, items) the kernels use for a sequence length.");
  m.def(
      "selective_scan_field_names",
      [] {
        pybind11::list l;
#define DK_X(name) l.append(#name);
        DK_SELECTIVE_SCAN_FIELDS(DK_X)
#undef DK_X
        return l;
      },
      "The fields of the args dict of selective_scan_fwd / selective_scan_bwd, in declaration order.");
}

}  // namespace sscan
}  // namespace dk
