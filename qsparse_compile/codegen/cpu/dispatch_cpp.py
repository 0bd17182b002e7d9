"""The C++ text of the native CPU kernels of the decode ops (built by :mod:`.native_dispatch`).

``qsparse::cpu_topk_linear`` and ``qsparse::cpu_packed_linear`` are implemented in Python: the
checks, the kernel look-up and a ctypes call cost 7-12 us per call, 1-1.5 ms per SmolLM2 token
of ~10. This translation unit registers a C++ kernel for their ``CPU`` dispatch key that does
the same thing for the calls a decode step makes: it checks the operands, finds the C entry
point and the weight layout in tables the Python implementation fills (after it has validated
and compiled them), allocates the output and calls the entry point, in about a microsecond.

Anything it does not find or does not accept (a first call, more rows than the fused kernel
takes, an input that requires grad, a changed torch thread count, a bad operand) goes, with
the same arguments, to ``qsparse::<op>_python``: the Python implementation registered as an
op of its own, which validates, raises the errors the op documents, falls back to the
generic ops for many rows, and registers what it compiled. So the two paths run the same
C entry points with the same arguments, and the C++ kernel adds no semantics.

The tables only grow (entries are written before the count that publishes them), so calls
from several threads read them without a lock while a registration appends.
"""

from __future__ import annotations

__all__ = ["SOURCE"]

