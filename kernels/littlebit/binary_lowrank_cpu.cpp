// Packed binary low-rank layer on CPU, computed from the int32 sign words (never from a dense copy).
//
//   t = (sgn(V) · (x ⊙ g)) ⊙ l        (stage 1: rows of V, reduction over d_in)
//   y = Σ_paths h ⊙ (sgn(U) · t) + b   (stage 2: rows of U, reduction over r)
//
// Both stages are the same primitive: out[row] = scale[row] · Σ_k sgn(bits[row, k]) · v[k]. Words are LSB first,
// bit 1 means −1, rows are padded with zero bits to a multiple of 32, so the vector is zero-padded to the same
// width and the padding adds nothing. Multiplying by ±1 is done by moving each sign bit into the float's sign bit
// (a variable left shift of the word) and XOR-ing it into the activation: no int→float conversion, no multiply.
// Up to 8 tokens share one pass over the sign words (decode). Rows are split across torch.get_num_threads()
// OpenMP threads; each row is summed by one thread in a fixed order, so results do not depend on the thread count.
//
// The same extension holds the tied LM head of a few-bit group-quantized embedding (group_head_forward, below).
// Built at first use by hf_littlebit.backends.cpu (AVX2 + FMA + F16C where the CPU has them, portable C++ otherwise).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTokenBlock = 8;
constexpr int64_t kRowBlock = 16;  // rows per work item: amortises the per-call set-up, still fine-grained

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

// out (M, out_stride)[:, :R] (=|+=) scale ⊙ (sgn(bits) · v) for every token of v (M, v_stride, zero-padded), rows
// [r0, r1), tokens in blocks of 8, 4, 2, 1 so every block runs a fully unrolled specialisation.
void sign_matvec_rows(const int32_t* b, int64_t words, const float* v, int64_t M, int64_t v_stride, const float* s,
                      float* out, int64_t out_stride, bool accumulate, int64_t r0, int64_t r1) {
  for (int64_t m0 = 0; m0 < M; m0 += kTokenBlock) {
    const int64_t n = std::min(kTokenBlock, M - m0);
    int64_t done = 0;
    while (done < n) {
      const int64_t left = n - done;
      const float* vq = v + (m0 + done) * v_stride;
      float* oq = out + (m0 + done) * out_stride;
      if (left >= 8) { rows<8>(b, words, vq, v_stride, s, oq, out_stride, accumulate, r0, r1); done += 8; }
      else if (left >= 4) { rows<4>(b, words, vq, v_stride, s, oq, out_stride, accumulate, r0, r1); done += 4; }
      else if (left >= 2) { rows<2>(b, words, vq, v_stride, s, oq, out_stride, accumulate, r0, r1); done += 2; }
      else { rows<1>(b, words, vq, v_stride, s, oq, out_stride, accumulate, r0, r1); done += 1; }
    }
  }
}

// A scale vector as fp32 (the stored dtype is fp16, bf16 or fp32): a plain loop, no ATen op per call.
std::vector<float> floats(const torch::Tensor& t) {
  const torch::Tensor c = t.contiguous();
  const int64_t n = c.numel();
  std::vector<float> out(n);
  switch (c.scalar_type()) {
    case torch::kFloat: std::copy_n(c.data_ptr<float>(), n, out.data()); break;
    case torch::kHalf: { const at::Half* p = c.data_ptr<at::Half>(); for (int64_t i = 0; i < n; ++i) out[i] = p[i]; break; }
    case torch::kBFloat16: {
      const at::BFloat16* p = c.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < n; ++i) out[i] = p[i];
      break;
    }
    default: TORCH_CHECK(false, "scale vectors must be float16, bfloat16 or float32, got ", c.scalar_type());
  }
  return out;
}

void check_bits(const torch::Tensor& bits, const char* name) {
  TORCH_CHECK(bits.scalar_type() == torch::kInt32 && bits.dim() == 2, name, ": expected a 2-D int32 tensor");
  TORCH_CHECK(bits.is_contiguous(), name, ": packed words must be contiguous");
  TORCH_CHECK(!bits.is_cuda(), name, ": the CPU kernel runs on CPU tensors");
}

}  // namespace

