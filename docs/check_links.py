"""Check that relative markdown links in README.md, docs/*.md and results/measured-runs.md resolve to files and anchors."""
import re, sys, unicodedata
from pathlib import Path

root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
files = [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "results" / "measured-runs.md"]

def slug(text):
    text = re.sub(r"`([^`]*)`", r"\1", text)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")

def anchors(path):
    seen, out, fence = {}, set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        if fence:
            continue
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            s = slug(m.group(1)); n = seen.get(s, 0); seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out

bad = 0
for f in files:
    text = f.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", lambda m: "" if "](" not in m.group(0) else m.group(0), text)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (f.parent / path).resolve() if path else f
        if not dest.exists():
            print(f"{f.relative_to(root)}: missing file {target}"); bad += 1; continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            print(f"{f.relative_to(root)}: missing anchor {target}"); bad += 1
# every docs page linked from README
readme = (root / "README.md").read_text()
for f in sorted((root / "docs").glob("*.md")):
    if f"](docs/{f.name})" not in readme:
        print(f"README.md: docs/{f.name} not linked"); bad += 1
print(f"{bad} problem(s) in {len(files)} files")
sys.exit(1 if bad else 0)
