// keel_loadgen implementation. See loadgen.h for the design; notes here are about mechanics:
//  - One io_context per worker: the client is synchronous, so the context only owns the
//    socket's reactor registration and nothing runs on it.
//  - Timeouts: synchronous Asio reads cannot time out (an SO_RCVTIMEO expiry just makes Asio
//    poll again), so a watchdog thread shuts down the socket of a request past its deadline,
//    which makes the blocked read return an error.
//  - A keep-alive connection the server has closed while idle shows up as EOF/reset on the
//    first write or header read; that request is retried once on a fresh connection (and its
//    start time reset) rather than counted as a server failure.
#include "runtime/tools/loadgen/loadgen.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cerrno>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <mutex>
#include <numbers>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>

extern char** environ;

namespace keel::loadgen {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

struct Target {
  std::string host;
  std::string port;
};

Target parse_url(const std::string& url) {
  const std::string scheme = "http://";
  if (url.rfind(scheme, 0) != 0) throw std::runtime_error("loadgen: only http:// URLs: " + url);
  std::string rest = url.substr(scheme.size());
  rest = rest.substr(0, rest.find('/'));
  size_t colon = rest.rfind(':');
  Target target;
  if (colon == std::string::npos || rest.find(']', colon) != std::string::npos) {
    target.host = rest;
    target.port = "80";
  } else {
    target.host = rest.substr(0, colon);
    target.port = rest.substr(colon + 1);
  }
  if (target.host.size() > 1 && target.host.front() == '[') {
    target.host = target.host.substr(1, target.host.size() - 2);
  }
  if (target.host.empty() || target.port.empty())
    throw std::runtime_error("loadgen: bad URL " + url);
  return target;
}

// Uniform double in [0, 1) from the top 53 bits: std::uniform_real_distribution's output is
// implementation-defined, this is the same everywhere.
double unit_interval(std::mt19937_64& rng) {
  return static_cast<double>(rng() >> 11) * 0x1.0p-53;
}

int uniform_int(std::mt19937_64& rng, int lo, int hi) {
  if (hi <= lo) return lo;
  uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
  return lo + static_cast<int>(rng() % span);  // bias < span/2^64: irrelevant here
}

// Shuts down the sockets of requests past their deadline (see the note at the top).
class Watchdog {
 public:
  Watchdog() : thread_([this] { run(); }) {}
  ~Watchdog() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }
  void arm(int fd, Clock::time_point deadline) {
    std::lock_guard lock(mutex_);
    deadlines_[fd] = deadline;
  }
  // Must be called before the socket is closed, so a reused fd number is never shut down.
  void disarm(int fd) {
    std::lock_guard lock(mutex_);
    deadlines_.erase(fd);
  }

 private:
  void run() {
    std::unique_lock lock(mutex_);
    while (!stopping_) {
      wake_.wait_for(lock, std::chrono::milliseconds(50));
      Clock::time_point now = Clock::now();
      for (auto it = deadlines_.begin(); it != deadlines_.end();) {
        if (it->second <= now) {
          ::shutdown(it->first, SHUT_RDWR);
          it = deadlines_.erase(it);
        } else {
          ++it;
        }
      }
    }
  }
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::map<int, Clock::time_point> deadlines_;
  std::thread thread_;  // last: starts after the members it uses exist
};

// What one SSE stream or JSON body said, accumulated as it arrives.
struct ResponseState {
  bool done = false;  // saw "data: [DONE]"
  std::string error;
  int token_chunks = 0;
  bool first_token_seen = false;
  Clock::time_point first_token_at;
  std::vector<Clock::time_point> token_times;
  bool usage = false;
  int prompt_tokens = 0;
  int completion_tokens = 0;
  std::string id;  // the first "id" seen
};

void read_id(const json& body, ResponseState& state) {
  if (!state.id.empty()) return;
  if (auto id = body.find("id"); id != body.end() && id->is_string())
    state.id = id->get<std::string>();
}

void read_usage(const json& usage, ResponseState& state) {
  if (!usage.is_object()) return;
  state.usage = true;
  state.prompt_tokens = usage.value("prompt_tokens", 0);
  state.completion_tokens = usage.value("completion_tokens", 0);
}

// A chunk carries a token when it has text, or when it is a mid-stream chunk (no
// finish_reason) that is not chat's opening role announcement: a token can decode to empty
// text (an incomplete UTF-8 sequence) and still be a token.
bool carries_token(const json& choice) {
  if (!choice.is_object()) return false;
  if (auto text = choice.find("text"); text != choice.end() && text->is_string())
    if (!text->get<std::string>().empty()) return true;
  if (auto delta = choice.find("delta"); delta != choice.end() && delta->is_object()) {
    auto content = delta->find("content");
    if (content != delta->end() && content->is_string() && !content->get<std::string>().empty())
      return true;
    if (delta->contains("role")) return false;
  }
  auto finish = choice.find("finish_reason");
  return finish == choice.end() || finish->is_null();
}