// ±1.0 fp32 rows (rows, width) from packed words (rows, ⌈width/32⌉): the prefill path's tile, unpacked in place of a
// chain of PyTorch shift/convert ops (an order of magnitude faster, and no int64 temporaries).
torch::Tensor unpack_signs_f32(const torch::Tensor& bits, int64_t width) {
  check_bits(bits, "bits");
  const int64_t rows = bits.size(0), words = bits.size(1);
  TORCH_CHECK(words * 32 >= width && (words - 1) * 32 < width, "unpack_signs_f32: width does not match the words");
  torch::Tensor out = torch::empty({rows, width}, torch::TensorOptions().dtype(torch::kFloat));
  const int32_t* b = bits.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t* row = b + r * words;
      float* dst = o + r * width;
      int64_t k = 0;
#if defined(__AVX2__)
      const __m256i lanes = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
      const __m256i sign_bit = _mm256_set1_epi32(static_cast<int>(0x80000000u));
      const __m256 one = _mm256_set1_ps(1.0f);
      for (; k + 8 <= width; k += 8) {
        // bits k..k+7 of the row (k is a multiple of 8): moved to bits 24..31 of the word, then bit 24 + i to the
        // sign bit of lane i
        const uint32_t moved = static_cast<uint32_t>(row[k / 32]) << (24 - (k % 32));
        const __m256i word = _mm256_set1_epi32(static_cast<int>(moved));
        const __m256i sign = _mm256_and_si256(_mm256_sllv_epi32(word, lanes), sign_bit);
        _mm256_storeu_ps(dst + k, _mm256_xor_ps(one, _mm256_castsi256_ps(sign)));
      }
#endif
      for (; k < width; ++k) dst[k] = ((static_cast<uint32_t>(row[k / 32]) >> (k % 32)) & 1u) ? -1.0f : 1.0f;
    }
  });
  return out;
}

struct Path {
  const int32_t* v_bits;
  const int32_t* u_bits;
  int64_t rank, v_words, u_words;
  std::vector<float> h, l, g;
};