SOURCE = r"""// qsparse native dispatch (see qsparse_compile/codegen/cpu/dispatch_cpp.py)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>

namespace {

using topk_fn = int64_t (*)(const void*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t, const void*, int64_t, int64_t, const void*, void*, int64_t,
                            int64_t);
using packed_fn = int64_t (*)(const void*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                              int64_t, int64_t, const void*, int64_t, int64_t, int64_t, int64_t,
                              int64_t, const void*, void*, int64_t, int64_t);

constexpr int kMaxRows = 8;
constexpr int kCapacity = 512;

// dtype codes shared with Python: 0 float32, 1 bfloat16
inline int dtype_code(c10::ScalarType t) {
    return t == c10::ScalarType::Float ? 0 : (t == c10::ScalarType::BFloat16 ? 1 : -1);
}

// formats shared with Python by index: FORMAT_NAMES[i]
const char* const FORMAT_NAMES[] = {"int8", "int4", "ternary"};
inline int format_code(c10::string_view f) {
    for (int i = 0; i < 3; ++i)
        if (f == FORMAT_NAMES[i]) return i;
    return -1;
}

struct Kernel { int op, fmt, dtype, rows; void* fn; };
struct Layout { int fmt; int64_t D, N, panel_bytes, scale_off, min_off, padded_out, nbytes; };

Kernel g_kernels[kCapacity];
Layout g_layouts[kCapacity];
std::atomic<int> g_nkernels{0}, g_nlayouts{0};
std::mutex g_append;
// the kernel threads the Python policy chose, for the torch thread count it chose them at
std::atomic<int64_t> g_torch_threads{-1}, g_kernel_threads{1};
// calls served here (not deferred to Python): what tests and reports read
std::atomic<int64_t> g_served{0};

void* find_kernel(int op, int fmt, int dtype, int rows) {
    const int n = g_nkernels.load(std::memory_order_acquire);
    for (int i = 0; i < n; ++i) {
        const Kernel& e = g_kernels[i];
        if (e.op == op && e.fmt == fmt && e.dtype == dtype && e.rows == rows) return e.fn;
    }
    return nullptr;
}

const Layout* find_layout(int fmt, int64_t D, int64_t N) {
    const int n = g_nlayouts.load(std::memory_order_acquire);
    for (int i = 0; i < n; ++i) {
        const Layout& e = g_layouts[i];
        if (e.fmt == fmt && e.D == D && e.N == N) return &e;
    }
    return nullptr;
}

// The rows of x (its last dimension D) when the fused kernels take them: 1..min(8, max_rows).
inline int64_t kernel_rows(const at::Tensor& x, int64_t max_rows) {
    if (x.dim() == 0) return 0;
    const int64_t D = x.size(-1);
    const int64_t rows = D ? x.numel() / D : 0;
    // a max_rows outside [0, kMaxRows] is an error the Python implementation reports
    if (max_rows < 0 || max_rows > kMaxRows) return 0;
    return rows >= 1 && rows <= max_rows ? rows : 0;
}

inline bool plain_cpu(const at::Tensor& t) {
    return t.device().is_cpu() && t.layout() == c10::kStrided && !t.is_conj() && !t.is_neg();
}

inline bool bias_ok(const std::optional<at::Tensor>& bias, c10::ScalarType dt, int64_t N) {
    if (!bias.has_value()) return true;
    const at::Tensor& b = *bias;
    return plain_cpu(b) && b.scalar_type() == dt && b.dim() == 1 && b.size(0) == N
        && b.is_contiguous();
}

inline bool selection_ok(int64_t D, int64_t k, int64_t n, int64_t m) {
    return m == 0 ? (k >= 1 && k <= D) : (m > 0 && n >= 1 && n <= m && D % m == 0);
}

inline bool no_grad_needed(const at::Tensor& a, const at::Tensor& b,
                           const std::optional<at::Tensor>& c) {
    if (!c10::GradMode::is_enabled()) return true;
    return !a.requires_grad() && !b.requires_grad() && !(c.has_value() && c->requires_grad());
}

// (stride between rows, stride between features) of x as the kernels take it, or false.
inline bool row_strides(at::Tensor& x, int64_t rows, int64_t D, int64_t* st, int64_t* sk) {
    if (rows == 1) {
        *st = 0;
        *sk = x.stride(-1);
        return true;
    }
    if (x.dim() != 2) x = x.reshape({rows, D});  // a view for the layouts decode produces
    *st = x.stride(0);
    *sk = x.stride(1);
    return true;
}

at::Tensor output_like(const at::Tensor& x, int64_t N) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    return x.new_empty(shape);
}

at::Tensor topk_python(const at::Tensor& x, int64_t k, int64_t n, int64_t m, bool rescale,
                       const at::Tensor& weight_t, const std::optional<at::Tensor>& bias,
                       int64_t max_rows) {
    static auto op = c10::Dispatcher::singleton()
        .findSchemaOrThrow("qsparse::cpu_topk_linear_python", "")
        .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t, bool, const at::Tensor&,
                          const std::optional<at::Tensor>&, int64_t)>();
    return op.call(x, k, n, m, rescale, weight_t, bias, max_rows);
}

at::Tensor topk_native(const at::Tensor& x_in, int64_t k, int64_t n, int64_t m, bool rescale,
                       const at::Tensor& weight_t, const std::optional<at::Tensor>& bias,
                       int64_t max_rows) {
    const int dt = dtype_code(x_in.scalar_type());
    const int64_t rows = kernel_rows(x_in, max_rows);
    void* fn = dt >= 0 && rows ? find_kernel(0, -1, dt, (int)rows) : nullptr;
    if (fn && plain_cpu(x_in) && plain_cpu(weight_t)
        && at::get_num_threads() == g_torch_threads.load(std::memory_order_relaxed)
        && no_grad_needed(x_in, weight_t, bias) && weight_t.scalar_type() == x_in.scalar_type()
        && weight_t.dim() == 2 && weight_t.size(0) == x_in.size(-1) && weight_t.size(1) > 0
        && weight_t.is_contiguous() && bias_ok(bias, x_in.scalar_type(), weight_t.size(1))
        && selection_ok(x_in.size(-1), k, n, m)) {
        at::Tensor x = x_in;
        const int64_t D = x.size(-1), N = weight_t.size(1);
        int64_t st, sk;
        row_strides(x, rows, D, &st, &sk);
        at::Tensor out = output_like(x_in, N);
        const int64_t status = reinterpret_cast<topk_fn>(fn)(
            x.data_ptr(), st, sk, D, k, n, m, rescale, weight_t.data_ptr(), N, N,
            bias.has_value() ? bias->data_ptr() : nullptr, out.data_ptr(), N,
            g_kernel_threads.load(std::memory_order_relaxed));
        if (status >= 0) {
            g_served.fetch_add(1, std::memory_order_relaxed);
            return out;
        }
    }
    return topk_python(x_in, k, n, m, rescale, weight_t, bias, max_rows);
}

at::Tensor packed_python(const at::Tensor& x, int64_t k, int64_t n, int64_t m, bool rescale,
                         bool quant, c10::string_view format, int64_t N,
                         const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t max_rows) {
    static auto op = c10::Dispatcher::singleton()
        .findSchemaOrThrow("qsparse::cpu_packed_linear_python", "")
        .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t, bool, bool,
                          c10::string_view, int64_t, const at::Tensor&,
                          const std::optional<at::Tensor>&, int64_t)>();
    return op.call(x, k, n, m, rescale, quant, format, N, packed, bias, max_rows);
}

at::Tensor packed_native(const at::Tensor& x_in, int64_t k, int64_t n, int64_t m, bool rescale,
                         bool quant, c10::string_view format, int64_t N,
                         const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t max_rows) {
    const int dt = dtype_code(x_in.scalar_type());
    const int fmt = format_code(format);
    const int64_t rows = kernel_rows(x_in, max_rows);
    void* fn = dt >= 0 && fmt >= 0 && rows ? find_kernel(1, fmt, dt, (int)rows) : nullptr;
    const Layout* L = fn ? find_layout(fmt, x_in.size(-1), N) : nullptr;
    if (L && plain_cpu(x_in) && plain_cpu(packed)
        && at::get_num_threads() == g_torch_threads.load(std::memory_order_relaxed)
        && no_grad_needed(x_in, packed, bias) && packed.scalar_type() == c10::ScalarType::Byte
        && packed.dim() == 1 && packed.numel() == L->nbytes && packed.is_contiguous()
        && bias_ok(bias, x_in.scalar_type(), N) && selection_ok(x_in.size(-1), k, n, m)) {
        at::Tensor x = x_in;
        const int64_t D = x.size(-1);
        int64_t st, sk;
        row_strides(x, rows, D, &st, &sk);
        at::Tensor out = output_like(x_in, N);
        const int64_t status = reinterpret_cast<packed_fn>(fn)(
            x.data_ptr(), st, sk, D, k, n, m, rescale, quant, packed.data_ptr(),
            L->panel_bytes, L->scale_off, L->min_off, N, L->padded_out,
            bias.has_value() ? bias->data_ptr() : nullptr, out.data_ptr(), N,
            g_kernel_threads.load(std::memory_order_relaxed));
        if (status >= 0) {
            g_served.fetch_add(1, std::memory_order_relaxed);
            return out;
        }
    }
    return packed_python(x_in, k, n, m, rescale, quant, format, N, packed, bias, max_rows);
}

}  // namespace

extern "C" {

// op: 0 cpu_topk_linear (fmt -1), 1 cpu_packed_linear; returns 0, or -1 when the table is full
int64_t qs_native_register_kernel(int64_t op, int64_t fmt, int64_t dtype, int64_t rows,
                                  void* fn) {
    std::lock_guard<std::mutex> lock(g_append);
    if (find_kernel((int)op, (int)fmt, (int)dtype, (int)rows)) return 0;
    const int n = g_nkernels.load(std::memory_order_relaxed);
    if (n == kCapacity) return -1;
    g_kernels[n] = Kernel{(int)op, (int)fmt, (int)dtype, (int)rows, fn};
    g_nkernels.store(n + 1, std::memory_order_release);
    return 0;
}

int64_t qs_native_register_layout(int64_t fmt, int64_t D, int64_t N, int64_t panel_bytes,
                                  int64_t scale_off, int64_t min_off, int64_t padded_out,
                                  int64_t nbytes) {
    std::lock_guard<std::mutex> lock(g_append);
    if (find_layout((int)fmt, D, N)) return 0;
    const int n = g_nlayouts.load(std::memory_order_relaxed);
    if (n == kCapacity) return -1;
    g_layouts[n] = Layout{(int)fmt, D, N, panel_bytes, scale_off, min_off, padded_out, nbytes};
    g_nlayouts.store(n + 1, std::memory_order_release);
    return 0;
}

void qs_native_set_threads(int64_t torch_threads, int64_t kernel_threads) {
    g_kernel_threads.store(kernel_threads, std::memory_order_relaxed);
    g_torch_threads.store(torch_threads, std::memory_order_relaxed);
}

int64_t qs_native_served() { return g_served.load(std::memory_order_relaxed); }

}  // extern "C"

TORCH_LIBRARY_IMPL(qsparse, CPU, m) {
    m.impl("cpu_topk_linear", &topk_native);
    m.impl("cpu_packed_linear", &packed_native);
}
"""
