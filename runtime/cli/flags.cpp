#include "runtime/cli/flags.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>

namespace keel::flags {
namespace {

// Whole numbers print exactly (2147483647, not 2.14748e+09); others in the shortest usual form.
std::string format_number(double value) {
  if (value == std::floor(value) && std::fabs(value) < 1e18)
    return std::to_string(static_cast<int64_t>(value));
  std::ostringstream out;
  out << value;
  return out.str();
}

// Names the bound the value broke; bounds are text so that integers print exactly.
[[noreturn]] void throw_below(std::string_view flag, std::string_view text,
                              const std::string& min) {
  throw UsageError(detail::concat(flag, ": '", text, "' must be >= ", min));
}
[[noreturn]] void throw_above(std::string_view flag, std::string_view text,
                              const std::string& max) {
  throw UsageError(detail::concat(flag, ": '", text, "' must be <= ", max));
}

bool starts_with_dashes(std::string_view text) {
  return text.rfind("--", 0) == 0;
}

}  // namespace

namespace {

// std::from_chars over the whole of `text`, a leading '+' allowed (as strtol allows it);
// errc::invalid_argument unless all of it is one number.
template <typename T>
std::errc parse_whole(std::string_view text, T& value) {
  if (text.size() > 1 && text[0] == '+' && text[1] != '-') text.remove_prefix(1);
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || end != text.data() + text.size()) return std::errc::invalid_argument;
  return error;
}

}  // namespace

int64_t parse_integer(std::string_view flag, std::string_view text, int64_t min, int64_t max) {
  int64_t value = 0;
  const std::errc error = parse_whole(text, value);
  if (error == std::errc::result_out_of_range) {
    if (text.find('-') != std::string_view::npos) throw_below(flag, text, std::to_string(min));
    throw_above(flag, text, std::to_string(max));
  }
  if (error != std::errc()) {
    // Say which integers are wanted where the bound makes it a familiar kind.
    const char* kind = min == 0   ? "a non-negative integer"
                       : min == 1 ? "a positive integer"
                                  : "an integer";
    throw UsageError(detail::concat(flag, ": '", text, "' is not ", kind));
  }
  if (value < min) throw_below(flag, text, std::to_string(min));
  if (value > max) throw_above(flag, text, std::to_string(max));
  return value;
}

double parse_number(std::string_view flag, std::string_view text, double min, double max) {
  double value = 0;
  if (parse_whole(text, value) != std::errc() || !std::isfinite(value))
    throw UsageError(detail::concat(flag, ": '", text, "' is not a number"));
  if (value < min) throw_below(flag, text, format_number(min));
  if (value > max) throw_above(flag, text, format_number(max));
  return value;
}

Flag& Flag::range(double min, double max) {
  min_ = min;
  max_ = max;
  min_exclusive_ = false;
  return *this;
}

Flag& Flag::above(double min) {
  min_ = min;
  min_exclusive_ = true;
  return *this;
}

double Flag::store_number(const std::string& text) const {
  const double value = parse_number(name_, text, min_exclusive_ ? -INFINITY : min_, max_);
  if (min_exclusive_ && value <= min_)
    throw UsageError(detail::concat(name_, ": '", text, "' must be > ", format_number(min_)));
  return value;
}

Flag& Flag::shown_default(std::string text) {
  default_text_ = std::move(text);
  return *this;
}

Flag& Flag::required() {
  required_ = true;
  return *this;
}

Flag& Flag::on_set(std::function<void()> action) {
  on_set_ = std::move(action);
  return *this;
}