// x: (M, d_in) in fp32, bf16 or fp16; paths: [v_bits, u_bits, h, l, g] per path; bias: (d_out,) or None. Returns y
// (M, d_out) in x's dtype. One OpenMP team for the whole call (rows of each stage shared out, a barrier between
// the stages); calls with fewer than min_parallel_signs sign×token products run on one thread (waking and
// synchronising a team costs more than they take).
torch::Tensor binary_lowrank_forward(const torch::Tensor& x_in, const std::vector<torch::Tensor>& tensors,
                                     const c10::optional<torch::Tensor>& bias, int64_t min_parallel_signs) {
  TORCH_CHECK(x_in.dim() == 2, "binary_lowrank_forward: x must be 2-D (tokens, d_in)");
  TORCH_CHECK(x_in.device().is_cpu(), "binary_lowrank_forward: x must be a CPU tensor");
  for (const auto& t : tensors) TORCH_CHECK(t.device().is_cpu(), "binary_lowrank_forward: tensors must be on CPU");
  TORCH_CHECK(!bias.has_value() || !bias->defined() || bias->device().is_cpu(), "binary_lowrank_forward: bias on CPU");
  TORCH_CHECK(!tensors.empty() && tensors.size() % 5 == 0, "binary_lowrank_forward: 5 tensors per path");
  const torch::Tensor x = x_in.scalar_type() == torch::kFloat ? x_in.contiguous() : x_in.to(torch::kFloat).contiguous();
  const int64_t M = x.size(0), d_in = x.size(1);
  const int64_t d_out = tensors[1].size(0);
  std::vector<Path> paths;
  int64_t work = 0, t_width = 0;
  for (size_t p = 0; p < tensors.size(); p += 5) {
    const torch::Tensor &v_bits = tensors[p], &u_bits = tensors[p + 1];
    check_bits(v_bits, "v_bits");
    check_bits(u_bits, "u_bits");
    const int64_t rank = v_bits.size(0);
    // The stage-1 buffer is shared by the paths: its padding beyond the rank must stay zero for every path.
    TORCH_CHECK(paths.empty() || rank == paths[0].rank, "binary_lowrank_forward: all paths must have the same rank");
    TORCH_CHECK(v_bits.size(1) * 32 >= d_in && (v_bits.size(1) - 1) * 32 < d_in, "v_bits width does not match d_in");
    TORCH_CHECK(u_bits.size(0) == d_out && u_bits.size(1) * 32 >= rank && (u_bits.size(1) - 1) * 32 < rank,
                "u_bits shape does not match (d_out, rank)");
    Path path{v_bits.data_ptr<int32_t>(), u_bits.data_ptr<int32_t>(), rank, v_bits.size(1), u_bits.size(1),
              floats(tensors[p + 2]), floats(tensors[p + 3]), floats(tensors[p + 4])};
    TORCH_CHECK(static_cast<int64_t>(path.h.size()) == d_out && static_cast<int64_t>(path.l.size()) == rank &&
                static_cast<int64_t>(path.g.size()) == d_in, "scale vector sizes do not match");
    work += 32 * (rank * path.v_words + d_out * path.u_words);
    t_width = std::max(t_width, 32 * path.u_words);
    paths.push_back(std::move(path));
  }
  const int64_t xg_width = 32 * paths[0].v_words;
  std::vector<float> xg(M * xg_width, 0.0f), t(M * t_width, 0.0f);
  torch::Tensor y = torch::empty({M, d_out}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<float> b;
  if (bias.has_value() && bias->defined()) b = floats(*bias);
  const int threads = work * M < min_parallel_signs ? 1 : at::get_num_threads();
#pragma omp parallel num_threads(threads)
  for (size_t p = 0; p < paths.size(); ++p) {
    const Path& path = paths[p];
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < d_in; ++k) xg[m * xg_width + k] = xp[m * d_in + k] * path.g[k];
    // stage 1: t = (sgn(V) · (x ⊙ g)) ⊙ l, kRowBlock rows of V per iteration
#pragma omp for schedule(static)
    for (int64_t r = 0; r < path.rank; r += kRowBlock)
      sign_matvec_rows(path.v_bits, path.v_words, xg.data(), M, xg_width, path.l.data(), t.data(), t_width, false,
                       r, std::min(r + kRowBlock, path.rank));
    // stage 2: y (+)= h ⊙ (sgn(U) · t), kRowBlock rows of U per iteration (t's padding beyond rank is zero)
#pragma omp for schedule(static)
    for (int64_t r = 0; r < d_out; r += kRowBlock)
      sign_matvec_rows(path.u_bits, path.u_words, t.data(), M, t_width, path.h.data(), yp, d_out, p > 0, r,
                       std::min(r + kRowBlock, d_out));
  }
  if (!b.empty())
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < d_out; ++r) yp[m * d_out + r] += b[r];
  return x_in.scalar_type() == torch::kFloat ? y : y.to(x_in.scalar_type());
}

// ------------------------------------------------------------------------------------------------------------------
// Tied LM head of a few-bit group-quantized embedding (format: hf_littlebit/format/group_quant.py):
//
//   logits[t, i] = Σ_g Σ_{j ∈ g} (zero[i, g] + scale[i, g] · code[i, j]) · x[t, j]
//                = Σ_g scale[i, g] · Σ_{j ∈ g} code[i, j] · x[t, j] + zero[i, g] · Σ_{j ∈ g} x[t, j]
//
// computed from the packed code words in place, eight codes at a time converted to fp32 in registers and multiplied
// into per-group fp32 accumulators (the second line); a block of 64 rows is read from memory once, blocks of up to 4
// tokens take turns over it while it is in cache. Codes
// form one LSB-first bit stream per row, so the 8 codes that start at column j (j a multiple of 8) are exactly the
// `bits` bytes that start at byte j · bits / 8 (x86 is little-endian): one small load per 8 codes at every width,
// straddling codes (3, 5, 6, 7 bits) included. Rows are split across OpenMP threads, each row summed by one thread
// in a fixed order (results do not depend on the thread count).
//
// Fast path (AVX2, group size a multiple of 8): a chunk of 8 codes never crosses a group; only the row's last
// cols % 8 codes are read one by one. Any other group size (and CPUs without AVX2) takes the generic path: the row
// is dequantized into a small fp32 buffer (one row, never the matrix), then one dot product per token. So does the
// tensor's last row, whose chunks the fast path's wide loads could read past.

