// keel_flags (runtime/cli/flags.h): the flag parser every keel command and bench program uses.
#include "runtime/cli/flags.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace keel::flags {
namespace {

// Parses `words` (no program name) with `flags`; returns parse()'s result.
bool parse_words(FlagSet& flags, const std::vector<std::string>& words) {
  std::vector<const char*> argv = {"prog"};
  for (const std::string& word : words) argv.push_back(word.c_str());
  return flags.parse(static_cast<int>(argv.size()), argv.data(), 1);
}

// The UsageError message of parsing `words`, or "" when it parses.
std::string error_of(FlagSet& flags, const std::vector<std::string>& words) {
  try {
    (void)parse_words(flags, words);
  } catch (const UsageError& error) {
    return error.what();
  }
  return "";
}

struct Options {
  std::string name = "default-name";
  int64_t count = 7;
  int small = 3;
  uint64_t seed = 0;
  double rate = 1.5;
  bool verbose = false;
  bool stream = true;
  std::string dtype = "bf16";
  std::vector<int> sizes = {1, 8, 32};
  std::vector<std::string> extra;
  std::vector<std::string> words;
};

// Every flag kind, registered as the commands register them.
struct Fixture {
  Options options;
  FlagSet flags{"prog", "usage: prog [flags]\nDoes a thing.\n"};
  Fixture() {
    flags.add_string("--name", &options.name, "NAME", "who");
    flags.add_int("--count", &options.count, "N", "how many").at_least(1);
    flags.add_int("--small", &options.small, "N", "a bounded int").range(0, 10);
    flags.add_int("--seed", &options.seed, "S", "random seed");
    flags.add_double("--rate", &options.rate, "R", "per second").range(0, 100);
    flags.add_switch("--verbose", &options.verbose, "say more");
    flags.add_switch("--no-stream", &options.stream, "one response", false);
    flags.add_choice("--dtype", &options.dtype, {"bf16", "f16", "f32"}, "weights");
    flags.add_int_list("--sizes", &options.sizes, "1,8,32", "sizes").at_least(1);
    flags.add_repeated("--extra", &options.extra, "ARG", "passed on");
    flags.add_words("--goodput", &options.words, "KEY:MS", "SLOs");
  }
};

TEST(Flags, DefaultsStayWhenNothingIsGiven) {
  Fixture f;
  EXPECT_TRUE(parse_words(f.flags, {}));
  EXPECT_EQ(f.options.name, "default-name");
  EXPECT_EQ(f.options.count, 7);
  EXPECT_DOUBLE_EQ(f.options.rate, 1.5);
  EXPECT_FALSE(f.options.verbose);
  EXPECT_TRUE(f.options.stream);
  EXPECT_EQ(f.options.sizes, (std::vector<int>{1, 8, 32}));
  EXPECT_FALSE(f.flags.given("--count"));
  EXPECT_FALSE(f.flags.given("--verbose"));
}

TEST(Flags, SpaceAndEqualsFormsSetEveryKind) {
  Fixture f;
  EXPECT_TRUE(parse_words(
      f.flags,
      {"--name", "x",          "--count=12",  "--small",     "0",       "--seed=42", "--rate",
       "2.25",   "--verbose",  "--no-stream", "--dtype=f32", "--sizes", "4,16",      "--extra",
       "--port", "--extra=-v", "--goodput",   "ttft:100",    "tpot:20", "--name=a=b"}));
  EXPECT_EQ(f.options.name, "a=b");  // the last occurrence wins; only the first '=' splits
  EXPECT_EQ(f.options.count, 12);
  EXPECT_EQ(f.options.small, 0);
  EXPECT_EQ(f.options.seed, 42u);
  EXPECT_DOUBLE_EQ(f.options.rate, 2.25);
  EXPECT_TRUE(f.options.verbose);
  EXPECT_FALSE(f.options.stream);
  EXPECT_EQ(f.options.dtype, "f32");
  EXPECT_EQ(f.options.sizes, (std::vector<int>{4, 16}));
  // A value may start with dashes: it is taken because the flag needs one.
  EXPECT_EQ(f.options.extra, (std::vector<std::string>{"--port", "-v"}));
  EXPECT_EQ(f.options.words, (std::vector<std::string>{"ttft:100", "tpot:20"}));
  EXPECT_TRUE(f.flags.given("--count"));
  EXPECT_TRUE(f.flags.given("--no-stream"));
}

TEST(Flags, NegativeValuesAreValuesNotFlags) {
  double value = 0;
  FlagSet flags("prog");
  flags.add_double("--offset", &value, "X", "offset");
  EXPECT_TRUE(parse_words(flags, {"--offset", "-2.5"}));
  EXPECT_DOUBLE_EQ(value, -2.5);
}

TEST(Flags, WordsStopAtTheNextFlagAndAccumulate) {
  Fixture f;
  EXPECT_TRUE(
      parse_words(f.flags, {"--goodput=ttft:1", "e2el:3", "--verbose", "--goodput", "tpot:2"}));
  EXPECT_EQ(f.options.words, (std::vector<std::string>{"ttft:1", "e2el:3", "tpot:2"}));
  EXPECT_TRUE(f.options.verbose);
}

TEST(Flags, HelpStopsParsingAndSkipsRequiredChecks) {
  std::string model;
  FlagSet flags("prog");
  flags.add_string("--model", &model, "DIR", "the model").required();
  EXPECT_FALSE(parse_words(flags, {"--help", "--bogus"}));
  EXPECT_FALSE(parse_words(flags, {"-h"}));
}

TEST(Flags, ErrorsNameTheFlagAndTheBadValue) {
  Fixture f;
  EXPECT_EQ(error_of(f.flags, {"--bogus", "1"}), "unknown flag '--bogus' (see prog --help)");
  EXPECT_EQ(error_of(f.flags, {"--bogus=1"}), "unknown flag '--bogus' (see prog --help)");
  EXPECT_EQ(error_of(f.flags, {"stray"}), "unexpected argument 'stray' (see prog --help)");
  EXPECT_EQ(error_of(f.flags, {"--name"}), "--name needs a value (NAME)");
  EXPECT_EQ(error_of(f.flags, {"--goodput", "--verbose"}), "--goodput needs a value (KEY:MS)");
  EXPECT_EQ(error_of(f.flags, {"--count", "two"}), "--count: 'two' is not a positive integer");
  EXPECT_EQ(error_of(f.flags, {"--count", "3x"}), "--count: '3x' is not a positive integer");
  EXPECT_EQ(error_of(f.flags, {"--count", "1.5"}), "--count: '1.5' is not a positive integer");
  EXPECT_EQ(error_of(f.flags, {"--count", ""}), "--count: '' is not a positive integer");
  EXPECT_EQ(error_of(f.flags, {"--seed", "x"}), "--seed: 'x' is not a non-negative integer");
  EXPECT_EQ(error_of(f.flags, {"--count", "0"}), "--count: '0' must be >= 1");
  EXPECT_EQ(error_of(f.flags, {"--small", "11"}), "--small: '11' must be <= 10");
  EXPECT_EQ(error_of(f.flags, {"--seed", "-1"}), "--seed: '-1' must be >= 0");
  EXPECT_EQ(error_of(f.flags, {"--count", "99999999999999999999"}),
            "--count: '99999999999999999999' must be <= 9223372036854775807");
  EXPECT_EQ(error_of(f.flags, {"--rate", "fast"}), "--rate: 'fast' is not a number");
  EXPECT_EQ(error_of(f.flags, {"--rate", "nan"}), "--rate: 'nan' is not a number");
  EXPECT_EQ(error_of(f.flags, {"--rate", "101"}), "--rate: '101' must be <= 100");
  EXPECT_EQ(error_of(f.flags, {"--dtype", "f64"}), "--dtype: 'f64' is not one of bf16, f16, f32");
  EXPECT_EQ(error_of(f.flags, {"--sizes", "1,x"}), "--sizes: 'x' is not a positive integer");
  EXPECT_EQ(error_of(f.flags, {"--sizes", "1,0"}), "--sizes: '0' must be >= 1");
  EXPECT_EQ(error_of(f.flags, {"--sizes", "1,,2"}), "--sizes: '' is not a positive integer");
  EXPECT_EQ(error_of(f.flags, {"--sizes", ""}), "--sizes needs a comma-separated list, got ''");
  EXPECT_EQ(error_of(f.flags, {"--verbose=1"}), "--verbose takes no value, got '--verbose=1'");
}

TEST(Flags, IntegersOutsideTheTargetTypeAreOutOfRange) {
  int narrow = 0;
  FlagSet flags("prog");
  flags.add_int("--narrow", &narrow, "N", "an int");
  EXPECT_EQ(error_of(flags, {"--narrow", "3000000000"}),
            "--narrow: '3000000000' must be <= 2147483647");
  EXPECT_EQ(error_of(flags, {"--narrow", "-3000000000"}),
            "--narrow: '-3000000000' must be >= -2147483648");
  EXPECT_EQ(error_of(flags, {"--narrow", "-7"}), "");
  EXPECT_EQ(narrow, -7);
}

TEST(Flags, NumberListsAndStrictLowerBounds) {
  std::vector<double> rates = {0.5, 1.5};
  double seconds = 1;
  FlagSet flags("prog");
  flags.add_double_list("--rates", &rates, "R,...", "rates").above(0);
  flags.add_double("--seconds", &seconds, "S", "budget").above(0);
  EXPECT_NE(flags.help().find("rates (> 0) (default 0.5,1.5)"), std::string::npos) << flags.help();
  EXPECT_TRUE(parse_words(flags, {"--rates=2,0.25", "--seconds", "0.001"}));
  EXPECT_EQ(rates, (std::vector<double>{2, 0.25}));
  EXPECT_DOUBLE_EQ(seconds, 0.001);
  EXPECT_EQ(error_of(flags, {"--rates", "1,y"}), "--rates: 'y' is not a number");
  EXPECT_EQ(error_of(flags, {"--rates", "1,0"}), "--rates: '0' must be > 0");
  EXPECT_EQ(error_of(flags, {"--seconds", "0"}), "--seconds: '0' must be > 0");
  EXPECT_EQ(error_of(flags, {"--seconds", "-1"}), "--seconds: '-1' must be > 0");
}

TEST(Flags, MissingRequiredFlagIsNamed) {
  std::string model;
  int64_t tp = 1;
  FlagSet flags("keel plan");
  flags.add_string("--model", &model, "DIR", "the model").required();
  flags.add_int("--tp", &tp, "N", "ranks").required();
  EXPECT_EQ(error_of(flags, {"--tp", "2"}), "--model is required (see keel plan --help)");
}

TEST(Flags, OnSetRunsInCommandLineOrder) {
  int concurrency = 1;
  double rate = 0;
  FlagSet flags("prog");
  flags.add_double("--rate", &rate, "R", "open loop");
  flags.add_int("--concurrency", &concurrency, "C", "closed loop").on_set([&] { rate = 0; });
  EXPECT_TRUE(parse_words(flags, {"--rate", "5", "--concurrency", "2"}));
  EXPECT_EQ(rate, 0);
  EXPECT_TRUE(parse_words(flags, {"--concurrency", "2", "--rate", "5"}));
  EXPECT_EQ(rate, 5);
}

TEST(Flags, PositionalsMixWithFlags) {
  std::vector<std::string> files;
  bool json = false;
  FlagSet flags("keel routes diff");
  flags.add_positionals(&files, "FILE");
  flags.add_switch("--json", &json, "JSON output");
  EXPECT_TRUE(parse_words(flags, {"a", "--json", "b"}));
  EXPECT_EQ(files, (std::vector<std::string>{"a", "b"}));
  EXPECT_TRUE(json);
}

TEST(Flags, HelpListsEveryFlagWithItsDefault) {
  Fixture f;
  const std::string help = f.flags.help();
  EXPECT_EQ(help.rfind("usage: prog [flags]\nDoes a thing.\n", 0), 0u) << help;
  for (const char* name :
       {"--name NAME", "--count N", "--small N", "--seed S", "--rate R", "--verbose", "--no-stream",
        "--dtype bf16|f16|f32", "--sizes 1,8,32", "--extra ARG", "--goodput KEY:MS ...", "--help"})
    EXPECT_NE(help.find(name), std::string::npos) << name << " missing from:\n" << help;
  EXPECT_NE(help.find("how many (>= 1) (default 7)"), std::string::npos) << help;
  EXPECT_NE(help.find("a bounded int [0, 10] (default 3)"), std::string::npos) << help;
  EXPECT_NE(help.find("(default default-name)"), std::string::npos) << help;
  EXPECT_NE(help.find("(default 1,8,32)"), std::string::npos) << help;
  EXPECT_NE(help.find("passed on (repeatable)"), std::string::npos) << help;
}

TEST(Flags, HelpShowsWholeBoundsExactlyAndOverriddenDefaults) {
  std::vector<int64_t> ids = {1, 2, 3};
  int64_t port = 0;
  FlagSet flags("prog");
  flags.add_int_list("--ids", &ids, "1,2,3", "token ids").range(0, 2147483647);
  flags.add_int("--port", &port, "P", "from the config file").shown_default("");
  const std::string help = flags.help();
  EXPECT_NE(help.find("token ids [0, 2147483647] (default 1,2,3)\n"), std::string::npos) << help;
  EXPECT_NE(help.find("from the config file\n"), std::string::npos) << help;
  // The longest flag still fits on its own line: no wrap, two spaces before its text.
  EXPECT_NE(help.find("  --ids 1,2,3  token ids"), std::string::npos) << help;
}

TEST(Flags, RegisteringANameTwiceIsAProgrammingError) {
  bool a = false;
  FlagSet flags("prog");
  flags.add_switch("--a", &a, "a");
  EXPECT_THROW(flags.add_switch("--a", &a, "again"), std::logic_error);
  EXPECT_THROW(flags.given("--nope"), std::logic_error);
}

TEST(Flags, AnAliasIsTheSameFlagUnderAnotherName) {
  int tp = 1;
  FlagSet flags("keel serve");
  flags.add_int("--tensor-parallel-size", &tp, "N", "ranks").range(1, 8);
  flags.add_alias("--tp", "--tensor-parallel-size");
  EXPECT_TRUE(parse_words(flags, {"--tp", "2"}));
  EXPECT_EQ(tp, 2);
  EXPECT_TRUE(flags.given("--tensor-parallel-size"));
  EXPECT_TRUE(flags.given("--tp"));
  EXPECT_TRUE(parse_words(flags, {"--tp=4"}));
  EXPECT_EQ(tp, 4);
  // The bound and the message are the flag's own, whichever name was typed.
  EXPECT_EQ(error_of(flags, {"--tp", "9"}), "--tensor-parallel-size: '9' must be <= 8");
  EXPECT_NE(flags.help().find("  --tensor-parallel-size, --tp N"), std::string::npos)
      << flags.help();
  // An alias may not take a registered name nor name a missing flag.
  EXPECT_THROW(flags.add_alias("--tp", "--tensor-parallel-size"), std::logic_error);
  EXPECT_THROW(flags.add_alias("--x", "--missing"), std::logic_error);
  int other = 0;
  EXPECT_THROW(flags.add_int("--tp", &other, "N", "clash"), std::logic_error);
}

}  // namespace
}  // namespace keel::flags