void handle_event(const std::string& event, Clock::time_point at, ResponseState& state) {
  std::string data;
  std::istringstream lines(event);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("data:", 0) != 0) continue;  // comments, "event:", "id:" lines
    std::string payload = line.substr(5);
    if (!payload.empty() && payload.front() == ' ') payload.erase(0, 1);
    if (!data.empty()) data += '\n';
    data += payload;
  }
  if (data.empty()) return;
  if (data == "[DONE]") {
    state.done = true;
    return;
  }
  json chunk = json::parse(data, nullptr, false);
  if (chunk.is_discarded()) {
    if (state.error.empty()) state.error = "malformed SSE event: " + data.substr(0, 200);
    return;
  }
  if (chunk.contains("error")) {
    if (state.error.empty()) {
      const json& error = chunk["error"];
      state.error = error.is_object() ? error.value("message", error.dump()) : error.dump();
    }
    return;
  }
  read_id(chunk, state);
  if (auto usage = chunk.find("usage"); usage != chunk.end()) read_usage(*usage, state);
  auto choices = chunk.find("choices");
  if (choices == chunk.end() || !choices->is_array() || choices->empty()) return;
  if (!carries_token((*choices)[0])) return;
  ++state.token_chunks;
  state.token_times.push_back(at);
  if (!state.first_token_seen) {
    state.first_token_seen = true;
    state.first_token_at = at;
  }
}

// Splits a byte stream into SSE events ("\n\n"-terminated; "\r" is dropped so CRLF framing
// works too) and hands each complete one to handle_event with the time its last byte came.
class SseSplitter {
 public:
  void feed(const char* bytes, size_t n, Clock::time_point at, ResponseState& state) {
    for (size_t i = 0; i < n; ++i)
      if (bytes[i] != '\r') pending_ += bytes[i];
    size_t end;
    while ((end = pending_.find("\n\n")) != std::string::npos) {
      handle_event(pending_.substr(0, end), at, state);
      pending_.erase(0, end + 2);
    }
  }
  void finish(Clock::time_point at, ResponseState& state) {
    if (!pending_.empty()) handle_event(pending_, at, state);
    pending_.clear();
  }

 private:
  std::string pending_;
};

// Without usage from the server: token ids sent, or for text the whitespace-separated words
// (an approximation; keel and vLLM both report usage when asked).
int sent_prompt_length(const PlannedRequest& planned) {
  if (!planned.text_prompt) return static_cast<int>(planned.prompt.size());
  std::istringstream words(planned.prompt_text);
  int count = 0;
  for (std::string word; words >> word;) ++count;
  return count;
}

std::string request_body(const LoadSpec& spec, const PlannedRequest& planned) {
  json body;
  if (!spec.model.empty()) body["model"] = spec.model;
  if (spec.endpoint.find("chat") != std::string::npos) {
    // Chat has no token-id prompt form: ids become words, so input length is approximate.
    std::string content = planned.prompt_text;
    if (!planned.text_prompt)
      for (int32_t id : planned.prompt)
        content += (content.empty() ? "w" : " w") + std::to_string(id);
    body["messages"] = json::array({{{"role", "user"}, {"content", content}}});
  } else if (planned.text_prompt) {
    body["prompt"] = planned.prompt_text;
  } else {
    body["prompt"] = planned.prompt;
  }
  body["max_tokens"] = planned.max_tokens;
  body["temperature"] = spec.temperature;
  body["stream"] = spec.stream;
  if (spec.stream) body["stream_options"] = {{"include_usage", true}};
  if (spec.ignore_eos) body["ignore_eos"] = true;
  return body.dump();
}

// One worker's client: a keep-alive connection, reopened when needed.
class Client {
 public:
  Client(const std::vector<tcp::endpoint>& endpoints, const Target& target, const LoadSpec& spec,
         Watchdog& watchdog, Clock::time_point t0)
      : endpoints_(endpoints),
        target_(target),
        spec_(spec),
        watchdog_(watchdog),
        t0_(t0),
        socket_(ioc_) {}
  ~Client() { close(); }

  RequestRecord execute(int index, const PlannedRequest& planned) {
    RequestRecord record;
    record.index = index;
    std::string body = request_body(spec_, planned);
    for (int attempt = 0;; ++attempt) {
      bool reused = socket_.is_open();
      Clock::time_point start = Clock::now();
      record = RequestRecord{};
      record.index = index;
      record.start_s = seconds_between(t0_, start);
      bool retryable = false;
      attempt_once(body, planned, start, reused, record, retryable);
      if (!(retryable && attempt == 0)) break;
    }
    return record;
  }

 private:
  void close() {
    if (!socket_.is_open()) return;
    watchdog_.disarm(socket_.native_handle());
    beast::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
    socket_.close(ignored);
    buffer_.clear();
  }

  void fail(RequestRecord& record, Clock::time_point start, std::string error) {
    record.success = false;
    record.error = std::move(error);
    record.e2el_s = seconds_between(start, Clock::now());
    close();
  }