namespace {

constexpr int64_t kHeadRowBlock = 64;  // vocabulary rows per work item
constexpr int64_t kHeadTokenBlock = 4;
constexpr int64_t kHeadPrefetchRows = 8;

// Code j of a row, read from whole int32 words (a code straddling two words takes its high bits from the second):
// never reads beyond the word holding the code's last bit. Independent of the byte order.
inline uint32_t code_at(const int32_t* row, int64_t j, int bits) {
  const int64_t bit = j * bits;
  const int offset = static_cast<int>(bit & 31);
  uint32_t v = static_cast<uint32_t>(row[bit >> 5]) >> offset;
  if (offset + bits > 32) v |= static_cast<uint32_t>(row[(bit >> 5) + 1]) << (32 - offset);
  return v & ((1u << bits) - 1u);
}

// n consecutive scale (or zero) values, stored as fp16, bf16 or fp32, as fp32.
inline void row_to_floats(const void* base, torch::ScalarType type, int64_t offset, int64_t n, float* out) {
  switch (type) {
    case torch::kHalf: {
#if defined(__F16C__) && defined(__AVX2__)  // immintrin.h is included with AVX2
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = _cvtsh_ss(p[i]);
#else
      const at::Half* p = static_cast<const at::Half*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = p[i];
#endif
      break;
    }
    case torch::kBFloat16: {
      const at::BFloat16* p = static_cast<const at::BFloat16*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = p[i];
      break;
    }
    default: std::copy_n(static_cast<const float*>(base) + offset, n, out);
  }
}

struct HeadArgs {
  const int32_t* codes;  // (rows, words)
  int64_t words, rows, cols, group_size, groups;
  int bits;
  const void* scales;  // (rows, groups), scale_type
  const void* zeros;
  torch::ScalarType scale_type;
  const float* x;  // (tokens, x_stride) fp32, zero beyond cols
  int64_t tokens, x_stride;
  const float* x_sums;  // (tokens, groups): Σ of x over each group
  float* out;  // (tokens, rows)
};

// Generic path, one row: dequantized into buf (x_stride floats, zero beyond cols), then a dot product per token.
void head_row_generic(const HeadArgs& a, int64_t r, const float* s, const float* z, float* buf) {
  const int32_t* row = a.codes + r * a.words;
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t j1 = std::min(a.cols, (g + 1) * a.group_size);
    for (int64_t j = g * a.group_size; j < j1; ++j) buf[j] = z[g] + s[g] * static_cast<float>(code_at(row, j, a.bits));
  }
  for (int64_t m = 0; m < a.tokens; ++m) {
    const float* xm = a.x + m * a.x_stride;
    float part[8] = {};  // x_stride is a multiple of 8: eight partial sums in a fixed order
    for (int64_t j = 0; j < a.x_stride; j += 8)
      for (int k = 0; k < 8; ++k) part[k] += buf[j + k] * xm[j + k];
    a.out[m * a.rows + r] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  }
}

