#!/usr/bin/env python3
"""Reference renderer of chat templates for the parity test (tests/chat_template/run_parity.sh).

Same contract as `pdserve chat-template`:
  reference.py --template FILE [--config tokenizer_config.json] < cases.jsonl
  reference.py --config tokenizer_config.json < cases.jsonl      (the config's chat_template)
  reference.py --model DIR [--template FILE] < cases.jsonl
Each stdin line is a JSON object of template variables; each prints one JSON line,
{"text": "..."} or {"error": "..."}. With --config/--model the config's bos/eos/unk/pad tokens
are added as variables unless the case sets them.

Rendering uses python3-jinja2 set up as HF transformers' apply_chat_template does: an
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and loop controls; `tojson` as
json.dumps with ensure_ascii=False; globals raise_exception and strftime_now; and
{% generation %}...{% endgeneration %} rendered as its body.
With --bench-seconds S each case prints {"renders", "us_per_render", "bytes"} instead (the
case rendered repeatedly for S seconds after one render).
Exit status: 0 when every case was processed (errors included), 1 when the template or config
cannot be loaded or parsed, 2 on a usage error.
"""

import argparse
import json
import os
import sys
import time
from datetime import datetime

try:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox
except ImportError:
    print("reference.py: python jinja2 is not installed", file=sys.stderr)
    sys.exit(3)

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TemplateRaised(Exception):
    """What raise_exception() throws."""


def raise_exception(message):
    raise TemplateRaised(message)


def strftime_now(fmt):
    return datetime.now().strftime(fmt)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class GenerationTag(jinja2.ext.Extension):
    """{% generation %}BODY{% endgeneration %} renders BODY (HF uses it to mark assistant text)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        # A call block gives the body its own scope, as the HF extension does.
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller):
        return caller()


def make_environment():
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, GenerationTag])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def config_template(config, path):
    """The chat_template of a tokenizer_config.json: a string, or a list of {name, template}."""
    tmpl = config.get("chat_template")
    if isinstance(tmpl, list):
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default")
    if not isinstance(tmpl, str):
        raise ValueError(f"{path}: no chat_template")
    return tmpl


def special_tokens(config):
    """bos_token etc. of a config: a string, or an object with "content"; null ones are left out."""
    out = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def load(args):
    """(template source, special tokens) from the flags."""
    config, config_path = {}, None
    if args.model:
        config_path = os.path.join(args.model, "tokenizer_config.json")
        if not os.path.exists(config_path):
            config_path = None
    elif args.config:
        config_path = args.config
    if config_path:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    if args.template:
        source = read_text(args.template)
    elif args.model and os.path.exists(os.path.join(args.model, "chat_template.jinja")):
        source = read_text(os.path.join(args.model, "chat_template.jinja"))
    else:
        source = config_template(config, config_path or args.model)
    return source, special_tokens(config)


def bench(template, context, seconds, text):
    """Renders the case repeatedly for `seconds`: {"renders", "us_per_render", "bytes"}."""
    renders = 0
    start = time.perf_counter()
    while True:
        template.render(**context)
        renders += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return {"renders": renders, "us_per_render": elapsed * 1e6 / renders,
            "bytes": len(text.encode("utf-8"))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory")
    parser.add_argument("--config", help="a tokenizer_config.json")
    parser.add_argument("--template", help="a Jinja template file")
    parser.add_argument("--bench-seconds", type=float, default=0,
                        help="render each case repeatedly this long and print its timing")
    args = parser.parse_args()
    # UTF-8 both ways whatever the locale (ctest may run under LANG=C).
    sys.stdin.reconfigure(encoding="utf-8")
    sys.stdout.reconfigure(encoding="utf-8")
    if args.model and args.config:
        parser.error("give --model or --config, not both")
    if not (args.model or args.config or args.template):
        parser.error("give --model DIR, --config FILE or --template FILE")

    try:
        source, specials = load(args)
        template = make_environment().from_string(source)
    except Exception as e:  # unreadable file, no template, or a syntax error
        print(f"reference.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 1

    for number, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            variables = json.loads(line)
        except ValueError:
            variables = None
        if not isinstance(variables, dict):
            print(f"reference.py: stdin line {number}: expected a JSON object of variables",
                  file=sys.stderr)
            return 1
        context = dict(specials)
        context.update(variables)
        try:
            out = {"text": template.render(**context)}
            if args.bench_seconds > 0:
                out = bench(template, context, args.bench_seconds, out["text"])
        except Exception as e:  # raise_exception, undefined values, type errors, ...
            out = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
