#include "runtime/common/logging.h"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include "kernels/base/check.h"

namespace keel {

namespace {

class RankFlag : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg&, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    int rank = current_rank();
    std::string text = rank < 0 ? "main" : "r" + std::to_string(rank);
    dest.append(text.data(), text.data() + text.size());
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return spdlog::details::make_unique<RankFlag>();
  }
};

}  // namespace

void init_logging(bool verbose) {
  auto logger = spdlog::stderr_color_mt("keel");
  auto formatter = std::make_unique<spdlog::pattern_formatter>();
  formatter->add_flag<RankFlag>('R').set_pattern("[keel %R %l] %v");
  logger->set_formatter(std::move(formatter));
  logger->set_level(verbose ? spdlog::level::info : spdlog::level::warn);
  spdlog::set_default_logger(logger);
}

}  // namespace keel
