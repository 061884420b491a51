// Packed binary low-rank layer on CPU, computed from the int32 sign words (never from a dense copy).
//
//   t = (sgn(V) · (x ⊙ g)) ⊙ l        (stage 1: rows of V, reduction over d_in)
//   y = Σ_paths h ⊙ (sgn(U) · t) + b   (stage 2: rows of U, reduction over r)
//
// Both stages are the same primitive: out[row] = scale[row] · Σ_k sgn(bits[row, k]) · v[k]. Words are LSB first,
// bit 1 means −1, rows are padded with zero bits to a multiple of 32, so the vector is zero-padded to the same
// width and the padding adds nothing. Multiplying by ±1 is done by moving each sign bit into the float's sign bit
// (a variable left shift of the word) and XOR-ing it into the activation: no int→float conversion, no multiply.
// Up to 8 tokens share one pass over the sign words (decode). Rows are split across torch's intra-op threads
// (at::parallel_for follows torch.set_num_threads); each row is summed by one thread in a fixed order, so results
// do not depend on the thread count. Built at first use by hf_littlebit.backends.cpu (AVX2 where the CPU has it,
// portable C++ otherwise).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTokenBlock = 8;

#if defined(__AVX2__)
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// NT tokens at once; NA independent accumulators per token hide the add latency when NT is small.
template <int NT>
void rows_simd(const int32_t* bits, int64_t words, const float* v, int64_t v_stride, const float* scale, float* out,
               int64_t out_stride, bool accumulate, int64_t r0, int64_t r1) {
  constexpr int NA = NT >= 4 ? 1 : 4 / NT;
  // Shift counts that bring bit (8q + i) of the word to bit 31 of lane i, for the four bytes q of a word.
  const __m256i shift[4] = {
      _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24), _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16),
      _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8), _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)};
  const __m256i sign_bit = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[NT][NA];
    for (int m = 0; m < NT; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
    const int32_t* row = bits + r * words;
    for (int64_t w = 0; w < words; ++w) {
      const __m256i word = _mm256_set1_epi32(row[w]);
      for (int q = 0; q < 4; ++q) {
        const __m256 sign = _mm256_castsi256_ps(_mm256_and_si256(_mm256_sllv_epi32(word, shift[q]), sign_bit));
        const float* vp = v + 32 * w + 8 * q;
        for (int m = 0; m < NT; ++m) {
          __m256& a = acc[m][q % NA];
          a = _mm256_add_ps(a, _mm256_xor_ps(_mm256_loadu_ps(vp + m * v_stride), sign));
        }
      }
    }
    for (int m = 0; m < NT; ++m) {
      __m256 total = acc[m][0];
      for (int a = 1; a < NA; ++a) total = _mm256_add_ps(total, acc[m][a]);
      const float value = scale[r] * hsum(total);
      float& dst = out[m * out_stride + r];
      dst = accumulate ? dst + value : value;
    }
  }
}
#endif

// Portable reference of the same primitive (CPUs without AVX2, e.g. aarch64: the compiler vectorises what it can).
template <int NT>
void rows_plain(const int32_t* bits, int64_t words, const float* v, int64_t v_stride, const float* scale, float* out,
                int64_t out_stride, bool accumulate, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc[NT] = {};
    const int32_t* row = bits + r * words;
    for (int64_t w = 0; w < words; ++w) {
      const uint32_t word = static_cast<uint32_t>(row[w]);
      for (int b = 0; b < 32; ++b) {
        const bool negative = (word >> b) & 1u;
        for (int m = 0; m < NT; ++m) {
          const float x = v[m * v_stride + 32 * w + b];
          acc[m] += negative ? -x : x;
        }
      }
    }
    for (int m = 0; m < NT; ++m) {
      const float value = scale[r] * acc[m];
      float& dst = out[m * out_stride + r];
      dst = accumulate ? dst + value : value;
    }
  }
}

template <int NT>
void rows(const int32_t* bits, int64_t words, const float* v, int64_t v_stride, const float* scale, float* out,
          int64_t out_stride, bool accumulate, int64_t r0, int64_t r1) {
#if defined(__AVX2__)
  rows_simd<NT>(bits, words, v, v_stride, scale, out, out_stride, accumulate, r0, r1);
#else
  rows_plain<NT>(bits, words, v, v_stride, scale, out, out_stride, accumulate, r0, r1);
#endif
}