  // `retryable`: the failure looks like a keep-alive connection the server had closed.
  void attempt_once(const std::string& body, const PlannedRequest& planned, Clock::time_point start,
                    bool reused, RequestRecord& record, bool& retryable) {
    beast::error_code ec;
    if (!socket_.is_open()) {
      net::connect(socket_, endpoints_, ec);
      if (ec) return fail(record, start, "connect: " + ec.message());
      socket_.set_option(tcp::no_delay(true), ec);
    }
    Clock::time_point deadline =
        start + std::chrono::duration_cast<Clock::duration>(
                    std::chrono::duration<double>(spec_.request_timeout_s));
    watchdog_.arm(socket_.native_handle(), deadline);

    http::request<http::string_body> request{http::verb::post, spec_.endpoint, 11};
    request.set(http::field::host, target_.host + ":" + target_.port);
    request.set(http::field::content_type, "application/json");
    request.set(http::field::accept, spec_.stream ? "text/event-stream" : "application/json");
    request.keep_alive(true);
    request.body() = body;
    request.prepare_payload();
    http::write(socket_, request, ec);
    if (ec) {
      retryable = reused;
      return fail(record, start, "write: " + ec.message());
    }

    http::response_parser<http::buffer_body> parser;
    // Not boost::none: Boost 1.74 compares Content-Length against the empty optional and
    // reports body_limit for every sized body.
    parser.body_limit(std::numeric_limits<std::uint64_t>::max());
    http::read_header(socket_, buffer_, parser, ec);
    if (ec) {
      retryable = reused && (ec == http::error::end_of_stream || ec == net::error::eof ||
                             ec == net::error::connection_reset);
      return fail(record, start, "read header: " + ec.message());
    }
    record.http_status = parser.get().result_int();
    bool event_stream = parser.get()[http::field::content_type].starts_with("text/event-stream");

    ResponseState state;
    SseSplitter splitter;
    std::string whole_body;  // non-SSE responses (JSON results and error bodies)
    char chunk[16384];
    while (!parser.is_done()) {
      parser.get().body().data = chunk;
      parser.get().body().size = sizeof chunk;
      // read_some, not read: it returns as soon as some bytes were parsed, so each event is
      // timestamped on arrival instead of when the buffer fills.
      http::read_some(socket_, buffer_, parser, ec);
      if (ec == http::error::need_buffer) ec = {};
      if (ec) break;
      size_t n = sizeof chunk - parser.get().body().size;
      if (n == 0) continue;
      Clock::time_point now = Clock::now();
      if (event_stream) {
        splitter.feed(chunk, n, now, state);
      } else {
        whole_body.append(chunk, n);
      }
    }
    Clock::time_point end = Clock::now();
    if (ec) return fail(record, start, "read body: " + ec.message());
    watchdog_.disarm(socket_.native_handle());
    if (!parser.keep_alive()) close();

    record.e2el_s = seconds_between(start, end);
    if (event_stream) splitter.finish(end, state);
    if (record.http_status != 200) {
      std::string text = event_stream ? state.error : whole_body;
      json parsed = json::parse(whole_body, nullptr, false);
      if (!parsed.is_discarded() && parsed.contains("error") && parsed["error"].is_object())
        text = parsed["error"].value("message", text);
      record.error = "HTTP " + std::to_string(record.http_status) + ": " + text.substr(0, 300);
      return;
    }
    if (event_stream) {
      if (!state.error.empty()) {
        record.error = state.error;
        return;
      }
      if (!state.done) {
        record.error = "stream ended without data: [DONE]";
        return;
      }
      record.ttft_s =
          state.first_token_seen ? seconds_between(start, state.first_token_at) : record.e2el_s;
      for (Clock::time_point at : state.token_times)
        record.chunk_times_s.push_back(seconds_between(start, at));
    } else {
      json parsed = json::parse(whole_body, nullptr, false);
      if (parsed.is_discarded() || !parsed.contains("choices")) {
        record.error = parsed.is_discarded() || !parsed.contains("error")
                           ? "response without choices: " + whole_body.substr(0, 300)
                           : parsed["error"].value("message", parsed["error"].dump());
        return;
      }
      read_id(parsed, state);
      if (auto usage = parsed.find("usage"); usage != parsed.end()) read_usage(*usage, state);
      record.ttft_s = record.e2el_s;
    }
    record.usage_reported = state.usage;
    record.response_id = state.id;
    record.prompt_tokens = state.usage ? state.prompt_tokens : sent_prompt_length(planned);
    record.completion_tokens = state.usage ? state.completion_tokens : state.token_chunks;
    record.success = true;
  }

  const std::vector<tcp::endpoint>& endpoints_;
  const Target& target_;
  const LoadSpec& spec_;
  Watchdog& watchdog_;
  Clock::time_point t0_;
  net::io_context ioc_;
  tcp::socket socket_;
  beast::flat_buffer buffer_;
};

