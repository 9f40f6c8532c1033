#!/usr/bin/python3
"""Structured output against an independent validator: every reply the JSON Schema matcher
completes for a corpus of schemas must be valid under python3-jsonschema (formats checked:
jsonschema's own checkers, and stdlib-based ones written here for those it leaves to packages
Debian does not ship), every reply under a corpus regex ({"x-regex": R}) must match it whole
under Python's re, no schema of the corpus may be refused, and no draw may reach a dead end
(a prefix after which nothing is allowed).

usage: json_schema_validate.py SAMPLER CORPUS WORK_DIR
Exit 77 (skipped) without python3-jsonschema.
"""
import datetime
import ipaddress
import json
import os
import re
import subprocess
import sys

SKIP = 77


def format_checker(jsonschema):
    checker = jsonschema.FormatChecker()

    @checker.checks("date-time", raises=ValueError)
    def date_time(value):
        if not isinstance(value, str):
            return True
        m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(\.\d+)?"
                         r"([Zz]|[+-](\d\d):(\d\d))", value)
        if not m:
            return False
        datetime.date(int(m[1]), int(m[2]), int(m[3]))
        ok_time = int(m[4]) <= 23 and int(m[5]) <= 59 and int(m[6]) <= 60
        ok_offset = m[9] is None or (int(m[9]) <= 23 and int(m[10]) <= 59)
        return ok_time and ok_offset

    @checker.checks("time")
    def time(value):
        if not isinstance(value, str):
            return True
        m = re.fullmatch(r"(\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|[+-](\d\d):(\d\d))", value)
        return bool(m) and int(m[1]) <= 23 and int(m[2]) <= 59 and int(m[3]) <= 60 and (
            m[6] is None or (int(m[6]) <= 23 and int(m[7]) <= 59))

    @checker.checks("date", raises=ValueError)
    def date(value):
        if not isinstance(value, str):
            return True
        if not re.fullmatch(r"\d{4}-\d\d-\d\d", value):
            return False
        datetime.date.fromisoformat(value)
        return True

    # RFC 3339 appendix A, written from the ABNF there.
    sec = r"\d+S"
    minute = rf"\d+M({sec})?"
    hour = rf"\d+H({minute})?"
    dur_time = rf"T({hour}|{minute}|{sec})"
    day = r"\d+D"
    month = rf"\d+M({day})?"
    year = rf"\d+Y({month})?"
    dur_date = rf"({day}|{month}|{year})({dur_time})?"
    duration_re = re.compile(rf"P({dur_date}|{dur_time}|\d+W)")

    @checker.checks("duration")
    def duration(value):
        return not isinstance(value, str) or bool(duration_re.fullmatch(value))

    @checker.checks("hostname")
    def hostname(value):
        if not isinstance(value, str):
            return True
        labels = value.split(".")
        return all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label)
                   for label in labels)

    @checker.checks("ipv6", raises=ValueError)
    def ipv6(value):
        if not isinstance(value, str):
            return True
        ipaddress.IPv6Address(value)
        return "%" not in value

    @checker.checks("ipv4", raises=ValueError)
    def ipv4(value):
        if not isinstance(value, str):
            return True
        ipaddress.IPv4Address(value)
        return True

    @checker.checks("uuid")
    def uuid(value):
        return not isinstance(value, str) or bool(re.fullmatch(
            r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", value))

    @checker.checks("email")
    def email(value):
        if not isinstance(value, str):
            return True
        local, at, domain = value.rpartition("@")
        return bool(at and local and "." in domain and all(domain.split(".")))

    return checker


def main():
    sampler, corpus, work = sys.argv[1:4]
    try:
        import jsonschema
    except ImportError:
        print("python3-jsonschema not found: skipped")
        return SKIP
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "samples.jsonl")
    subprocess.run([sampler, corpus, out], check=True, timeout=900)
    schemas = {}
    with open(corpus) as f:
        for i, line in enumerate(f, 1):
            if line.strip() and not line.startswith("#"):
                schemas[i] = json.loads(line)
    checker = format_checker(jsonschema)
    failures, replies, incomplete = [], 0, 0
    with open(out) as f:
        for line in f:
            record = json.loads(line)
            n = record["line"]
            schema = schemas[n]
            if "refused" in record:
                failures.append(f"line {n}: refused: {record['refused']}")
                continue
            for prefix in record["dead_ends"]:
                failures.append(f"line {n}: dead end after {prefix!r}")
            incomplete += record["incomplete"]
            if not record["replies"]:
                failures.append(f"line {n}: no reply completed")
            if list(schema) == ["x-regex"]:
                pattern = re.compile(schema["x-regex"])
                for text in record["replies"]:
                    replies += 1
                    if not pattern.fullmatch(text):
                        failures.append(f"line {n}: {text!r} does not match")
                continue
            cls = jsonschema.validators.validator_for(schema,
                                                      default=jsonschema.Draft202012Validator)
            validator = cls(schema, format_checker=checker)
            for text in record["replies"]:
                replies += 1
                try:
                    value = json.loads(text)
                except ValueError as e:
                    failures.append(f"line {n}: not JSON ({e}): {text!r}")
                    continue
                errors = list(validator.iter_errors(value))
                if errors:
                    failures.append(f"line {n}: {text!r}: {errors[0].message}")
    print(f"{len(schemas)} schemas, {replies} replies checked, {incomplete} drawn past the "
          f"step bound")
    if failures:
        print(f"{len(failures)} failures:")
        for failure in failures[:50]:
            print("  " + failure)
        return 1
    print("every reply is valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
