"""Compare the SASS of every kernel in two builds of the CUDA library (no GPU needed).

    python benchmarks/cuda_sass_diff.py OLD.so NEW.so [--arch 80,90] [--diff 40] [--cuobjdump PATH] [--all]

(Any file `cuobjdump -sass` reads will do, a `.cubin` or `.o` too: compiling one translation unit with
`nvcc -cubin` and comparing it against the full library is a quick check while editing one file.)

A refactoring of `csrc/` that must not touch the numerical code is checked by dumping both libraries with
`cuobjdump -sass` and comparing each kernel's instructions, per architecture. What is not compared, because it
legitimately differs between two builds of the same kernels: the fatbin section headers (source path, section
order), each instruction's address comment (offsets inside the function; a relative branch target stays in the
instruction and is compared), the order of the functions, and how many translation units carry a copy of a
kernel. The 64-bit encoding words are compared: they hold the scheduling control bits (stalls, barriers) that the
text does not show.

Kernels are matched by mangled name. A kernel whose name appears in only one library is paired with the one
kernel of the other library that has the same demangled name once template arguments are removed (a template
parameter that was dropped, say `build_tok_kernel<0>` that became `build_tok_kernel`), if there is exactly one
such candidate on each side; its body is then compared like any other.

Prints one line per (architecture, kernel): `identical`, `DIFFERENT`, `only in OLD` or `only in NEW` (with
`--all`; by default only the kernels that are not identical, and a summary). Exit status 0 when every kernel of
both libraries is present in both and identical, else 1.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

_ADDR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s*")
_ENCODING = re.compile(r"^\s*/\* 0x[0-9a-f]{16} \*/\s*$")
_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")
_ARCH = re.compile(r"^(?:arch = |\s*code for )sm_(\d+)\s*$")


def find_cuobjdump(explicit: str | None = None) -> str:
    """`--cuobjdump`, else `$CUDA_HOME/bin`, `/usr/local/cuda/bin`, `PATH`, and last the copy Triton ships."""
    candidates = [explicit] if explicit else []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    candidates.append(shutil.which("cuobjdump"))
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise SystemExit("cuobjdump not found: pass --cuobjdump or set CUDA_HOME")


def parse_sass(text: str) -> dict[tuple[int, str], list[tuple[str, ...]]]:
    """`{(sm, mangled name): [normalised body, one per copy in the library]}`."""
    kernels: dict[tuple[int, str], list[tuple[str, ...]]] = defaultdict(list)
    arch = None
    name = None
    body: list[str] = []

    def close():
        if name is not None:
            kernels[(arch, name)].append(tuple(body))

    for line in text.splitlines():
        m = _ARCH.match(line)
        if m or (line and not line[0].isspace()):  # a section header ends the function before it
            close()
            name, body = None, []
            if m:
                arch = int(m.group(1))
            continue
        m = _FUNCTION.match(line)
        if m:
            close()
            name, body = m.group(1), []
            continue
        if name is None:
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith(".headerflags") or set(stripped) == {"."}:
            continue
        if _ENCODING.match(line):
            body.append(stripped)
            continue
        body.append(" ".join(_ADDR.sub("", line).split()).replace(name, "<self>"))
    close()
    return dict(kernels)


def dump(lib: Path, cuobjdump: str) -> dict[tuple[int, str], list[tuple[str, ...]]]:
    res = subprocess.run([cuobjdump, "-sass", str(lib)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{cuobjdump} -sass {lib} failed: {res.stderr.strip()}")
    return parse_sass(res.stdout)


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, res.stdout.splitlines(), strict=True))


def _strip_templates(demangled: str) -> str:
    """`void ns::f<0>(ns::P)` -> `ns::f(ns::P)`: the template arguments and the return type (which only a
    function template's mangled name carries) removed."""
    out, depth = [], 0
    for ch in demangled:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    plain = "".join(out)
    m = re.match(r"^(?:.*?\s)?([^\s(]+\(.*\))$", plain)
    return m.group(1) if m else plain


def pair_renamed(only_old: list[str], only_new: list[str]) -> list[tuple[str, str]]:
    """Pairs (old, new) of unmatched names equal once template arguments are removed, one candidate a side."""
    plain = {n: _strip_templates(d) for n, d in demangle(only_old + only_new).items()}
    by_key_old, by_key_new = defaultdict(list), defaultdict(list)
    for n in only_old:
        by_key_old[plain[n]].append(n)
    for n in only_new:
        by_key_new[plain[n]].append(n)
    return [(by_key_old[k][0], by_key_new[k][0]) for k in by_key_old
            if len(by_key_old[k]) == 1 and len(by_key_new.get(k, ())) == 1]


def compare(old: dict, new: dict, archs: set[int] | None) -> list[tuple[int, str, str, list[str]]]:
    """Rows `(sm, label, verdict, diff lines)` sorted by architecture and name."""
    rows = []
    for sm in sorted({a for a, _ in old} | {a for a, _ in new}):
        if archs and sm not in archs:
            continue
        names_old = {n for a, n in old if a == sm}
        names_new = {n for a, n in new if a == sm}
        pairs = [(n, n) for n in sorted(names_old & names_new)]
        renamed = pair_renamed(sorted(names_old - names_new), sorted(names_new - names_old))
        pairs += renamed
        paired_old = {o for o, _ in pairs}
        paired_new = {n for _, n in pairs}
        for o, n in pairs:
            bodies_old, bodies_new = set(old[(sm, o)]), set(new[(sm, n)])
            label = o if o == n else f"{o} -> {n}"
            if len(bodies_old) > 1 or len(bodies_new) > 1:
                rows.append((sm, label, "DIFFERENT (copies differ within one library)", []))
            elif bodies_old == bodies_new:
                rows.append((sm, label, "identical", []))
            else:
                a, b = next(iter(bodies_old)), next(iter(bodies_new))
                diff = list(difflib.unified_diff(a, b, "old", "new", n=2, lineterm=""))
                rows.append((sm, label, f"DIFFERENT ({len(a)} vs {len(b)} lines)", diff))
        rows += [(sm, o, "only in OLD", []) for o in sorted(names_old - paired_old)]
        rows += [(sm, n, "only in NEW", []) for n in sorted(names_new - paired_new)]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--arch", default="", help="comma-separated compute capabilities to compare (default: all)")
    ap.add_argument("--diff", type=int, default=0, metavar="N", help="print up to N diff lines per different kernel")
    ap.add_argument("--all", action="store_true", help="one line per kernel, identical ones included")
    ap.add_argument("--cuobjdump", default=None)
    args = ap.parse_args(argv)
    tool = find_cuobjdump(args.cuobjdump)
    archs = {int(a) for a in args.arch.replace(";", ",").split(",") if a.strip()}
    rows = compare(dump(args.old, tool), dump(args.new, tool), archs or None)
    bad = 0
    for sm, label, verdict, diff in rows:
        ok = verdict == "identical"
        bad += not ok
        if args.all or not ok:
            print(f"sm_{sm}  {verdict:<12}  {label}")
        if diff and args.diff:
            print("\n".join(diff[: args.diff]))
    per_arch = defaultdict(lambda: [0, 0])
    for sm, _, verdict, _ in rows:
        per_arch[sm][0] += verdict == "identical"
        per_arch[sm][1] += 1
    for sm, (same, total) in sorted(per_arch.items()):
        print(f"sm_{sm}: {same}/{total} kernels identical")
    if not rows:
        print("no kernels found", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