// One redraw of the progress line: "\r 37/100 [=======>     ] 37% 2 failed 12.3s" (carriage
// return, no newline until the last, so a terminal shows one updating line).
void print_progress(int finished, int failed, int total, double elapsed_s, bool last) {
  int width = 30;
  int filled = total > 0 ? finished * width / total : width;
  std::ostringstream line;
  line << "\r" << std::setw(6) << finished << "/" << total << " [";
  for (int i = 0; i < width; ++i) line << (i < filled ? '=' : (i == filled ? '>' : ' '));
  line << "] " << std::setw(3) << (total > 0 ? finished * 100 / total : 100) << "% ";
  if (failed > 0) line << failed << " failed ";
  line << std::fixed << std::setprecision(1) << elapsed_s << "s";
  if (last) line << "\n";
  std::cerr << line.str() << std::flush;
}

// The gap before the next arrival: gamma with shape b and scale 1/(rate b), so the mean is
// 1/rate whatever b. b = 1 keeps the plain exponential inverse-CDF draw (one RNG draw per gap)
// so seeded Poisson plans stay what they were before burstiness existed.
double next_gap(std::mt19937_64& rng, const LoadSpec& spec) {
  if (spec.burstiness == 1.0) return -std::log(1.0 - unit_interval(rng)) / spec.request_rate;
  return sample_gamma(rng, spec.burstiness, 1.0 / (spec.request_rate * spec.burstiness));
}

Summary::Stats stats_ms(const std::vector<double>& seconds) {
  Summary::Stats stats;
  if (seconds.empty()) return stats;
  std::vector<double> ms;
  for (double s : seconds) ms.push_back(s * 1e3);
  double sum = 0;
  for (double v : ms) sum += v;
  stats.mean = sum / static_cast<double>(ms.size());
  double squares = 0;
  for (double v : ms) squares += (v - stats.mean) * (v - stats.mean);
  stats.stddev = std::sqrt(squares / static_cast<double>(ms.size()));  // numpy.std: ddof 0
  stats.median = percentile(ms, 50);
  stats.p90 = percentile(ms, 90);
  stats.p99 = percentile(ms, 99);
  stats.p99_9 = percentile(ms, 99.9);
  return stats;
}

}  // namespace

double sample_gamma(std::mt19937_64& rng, double shape, double scale) {
  if (!(shape > 0) || !(scale > 0))
    throw std::runtime_error("loadgen: gamma needs shape, scale > 0");
  // shape < 1: gamma(shape) = gamma(shape + 1) * U^(1/shape) (Marsaglia-Tsang's own remedy).
  double boost = 1.0;
  if (shape < 1.0) {
    boost = std::pow(1.0 - unit_interval(rng), 1.0 / shape);
    shape += 1.0;
  }
  double d = shape - 1.0 / 3.0;
  double c = 1.0 / std::sqrt(9.0 * d);
  for (;;) {
    // Box-Muller: one standard normal from two uniforms (1 - u keeps log away from 0).
    double u1 = 1.0 - unit_interval(rng), u2 = unit_interval(rng);
    double x = std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
    double v = 1.0 + c * x;
    if (v <= 0) continue;
    v = v * v * v;
    double u = 1.0 - unit_interval(rng);
    if (std::log(u) < 0.5 * x * x + d - d * v + d * std::log(v)) return d * v * boost * scale;
  }
}

std::vector<PlannedRequest> load_dataset(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("loadgen: cannot open dataset " + path);
  std::vector<PlannedRequest> out;
  int line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank lines
    std::string where = path + ":" + std::to_string(line_no) + ": ";
    json entry = json::parse(line, nullptr, false);
    if (entry.is_discarded() || !entry.is_object())
      throw std::runtime_error("loadgen: " + where + "not a JSON object");
    PlannedRequest request;
    auto prompt = entry.find("prompt");
    if (prompt == entry.end()) throw std::runtime_error("loadgen: " + where + "no \"prompt\"");
    if (prompt->is_string()) {
      request.text_prompt = true;
      request.prompt_text = prompt->get<std::string>();
    } else if (prompt->is_array() && !prompt->empty()) {
      for (const json& id : *prompt) {
        if (!id.is_number_integer())
          throw std::runtime_error("loadgen: " + where + "\"prompt\" ids must be integers");
        request.prompt.push_back(id.get<int32_t>());
      }
    } else {
      throw std::runtime_error("loadgen: " + where +
                               "\"prompt\" must be a string or a non-empty list of token ids");
    }
    auto output_len = entry.find("output_len");
    if (output_len == entry.end() || !output_len->is_number_integer() ||
        output_len->get<int64_t>() < 1)
      throw std::runtime_error("loadgen: " + where + "\"output_len\" must be an integer >= 1");
    request.max_tokens = output_len->get<int>();
    out.push_back(std::move(request));
  }
  if (out.empty()) throw std::runtime_error("loadgen: dataset " + path + " has no requests");
  return out;
}

