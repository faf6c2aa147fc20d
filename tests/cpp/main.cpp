// Calls the installed C++ API of pyprotoclip (one entry point per op, declared in
// <pyprotoclip/<stem>.h> and dispatched to the CPU kernels) and checks each result against the same
// quantity computed with plain ATen ops. Exit code 0 on success.
#include <pyprotoclip/infonce.h>
#include <pyprotoclip/kmeans.h>
#include <pyprotoclip/proto_softmax.h>
#include <torch/torch.h>

#include <cstdio>
#include <optional>

extern "C" const char* pyprotoclip_torch_version();

namespace {

int failures = 0;

void check(const char* what, const at::Tensor& got, const at::Tensor& want, double tol) {
  const bool same_shape = got.sizes() == want.sizes();
  const double err = same_shape ? (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>() : -1.0;
  const bool ok = same_shape && err <= tol;
  std::printf("%-40s max |error| vs ATen = %.3g %s\n", what, err, ok ? "ok" : "FAILED");
  if (!ok) ++failures;
}

at::Tensor unit_rows(int64_t n, int64_t d) {
  return torch::nn::functional::normalize(torch::randn({n, d}), torch::nn::functional::NormalizeFuncOptions().dim(1));
}

}  // namespace

int main() {
  std::printf("pyprotoclip built against torch %s\n", pyprotoclip_torch_version());
  torch::manual_seed(0);

  // similarity cross-entropy: per-row lse_i - S[i, t_i] of S = scale q k^T
  const auto q = unit_rows(37, 16), k = unit_rows(53, 16);
  const auto targets = torch::randint(0, 53, {37}, torch::kLong);
  const auto scale = torch::tensor(10.0f);
  const auto [loss, lse] = pyprotoclip::similarity_cross_entropy(q, k, targets, scale);
  const auto logits = scale * q.matmul(k.t());
  check("similarity_cross_entropy loss", loss,
        torch::logsumexp(logits, 1) - logits.gather(1, targets.view({-1, 1})).squeeze(1), 1e-5);
  check("similarity_cross_entropy lse", lse, torch::logsumexp(logits, 1), 1e-5);

  // prototype softmax, hard targets: -log softmax_j(F_i.P_j / tau)[t_i], and the assignment probabilities
  const auto features = unit_rows(29, 8), prototypes = unit_rows(41, 8);
  const auto index = torch::randint(0, 41, {29}, torch::kLong);
  const auto tau = torch::tensor(0.1f);
  const auto [proto_loss, proto_lse, teacher_lse] = pyprotoclip::proto_softmax_loss(
      features, prototypes, tau, index, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
  const auto log_p = torch::log_softmax(features.matmul(prototypes.t()) / tau, 1);
  check("proto_softmax_loss loss", proto_loss, -log_p.gather(1, index.view({-1, 1})).squeeze(1), 1e-5);
  check("proto_assign", pyprotoclip::proto_assign(features, prototypes, tau), log_p.exp(), 1e-6);
  if (teacher_lse.numel() != 0) {
    std::printf("proto_softmax_loss: expected an empty teacher_lse without a teacher, got %lld values\n",
                static_cast<long long>(teacher_lse.numel()));
    ++failures;
  }

  // k-means update (l2): nearest centroid, its squared distance, per-centroid sums and counts
  auto x = torch::randn({200, 6});
  const auto centroids = torch::randn({7, 6});
  const auto [assign, score, sums, counts] = pyprotoclip::kmeans_update(x, centroids, std::nullopt, "l2");
  const auto [best, want_assign] = torch::cdist(x, centroids).square().min(1);
  check("kmeans_update assign", assign, want_assign, 0.0);
  check("kmeans_update score", score, best, 1e-4);
  check("kmeans_update sums", sums, torch::zeros({7, 6}).index_add_(0, want_assign, x), 1e-4);
  check("kmeans_update counts", counts, torch::zeros({7}).index_add_(0, want_assign, torch::ones({200})), 0.0);

  std::printf(failures == 0 ? "OK\n" : "FAILED\n");
  return failures == 0 ? 0 : 1;
}