#if defined(__AVX2__)
// vpshufb control and shifts for 5–7-bit codes: lane k receives the two bytes that hold code k (a code of ≤ 8 bits
// spans at most two), the code at bit (k · B) mod 8 of them.
template <int B>
struct Spread {
  alignas(32) int8_t control[32];
  alignas(32) int32_t shift[8];
  constexpr Spread() : control{}, shift{} {
    for (int k = 0; k < 8; ++k) {
      for (int q = 0; q < 4; ++q) control[4 * k + q] = q < 2 ? static_cast<int8_t>(k * B / 8 + q) : int8_t{-128};
      shift[k] = k * B % 8;
    }
  }
};
template <int B>
constexpr Spread<B> kSpread{};

// The 8 codes of B bits that start at byte p (a chunk: 8 · B bits, B whole bytes), one per 32-bit lane. Reads 4
// bytes from p (B ≤ 4) or 8 (B ≥ 5), up to 7 past the chunk: callers keep the row of the tensor's end off this path.
template <int B>
inline __m256i decode8(const uint8_t* p) {
  const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
  if constexpr (B == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (B <= 4) {  // the chunk fits one 32-bit value: broadcast it, shift code k down to bit 0 of lane k
    const __m256i shift = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    uint32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(v)), shift), mask);
  } else {  // 5–7 bits: the chunk's 8 bytes in both 128-bit halves, each code's two bytes moved into its lane
    uint64_t v;
    std::memcpy(&v, p, 8);
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi64x(static_cast<int64_t>(v)),
                                              _mm256_load_si256(reinterpret_cast<const __m256i*>(kSpread<B>.control)));
    const __m256i shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(kSpread<B>.shift));
    return _mm256_and_si256(_mm256_srlv_epi32(bytes, shift), mask);
  }
}

// Fast path, one row, NT ≤ 4 tokens from m0 (group_size a multiple of 8): per group, Σ code · x in NA accumulators
// per token (NA hides the FMA latency when the tokens are few), then scaled into the token's total; the zero term
// is zero · Σ_{j∈g} x, the sums of x precomputed per call.
template <int B, int NT>
void head_row_simd(const HeadArgs& a, int64_t r, const float* s, const float* z, int64_t m0) {
  constexpr int NA = NT >= 3 ? 1 : 4 / NT;
  const int32_t* words = a.codes + r * a.words;
  const uint8_t* row = reinterpret_cast<const uint8_t*>(words);
  const float* x = a.x + m0 * a.x_stride;
  __m256 total[NT];
  float zero_part[NT];
  for (int m = 0; m < NT; ++m) {
    total[m] = _mm256_setzero_ps();
    zero_part[m] = 0.0f;
  }
  for (int64_t g = 0; g < a.groups; ++g) {
    __m256 acc[NT][NA];
    for (int m = 0; m < NT; ++m)
      for (int k = 0; k < NA; ++k) acc[m][k] = _mm256_setzero_ps();
    const int64_t j1 = std::min(a.cols, (g + 1) * a.group_size);
    int64_t j = g * a.group_size;
    const uint8_t* p = row + (j >> 3) * B;  // the chunk at column j (a multiple of 8) starts at byte j · B / 8
    const float* xj = x + j;
    for (; j + 8 * NA <= j1; j += 8 * NA, p += NA * B, xj += 8 * NA)
      for (int k = 0; k < NA; ++k) {
        const __m256 c = _mm256_cvtepi32_ps(decode8<B>(p + k * B));
        for (int m = 0; m < NT; ++m)
          acc[m][k] = _mm256_fmadd_ps(c, _mm256_loadu_ps(xj + m * a.x_stride + 8 * k), acc[m][k]);
      }
    for (; j + 8 <= j1; j += 8, p += B, xj += 8) {
      const __m256 c = _mm256_cvtepi32_ps(decode8<B>(p));
      for (int m = 0; m < NT; ++m) acc[m][0] = _mm256_fmadd_ps(c, _mm256_loadu_ps(xj + m * a.x_stride), acc[m][0]);
    }
    if (j < j1) {  // the row's last cols % 8 codes (groups start at multiples of 8, so only the last group has them)
      alignas(32) int32_t tail[8] = {};
      for (int64_t t = j; t < j1; ++t) tail[t - j] = static_cast<int32_t>(code_at(words, t, B));
      const __m256 c = _mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(tail)));
      for (int m = 0; m < NT; ++m) acc[m][0] = _mm256_fmadd_ps(c, _mm256_loadu_ps(x + m * a.x_stride + j), acc[m][0]);
    }
    const __m256 scale = _mm256_set1_ps(s[g]);
    for (int m = 0; m < NT; ++m) {
      __m256 sum = acc[m][0];
      for (int k = 1; k < NA; ++k) sum = _mm256_add_ps(sum, acc[m][k]);
      total[m] = _mm256_fmadd_ps(scale, sum, total[m]);
      zero_part[m] += z[g] * a.x_sums[(m0 + m) * a.groups + g];
    }
  }
  for (int m = 0; m < NT; ++m) a.out[(m0 + m) * a.rows + r] = hsum(total[m]) + zero_part[m];
}