std::vector<PlannedRequest> plan_requests(const LoadSpec& spec) {
  if (spec.num_prompts < 0) throw std::runtime_error("loadgen: num_prompts < 0");
  if (spec.request_rate > 0 && !(spec.burstiness > 0))
    throw std::runtime_error("loadgen: burstiness must be > 0");
  if (!spec.dataset.empty()) {
    std::vector<PlannedRequest> entries = load_dataset(spec.dataset);
    std::mt19937_64 rng(spec.seed);
    std::vector<PlannedRequest> plan;
    double arrival = 0.0;
    for (int i = 0; i < spec.num_prompts; ++i) {
      plan.push_back(entries[static_cast<size_t>(i) % entries.size()]);
      plan.back().arrival_s = arrival;
      if (spec.request_rate > 0) arrival += next_gap(rng, spec);
    }
    return plan;
  }
  if (spec.input_len_min < 1 || spec.input_len_max < spec.input_len_min)
    throw std::runtime_error("loadgen: need 1 <= input_len_min <= input_len_max");
  if (spec.output_len_min < 1 || spec.output_len_max < spec.output_len_min)
    throw std::runtime_error("loadgen: need 1 <= output_len_min <= output_len_max");
  if (spec.vocab_hint < 1) throw std::runtime_error("loadgen: vocab_hint < 1");
  std::mt19937_64 rng(spec.seed);
  std::vector<PlannedRequest> plan(static_cast<size_t>(spec.num_prompts));
  double arrival = 0.0;
  for (PlannedRequest& request : plan) {
    int input_len = uniform_int(rng, spec.input_len_min, spec.input_len_max);
    request.max_tokens = uniform_int(rng, spec.output_len_min, spec.output_len_max);
    for (int i = 0; i < input_len; ++i)
      request.prompt.push_back(uniform_int(rng, 0, spec.vocab_hint - 1));
    // As in vLLM's benchmark_serving, the first request goes at once and each later one one
    // gap after its predecessor.
    request.arrival_s = arrival;
    if (spec.request_rate > 0) arrival += next_gap(rng, spec);
  }
  return plan;
}

LoadResult run_load(const LoadSpec& spec) {
  if (spec.request_rate <= 0 && spec.concurrency < 1)
    throw std::runtime_error("loadgen: need concurrency >= 1 or request_rate > 0");
  LoadResult result;
  result.spec = spec;
  std::vector<PlannedRequest> plan = plan_requests(spec);
  Target target = parse_url(spec.url);
  std::vector<tcp::endpoint> endpoints;
  {
    net::io_context ioc;
    tcp::resolver resolver(ioc);
    for (const auto& entry : resolver.resolve(target.host, target.port))
      endpoints.push_back(entry.endpoint());
  }
  int workers =
      spec.request_rate > 0
          ? (spec.max_workers > 0 ? std::min(spec.num_prompts, spec.max_workers) : spec.num_prompts)
          : std::min(spec.num_prompts, spec.concurrency);
  result.records.resize(plan.size());
  std::atomic<int> next{0};
  std::atomic<int> finished{0}, failed{0};
  Watchdog watchdog;
  Clock::time_point t0 = Clock::now();
  {
    // Declared before the workers so it is joined after them and prints the final state.
    std::jthread progress;
    if (spec.progress)
      progress = std::jthread([&](std::stop_token stop) {
        for (bool last = false; !last;) {
          last = stop.stop_requested();
          print_progress(finished, failed, static_cast<int>(plan.size()),
                         seconds_between(t0, Clock::now()), last);
          if (!last) std::this_thread::sleep_for(std::chrono::milliseconds(200));
        }
      });
    std::vector<std::jthread> threads;
    for (int w = 0; w < workers; ++w) {
      threads.emplace_back([&] {
        Client client(endpoints, target, spec, watchdog, t0);
        for (int i = next++; i < static_cast<int>(plan.size()); i = next++) {
          const PlannedRequest& planned = plan[static_cast<size_t>(i)];
          if (planned.arrival_s > 0)
            std::this_thread::sleep_until(t0 +
                                          std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(planned.arrival_s)));
          result.records[static_cast<size_t>(i)] = client.execute(i, planned);
          if (!result.records[static_cast<size_t>(i)].success) ++failed;
          ++finished;
        }
      });
    }
    for (std::jthread& thread : threads) thread.join();
    if (progress.joinable()) progress.request_stop();
  }
  double duration = seconds_between(t0, Clock::now());
  result.summary = summarize(result.records, duration);
  return result;
}

double percentile(std::vector<double> values, double q) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  double position = std::clamp(q, 0.0, 100.0) / 100.0 * static_cast<double>(values.size() - 1);
  size_t lo = static_cast<size_t>(std::floor(position));
  size_t hi = std::min(lo + 1, values.size() - 1);
  double fraction = position - static_cast<double>(lo);
  return values[lo] + fraction * (values[hi] - values[lo]);
}