FlagSet::FlagSet(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

Flag& FlagSet::add(std::string name, std::string metavar, std::string help, Flag::Kind kind,
                   std::string default_text) {
  if (!starts_with_dashes(name) || find(name) != nullptr)
    throw std::logic_error("flag '" + name + "' registered twice or without leading --");
  auto flag = std::make_unique<Flag>();
  flag->name_ = std::move(name);
  flag->metavar_ = std::move(metavar);
  flag->help_ = std::move(help);
  flag->kind_ = kind;
  flag->default_text_ = std::move(default_text);
  flags_.push_back(std::move(flag));
  return *flags_.back();
}

Flag& FlagSet::add_string(std::string name, std::string* target, std::string metavar,
                          std::string help) {
  Flag& flag =
      add(std::move(name), std::move(metavar), std::move(help), Flag::Kind::kValue, *target);
  flag.store_ = [target](const Flag&, const std::string& text) { *target = text; };
  return flag;
}

Flag& FlagSet::add_double(std::string name, double* target, std::string metavar, std::string help) {
  Flag& flag = add(std::move(name), std::move(metavar), std::move(help), Flag::Kind::kValue,
                   format_number(*target));
  flag.numeric_ = true;
  flag.store_ = [target](const Flag& self, const std::string& text) {
    *target = self.store_number(text);
  };
  return flag;
}

Flag& FlagSet::add_double_list(std::string name, std::vector<double>* target, std::string metavar,
                               std::string help) {
  return add_list(
      std::move(name), target, std::move(metavar), std::move(help), format_number,
      [](const Flag& self, const std::string& item) { return self.store_number(item); });
}

Flag& FlagSet::add_switch(std::string name, bool* target, std::string help, bool value_when_given) {
  Flag& flag = add(std::move(name), "", std::move(help), Flag::Kind::kSwitch, "");
  flag.store_ = [target, value_when_given](const Flag&, const std::string&) {
    *target = value_when_given;
  };
  return flag;
}

Flag& FlagSet::add_choice(std::string name, std::string* target, std::vector<std::string> choices,
                          std::string help) {
  std::string metavar;
  for (const std::string& choice : choices) metavar += (metavar.empty() ? "" : "|") + choice;
  Flag& flag =
      add(std::move(name), std::move(metavar), std::move(help), Flag::Kind::kValue, *target);
  flag.store_ = [target, choices = std::move(choices)](const Flag& self, const std::string& text) {
    for (const std::string& choice : choices)
      if (text == choice) {
        *target = text;
        return;
      }
    std::string listed;
    for (const std::string& choice : choices) listed += (listed.empty() ? "" : ", ") + choice;
    throw UsageError(detail::concat(self.name_, ": '", text, "' is not one of ", listed));
  };
  return flag;
}

Flag& FlagSet::add_repeated(std::string name, std::vector<std::string>* target, std::string metavar,
                            std::string help) {
  Flag& flag = add(std::move(name), std::move(metavar), std::move(help), Flag::Kind::kRepeated, "");
  flag.store_ = [target](const Flag&, const std::string& text) { target->push_back(text); };
  return flag;
}

Flag& FlagSet::add_words(std::string name, std::vector<std::string>* target, std::string metavar,
                         std::string help) {
  Flag& flag = add(std::move(name), std::move(metavar), std::move(help), Flag::Kind::kWords, "");
  flag.store_ = [target](const Flag&, const std::string& text) { target->push_back(text); };
  return flag;
}

void FlagSet::add_positionals(std::vector<std::string>* target, std::string metavar) {
  positionals_ = target;
  positional_metavar_ = std::move(metavar);
}

void FlagSet::add_alias(std::string alias, std::string_view flag_name) {
  Flag* flag = find(flag_name);
  if (flag == nullptr || !starts_with_dashes(alias) || find(alias) != nullptr)
    throw std::logic_error("alias '" + alias + "' of '" + std::string(flag_name) +
                           "': no such flag, no leading --, or the name is taken");
  flag->aliases_.push_back(std::move(alias));
}

Flag* FlagSet::find(std::string_view name) const {
  for (const auto& flag : flags_) {
    if (flag->name_ == name) return flag.get();
    for (const std::string& alias : flag->aliases_)
      if (alias == name) return flag.get();
  }
  return nullptr;
}

bool FlagSet::given(std::string_view name) const {
  const Flag* flag = find(name);
  if (flag == nullptr) throw std::logic_error("given(): no flag " + std::string(name));
  return flag->given_ > 0;
}

std::vector<std::string> FlagSet::split_list(const std::string& flag, const std::string& text) {
  std::vector<std::string> items;
  size_t start = 0;
  while (true) {
    const size_t comma = text.find(',', start);
    items.push_back(text.substr(start, comma == std::string::npos ? comma : comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (text.empty()) throw UsageError(flag + " needs a comma-separated list, got ''");
  return items;
}

bool FlagSet::parse(int argc, const char* const* argv, int first) {
  for (int i = first; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") return false;
    if (arg.size() < 2 || arg[0] != '-') {
      if (positionals_ == nullptr)
        throw UsageError(
            detail::concat("unexpected argument '", arg, "' (see ", command_, " --help)"));
      positionals_->push_back(arg);
      continue;
    }
    const size_t equals = arg.find('=');
    const bool inline_value = starts_with_dashes(arg) && equals != std::string::npos;
    const std::string name = inline_value ? arg.substr(0, equals) : arg;
    Flag* flag = find(name);
    if (flag == nullptr)
      throw UsageError(detail::concat("unknown flag '", name, "' (see ", command_, " --help)"));
    const std::string value_hint = flag->metavar_.empty() ? "" : " (" + flag->metavar_ + ")";
    switch (flag->kind_) {
      case Flag::Kind::kSwitch:
        if (inline_value)
          throw UsageError(detail::concat(name, " takes no value, got '", arg, "'"));
        flag->store_(*flag, "");
        break;
      case Flag::Kind::kWords: {
        int stored = 0;
        if (inline_value) {
          flag->store_(*flag, arg.substr(equals + 1));
          ++stored;
        }
        while (i + 1 < argc && !starts_with_dashes(argv[i + 1])) {
          flag->store_(*flag, argv[++i]);
          ++stored;
        }
        if (stored == 0) throw UsageError(detail::concat(name, " needs a value", value_hint));
        break;
      }
      case Flag::Kind::kValue:
      case Flag::Kind::kRepeated:
        if (inline_value) {
          flag->store_(*flag, arg.substr(equals + 1));
        } else {
          if (i + 1 >= argc) throw UsageError(detail::concat(name, " needs a value", value_hint));
          flag->store_(*flag, argv[++i]);
        }
        break;
    }
    ++flag->given_;
    if (flag->on_set_) flag->on_set_();
  }
  for (const auto& flag : flags_)
    if (flag->required_ && flag->given_ == 0)
      throw UsageError(detail::concat(flag->name_, " is required (see ", command_, " --help)"));
  return true;
}

void FlagSet::parse_or_exit(int argc, const char* const* argv, int usage_status) {
  try {
    if (parse(argc, argv, 1)) return;
    std::fputs(help().c_str(), stdout);
    std::exit(0);
  } catch (const UsageError& error) {
    std::fprintf(stderr, "%s: %s\n", command_.c_str(), error.what());
    std::exit(usage_status);
  }
}

std::string FlagSet::help() const {
  std::ostringstream out;
  out << (summary_.empty() ? "usage: " + command_ + " [flags]\n" : summary_);
  if (!summary_.empty() && summary_.back() != '\n') out << "\n";
  out << "flags (--name value or --name=value):\n";
  std::vector<std::string> heads;
  size_t width = 0;
  for (const auto& flag : flags_) {
    std::string head = "  " + flag->name_;
    for (const std::string& alias : flag->aliases_) head += ", " + alias;
    if (!flag->metavar_.empty()) head += " " + flag->metavar_;
    if (flag->kind_ == Flag::Kind::kWords) head += " ...";
    width = std::max(width, head.size());
    heads.push_back(std::move(head));
  }
  if (positionals_ != nullptr) width = std::max(width, positional_metavar_.size() + 2);
  width = std::min<size_t>(std::max<size_t>(width, std::string("  --help, -h").size()), 34);
  auto line = [&](const std::string& head, const std::string& text) {
    out << head;
    if (head.size() > width)
      out << "\n" << std::string(width + 2, ' ');
    else
      out << std::string(width + 2 - head.size(), ' ');
    out << text << "\n";
  };
  if (positionals_ != nullptr) line("  " + positional_metavar_, "(positional)");
  for (size_t i = 0; i < flags_.size(); ++i) {
    const Flag& flag = *flags_[i];
    std::string text = flag.help_;
    if (flag.numeric_ && std::isfinite(flag.min_) && std::isfinite(flag.max_))
      text += " [" + format_number(flag.min_) + ", " + format_number(flag.max_) + "]";
    else if (flag.numeric_ && std::isfinite(flag.min_))
      text += std::string(flag.min_exclusive_ ? " (> " : " (>= ") + format_number(flag.min_) + ")";
    if (flag.required_)
      text += " (required)";
    else if (!flag.default_text_.empty())
      text += " (default " + flag.default_text_ + ")";
    if (flag.kind_ == Flag::Kind::kRepeated) text += " (repeatable)";
    line(heads[i], text);
  }
  line("  --help, -h", "this text");
  return out.str();
}

}  // namespace keel::flags
