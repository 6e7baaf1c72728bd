// keel_flags: the one command-line flag parser of the keel CLI and the bench programs.
//
// Flags are registered declaratively, each bound to the variable it fills; the variable's value
// at registration is the default (and is what --help shows). parse() then walks argv once:
//   --name value  and  --name=value   a valued flag (the value may itself start with "-")
//   --name                            a switch
//   anything not starting with "-"    a positional, where the command takes them
// Every bad command line throws UsageError with one message naming the flag and the bad value
// (unknown flag, missing value, non-numeric or out-of-range number, bad choice, missing
// required flag); each command maps it to the exit status it has always used for usage errors.
// Later occurrences of a single-valued flag replace earlier ones; repeated and word flags
// collect every occurrence. A flag may have aliases (add_alias), each the same flag.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kernels/base/check.h"

namespace keel::flags {

// A bad command line. Derives from keel::Error so boundaries that catch keel::Error still see
// it; commands that use a distinct status for usage errors catch this type first.
class UsageError : public Error {
 public:
  using Error::Error;
};

// Parses `text` as a base-10 integer for `flag`, within [min, max]. Throws UsageError.
int64_t parse_integer(std::string_view flag, std::string_view text, int64_t min, int64_t max);
// Parses `text` as a finite number for `flag`, within [min, max]. Throws UsageError.
double parse_number(std::string_view flag, std::string_view text, double min, double max);

// One registered flag; FlagSet::add_* return it so settings can be chained:
//   flags.add_int("--tp", &tp, "N", "tensor-parallel ranks").range(1, 1024).required();
class Flag {
 public:
  // Flags whose value is a number (or a list of numbers) accept only values in [min, max].
  Flag& range(double min, double max);
  Flag& at_least(double min) { return range(min, max_); }
  // add_double / add_double_list flags: values must be strictly greater than `min` (a rate,
  // a duration).
  Flag& above(double min);
  // What --help shows as the default ("" shows none): for a default that is not the bound
  // variable's initial value, e.g. one read from a config file when the flag is absent.
  Flag& shown_default(std::string text);
  // parse() fails unless the flag is given (not checked when --help is asked for).
  Flag& required();
  // Runs after each occurrence is stored, for flags whose meaning depends on their order
  // (e.g. --concurrency after --rate switches back to a closed loop).
  Flag& on_set(std::function<void()> action);

 private:
  friend class FlagSet;
  enum class Kind { kValue, kSwitch, kWords, kRepeated };

  std::string name_;
  std::vector<std::string> aliases_;
  std::string metavar_;
  std::string help_;
  std::string default_text_;
  Kind kind_ = Kind::kValue;
  bool required_ = false;
  bool numeric_ = false;
  bool min_exclusive_ = false;
  double min_ = -std::numeric_limits<double>::infinity();
  double max_ = std::numeric_limits<double>::infinity();
  int given_ = 0;
  // Stores one value (the text after the flag; empty for switches).
  std::function<void(const Flag&, const std::string&)> store_;
  std::function<void()> on_set_;

  // Integer bounds: [min_, max_] clipped to what T holds.
  template <typename T>
  int64_t int_min() const;
  template <typename T>
  int64_t int_max() const;
  double store_number(const std::string& text) const;
  template <typename T>
  T store_integer(const std::string& text) const {
    return static_cast<T>(parse_integer(name_, text, int_min<T>(), int_max<T>()));
  }
};

class FlagSet {
 public:
  // `command` names the program in messages and help ("keel plan", "gemm"); `summary` is the
  // help's opening text (usage synopsis, what the command does).
  explicit FlagSet(std::string command, std::string summary = "");
  FlagSet(const FlagSet&) = delete;
  FlagSet& operator=(const FlagSet&) = delete;

  Flag& add_string(std::string name, std::string* target, std::string metavar, std::string help);
  Flag& add_double(std::string name, double* target, std::string metavar, std::string help);
  // A switch sets *target to `value_when_given` (false for --no-... switches).
  Flag& add_switch(std::string name, bool* target, std::string help, bool value_when_given = true);
  // One of `choices`, stored as given; anything else is an error listing the choices.
  Flag& add_choice(std::string name, std::string* target, std::vector<std::string> choices,
                   std::string help);
  // Every occurrence appends its value (--server-arg A --server-arg B).
  Flag& add_repeated(std::string name, std::vector<std::string>* target, std::string metavar,
                     std::string help);
  // Every following word up to the next "--" option (--goodput ttft:100 tpot:20).
  Flag& add_words(std::string name, std::vector<std::string>* target, std::string metavar,
                  std::string help);
  // Words that are not flags; without this a stray word is an error.
  void add_positionals(std::vector<std::string>* target, std::string metavar);
  // Another name for the registered flag `flag_name` (vLLM's --tp for --tensor-parallel-size):
  // parse() and given() take either name, --help lists both on the flag's line.
  void add_alias(std::string alias, std::string_view flag_name);

