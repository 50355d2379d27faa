"""PEFT's `rank_pattern` / `alpha_pattern` keys, matched as PEFT matches them and in bounded time.

PEFT (`peft.utils.other.get_pattern_key`) takes the first key, in the config's order, for which
`re.match(rf"(.*\\.)?({key})$", module)` succeeds. Python's backtracking matcher can take time
exponential in the module name's length on a key such as `(.*)*X`, so a crafted adapter config
could stall a merge. Here the same expression is parsed by Python's own regular-expression parser
(so a key is valid exactly when PEFT can use it) and run as a Thompson NFA: time linear in the
name's length times the expression's size, whatever the key. Keys needing more than a regular
language (backreferences, lookarounds, atomic groups, possessive repeats) or scoped flags are
refused by name; a rank pattern never needs them.
"""

from __future__ import annotations

from re import _constants as sre
from re import _parser

_MAX_PROGRAM = 20_000  # instructions; repeat counts expand, so `a{1000}{1000}` is refused, not built

_CHAR, _SPLIT, _JUMP, _AT, _MATCH = range(5)


class UnsupportedPattern(ValueError):
    """A valid expression that needs more than a regular language; the message names the feature."""


def compile_key(key: str) -> list[tuple]:
    """The program matching a module name as PEFT matches it against `key`. Raises re.error for
    an expression Python cannot parse, UnsupportedPattern for one this matcher does not run."""
    program: list[tuple] = []
    _emit(list(_parser.parse(rf"(.*\.)?({key})$")), program)  # global flags cannot follow the prefix
    program.append((_MATCH,))
    return program


def matches(program: list[tuple], name: str) -> bool:
    """Whether `re.match` of the program's expression succeeds on `name`, in O(len(name) * len(program))."""
    states = _closure(program, [0], name, 0)
    for pos, ch in enumerate(name):
        if any(program[pc][0] == _MATCH for pc in states):
            return True
        states = _closure(program, [pc + 1 for pc in states if program[pc][0] == _CHAR and program[pc][1](ch)],
                          name, pos + 1)
        if not states:
            return False
    return any(program[pc][0] == _MATCH for pc in states)


def _closure(program, pcs, name, pos) -> list[int]:
    """The states reachable from `pcs` without reading a character (each state once)."""
    seen, out, todo = set(), [], list(reversed(pcs))
    while todo:
        pc = todo.pop()
        if pc in seen:
            continue
        seen.add(pc)
        op = program[pc]
        if op[0] == _SPLIT:
            todo.extend((op[2], op[1]))
        elif op[0] == _JUMP:
            todo.append(op[1])
        elif op[0] == _AT:
            if _AT_TESTS[op[1]](name, pos):
                todo.append(pc + 1)
        else:
            out.append(pc)
    return out


def _emit(items: list, program: list[tuple]) -> None:
    for op, av in items:
        if len(program) > _MAX_PROGRAM:
            raise UnsupportedPattern(f"more than {_MAX_PROGRAM} states once its repeats are expanded")
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            program.append((_CHAR, _char_test(op, av)))
        elif op is sre.SUBPATTERN:
            group, add_flags, del_flags, body = av
            if add_flags or del_flags:
                raise UnsupportedPattern("scoped flags such as (?i:...)")
            _emit(list(body), program)
        elif op is sre.BRANCH:
            jumps = []
            for k, alternative in enumerate(av[1]):
                if k < len(av[1]) - 1:
                    split = len(program)
                    program.append(None)
                    _emit(list(alternative), program)
                    jumps.append(len(program))
                    program.append(None)
                    program[split] = (_SPLIT, split + 1, len(program))
                else:
                    _emit(list(alternative), program)
            for j in jumps:
                program[j] = (_JUMP, len(program))
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # greedy or lazy: the same set of names matches
            low, high, body = av
            for _ in range(low):
                _emit(list(body), program)
            if high == sre.MAXREPEAT:
                loop = len(program)
                program.append(None)
                _emit(list(body), program)
                program.append((_JUMP, loop))
                program[loop] = (_SPLIT, loop + 1, len(program))
            else:
                splits = []
                for _ in range(high - low):
                    splits.append(len(program))
                    program.append(None)
                    _emit(list(body), program)
                for s in splits:
                    program[s] = (_SPLIT, s + 1, len(program))
        elif op is sre.AT:
            if av not in _AT_TESTS:
                raise UnsupportedPattern(f"the anchor {av}")
            program.append((_AT, av))
        else:
            raise UnsupportedPattern(_UNSUPPORTED.get(op, str(op)))


_UNSUPPORTED = {sre.GROUPREF: "a backreference", sre.GROUPREF_EXISTS: "a conditional group",
                sre.ASSERT: "a lookahead or lookbehind", sre.ASSERT_NOT: "a lookahead or lookbehind",
                sre.ATOMIC_GROUP: "an atomic group (?>...)", sre.POSSESSIVE_REPEAT: "a possessive repeat"}


def _word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES = {  # as Python's matcher tests them on str patterns
    sre.CATEGORY_DIGIT: str.isdecimal, sre.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    sre.CATEGORY_SPACE: str.isspace, sre.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    sre.CATEGORY_WORD: _word, sre.CATEGORY_NOT_WORD: lambda ch: not _word(ch),
}


def _char_test(op, av):
    if op is sre.LITERAL:
        return lambda ch, c=chr(av): ch == c
    if op is sre.NOT_LITERAL:
        return lambda ch, c=chr(av): ch != c
    if op is sre.ANY:
        return lambda ch: ch != "\n"
    negate = bool(av) and av[0][0] is sre.NEGATE
    tests = []
    for kind, value in av[1:] if negate else av:
        if kind is sre.LITERAL:
            tests.append(lambda ch, c=chr(value): ch == c)
        elif kind is sre.RANGE:
            tests.append(lambda ch, lo=value[0], hi=value[1]: lo <= ord(ch) <= hi)
        elif kind is sre.CATEGORY and value in _CATEGORIES:
            tests.append(_CATEGORIES[value])
        else:
            raise UnsupportedPattern(f"the character class item {kind}")
    return lambda ch: any(t(ch) for t in tests) != negate


def _boundary(name: str, pos: int) -> bool:
    return (pos > 0 and _word(name[pos - 1])) != (pos < len(name) and _word(name[pos]))


_AT_TESTS = {
    sre.AT_BEGINNING: lambda name, pos: pos == 0,
    sre.AT_BEGINNING_STRING: lambda name, pos: pos == 0,
    sre.AT_END: lambda name, pos: pos == len(name) or (pos == len(name) - 1 and name[-1] == "\n"),
    sre.AT_END_STRING: lambda name, pos: pos == len(name),
    sre.AT_BOUNDARY: lambda name, pos: bool(name) and _boundary(name, pos),
    sre.AT_NON_BOUNDARY: lambda name, pos: bool(name) and not _boundary(name, pos),
}
