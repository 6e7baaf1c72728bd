#include "runtime/common/yaml_util.h"

#include <yaml-cpp/eventhandler.h>

#include <fstream>
#include <sstream>
#include <vector>

namespace keel {

namespace {

std::string at_line(const YAML::Mark& mark) {
  return "line " + std::to_string(mark.line + 1);
}

// Walks the parser's events (before any node is built) and refuses what yaml-cpp would accept
// silently but keel's configs must not contain:
//  - a key twice in one mapping: yaml-cpp keeps one of them without a word, so an operator who
//    set `tp` twice runs with a value they may not have meant;
//  - anchors and aliases (&a, *a, <<: merges): one node shared under several keys, which the
//    typed readers do not expect (a `tp: *a` alias once started a server whose requests hung);
//    a config is short enough to spell every value out;
//  - mapping keys that are not plain scalars, and more than one document.
class StrictEvents : public YAML::EventHandler {
 public:
  explicit StrictEvents(std::string where) : where_(std::move(where)) {}

  void OnDocumentStart(const YAML::Mark& mark) override {
    if (++num_documents_ > 1)
      throw_error(where_, ": ", at_line(mark),
                  ": a second YAML document ('---'); a config file "
                  "holds one");
  }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark& mark, YAML::anchor_t anchor) override {
    node(mark, anchor, nullptr);
  }
  void OnAlias(const YAML::Mark& mark, YAML::anchor_t /*anchor*/) override {
    throw_error(where_, ": ", at_line(mark),
                ": YAML aliases (*name) are not accepted in keel configs; write the value out");
  }
  void OnScalar(const YAML::Mark& mark, const std::string& /*tag*/, YAML::anchor_t anchor,
                const std::string& value) override {
    node(mark, anchor, &value);
  }
  void OnSequenceStart(const YAML::Mark& mark, const std::string& /*tag*/, YAML::anchor_t anchor,
                       YAML::EmitterStyle::value /*style*/) override {
    node(mark, anchor, nullptr, /*collection=*/true);
    frames_.push_back(Frame{});
  }
  void OnSequenceEnd() override { frames_.pop_back(); }
  void OnMapStart(const YAML::Mark& mark, const std::string& /*tag*/, YAML::anchor_t anchor,
                  YAML::EmitterStyle::value /*style*/) override {
    node(mark, anchor, nullptr, /*collection=*/true);
    Frame map;
    map.is_map = true;
    frames_.push_back(std::move(map));
  }
  void OnMapEnd() override { frames_.pop_back(); }
  void OnAnchor(const YAML::Mark& mark, const std::string& name) override {
    throw_error(where_, ": ", at_line(mark), ": YAML anchor &", name,
                " is not accepted in keel configs; write the value out");
  }

 private:
  struct Frame {
    bool is_map = false;
    bool expecting_key = true;
    std::set<std::string> keys;
  };

  // Every node event: a key or a value of the enclosing mapping, or a sequence item.
  void node(const YAML::Mark& mark, YAML::anchor_t anchor, const std::string* scalar,
            bool collection = false) {
    if (anchor != YAML::NullAnchor)
      throw_error(where_, ": ", at_line(mark),
                  ": YAML anchors (&name) are not accepted in keel configs; write the value out");
    if (frames_.empty() || !frames_.back().is_map) return;
    Frame& frame = frames_.back();
    if (frame.expecting_key) {
      if (collection || scalar == nullptr)
        throw_error(where_, ": ", at_line(mark), ": mapping keys must be plain names");
      if (*scalar == "<<")
        throw_error(where_, ": ", at_line(mark),
                    ": YAML merge keys (<<) are not accepted in keel configs");
      if (!frame.keys.insert(*scalar).second)
        throw_error(where_, ": ", at_line(mark), ": key '", *scalar,
                    "' appears twice in the same mapping");
    }
    frame.expecting_key = !frame.expecting_key;
  }

  std::string where_;
  int num_documents_ = 0;
  std::vector<Frame> frames_;
};

}  // namespace

void check_yaml_strict(const std::string& text, const std::string& where) {
  std::istringstream stream(text);
  StrictEvents events(where);
  try {
    YAML::Parser parser(stream);
    while (parser.HandleNextDocument(events)) {
    }
  } catch (const YAML::Exception& error) {
    throw_error(where, ": invalid YAML: ", error.what());
  }
}

YAML::Node parse_yaml_mapping(const std::string& text, const std::string& where) {
  check_yaml_strict(text, where);
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& error) {
    throw_error(where, ": invalid YAML: ", error.what());
  }
  if (!root.IsMap()) throw_error(where, ": expected a mapping of keys to values at the top level");
  return root;
}

YAML::Node load_yaml_mapping(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw_error("cannot open YAML file ", path);
  std::ostringstream text;
  text << file.rdbuf();
  if (file.bad()) throw_error("cannot read YAML file ", path);
  return parse_yaml_mapping(text.str(), path);
}

void reject_unknown_keys(const YAML::Node& node, const std::set<std::string>& known,
                         const std::string& where) {
  for (const auto& entry : node) {
    std::string key = entry.first.as<std::string>();
    if (known.count(key)) continue;
    std::string list;
    for (const std::string& name : known) list += (list.empty() ? "" : ", ") + name;
    throw_error(where, ": unknown key '", key, "' (known keys: ", list, ")");
  }
}

}  // namespace keel
