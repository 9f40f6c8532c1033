// Chat templates: the Jinja templates in HF tokenizer_config.json ("chat_template") or
// chat_template.jinja that turn a list of messages into a model's prompt text.
//
// pdserve renders them with its own interpreter of the Jinja subset chat templates use, with
// the environment HF transformers' apply_chat_template sets up (trim_blocks, lstrip_blocks,
// loop controls, `tojson` as Python's json.dumps with ensure_ascii=False, `raise_exception`,
// `strftime_now`). Supported: text, {{ }}, {% %}, {# #} with -/+ whitespace control;
// if/elif/else, for (tuple targets, `if` filter, else, loop.*, break/continue), set (names,
// namespace attributes, block set), macro, raw, generation (its body, in its own scope); literals,
// attribute/item access, slices, calls, Python's operators, conditional expressions; the
// string/dict methods and filters and tests real templates use (see chat_template.cc).
// Anything else is refused when the template is parsed, naming the line.
//
// The test tests/chat_template holds it byte for byte to python3-jinja2 on real and written
// templates.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json_fwd.hpp"

namespace pds::engine {

class ChatTemplate {
 public:
  // `source` names the template in errors (e.g. "model/tokenizer_config.json").
  static absl::StatusOr<std::unique_ptr<ChatTemplate>> Parse(absl::string_view text,
                                                             absl::string_view source);
  ~ChatTemplate();

  // Renders with `variables` (a JSON object: messages, add_generation_prompt, bos_token, ...;
  // moved in, not copied, when the caller passes an rvalue) and, for names it does not set,
  // `defaults`. INVALID_ARGUMENT for what the template refuses (raise_exception, undefined
  // values, type errors), naming the template line; RESOURCE_EXHAUSTED past the output or step
  // budget.
  absl::StatusOr<std::string> Render(nlohmann::ordered_json variables,
                                     const nlohmann::ordered_json* defaults = nullptr) const;

  struct Node;

 private:
  ChatTemplate();
  absl::StatusOr<std::string> RenderChecked(nlohmann::ordered_json variables,
                                            const nlohmann::ordered_json* defaults) const;
  std::string source_;
  std::unique_ptr<Node> root_;
};

// A model's chat template and the special-token variables its tokenizer_config.json gives
// (bos_token, eos_token, unk_token, pad_token).
struct ChatFormat {
  std::unique_ptr<ChatTemplate> chat_template;
  std::string source;  // the file it came from
  std::unique_ptr<nlohmann::ordered_json> special_tokens;

  ChatFormat();
  ~ChatFormat();
  ChatFormat(ChatFormat&&) noexcept;
  ChatFormat& operator=(ChatFormat&&) noexcept;

  // `variables` with the special tokens added where it does not set them.
  absl::StatusOr<std::string> Render(nlohmann::ordered_json variables) const;
};

// The chat format of a model directory: DIR/chat_template.jinja if present, else the
// "chat_template" of DIR/tokenizer_config.json (a string, or a list of {name, template}: the
// one named "default"). `template_override` (a file) replaces the template. NOT_FOUND when the
// model has none; INVALID_ARGUMENT naming the file for one that does not parse.
absl::StatusOr<ChatFormat> LoadChatFormat(const std::string& model_dir,
                                          const std::string& template_override = "");

// The same from explicit files: `config_path` (tokenizer_config.json, may be empty) gives the
// special tokens and, when `template_path` is empty, the template.
absl::StatusOr<ChatFormat> LoadChatFormatFiles(const std::string& config_path,
                                               const std::string& template_path);

}  // namespace pds::engine
