// ONNX Runtime custom operator cosine:GGUFMatMul (CPU): Y[..., N] = X[..., K] @ W^T with
// W's rows in GGUF blocks (gguf_blocks.h says how and why).
//
//   inputs:  X float32 [..., K]; W uint8 [N, K / block_elems * block_bytes] (the GGUF
//            tensor's raw bytes, one weight row after another)
//   output:  Y float32 [..., N]
//   attributes: format ("Q4_K", "Q6_K", "Q8_0"), K, N
//
// Built against ONNX Runtime's C API headers with ORT_API_MANUAL_INIT: the library takes
// the API table ONNX Runtime passes to RegisterCustomOps and links against nothing of it.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "gguf_blocks.h"

namespace {

using cosine_gguf::Format;

constexpr int64_t kColumnsPerTask = 64;  // output columns per ParallelFor item

bool parse_format(const std::string& name, Format* f) {
  if (name == "Q4_K") *f = Format::kQ4K;
  else if (name == "Q6_K") *f = Format::kQ6K;
  else if (name == "Q8_0") *f = Format::kQ8_0;
  else return false;
  return true;
}

struct Call {
  Format format;
  const cosine_gguf::Rows* rows;
  const uint8_t* w;
  float* y;
  int64_t m, n, k;
};

void run_task(void* data, size_t task) {
  const Call* c = static_cast<const Call*>(data);
  const int64_t n0 = static_cast<int64_t>(task) * kColumnsPerTask;
  const int64_t n1 = n0 + kColumnsPerTask < c->n ? n0 + kColumnsPerTask : c->n;
  cosine_gguf::matmul_columns(c->format, c->rows, c->w, c->y, c->m, c->n, c->k, n0, n1);
}

struct GGUFMatMulKernel {
  Format format{};
  int64_t n = 0, k = 0, row_bytes = 0;
  std::string name;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    try {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(0);
      auto w = ctx.GetInput(1);
      std::vector<int64_t> shape = x.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.empty() || shape.back() != k)
        return error("X's last dimension must be K = " + std::to_string(k));
      const std::vector<int64_t> wshape = w.GetTensorTypeAndShapeInfo().GetShape();
      int64_t wbytes = 1;
      for (int64_t d : wshape) wbytes *= d;
      if (wbytes != n * row_bytes)
        return error("W holds " + std::to_string(wbytes) + " bytes; N x row bytes = " + std::to_string(n * row_bytes));
      int64_t m = 1;
      for (size_t i = 0; i + 1 < shape.size(); ++i) m *= shape[i];
      shape.back() = n;
      auto y = ctx.GetOutput(0, shape);
      if (m == 0) return nullptr;

      // each row of X quantized once per call (only that row's values decide its bits)
      std::vector<int8_t> q(static_cast<size_t>(m * k));
      std::vector<float> scale(static_cast<size_t>(m * (k / cosine_gguf::kXBlock)));
      std::vector<int16_t> sums(static_cast<size_t>(m * (k / 32)));
      std::vector<cosine_gguf::Rows> rows(static_cast<size_t>(m));
      const float* xp = x.GetTensorData<float>();
      for (int64_t r = 0; r < m; ++r) {
        int8_t* qr = q.data() + r * k;
        float* sr = scale.data() + r * (k / cosine_gguf::kXBlock);
        int16_t* br = sums.data() + r * (k / 32);
        cosine_gguf::quantize_row(xp + r * k, k, qr, sr, br);
        rows[static_cast<size_t>(r)] = {qr, sr, br};
      }
      Call call{format, rows.data(), w.GetTensorData<uint8_t>(), y.GetTensorMutableData<float>(), m, n, k};
      const size_t tasks = static_cast<size_t>((n + kColumnsPerTask - 1) / kColumnsPerTask);
      ctx.ParallelFor(run_task, tasks, 0, &call);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return error(e.what());
    } catch (const std::exception& e) {
      return error(e.what());
    }
  }

  OrtStatusPtr error(const std::string& what) const {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, ("cosine:GGUFMatMul " + name + ": " + what).c_str());
  }
};

struct GGUFMatMulOp : Ort::CustomOpBase<GGUFMatMulOp, GGUFMatMulKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept {
    try {
      Ort::ConstKernelInfo ki(info);
      auto kn = std::make_unique<GGUFMatMulKernel>();
      kn->name = ki.GetNodeName();
      const std::string format = ki.GetAttribute<std::string>("format");
      if (!parse_format(format, &kn->format))
        return api.CreateStatus(ORT_INVALID_ARGUMENT,
                                ("cosine:GGUFMatMul: format " + format + " is not one of Q4_K, Q6_K, Q8_0").c_str());
      kn->k = ki.GetAttribute<int64_t>("K");
      kn->n = ki.GetAttribute<int64_t>("N");
      const cosine_gguf::FormatInfo fi = cosine_gguf::info(kn->format);
      if (kn->k <= 0 || kn->n <= 0 || kn->k % cosine_gguf::kXBlock)
        return api.CreateStatus(ORT_INVALID_ARGUMENT,
                                ("cosine:GGUFMatMul: K must be a positive multiple of 256 and N positive, got K=" +
                                 std::to_string(kn->k) + " N=" + std::to_string(kn->n)).c_str());
      kn->row_bytes = kn->k / fi.block_elems * fi.block_bytes;
      *kernel = kn.release();
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, (std::string("cosine:GGUFMatMul: ") + e.what()).c_str());
    }
  }
  const char* GetName() const { return "GGUFMatMul"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

GGUFMatMulOp& op() {
  static GGUFMatMulOp instance;
  return instance;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                              const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // cannot even report: ONNX Runtime older than these headers
  Ort::InitApi(api);
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c"))
    return api->CreateStatus(ORT_FAIL, "cosine:GGUFMatMul needs a CPU with AVX2, FMA and F16C");
  // one domain for the process: sessions share it (ONNX Runtime keeps a pointer to it)
  static std::mutex lock;
  static OrtCustomOpDomain* domain = nullptr;
  std::lock_guard<std::mutex> guard(lock);
  if (domain == nullptr) {
    if (OrtStatus* s = api->CreateCustomOpDomain("cosine", &domain)) return s;
    if (OrtStatus* s = api->CustomOpDomain_Add(domain, &op())) return s;
  }
  return api->AddCustomOpDomain(options, domain);
}
