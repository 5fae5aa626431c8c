"""The README's "Read the code" path names code that exists: every `file.py: name` and every
backticked name in that section is a function, class or method defined in the project's files."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("model.py", "taps.py", "train.py", "eval.py")


def definitions(path: Path) -> set:
    """Top-level functions and classes of a file, and Class.method for their methods."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)}
    return names


def test_every_name_on_the_reading_path_exists():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Read the code", 1)[1].split("\n## ", 1)[0]
    defined = {f: definitions(ROOT / f) for f in FILES}
    everywhere = set().union(*defined.values())
    qualified = re.findall(r"`(\w+\.py): ([\w.]+)`", section)
    assert len(qualified) >= 9
    for file, name in qualified:
        assert name in defined[file], f"README names {file}: {name}, which {file} does not define"
    bare = [n for n in re.findall(r"`([A-Za-z_][\w.]*)`", section) if not n.endswith(".py")
            and "/" not in n]
    for name in bare:
        assert name in everywhere, f"README's reading path names `{name}`, defined nowhere"