// out (M, out_stride)[:, :R] (=|+=) scale ⊙ (sgn(bits) · v) for every token of v (M, 32·words, zero-padded).
void sign_matvec(const torch::Tensor& bits, const torch::Tensor& v, const torch::Tensor& scale, torch::Tensor& out,
                 bool accumulate) {
  const int64_t R = bits.size(0), words = bits.size(1), M = v.size(0);
  const int32_t* b = bits.data_ptr<int32_t>();
  const float* s = scale.data_ptr<float>();
  const int64_t v_stride = v.size(1), out_stride = out.size(1);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, 32 * words));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t m0 = 0; m0 < M; m0 += kTokenBlock) {
      const int64_t n = std::min(kTokenBlock, M - m0);
      const float* vp = v.data_ptr<float>() + m0 * v_stride;
      float* op = out.data_ptr<float>() + m0 * out_stride;
      // Blocks of 8, 4, 2, 1 tokens, so every block runs a fully unrolled specialisation.
      int64_t done = 0;
      while (done < n) {
        const int64_t left = n - done;
        const float* vq = vp + done * v_stride;
        float* oq = op + done * out_stride;
        if (left >= 8) { rows<8>(b, words, vq, v_stride, s, oq, out_stride, accumulate, r0, r1); done += 8; }
        else if (left >= 4) { rows<4>(b, words, vq, v_stride, s, oq, out_stride, accumulate, r0, r1); done += 4; }
        else if (left >= 2) { rows<2>(b, words, vq, v_stride, s, oq, out_stride, accumulate, r0, r1); done += 2; }
        else { rows<1>(b, words, vq, v_stride, s, oq, out_stride, accumulate, r0, r1); done += 1; }
      }
    }
  });
}

torch::Tensor as_float(const torch::Tensor& t) { return t.to(torch::kFloat).contiguous(); }

void check_bits(const torch::Tensor& bits, const char* name) {
  TORCH_CHECK(bits.scalar_type() == torch::kInt32 && bits.dim() == 2, name, ": expected a 2-D int32 tensor");
  TORCH_CHECK(bits.is_contiguous(), name, ": packed words must be contiguous");
  TORCH_CHECK(!bits.is_cuda(), name, ": the CPU kernel runs on CPU tensors");
}

}  // namespace

// x: (M, d_in) fp32 contiguous; paths: [v_bits, u_bits, h, l, g] per path; bias: (d_out,) or None.
torch::Tensor binary_lowrank_forward(const torch::Tensor& x, const std::vector<torch::Tensor>& paths,
                                     const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "binary_lowrank_forward: x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(!paths.empty() && paths.size() % 5 == 0, "binary_lowrank_forward: 5 tensors per path");
  const int64_t M = x.size(0), d_in = x.size(1);
  const int64_t d_out = paths[1].size(0);
  torch::Tensor y = torch::empty({M, d_out}, x.options());
  for (size_t p = 0; p < paths.size(); p += 5) {
    const torch::Tensor &v_bits = paths[p], &u_bits = paths[p + 1];
    check_bits(v_bits, "v_bits");
    check_bits(u_bits, "u_bits");
    const int64_t rank = v_bits.size(0);
    TORCH_CHECK(v_bits.size(1) * 32 >= d_in && (v_bits.size(1) - 1) * 32 < d_in, "v_bits width does not match d_in");
    TORCH_CHECK(u_bits.size(0) == d_out && u_bits.size(1) * 32 >= rank && (u_bits.size(1) - 1) * 32 < rank,
                "u_bits shape does not match (d_out, rank)");
    const torch::Tensor h = as_float(paths[p + 2]), l = as_float(paths[p + 3]), g = as_float(paths[p + 4]);
    TORCH_CHECK(h.numel() == d_out && l.numel() == rank && g.numel() == d_in, "scale vector sizes do not match");
    // Stage 1 input: x ⊙ g, zero-padded to the word width of V's rows.
    torch::Tensor xg = torch::zeros({M, 32 * v_bits.size(1)}, x.options());
    xg.narrow(1, 0, d_in).copy_(x * g);
    // Stage 1 output (already ⊙ l), zero-padded to the word width of U's rows: it is stage 2's input.
    torch::Tensor t = torch::zeros({M, 32 * u_bits.size(1)}, x.options());
    sign_matvec(v_bits, xg, l, t, /*accumulate=*/false);
    sign_matvec(u_bits, t, h, y, /*accumulate=*/p > 0);
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(torch::kFloat));
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("binary_lowrank_forward", &binary_lowrank_forward,
        "Packed binary low-rank layer forward on CPU (sign words read directly)");
}
