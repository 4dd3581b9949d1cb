"""The Go-style flag parser every flag-taking front end and module shares."""

from __future__ import annotations

import pytest

from zdut.common.durations import parse_duration
from zdut.common.flags import FlagError, go_quote, parse_flags

BOOLS = ("v", "keep-escapes")
VALUES = ("t", "eol")


def parse(*args: str) -> tuple[dict[str, bool], dict[str, str], list[str]]:
    p = parse_flags(list(args), BOOLS, VALUES, {"t": parse_duration})
    return p.switches, p.values, p.rest


@pytest.mark.parametrize("word", ["1", "t", "T", "TRUE", "true", "True"])
def test_boolean_true_words(word: str) -> None:
    assert parse(f"-v={word}")[0] == {"v": True}


@pytest.mark.parametrize("word", ["0", "f", "F", "FALSE", "false", "False"])
def test_boolean_false_words(word: str) -> None:
    assert parse("-v", f"--v={word}")[0] == {"v": False}  # the last one wins


@pytest.mark.parametrize("word", ["yes", "tRuE", "", "2", "on"])
def test_other_boolean_words_are_refused(word: str) -> None:
    with pytest.raises(FlagError) as err:
        parse(f"-keep-escapes={word}")
    assert str(err.value) == f"invalid boolean value {go_quote(word)} for -keep-escapes: parse error"


def test_a_boolean_never_takes_the_next_word() -> None:
    assert parse("-v", "false", "x") == ({"v": True}, {}, ["false", "x"])


def test_one_and_two_dashes_are_the_same_flag() -> None:
    assert parse("--v", "-keep-escapes")[0] == {"v": True, "keep-escapes": True}
    assert parse("--t", "1s")[1] == {"t": "1s"}


def test_value_flags_take_the_next_word_or_equals() -> None:
    assert parse("-t", "5s", "-eol=crlf", "expect", "x") == ({}, {"t": "5s", "eol": "crlf"}, ["expect", "x"])
    assert parse("-eol", "-v")[1] == {"eol": "-v"}  # the next word even if it looks like a flag
    assert parse("-eol=")[1] == {"eol": ""}
    assert parse("-eol=a=b")[1] == {"eol": "a=b"}


def test_missing_value() -> None:
    with pytest.raises(FlagError, match=r"^flag needs an argument: -eol$"):
        parse("-v", "-eol")


def test_check_failure_is_worded_like_go() -> None:
    with pytest.raises(FlagError) as err:
        parse("-t", "soon")
    assert str(err.value) == 'invalid value "soon" for flag -t: parse error'


def test_unknown_flag() -> None:
    with pytest.raises(FlagError, match=r"^flag provided but not defined: -x$"):
        parse("-v", "--x=1", "-t")


@pytest.mark.parametrize("arg", ["---v", "-=v", "--=", "-=", "---"])
def test_bad_syntax(arg: str) -> None:
    with pytest.raises(FlagError) as err:
        parse(arg)
    assert str(err.value) == f"bad flag syntax: {arg}"


def test_double_dash_ends_flags_and_is_dropped() -> None:
    assert parse("-v", "--", "-t", "--") == ({"v": True}, {}, ["-t", "--"])


def test_first_operand_ends_flags() -> None:
    assert parse("send", "-v") == ({}, {}, ["send", "-v"])
    assert parse("-", "-v") == ({}, {}, ["-", "-v"])  # "-" alone is an operand
    assert parse("") == ({}, {}, [""])
    assert parse() == ({}, {}, [])


def test_help_unless_defined() -> None:
    for arg in ("-h", "--help", "-help=1"):
        with pytest.raises(FlagError, match=r"^flag: help requested$"):
            parse(arg)
    assert parse_flags(["-h", "x"], booleans=("h",)).switches == {"h": True}


def test_no_flags_defined() -> None:
    assert parse_flags(["a", "-b"]).rest == ["a", "-b"]
    with pytest.raises(FlagError, match=r"^flag provided but not defined: -b$"):
        parse_flags(["-b", "a"])


def test_go_quote() -> None:
    assert go_quote('a"b\\c\n\x01é\u200b') == '"a\\"b\\\\c\\n\\x01é\\u200b"'