// Rows [r0, r1) (never the tensor's last), every token: blocks of up to 4 tokens (8 accumulators, two per token,
// leave the decode its registers among AVX2's 16) outside, the rows inside, so that a block's x and the rows' codes
// stay in cache from one use to the next. s, z: the rows' scales and zeros, (r1 − r0, groups).
template <int B>
void head_rows_simd(const HeadArgs& a, int64_t r0, int64_t r1, const float* s, const float* z) {
  for (int64_t m0 = 0; m0 < a.tokens; m0 += kHeadTokenBlock) {
    const int64_t n = std::min(kHeadTokenBlock, a.tokens - m0);
    for (int64_t r = r0; r < r1; ++r) {
      if (m0 == 0 && r + kHeadPrefetchRows < a.rows) {  // the hardware prefetcher alone leaves DRAM waits
        const char* next = reinterpret_cast<const char*>(a.codes + (r + kHeadPrefetchRows) * a.words);
        for (int64_t off = 0; off < a.words * 4; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
      }
      const float* sr = s + (r - r0) * a.groups;
      const float* zr = z + (r - r0) * a.groups;
      switch (n) {
        case 1: head_row_simd<B, 1>(a, r, sr, zr, m0); break;
        case 2: head_row_simd<B, 2>(a, r, sr, zr, m0); break;
        case 3: head_row_simd<B, 3>(a, r, sr, zr, m0); break;
        default: head_row_simd<B, 4>(a, r, sr, zr, m0); break;
      }
    }
  }
}

using HeadRowsFn = void (*)(const HeadArgs&, int64_t, int64_t, const float*, const float*);

HeadRowsFn simd_rows_fn(int bits) {
  switch (bits) {
    case 1: return head_rows_simd<1>;
    case 2: return head_rows_simd<2>;
    case 3: return head_rows_simd<3>;
    case 4: return head_rows_simd<4>;
    case 5: return head_rows_simd<5>;
    case 6: return head_rows_simd<6>;
    case 7: return head_rows_simd<7>;
    default: return head_rows_simd<8>;
  }
}
#endif

}  // namespace

