// Greedy generation from token ids with llama.cpp's library, for bench/llama_cpp/compare: the
// same prompt ids keel is given, argmax of the last position's logits each step (lowest id on
// a tie, as keel's sampler), the generated ids printed space-separated on one line.
// Built by compare against the llama.cpp tree it builds from the llama-cpp-python sdist; not part
// of keel's build.
//   usage: greedy MODEL.gguf N_TOKENS THREADS ID [ID ...]
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "llama.h"

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: greedy MODEL.gguf N_TOKENS THREADS ID [ID ...]\n");
    return 2;
  }
  const int num_tokens = std::atoi(argv[2]);
  const int threads = std::atoi(argv[3]);
  std::vector<llama_token> prompt;
  for (int i = 4; i < argc; ++i) prompt.push_back(static_cast<llama_token>(std::atoi(argv[i])));
  llama_backend_init();
  llama_model* model = llama_model_load_from_file(argv[1], llama_model_default_params());
  if (model == nullptr) {
    std::fprintf(stderr, "greedy: cannot load %s\n", argv[1]);
    return 1;
  }
  llama_context_params params = llama_context_default_params();
  params.n_ctx = static_cast<uint32_t>(prompt.size() + num_tokens + 8);
  params.n_batch = params.n_ctx;
  params.n_threads = threads;
  params.n_threads_batch = threads;
  llama_context* context = llama_init_from_model(model, params);
  const int vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
  std::vector<llama_token> feed = prompt;
  for (int step = 0; step < num_tokens; ++step) {
    if (llama_decode(context,
                     llama_batch_get_one(feed.data(), static_cast<int32_t>(feed.size())))) {
      std::fprintf(stderr, "greedy: llama_decode failed at step %d\n", step);
      return 1;
    }
    const float* logits = llama_get_logits_ith(context, -1);
    int best = 0;
    for (int id = 1; id < vocab; ++id)
      if (logits[id] > logits[best]) best = id;
    std::printf(step ? " %d" : "%d", best);
    feed.assign(1, best);
  }
  std::printf("\n");
  llama_free(context);
  llama_model_free(model);
  return 0;
}