  template <typename T>
  Flag& add_int(std::string name, T* target, std::string metavar, std::string help) {
    static_assert(std::is_integral_v<T> && !std::is_same_v<T, bool>);
    Flag& flag = add(std::move(name), std::move(metavar), std::move(help), Flag::Kind::kValue,
                     std::to_string(*target));
    flag.numeric_ = true;
    flag.store_ = [target](const Flag& self, const std::string& text) {
      *target = self.store_integer<T>(text);
    };
    return flag;
  }

  // A comma-separated list of integers ("1,8,32"); the whole list replaces the default.
  template <typename T>
  Flag& add_int_list(std::string name, std::vector<T>* target, std::string metavar,
                     std::string help) {
    static_assert(std::is_integral_v<T> && !std::is_same_v<T, bool>);
    return add_list(
        std::move(name), target, std::move(metavar), std::move(help),
        [](T value) { return std::to_string(value); },
        [](const Flag& self, const std::string& item) { return self.store_integer<T>(item); });
  }

  // A comma-separated list of numbers ("0.5,1.5,3"); the whole list replaces the default.
  Flag& add_double_list(std::string name, std::vector<double>* target, std::string metavar,
                        std::string help);

  // Parses argv[first, argc). Returns false when --help or -h was given (the caller prints
  // help() and exits 0), true otherwise. Throws UsageError for a bad command line.
  [[nodiscard]] bool parse(int argc, const char* const* argv, int first = 1);
  // For programs whose main() owns the process (the bench programs): parse(), and on --help
  // print help() to stdout and exit 0; on a bad command line print "COMMAND: MESSAGE" to
  // stderr and exit `usage_status`.
  void parse_or_exit(int argc, const char* const* argv, int usage_status = 2);
  // Whether the flag appeared on the command line (defaults do not count).
  bool given(std::string_view name) const;
  // Usage text: the summary, then one line per flag with its value, default and choices.
  std::string help() const;

 private:
  Flag& add(std::string name, std::string metavar, std::string help, Flag::Kind kind,
            std::string default_text);
  Flag* find(std::string_view name) const;
  // A comma-separated list; `format` writes one default item, `parse_item` reads one.
  template <typename T, typename Format, typename ParseItem>
  Flag& add_list(std::string name, std::vector<T>* target, std::string metavar, std::string help,
                 Format format, ParseItem parse_item) {
    std::string default_text;
    for (const T& value : *target)
      default_text += (default_text.empty() ? "" : ",") + format(value);
    Flag& flag = add(std::move(name), std::move(metavar), std::move(help), Flag::Kind::kValue,
                     std::move(default_text));
    flag.numeric_ = true;
    flag.store_ = [target, parse_item](const Flag& self, const std::string& text) {
      std::vector<T> values;
      for (const std::string& item : split_list(self.name_, text))
        values.push_back(parse_item(self, item));
      *target = std::move(values);
    };
    return flag;
  }
  static std::vector<std::string> split_list(const std::string& flag, const std::string& text);

  std::string command_;
  std::string summary_;
  std::vector<std::unique_ptr<Flag>> flags_;
  std::vector<std::string>* positionals_ = nullptr;
  std::string positional_metavar_;
};

template <typename T>
int64_t Flag::int_min() const {
  const double type_min = static_cast<double>(std::numeric_limits<T>::min());
  return min_ <= type_min ? static_cast<int64_t>(std::numeric_limits<T>::min())
                          : static_cast<int64_t>(min_);
}

template <typename T>
int64_t Flag::int_max() const {
  // Unsigned 64-bit values beyond int64's range are not needed by any flag (seeds included).
  int64_t type_max = std::numeric_limits<int64_t>::max();
  if constexpr (std::is_signed_v<T> || sizeof(T) < sizeof(int64_t))
    type_max = static_cast<int64_t>(std::numeric_limits<T>::max());
  return max_ >= static_cast<double>(type_max) ? type_max : static_cast<int64_t>(max_);
}

}  // namespace keel::flags