Slo parse_slo(const std::vector<std::string>& items) {
  Slo slo;
  for (const std::string& item : items) {
    size_t colon = item.find(':');
    std::string key = item.substr(0, colon);
    double value = 0;
    try {
      size_t used = 0;
      if (colon == std::string::npos) throw std::invalid_argument("no value");
      value = std::stod(item.substr(colon + 1), &used);
      if (used != item.size() - colon - 1) throw std::invalid_argument("trailing text");
    } catch (const std::exception&) {
      throw std::runtime_error("goodput: expected KEY:MS (e.g. ttft:300), got '" + item + "'");
    }
    if (!(value > 0)) throw std::runtime_error("goodput: " + key + " must be > 0 ms");
    if (key == "ttft") {
      slo.ttft_ms = value;
    } else if (key == "tpot") {
      slo.tpot_ms = value;
    } else if (key == "e2el") {
      slo.e2el_ms = value;
    } else {
      throw std::runtime_error("goodput: unknown SLO '" + key + "' (ttft, tpot, e2el)");
    }
  }
  return slo;
}

namespace {
double tpot_s(const RequestRecord& record) {
  return record.completion_tokens > 1
             ? (record.e2el_s - record.ttft_s) / (record.completion_tokens - 1)
             : 0.0;
}
}  // namespace

bool meets_slo(const RequestRecord& record, const Slo& slo) {
  if (!record.success) return false;
  // vLLM compares SLO >= measured (both in seconds): equality is good.
  if (slo.ttft_ms && record.ttft_s * 1e3 > *slo.ttft_ms) return false;
  if (slo.tpot_ms && tpot_s(record) * 1e3 > *slo.tpot_ms) return false;
  if (slo.e2el_ms && record.e2el_s * 1e3 > *slo.e2el_ms) return false;
  return true;
}

Summary summarize(const std::vector<RequestRecord>& records, double duration_s, const Slo& slo) {
  Summary summary;
  summary.duration_s = duration_s;
  std::vector<double> ttft, tpot, itl, e2el;
  std::set<std::string> seen_errors;
  for (const RequestRecord& record : records) {
    if (!record.success) {
      ++summary.failed;
      if (summary.errors.size() < 8 && seen_errors.insert(record.error).second)
        summary.errors.push_back(record.error);
      continue;
    }
    ++summary.completed;
    if (slo.any() && meets_slo(record, slo)) ++summary.good_completed;
    summary.total_input_tokens += record.prompt_tokens;
    summary.total_output_tokens += record.completion_tokens;
    ttft.push_back(record.ttft_s);
    e2el.push_back(record.e2el_s);
    // The first token's time is TTFT; TPOT spreads the rest over the remaining tokens.
    if (record.completion_tokens > 1)
      tpot.push_back((record.e2el_s - record.ttft_s) / (record.completion_tokens - 1));
    for (size_t i = 1; i < record.chunk_times_s.size(); ++i)
      itl.push_back(record.chunk_times_s[i] - record.chunk_times_s[i - 1]);
  }
  if (slo.any())
    summary.request_goodput = duration_s > 0 ? summary.good_completed / duration_s : 0.0;
  if (duration_s > 0) {
    summary.request_throughput = summary.completed / duration_s;
    summary.output_throughput = static_cast<double>(summary.total_output_tokens) / duration_s;
    summary.total_token_throughput =
        static_cast<double>(summary.total_input_tokens + summary.total_output_tokens) / duration_s;
  }
  summary.ttft_ms = stats_ms(ttft);
  summary.tpot_ms = stats_ms(tpot);
  summary.itl_ms = stats_ms(itl);
  summary.e2el_ms = stats_ms(e2el);
  return summary;
}

json summary_json(const Summary& summary) {
  json out = {{"completed", summary.completed},
              {"failed", summary.failed},
              {"duration", summary.duration_s},
              {"total_input_tokens", summary.total_input_tokens},
              {"total_output_tokens", summary.total_output_tokens},
              {"request_throughput", summary.request_throughput},
              {"output_throughput", summary.output_throughput},
              {"total_token_throughput", summary.total_token_throughput},
              {"request_goodput",
               summary.request_goodput ? json(*summary.request_goodput) : json(nullptr)}};
  auto add = [&](const std::string& name, const Summary::Stats& stats) {
    out["mean_" + name + "_ms"] = stats.mean;
    out["median_" + name + "_ms"] = stats.median;
    out["std_" + name + "_ms"] = stats.stddev;
    out["p90_" + name + "_ms"] = stats.p90;
    out["p99_" + name + "_ms"] = stats.p99;
    out["p99.9_" + name + "_ms"] = stats.p99_9;
  };
  add("ttft", summary.ttft_ms);
  add("tpot", summary.tpot_ms);
  add("itl", summary.itl_ms);
  add("e2el", summary.e2el_ms);
  out["errors"] = summary.errors;
  return out;
}

