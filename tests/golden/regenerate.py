"""Rewrite golden_values.json from the current code (after a deliberate compute change).

    python -m tests.golden.regenerate
"""

import json
import tempfile

from megatron_ext.testing.distributed import run_distributed
from tests.golden.cases import GOLDEN_FILE, case_configs, run_case


def main() -> None:
    values = {}
    for name, config in case_configs().items():
        with tempfile.TemporaryDirectory() as run_dir:
            values[name] = run_distributed(run_case, 2, None, config=config, run_dir=run_dir, timeout=900)[0]
        print(f"{name}: {len(values[name])} steps, final loss {values[name][-1]['loss']!r}")
    GOLDEN_FILE.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN_FILE}")


if __name__ == "__main__":
    main()