// x (tokens, cols) in fp32, bf16 or fp16 → logits (tokens, rows) in x's dtype, computed in fp32. codes: (rows,
// ⌈cols · bits / 32⌉) int32; scales, zeros: (rows, ⌈cols / group_size⌉) fp16, bf16 or fp32. Calls with fewer than
// min_parallel code × token products run on one thread.
torch::Tensor group_head_forward(const torch::Tensor& x_in, const torch::Tensor& codes, const torch::Tensor& scales_in,
                                 const torch::Tensor& zeros_in, int64_t bits, int64_t group_size,
                                 int64_t min_parallel) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), "group_head_forward: x must be a 2-D CPU tensor");
  TORCH_CHECK(bits >= 1 && bits <= 8, "group_head_forward: bits must be 1–8, got ", bits);
  TORCH_CHECK(group_size >= 1, "group_head_forward: group_size must be positive");
  check_bits(codes, "codes");
  const int64_t rows = codes.size(0), cols = x_in.size(1), tokens = x_in.size(0);
  const int64_t groups = (cols + group_size - 1) / group_size;
  TORCH_CHECK(codes.size(1) == (cols * bits + 31) / 32, "group_head_forward: codes width does not match x's width");
  const torch::Tensor scales = scales_in.contiguous(), zeros = zeros_in.contiguous();
  for (const torch::Tensor* t : {&scales, &zeros}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 2 && t->size(0) == rows && t->size(1) == groups,
                "group_head_forward: scales and zeros must be CPU tensors of shape (rows, groups)");
    TORCH_CHECK(t->scalar_type() == scales.scalar_type(), "group_head_forward: scales and zeros differ in dtype");
    TORCH_CHECK(t->scalar_type() == torch::kHalf || t->scalar_type() == torch::kBFloat16 ||
                t->scalar_type() == torch::kFloat, "group_head_forward: scales must be float16, bfloat16 or float32");
  }
  // x as fp32 rows padded with zeros to a multiple of 8 columns (the last chunk of 8 meets zeros past cols)
  const int64_t x_stride = (cols + 7) & ~int64_t{7};
  const torch::Tensor xf = x_in.to(torch::kFloat).contiguous();
  std::vector<float> xb(tokens * x_stride, 0.0f);
  for (int64_t m = 0; m < tokens; ++m) std::copy_n(xf.data_ptr<float>() + m * cols, cols, xb.data() + m * x_stride);
  std::vector<float> x_sums(tokens * groups, 0.0f);
  for (int64_t m = 0; m < tokens; ++m)
    for (int64_t j = 0; j < cols; ++j) x_sums[m * groups + j / group_size] += xb[m * x_stride + j];
  torch::Tensor out = torch::empty({tokens, rows}, xf.options());
  const HeadArgs a{codes.data_ptr<int32_t>(), codes.size(1), rows, cols, group_size, groups, static_cast<int>(bits),
                   scales.data_ptr(), zeros.data_ptr(), scales.scalar_type(), xb.data(), tokens, x_stride,
                   x_sums.data(), out.data_ptr<float>()};
#if defined(__AVX2__)
  const HeadRowsFn fast = group_size % 8 == 0 ? simd_rows_fn(static_cast<int>(bits)) : nullptr;
#endif
  const int threads = rows * cols * tokens < min_parallel ? 1 : at::get_num_threads();
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> s(kHeadRowBlock * groups), z(kHeadRowBlock * groups), buf(x_stride, 0.0f);
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += kHeadRowBlock) {
      const int64_t r1 = std::min(rows, r0 + kHeadRowBlock);
      row_to_floats(a.scales, a.scale_type, r0 * groups, (r1 - r0) * groups, s.data());
      row_to_floats(a.zeros, a.scale_type, r0 * groups, (r1 - r0) * groups, z.data());
      int64_t r = r0;
#if defined(__AVX2__)
      if (fast != nullptr) {  // all rows but the tensor's last, whose chunks decode8's wide loads could read past
        r = std::max(r0, std::min(r1, rows - 1));
        if (r > r0) fast(a, r0, r, s.data(), z.data());
      }
#endif
      for (; r < r1; ++r)
        head_row_generic(a, r, s.data() + (r - r0) * groups, z.data() + (r - r0) * groups, buf.data());
    }
  }
  return x_in.scalar_type() == torch::kFloat ? out : out.to(x_in.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while the kernels run: other Python threads (a server's) keep going.
  m.def("binary_lowrank_forward", &binary_lowrank_forward,
        "Packed binary low-rank layer forward on CPU (sign words read directly)",
        py::call_guard<py::gil_scoped_release>());
  m.def("unpack_signs_f32", &unpack_signs_f32, "±1.0 float32 rows from packed sign words",
        py::call_guard<py::gil_scoped_release>());
  m.def("group_head_forward", &group_head_forward,
        "Tied LM head of a group-quantized embedding on CPU (packed codes read directly)",
        py::call_guard<py::gil_scoped_release>());
}