json records_json(const std::vector<RequestRecord>& records) {
  json input_lens = json::array(), output_lens = json::array(), ttfts = json::array(),
       itls = json::array(), errors = json::array(), ids = json::array(), e2els = json::array(),
       tpots = json::array(), starts = json::array(), success = json::array();
  for (const RequestRecord& record : records) {
    bool ok = record.success;
    input_lens.push_back(ok ? record.prompt_tokens : 0);
    output_lens.push_back(ok ? record.completion_tokens : 0);
    ttfts.push_back(ok ? record.ttft_s : 0.0);
    json gaps = json::array();
    if (ok)
      for (size_t i = 1; i < record.chunk_times_s.size(); ++i)
        gaps.push_back(record.chunk_times_s[i] - record.chunk_times_s[i - 1]);
    itls.push_back(std::move(gaps));
    errors.push_back(record.error);
    ids.push_back(record.response_id);
    e2els.push_back(ok ? record.e2el_s : 0.0);
    tpots.push_back(ok ? tpot_s(record) : 0.0);
    starts.push_back(record.start_s);
    success.push_back(ok);
  }
  return {
      {"input_lens", input_lens}, {"output_lens", output_lens}, {"ttfts", ttfts}, {"itls", itls},
      {"errors", errors},         {"request_ids", ids},         {"e2els", e2els}, {"tpots", tpots},
      {"start_times", starts},    {"success", success}};
}

json spec_json(const LoadSpec& spec) {
  return {{"url", spec.url},
          {"endpoint", spec.endpoint},
          {"model", spec.model},
          {"concurrency", spec.request_rate > 0 ? 0 : spec.concurrency},
          {"request_rate", spec.request_rate},
          {"burstiness", spec.burstiness},
          {"dataset", spec.dataset},
          {"num_prompts", spec.num_prompts},
          {"input_len", {spec.input_len_min, spec.input_len_max}},
          {"output_len", {spec.output_len_min, spec.output_len_max}},
          {"vocab_hint", spec.vocab_hint},
          {"stream", spec.stream},
          {"temperature", spec.temperature},
          {"ignore_eos", spec.ignore_eos},
          {"seed", spec.seed}};
}

std::string summary_table(const Summary& summary, const std::string& title) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(2);
  auto row = [&](const std::string& name, auto value) {
    out << std::left << std::setw(40) << name << std::right << std::setw(12) << value << "\n";
  };
  out << "============ " << title << " ============\n";
  row("Successful requests:", summary.completed);
  row("Failed requests:", summary.failed);
  row("Benchmark duration (s):", summary.duration_s);
  row("Total input tokens:", summary.total_input_tokens);
  row("Total generated tokens:", summary.total_output_tokens);
  row("Request throughput (req/s):", summary.request_throughput);
  row("Output token throughput (tok/s):", summary.output_throughput);
  if (summary.request_goodput) row("Request goodput (req/s):", *summary.request_goodput);
  row("Total token throughput (tok/s):", summary.total_token_throughput);
  auto block = [&](const std::string& label, const std::string& name, const Summary::Stats& stats) {
    out << "---------- " << label << " ----------\n";
    row("Mean " + name + " (ms):", stats.mean);
    row("Median " + name + " (ms):", stats.median);
    row("P90 " + name + " (ms):", stats.p90);
    row("P99 " + name + " (ms):", stats.p99);
    row("P99.9 " + name + " (ms):", stats.p99_9);
  };
  block("Time to First Token", "TTFT", summary.ttft_ms);
  block("Time per Output Token (excl. 1st token)", "TPOT", summary.tpot_ms);
  block("Inter-token Latency", "ITL", summary.itl_ms);
  block("End-to-end Latency", "E2EL", summary.e2el_ms);
  for (const std::string& error : summary.errors) out << "error: " << error << "\n";
  return out.str();
}

// ---- ServerProcess ----

std::vector<ScheduledRun> abba_schedule(int rounds) {
  std::vector<ScheduledRun> runs;
  for (int round = 0; round < rounds; ++round) {
    int first = round % 2;  // A first in even rounds, B first in odd ones
    runs.push_back({round, first, 0});
    runs.push_back({round, 1 - first, 1});
  }
  return runs;
}

std::string parse_listening_url(const std::string& line) {
  const std::string marker = "listening on http://";
  size_t at = line.find(marker);
  if (at == std::string::npos) return "";
  size_t begin = at + marker.size() - std::string("http://").size();
  size_t end = begin + 7;
  while (end < line.size() && !std::isspace(static_cast<unsigned char>(line[end])) &&
         line[end] != '/')
    ++end;
  std::string url = line.substr(begin, end - begin);
  // Trailing punctuation ("...:8000.") is not part of the port.
  while (!url.empty() && !std::isdigit(static_cast<unsigned char>(url.back()))) url.pop_back();
  size_t colon = url.rfind(':');
  if (colon == std::string::npos || colon < 7 || colon + 1 >= url.size()) return "";
  return url;
}

ServerProcess::ServerProcess(std::vector<std::string> argv) : argv_(std::move(argv)) {}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) stop(std::chrono::milliseconds(10000));
}

