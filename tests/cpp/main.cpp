// Calls pyprotoclip::similarity_cross_entropy from C++ through the dispatcher, on CPU, and checks it
// against the same loss computed with plain ATen ops. Exit code 0 on success.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>

extern "C" const char* pyprotoclip_torch_version();  // also keeps the library linked (registration)

int main() {
  std::printf("pyprotoclip built against torch %s\n", pyprotoclip_torch_version());
  torch::manual_seed(0);
  const auto q = torch::nn::functional::normalize(torch::randn({37, 16}), torch::nn::functional::NormalizeFuncOptions().dim(1));
  const auto k = torch::nn::functional::normalize(torch::randn({53, 16}), torch::nn::functional::NormalizeFuncOptions().dim(1));
  const auto targets = torch::randint(0, 53, {37}, torch::kLong);
  const auto scale = torch::tensor(10.0f);

  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("pyprotoclip::similarity_cross_entropy", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&)>();
  const auto [loss, lse] = op.call(q, k, targets, scale);

  const auto logits = scale * q.matmul(k.t());
  const auto expected = torch::logsumexp(logits, 1) - logits.gather(1, targets.view({-1, 1})).squeeze(1);
  const double err = (loss - expected).abs().max().item<double>();
  std::printf("similarity_cross_entropy: max |error| vs ATen = %.3g\n", err);
  if (!(err < 1e-5)) {
    std::printf("FAILED\n");
    return 1;
  }
  std::printf("OK\n");
  return 0;
}
