#!/usr/bin/env python3
"""The top-level module graph of the errand crate, from its `crate::` paths.

Prints one line per module: the modules it uses. Exits 1 when the graph has
a cycle (and prints it), so CI keeps the layering honest. A module is a
file or folder directly under src/ (`src/agent/`, `src/audit.rs`); uses
inside a module, and test modules (`#[cfg(test)] mod tests` to the end of
the file), do not count.

    python3 scripts/modgraph.py            # the graph, exit 1 on a cycle
    python3 scripts/modgraph.py --dot      # Graphviz
"""
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
GROUP = re.compile(r"\buse\s+crate::\{([^;]*)\}", re.S)


def module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".rs")


def code(text: str) -> str:
    """The file without its unit tests and comments."""
    cut = re.search(r"^#\[cfg\(test\)\]\s*\n\s*mod \w+", text, re.M)
    if cut:
        text = text[: cut.start()]
    return "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))


def graph() -> dict:
    mods = {module_of(p) for p in SRC.glob("*") if p.suffix == ".rs" or p.is_dir()}
    mods -= {"lib", "main"}
    edges = {m: set() for m in mods}
    for p in SRC.rglob("*.rs"):
        src = module_of(p)
        if src not in mods:
            continue
        text = code(p.read_text(encoding="utf-8"))
        used = set(PATH.findall(text))
        for g in GROUP.findall(text):
            used |= {part.strip().split("::")[0] for part in g.split(",") if part.strip()}
        edges[src] |= {u for u in used if u in mods and u != src}
    return edges


def cycle(edges: dict):
    """One cycle as a list of modules, or None."""
    state = {}
    stack = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def main() -> int:
    edges = graph()
    if "--dot" in sys.argv:
        print("digraph errand {")
        for m in sorted(edges):
            for n in sorted(edges[m]):
                print(f'  "{m}" -> "{n}";')
        print("}")
    else:
        for m in sorted(edges):
            print(f"{m:<10} -> {', '.join(sorted(edges[m])) or '(nothing)'}")
    c = cycle(edges)
    if c:
        print("module cycle: " + " -> ".join(c), file=sys.stderr)
        return 1
    print("no cycles between top-level modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