std::string ServerProcess::start(std::chrono::milliseconds startup_timeout) {
  if (pid_ > 0) throw std::runtime_error("ServerProcess: already started");
  if (argv_.empty()) throw std::runtime_error("ServerProcess: empty command");
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0)
    throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  // dup2 clears O_CLOEXEC on the child's stdout; the originals close on exec.
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  std::vector<char*> args;
  for (std::string& arg : argv_) args.push_back(arg.data());
  args.push_back(nullptr);
  int rc = ::posix_spawnp(&pid_, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(fds[1]);
  if (rc != 0) {
    ::close(fds[0]);
    pid_ = -1;
    throw std::runtime_error("spawn " + argv_[0] + ": " + std::strerror(rc));
  }
  stdout_fd_ = fds[0];

  auto deadline = Clock::now() + startup_timeout;
  std::string pending;
  std::string url;
  while (url.empty()) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      stop(std::chrono::milliseconds(5000));
      throw std::runtime_error(argv_[0] + " did not print 'listening on http://...' within " +
                               std::to_string(startup_timeout.count()) + " ms");
    }
    pollfd poll_fd{stdout_fd_, POLLIN, 0};
    int ready = ::poll(&poll_fd, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
    if (ready <= 0) continue;
    char bytes[4096];
    ssize_t n = ::read(stdout_fd_, bytes, sizeof bytes);
    if (n <= 0) {
      int status = stop(std::chrono::milliseconds(5000));
      throw std::runtime_error(argv_[0] + " exited (status " + std::to_string(status) +
                               ") before announcing its port");
    }
    pending.append(bytes, static_cast<size_t>(n));
    size_t newline;
    while (url.empty() && (newline = pending.find('\n')) != std::string::npos) {
      std::string line = pending.substr(0, newline);
      pending.erase(0, newline + 1);
      std::cerr << "[server " << pid_ << "] " << line << "\n";
      url = parse_listening_url(line);
    }
  }
  // Keep draining: a child writing to a full pipe would block. Polling with a timeout lets
  // stop() end the thread even if a grandchild still holds the pipe open.
  stop_draining_ = false;
  drainer_ = std::thread([this, fd = stdout_fd_, pid = pid_, line = std::move(pending)]() mutable {
    for (;;) {
      pollfd poll_fd{fd, POLLIN, 0};
      int ready = ::poll(&poll_fd, 1, 100);
      if (ready < 0 && errno != EINTR) return;
      if (ready <= 0) {
        if (stop_draining_) return;
        continue;
      }
      char bytes[4096];
      ssize_t n = ::read(fd, bytes, sizeof bytes);
      if (n <= 0) return;
      line.append(bytes, static_cast<size_t>(n));
      size_t newline;
      while ((newline = line.find('\n')) != std::string::npos) {
        std::cerr << "[server " << pid << "] " << line.substr(0, newline) << "\n";
        line.erase(0, newline + 1);
      }
    }
  });
  return url;
}

int ServerProcess::stop(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return -1;
  ::kill(pid_, SIGTERM);
  auto deadline = Clock::now() + timeout;
  int status = 0;
  int result = -1;
  for (;;) {
    pid_t done = ::waitpid(pid_, &status, WNOHANG);
    if (done == pid_) {
      result = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      break;
    }
    if (done < 0 && errno != EINTR) break;
    if (Clock::now() >= deadline) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status, 0);
      result = -1;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  pid_ = -1;
  stop_draining_ = true;
  if (drainer_.joinable()) drainer_.join();
  if (stdout_fd_ >= 0) ::close(stdout_fd_);
  stdout_fd_ = -1;
  return result;
}

HttpResponse http_get(const std::string& url, double timeout_s) {
  Target target = parse_url(url);
  std::string rest = url.substr(std::string("http://").size());
  size_t slash = rest.find('/');
  std::string path = slash == std::string::npos ? "/" : rest.substr(slash);
  net::io_context ioc;
  tcp::resolver resolver(ioc);
  beast::error_code ec;
  auto endpoints = resolver.resolve(target.host, target.port, ec);
  if (ec) throw std::runtime_error("GET " + url + ": resolve: " + ec.message());
  tcp::socket socket(ioc);
  net::connect(socket, endpoints, ec);
  if (ec) throw std::runtime_error("GET " + url + ": connect: " + ec.message());
  // The same watchdog as the load's requests: synchronous reads cannot time out by themselves.
  Watchdog watchdog;
  watchdog.arm(socket.native_handle(),
               Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                  std::chrono::duration<double>(timeout_s)));
  http::request<http::empty_body> request{http::verb::get, path, 11};
  request.set(http::field::host, target.host + ":" + target.port);
  request.set(http::field::accept, "application/json");
  request.keep_alive(false);
  http::write(socket, request, ec);
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(std::numeric_limits<std::uint64_t>::max());  // see attempt_once
  if (!ec) http::read(socket, buffer, parser, ec);
  watchdog.disarm(socket.native_handle());
  if (ec) throw std::runtime_error("GET " + url + ": " + ec.message());
  socket.shutdown(tcp::socket::shutdown_both, ec);
  return {static_cast<int>(parser.get().result_int()), parser.get().body()};
}

}  // namespace keel::loadgen
