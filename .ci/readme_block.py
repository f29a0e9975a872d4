"""Print the first ```bash block under a README heading: what .ci/run executes (the README's exact commands)."""
import re
import sys
from pathlib import Path


def block(readme: str, heading: str) -> str:
    section = re.search(rf"^#+ {re.escape(heading)}\s*$(.*?)(?=^#+ |\Z)", readme, re.M | re.S)
    if section is None:
        raise SystemExit(f"README has no heading {heading!r}")
    code = re.search(r"^```bash\n(.*?)^```", section.group(1), re.M | re.S)
    if code is None:
        raise SystemExit(f"README's {heading!r} section has no ```bash block")
    return code.group(1)


if __name__ == "__main__":
    sys.stdout.write(block(Path(sys.argv[1]).read_text(), sys.argv[2]))
